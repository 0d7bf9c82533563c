"""Face analysis for InstantID: detection, the largest face, ArcFace embeddings, identity scores.

A thin wrapper over insightface's SCRFD detector and ArcFace recognizer (antelopev2 in production,
any insightface detector/recognizer pair in tests). Only those two models are built: InstantID needs
the box, the five keypoints and the raw 512-d embedding, nothing from the landmark or gender/age
models that ship in the same folder.

No torch here: the command line's `faces` sub-command and the UI's face preview import this module.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ..errors import CheckpointError, NoFaceError
from .face_models import EXPECTED_FILES, find_face_models
from .geometry import drawn_face_box

DETECTION_MAX_SIDE = 1536
MIN_FACE_WIDTH = 32
# A strip (a side more than STRIP_ASPECT times the other) scaled by its long side alone would shrink its
# faces out of the detector's sight (a 214 px face in a 7999 x 401 strip came to 17 px at 640): its short
# side keeps 1/STRIP_ASPECT of the detector's size (and of DETECTION_MAX_SIDE when shrunk), the long side
# growing with it up to STRIP_MAX_STRETCH times the size; the images allowed (20:1) fit within that.
STRIP_ASPECT = 4
STRIP_MAX_STRETCH = 5

# The request path detects at this size first (see FaceAnalyzer._detect_boxes_coarse_first), and falls
# back to the full det_size when the largest face spans fewer than COARSE_MIN_FACE detector pixels.
COARSE_DET_SIZE = 320
COARSE_MIN_FACE = 48
# A face found too small is looked at again in a crop around it, at the detector size that shows it this
# many pixels wide: the recognizer's own input size, so the keypoints are as precise as its crop needs.
FACE_SCALE_PX = 112
FACE_CROP_FACTOR = 2.0  # crop side / face side: the face fills half the crop, as in a portrait photo
# The request path's analyses of the last photos, by their pixels: "generate again" with the same photo (a
# new prompt, seed or mode) costs no detection and no recognition (a ResNet-100 pass, ~120 ms on 2 cores).
PHOTO_CACHE_SIZE = 16

@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in the coordinates of the image it was found in."""

    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2
    kps: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth corner, right mouth corner
    det_score: float
    # Raw ArcFace output, not L2-normalised: InstantID's resampler was trained on raw embeddings.
    embedding: np.ndarray | None = None

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def copy(self) -> Face:
        """A copy whose arrays the caller may change."""
        embedding = None if self.embedding is None else self.embedding.copy()
        return replace(self, kps=self.kps.copy(), embedding=embedding)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types for the command line and the API (no embedding: it is 512 numbers of noise)."""
        return {
            "bbox": [round(float(v), 2) for v in self.bbox],
            "kps": [[round(float(x), 2), round(float(y), 2)] for x, y in self.kps],
            "score": round(float(self.det_score), 4),
        }


# --- the analyzer --------------------------------------------------------------------------------


def usable_cpus() -> int:
    """CPUs this process can really use: its affinity, capped by a cgroup v2 CPU quota if there is one.

    A container limited by quota (as Spaces and most Kubernetes pods are) still sees every host CPU in
    os.cpu_count() and in its affinity; a thread pool sized to those is throttled, not faster.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity is the limit
    return max(1, count)


def _session_options() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # onnxruntime's worker threads spin between runs by default; on a small shared CPU that spinning
    # steals the cores torch needs next (measured: bench overhead, ~35 ms per request on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # onnxruntime sizes its pool by the host's physical cores, blind to a container's CPU quota.
    options.intra_op_num_threads = usable_cpus()
    options.inter_op_num_threads = 1  # the graphs run sequentially: a second pool would only idle
    return options


def _letterboxed(hw: tuple[int, int], input_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) the insightface detector resizes an image of `hw` to inside its `input_size`."""
    # The same arithmetic as insightface's SCRFD.detect, so the guard agrees with it to the pixel.
    im_ratio = float(hw[0]) / hw[1]
    if im_ratio > float(input_size[1]) / input_size[0]:
        return int(input_size[1] / im_ratio), input_size[1]
    return input_size[0], int(input_size[0] * im_ratio)


def _detector_input(hw: tuple[int, int], det_size: int) -> tuple[int, int]:
    """(width, height) of the detector input for an image of `hw` (height, width) at `det_size`.

    `det_size` on the long side, as in insightface's square letterbox, but the short side only as long
    as the image needs (rounded up to SCRFD's stride of 32): the square's padding was computed too, a
    third of a landscape photo's detection. The scale, and so every box, is the square's; except for a
    strip, whose long side grows (up to STRIP_MAX_STRETCH x det_size) so that its short side keeps
    det_size / STRIP_ASPECT: a strip's faces are as tall as its short side at most.
    """
    height, width = hw
    ratio = max(height, width) / max(1, min(height, width))
    long = min(det_size * STRIP_MAX_STRETCH, max(det_size, math.ceil(det_size / STRIP_ASPECT * ratio / 32) * 32))
    short = min(long, max(32, math.ceil(long / ratio / 32) * 32))
    return (long, short) if width >= height else (short, long)


def _shrunk(bgr: np.ndarray) -> np.ndarray:
    """`bgr` with its long side at most DETECTION_MAX_SIDE: the detector letterboxes to det_size anyway,
    and shrinking a 50 MP photo first (with area averaging, no aliasing) is much cheaper. A strip keeps a
    short side of DETECTION_MAX_SIDE / STRIP_ASPECT (see `_detector_input`)."""
    height, width = bgr.shape[:2]
    long_limit = DETECTION_MAX_SIDE / max(height, width)
    scale = min(1.0, max(long_limit, DETECTION_MAX_SIDE / STRIP_ASPECT / min(height, width)))
    if scale >= 1.0:
        return bgr
    return cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def _placed(
    boxes: np.ndarray,
    kps: np.ndarray,
    image_hw: tuple[int, ...],
    scale: tuple[float, float],
    shift: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Detections mapped into the image (x * scale + shift per axis), clipped to it, largest box first."""
    height, width = image_hw[:2]
    for axis in (0, 1):
        boxes[:, [axis, axis + 2]] = boxes[:, [axis, axis + 2]] * scale[axis] + shift[axis]
        kps[:, :, axis] = kps[:, :, axis] * scale[axis] + shift[axis]
    # Clip boxes to the image: the padded pass (and a crop's edge) can place them partly outside.
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
    return boxes[order], kps[order]


def _crop_around(box: Sequence[float], hw: tuple[int, ...], factor: float) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): a square `factor` times the box's long side, centred on it, kept inside the image."""
    height, width = hw[:2]
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    side = max(x2 - x1, y2 - y1) * factor
    left = max(0.0, min((x1 + x2 - side) / 2, width - side))
    top = max(0.0, min((y1 + y2 - side) / 2, height - side))
    return int(left), int(top), min(width, math.ceil(left + side)), min(height, math.ceil(top + side))


def _to_bgr(image: Any) -> np.ndarray:
    # insightface models expect OpenCV's BGR order; cvtColor is a fast contiguous copy.
    return cv2.cvtColor(_as_rgb_array(image), cv2.COLOR_RGB2BGR)


def _as_rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected an RGB uint8 array or a PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array of shape (height, width, 3), got {image.dtype} {image.shape}")
    return image


class FaceAnalyzer:
    """insightface detection + recognition, built once and safe to share between threads."""

    def __init__(
        self,
        model_dir: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        det_size: int = 640,
        det_thresh: float = 0.5,
    ) -> None:
        from insightface.model_zoo import get_model

        self.model_dir = Path(model_dir)
        self.detector_path, self.recognizer_path = find_face_models(self.model_dir)
        # Explicit providers: left to itself onnxruntime-gpu tries CUDA and prints library errors on CPU.
        self.providers = tuple(providers)
        # SCRFD's feature strides go up to 32; other sizes misalign its anchor grid.
        self.det_size = max(32, int(det_size) // 32 * 32)
        # One dynamic-shape session for every input size: insightface would otherwise build (and keep) a
        # session per size, and the detector's input follows each photo's shape. Measured: same speed.
        self._det = get_model(
            str(self.detector_path),
            providers=list(self.providers),
            sess_options=_session_options(),
            static_shape_sessions=False,
        )
        self._rec = get_model(
            str(self.recognizer_path), providers=list(self.providers), sess_options=_session_options()
        )
        if getattr(self._det, "taskname", None) != "detection" or not getattr(self._det, "use_kps", False):
            raise CheckpointError(
                f"{self.detector_path} is not a face detector that predicts the 5 facial keypoints "
                f"InstantID needs: the folder must hold {EXPECTED_FILES}."
            )
        if getattr(self._rec, "taskname", None) != "recognition":
            raise CheckpointError(
                f"{self.recognizer_path} is not a face recognition model: the folder must hold {EXPECTED_FILES}."
            )
        # ctx_id 0 keeps the providers given above (a negative id would force the CPU).
        self._det.prepare(0, input_size=(self.det_size, self.det_size), det_thresh=det_thresh)
        self._rec.prepare(0)
        self._lock = threading.RLock()
        # Keyed by a digest of the pixels, never the file name: equal keys mean equal photos. The entries are
        # embeddings (2 KB each), reachable only by sending the same photo again.
        self._photos: OrderedDict[tuple[tuple[int, ...], bytes], tuple[Face, int]] = OrderedDict()

    def clear_cache(self) -> None:
        """Forget the analysed photos (`embed_largest` analyses the next ones afresh)."""
        with self._lock:
            self._photos.clear()

    def __repr__(self) -> str:
        return (
            f"FaceAnalyzer(detector={self.detector_path.name!r}, recognizer={self.recognizer_path.name!r}, "
            f"det_size={self.det_size}, providers={list(self.providers)!r})"
        )

    def _run_detector(self, bgr: np.ndarray, det_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        size = _detector_input(bgr.shape[:2], det_size or self.det_size)
        # insightface 2.1 may run several input sizes (or a model's fixed one) for one call.
        resolve = getattr(self._det, "_resolve_input_sizes", lambda s: [s or self._det.input_size])
        if any(min(_letterboxed(bgr.shape[:2], tuple(s))) < 1 for s in resolve(size)):
            # The detector would scale the short side to zero pixels and OpenCV would assert: no face fits.
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        boxes, kps = self._det.detect(bgr, input_size=size, max_num=0)
        if kps is None:
            kps = np.zeros((len(boxes), 5, 2), np.float32)
        return np.asarray(boxes, np.float32).reshape(-1, 5), np.asarray(kps, np.float32).reshape(-1, 5, 2)

    def _detect_boxes(self, bgr: np.ndarray, det_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        small = _shrunk(bgr)
        boxes, kps = self._run_detector(small, det_size)
        offset = 0
        if len(boxes) == 0:
            # SCRFD misses faces that fill the whole frame (tight crops, passport photos); a border
            # gives it the context it was trained with. Costs a second pass only when the first failed.
            # At most half the short side: a strip's faces fill its short side, and a border of a quarter
            # of its long side would shrink them out of sight again.
            offset = min(max(small.shape[:2]) // 4, min(small.shape[:2]) // 2)
            padded = cv2.copyMakeBorder(small, *(offset,) * 4, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            boxes, kps = self._run_detector(padded, det_size)
        sx, sy = bgr.shape[1] / small.shape[1], bgr.shape[0] / small.shape[0]
        return _placed(boxes, kps, bgr.shape[:2], (sx, sy), (-offset * sx, -offset * sy))

    def _detect_at_face_scale(
        self, bgr: np.ndarray, face_box: Sequence[float], max_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Faces in a crop around `face_box`, detected at the size that shows that face FACE_SCALE_PX wide.

        Detection cost grows with the detector's input area, not the photo's: a small face in a large photo
        needs a large input to be seen whole-frame, and only a small one when the crop is its own context.
        """
        side = max(float(face_box[2]) - float(face_box[0]), float(face_box[3]) - float(face_box[1]))
        x1, y1, x2, y2 = _crop_around(face_box, bgr.shape[:2], FACE_CROP_FACTOR)
        if side < 1 or x2 - x1 < 2 or y2 - y1 < 2:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        size = min(max_size, max(64, math.ceil(FACE_SCALE_PX * max(x2 - x1, y2 - y1) / side / 32) * 32))
        crop = np.ascontiguousarray(bgr[y1:y2, x1:x2])
        boxes, kps = self._run_detector(crop, size)
        return _placed(boxes, kps, bgr.shape[:2], (1.0, 1.0), (x1, y1))

    def _embed(self, bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        from insightface.utils import face_align

        # Alignment on the full-resolution photo: the 112 px crop keeps every detail the photo has.
        with warnings.catch_warnings():
            # insightface's alignment calls a scikit-image API deprecated in 0.26: noise to our users, and
            # fatal under `-W error`. Racing threads can at worst leave this same narrow filter installed.
            warnings.filterwarnings("ignore", message=".*`estimate` is deprecated", category=FutureWarning)
            crop = face_align.norm_crop(bgr, landmark=kps, image_size=self._rec.input_size[0])
        return np.asarray(self._rec.get_feat(crop), np.float32).reshape(-1).copy()

    def detect(
        self,
        image: np.ndarray | Image.Image,
        *,
        with_embedding: bool = True,
        only_largest: bool = False,
        det_size: int | None = None,
    ) -> list[Face]:
        """Faces in an RGB uint8 image, largest box first.

        With `only_largest`, every face is returned but only the first (largest) one carries an embedding:
        the pipeline uses only it.
        `det_size` overrides the detector's input size for this call (a multiple of 32).
        """
        if det_size is not None:
            det_size = max(32, int(det_size) // 32 * 32)
        bgr = _to_bgr(image)
        with self._lock:
            boxes, kps = self._detect_boxes(bgr, det_size)
            faces = []
            for i in range(len(boxes)):
                embedding = None
                if with_embedding and (i == 0 or not only_largest):
                    embedding = self._embed(bgr, kps[i])
                x1, y1, x2, y2, score = (float(v) for v in boxes[i])
                faces.append(Face((x1, y1, x2, y2), kps[i].copy(), score, embedding))
        return faces

    def largest_face(
        self, image: np.ndarray | Image.Image, *, near: Sequence[float] | None = None, det_size: int | None = None
    ) -> Face | None:
        """The largest face with its embedding, or None; looked for around `near` (a box) first if given.

        With `near`, a crop around that box is searched at the face's own scale (see
        `_detect_at_face_scale`, capped at `det_size`); the whole image at `det_size` only if it holds none.
        """
        bgr = _to_bgr(image)
        size = max(32, int(det_size or self.det_size) // 32 * 32)
        with self._lock:
            boxes, kps = self._detect_at_face_scale(bgr, near, size) if near is not None else ((), ())
            if len(boxes) == 0:
                boxes, kps = self._detect_boxes(bgr, size)
            if len(boxes) == 0:
                return None
            embedding = self._embed(bgr, kps[0])
        x1, y1, x2, y2, score = (float(v) for v in boxes[0])
        return Face((x1, y1, x2, y2), kps[0].copy(), score, embedding)

    def face_at(
        self, image: np.ndarray | Image.Image, box: Sequence[float], *, det_size: int | None = None
    ) -> Face | None:
        """The face at `box` (x1, y1, x2, y2) with its embedding, or None when no face is there.

        Only a face centred inside `box` counts (the one that overlaps it most): a neighbour in the crop
        searched around it, however large, is another face, never a stand-in for this one.
        """
        bgr = _to_bgr(image)
        size = max(32, int(det_size or self.det_size) // 32 * 32)
        x1, y1, x2, y2 = (float(v) for v in box[:4])
        with self._lock:
            boxes, kps = self._detect_at_face_scale(bgr, (x1, y1, x2, y2), size)
            best, best_overlap = -1, 0.0
            for i, (bx1, by1, bx2, by2, _) in enumerate(boxes):
                if not (x1 <= (bx1 + bx2) / 2 <= x2 and y1 <= (by1 + by2) / 2 <= y2):
                    continue
                overlap = max(0.0, min(x2, bx2) - max(x1, bx1)) * max(0.0, min(y2, by2) - max(y1, by1))
                if overlap > best_overlap:
                    best, best_overlap = i, overlap
            if best < 0:
                return None
            embedding = self._embed(bgr, kps[best])
        bx1, by1, bx2, by2, score = (float(v) for v in boxes[best])
        return Face((bx1, by1, bx2, by2), kps[best].copy(), score, embedding)

    def _detect_boxes_coarse_first(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes for the request path: a quick pass at `COARSE_DET_SIZE`, then only what the face needs.

        A face photo for InstantID is a portrait: its face is found at a quarter of the detector's pixels,
        with keypoints as good as at full size. When the largest face is too small there for precise
        keypoints (a full-body shot, a group photo), it is detected again in a crop around it, at its own
        scale, instead of the whole photo at full size: on insightface's t1 group photo a 256 x 256 input
        instead of 640 x 448, with the face seen at 112 px instead of 70. The full `det_size` pass runs
        only when the quick pass finds no face at all.
        """
        if self.det_size <= COARSE_DET_SIZE:
            return self._detect_boxes(bgr)
        small = _shrunk(bgr)
        boxes, kps = self._run_detector(small, COARSE_DET_SIZE)
        if len(boxes) == 0:
            return self._detect_boxes(bgr)
        sx, sy = bgr.shape[1] / small.shape[1], bgr.shape[0] / small.shape[0]
        boxes, kps = _placed(boxes, kps, bgr.shape[:2], (sx, sy), (0.0, 0.0))
        if (boxes[0, 2] - boxes[0, 0]) * COARSE_DET_SIZE / max(bgr.shape[:2]) >= COARSE_MIN_FACE:
            return boxes, kps
        near, near_kps = self._detect_at_face_scale(bgr, boxes[0], self.det_size)
        if len(near) == 0:
            return self._detect_boxes(bgr)
        # The largest face's sharper detection replaces its coarse one; the others only count.
        boxes[0], kps[0] = near[0], near_kps[0]
        return boxes, kps

    def embed_largest(self, image: np.ndarray | Image.Image, *, what: str = "face photo") -> tuple[Face, int]:
        """The largest face with its embedding, and how many faces the photo holds.

        Raises `NoFaceError` when there is no face, or when the largest one is too small to identify. The
        last `PHOTO_CACHE_SIZE` photos' answers are kept: the same pixels again are not analysed again.
        """
        bgr = _to_bgr(image)
        # blake2b reads ~1 GB/s: 3 ms for a 1024 px photo, against 150 ms and more to analyse it.
        key = (bgr.shape, hashlib.blake2b(memoryview(np.ascontiguousarray(bgr)), digest_size=32).digest())
        with self._lock:
            if key in self._photos:
                self._photos.move_to_end(key)
                face, count = self._photos[key]
                return face.copy(), count
            boxes, kps = self._detect_boxes_coarse_first(bgr)
            if len(boxes) == 0:
                raise NoFaceError(
                    f"No face found in the {what}: use a photo where the face is clearly visible, facing the "
                    "camera and not cropped too tightly."
                )
            x1, y1, x2, y2, score = (float(v) for v in boxes[0])
            # Checked before the embedding is computed: a face this small carries no usable identity.
            if x2 - x1 < MIN_FACE_WIDTH:
                raise NoFaceError(
                    f"The face in the {what} is too small ({x2 - x1:.0f} pixels wide): use a photo where the "
                    f"face is at least {MIN_FACE_WIDTH} pixels wide, or crop closer to it."
                )
            embedding = self._embed(bgr, kps[0])
            face = Face((x1, y1, x2, y2), kps[0].copy(), score, embedding)
            self._photos[key] = face.copy(), len(boxes)
            if len(self._photos) > PHOTO_CACHE_SIZE:
                self._photos.popitem(last=False)
        return face, len(boxes)


# --- embeddings ----------------------------------------------------------------------------------


# Generated faces are large (InstantID draws the face from a keypoint layout sized to the photo's face),
# so the output check detects at a quarter of the pixels of the input analysis.
IDENTITY_DET_SIZE = 320


def identity_similarity(
    analyzer: FaceAnalyzer,
    reference: np.ndarray,
    image: np.ndarray | Image.Image,
    keypoint_image: Image.Image | None = None,
    *,
    at: Sequence[float] | None = None,
) -> float | None:
    """Cosine between `reference` and the largest face in a generated image; None when it has no face.

    With the `keypoint_image` the image was generated from, the face is looked for where it was drawn,
    at its own scale (one small detection); the whole image is searched only if it is not there.
    With `at` (a box: the face a swap redrew), only the face there is scored, and None when there is none:
    the other faces of a swap's target are the photo's own, and scoring one of them would say nothing of
    the swap.
    """
    rgb = _as_rgb_array(image)
    if at is not None:
        face = analyzer.face_at(rgb, at, det_size=IDENTITY_DET_SIZE)
    else:
        near = drawn_face_box(keypoint_image, (rgb.shape[1], rgb.shape[0])) if keypoint_image is not None else None
        face = analyzer.largest_face(rgb, near=near, det_size=IDENTITY_DET_SIZE)
    if face is None or face.embedding is None:
        return None
    return round(cosine_similarity(reference, face.embedding), 4)


def average_embedding(embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of several raw face embeddings (one identity from several photos).

    The raw vectors are averaged, not normalised ones: InstantID's resampler was trained on raw
    ArcFace embeddings, whose norm it sees too, so the mean must stay in that space.
    """
    if len(embeddings) == 0:
        raise ValueError("average_embedding needs at least one embedding")
    vectors = [np.asarray(e, dtype=np.float32) for e in embeddings]
    first = vectors[0].reshape(-1).shape
    for i, v in enumerate(vectors):
        if v.ndim not in (1, 2) or (v.ndim == 2 and v.shape[0] != 1) or v.reshape(-1).shape != first:
            raise ValueError(f"embedding {i} has shape {v.shape}; expected {first} like embedding 0")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"embedding {i} holds non-finite values")
    return np.mean(np.stack([v.reshape(-1) for v in vectors]), axis=0).astype(np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two embeddings (1 = same direction); 0.0 if either is all zeros."""
    va = np.asarray(a, dtype=np.float64).reshape(-1)
    vb = np.asarray(b, dtype=np.float64).reshape(-1)
    if va.shape != vb.shape:
        raise ValueError(f"embeddings differ in size: {va.shape} vs {vb.shape}")
    na, nb = float(np.linalg.norm(va)), float(np.linalg.norm(vb))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(va, vb) / (na * nb))


@dataclass(frozen=True)
class PersonMatch:
    """The face of a generated image matched to one person: its similarity to that person and its margin, that
    similarity minus its best similarity to another person of the request (None with one person alone).
    `nearest_other` is the index of that other person. A negative margin means the face looks more like someone
    else: the identities mixed."""

    similarity: float
    margin: float | None = None
    nearest_other: int | None = None


def match_people_detail(
    analyzer: FaceAnalyzer, references: Sequence[np.ndarray], image: np.ndarray | Image.Image
) -> list[PersonMatch | None]:
    """Each person's matched face in a generated image, in person order: every face found is compared with
    every person, and the most similar pair is matched first, then the next among the rest, so each face and
    each person is matched at most once. None for a person no face was matched to.

    The margin of each match is the idea behind UMO's ID-confusion and WithAnyone's copy-paste measures (how
    much more a face resembles its own reference than the other references), on this matching."""
    found = [f for f in analyzer.detect(_as_rgb_array(image), with_embedding=True) if f.embedding is not None]
    table = [[cosine_similarity(ref, face.embedding) for face in found] for ref in references]
    pairs = sorted(
        ((table[p][f], p, f) for p in range(len(references)) for f in range(len(found))),
        key=lambda pair: -pair[0],
    )
    matches: list[PersonMatch | None] = [None] * len(references)
    used: set[int] = set()
    for similarity, person, face in pairs:
        if matches[person] is None and face not in used:
            others = [(table[q][face], q) for q in range(len(references)) if q != person]
            if others:
                best, nearest = max(others)
                matches[person] = PersonMatch(round(similarity, 4), round(similarity - best, 4), nearest)
            else:
                matches[person] = PersonMatch(round(similarity, 4))
            used.add(face)
    return matches


def match_people(
    analyzer: FaceAnalyzer, references: Sequence[np.ndarray], image: np.ndarray | Image.Image
) -> list[float | None]:
    """Each person's identity score in a generated image, in person order (`match_people_detail`'s
    similarities; None for a person no face was matched to)."""
    return [None if m is None else m.similarity for m in match_people_detail(analyzer, references, image)]
