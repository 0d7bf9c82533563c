"""Condition images for the optional extra ControlNets: canny edges, depth maps and body-pose skeletons.

The pose, canny and depth SDXL ControlNets each expect a particular kind of picture. This module makes
them from a photo with maintained libraries only (OpenCV for edges, transformers models for depth and
pose), so no torchvision and no `controlnet_aux` are needed.

Estimators are plain objects built from LOCAL folders (the hub layer resolves repos into the Hugging
Face cache and hands over the snapshot folder). Constructing one loads its weights; the engine decides
when, so nothing is loaded until a request selects that ControlNet. There is no module-level state.
"""

from __future__ import annotations

import colorsys
import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import PIL.Image
import torch

from ..errors import CheckpointError, ImageError, InvalidParameter
from ..settings import CONTROL_TYPES, ControlType, Settings
from . import tiny_controls

# Files each estimator folder needs; the hub layer can pass these as `allow_patterns` so a snapshot
# download skips READMEs and alternative weight formats.
ESTIMATOR_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "preprocessor_config.json")

# A condition maker turns an RGB photo into a condition image of the same size.
ConditionFn = Callable[[PIL.Image.Image], PIL.Image.Image]

# --- OpenPose body format (facts of the format the openpose ControlNets were trained on) ---------------

# The 18 OpenPose body keypoints, in OpenPose's order.
OPENPOSE_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)

# The 17 COCO keypoints, in COCO's order (what VitPose predicts).
COCO_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)

# The 17 limbs OpenPose draws, as pairs of OpenPose indices; limb i is drawn in colour i.
OPENPOSE_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip


def openpose_colors() -> list[tuple[int, int, int]]:
    """The 18 OpenPose palette colours (RGB): a full-saturation hue wheel in 20-degree steps from red.

    Keypoint i is drawn in colour i, limb i in colour i at 60% intensity.
    """
    colors = []
    for i in range(18):
        r, g, b = colorsys.hsv_to_rgb(i / 18, 1.0, 1.0)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def coco_to_openpose(keypoints: np.ndarray) -> np.ndarray:
    """Reorder COCO-17 keypoints `(17, 3)` of (x, y, score) into OpenPose-18 `(18, 3)`.

    OpenPose has a neck that COCO lacks: it sits at the midpoint of the shoulders, and its score is the
    lower shoulder score, so it only shows when both shoulders do.
    """
    kp = np.asarray(keypoints, dtype=np.float32)
    if kp.shape != (17, 3):
        raise ValueError(f"coco_to_openpose expects a (17, 3) array of x, y, score; got shape {kp.shape}.")
    coco = {name: i for i, name in enumerate(COCO_KEYPOINTS)}
    out = np.zeros((18, 3), dtype=np.float32)
    for j, name in enumerate(OPENPOSE_KEYPOINTS):
        if name == "neck":
            left, right = kp[coco["left_shoulder"]], kp[coco["right_shoulder"]]
            out[j, :2] = (left[:2] + right[:2]) / 2.0
            out[j, 2] = min(left[2], right[2])
        else:
            out[j] = kp[coco[name]]
    return out


def openpose_stick_width(width: int, height: int) -> int:
    """Limb half-thickness and joint radius for a canvas of this size.

    OpenPose annotators draw with 4 px on a canvas whose short side is 512 and the result is then resized,
    so scaling with the short side keeps the look the ControlNet was trained on at any resolution.
    """
    return max(1, round(4 * min(width, height) / 512))


def draw_openpose(
    people: Sequence[np.ndarray],
    size: tuple[int, int],
    threshold: float = 0.3,
    stick_width: int | None = None,
) -> PIL.Image.Image:
    """Draw OpenPose-18 skeletons `(18, 3)` of (x, y, score) on a black RGB canvas of `size` = (width, height).

    Limbs are filled ellipses along each bone in 60% of their palette colour, joints are filled circles in
    full colour drawn last so they sit on top. Keypoints scoring below `threshold` and limbs touching them
    are left out, as OpenPose does for parts it cannot see.
    """
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    stick = stick_width if stick_width is not None else openpose_stick_width(width, height)
    colors = openpose_colors()
    for person in people:
        kp = np.asarray(person, dtype=np.float32)
        if kp.shape != (18, 3):
            raise ValueError(f"draw_openpose expects (18, 3) arrays of x, y, score; got shape {kp.shape}.")
        visible = (kp[:, 2] >= threshold) & np.isfinite(kp[:, :2]).all(axis=1)
        for i, (a, b) in enumerate(OPENPOSE_LIMBS):
            if not (visible[a] and visible[b]):
                continue
            (xa, ya), (xb, yb) = kp[a, :2], kp[b, :2]
            length = math.hypot(xb - xa, yb - ya)
            angle = math.degrees(math.atan2(yb - ya, xb - xa))
            center = (round((xa + xb) / 2), round((ya + yb) / 2))
            color = tuple(int(c * 0.6) for c in colors[i])
            cv2.ellipse(canvas, center, (max(1, round(length / 2)), stick), angle, 0, 360, color, thickness=-1)
        for j in range(18):
            if visible[j]:
                center = (round(float(kp[j, 0])), round(float(kp[j, 1])))
                cv2.circle(canvas, center, stick, colors[j], thickness=-1)
    return PIL.Image.fromarray(canvas)


# --- shared helpers ------------------------------------------------------------------------------------


def _as_rgb(image: Any) -> PIL.Image.Image:
    if not isinstance(image, PIL.Image.Image):
        raise ImageError(f"A condition image must be a PIL image, got {type(image).__name__}.")
    if image.width < 1 or image.height < 1:
        raise ImageError(f"A condition image must not be empty, got size {image.size}.")
    return image if image.mode == "RGB" else image.convert("RGB")


def _load_error(what: str, folder: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"Could not load the {what} from {folder}: {exc}. The folder needs {', '.join(ESTIMATOR_FILES)}; "
        "check the repo id in the settings or clear that entry from the Hugging Face cache."
    )


def _load_model(what: str, folder: str | Path, model_class: Any, device: Any, dtype: torch.dtype) -> tuple[Any, Any]:
    """A transformers model (in eval mode, on `device`) and its image processor from a local folder."""
    from transformers import AutoImageProcessor

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"The {what} folder {path} has no config.json; it must be a transformers checkpoint.")
    try:
        model = model_class.from_pretrained(path, dtype=dtype)
        # backend="pil": the default backend wants torchvision, which we do not ship; the PIL one behaves the
        # same (VitPose's crops its boxes with scipy) and asking for it explicitly avoids the fallback warning.
        processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _load_error(what, path, exc) from exc
    return model.to(device).eval(), processor


# --- canny ---------------------------------------------------------------------------------------------


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def canny_condition(image: PIL.Image.Image, low: int = 100, high: int = 200) -> PIL.Image.Image:
    """OpenCV Canny edges of `image` as a white-on-black RGB image of the same size.

    The colour image goes to Canny as is (OpenCV takes the strongest gradient over the channels), as the
    InstantID demo does, so colour-only boundaries still give edges.
    """
    if low < 0:
        raise InvalidParameter("canny_low", low, "use a threshold of 0 or more")
    if high < low:
        raise InvalidParameter("canny_high", high, f"use a threshold of at least canny_low={low}")
    rgb = np.asarray(_as_rgb(image))
    edges = cv2.Canny(np.ascontiguousarray(rgb), int(low), int(high))
    return PIL.Image.fromarray(np.stack([edges] * 3, axis=-1))


# --- depth ---------------------------------------------------------------------------------------------


def depth_to_image(depth: np.ndarray, near_is_large: bool = True) -> PIL.Image.Image:
    """Min-max normalise a depth map to a 3-channel uint8 image with near = bright, as depth ControlNets expect.

    Relative models (Depth Anything, DPT/MiDaS) predict inverse depth, where near is already large; metric
    models predict distance, so pass `near_is_large=False` to flip them. A flat map gives a black image.
    """
    d = np.asarray(depth, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"depth_to_image expects a 2-D map, got shape {d.shape}.")
    if not near_is_large:
        d = -d
    lo, hi = float(np.nanmin(d)), float(np.nanmax(d))
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo < 1e-12:
        norm = np.zeros_like(d)
    else:
        norm = np.nan_to_num((d - lo) / (hi - lo))
    gray = np.clip(np.round(norm * 255.0), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(np.stack([gray] * 3, axis=-1))


class DepthEstimator:
    """Monocular depth with a transformers depth model (Depth Anything V2 by default).

    Build it with `from_folder`; calling it on a photo gives the depth condition image at the photo's size.
    """

    def __init__(self, model: Any, processor: Any, device: str | torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.processor = processor
        self.dtype = dtype
        # Depth Anything configs say whether the head predicts metric distance; DPT-style models do not
        # and predict inverse depth.
        self.near_is_large = getattr(model.config, "depth_estimation_type", "relative") != "metric"

    @classmethod
    def from_folders(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> DepthEstimator:
        """Load model and image processor from a local checkpoint folder."""
        # Imported here so that importing this module (for canny alone) stays cheap.
        from transformers import AutoModelForDepthEstimation

        model, processor = _load_model("depth estimator", path, AutoModelForDepthEstimation, device, dtype)
        return cls(model, processor, device, dtype)

    @property
    def device(self) -> torch.device:
        # Read from the weights, not remembered: on ZeroGPU they move to the GPU only inside a GPU call.
        return _device_of(self.model)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Its torch modules by role, for the memory report."""
        return {"model": self.model}

    @torch.inference_mode()
    def estimate(self, image: PIL.Image.Image) -> np.ndarray:
        """Raw model output resized to the photo, float32 `(height, width)`."""
        rgb = _as_rgb(image)
        inputs = self.processor(images=rgb, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        predicted = self.model(pixel_values=pixel_values).predicted_depth
        # Resize in float32: half-precision bicubic is not available on every device, and the map is small.
        resized = torch.nn.functional.interpolate(
            predicted.float().unsqueeze(1), size=(rgb.height, rgb.width), mode="bicubic", align_corners=False
        )
        return resized[0, 0].cpu().numpy()

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        return depth_to_image(self.estimate(image), near_is_large=self.near_is_large)


# --- pose ----------------------------------------------------------------------------------------------


class PoseEstimator:
    """Top-down body pose: a transformers object detector finds people, VitPose finds their COCO keypoints.

    Calling it on a photo gives the OpenPose-style skeleton image at the photo's size. With no detector,
    or when it finds nobody, the whole photo is treated as one person's box.
    """

    def __init__(
        self,
        pose_model: Any,
        pose_processor: Any,
        detector: Any | None,
        detector_processor: Any | None,
        device: str | torch.device,
        dtype: torch.dtype,
        detection_threshold: float = 0.5,
        keypoint_threshold: float = 0.3,
        max_people: int = 10,
    ) -> None:
        self.pose_model = pose_model
        self.pose_processor = pose_processor
        self.detector = detector
        self.detector_processor = detector_processor
        self.dtype = dtype
        self.detection_threshold = detection_threshold
        self.keypoint_threshold = keypoint_threshold
        self.max_people = max_people
        self.person_labels: frozenset[int] = frozenset()
        if detector is not None:
            id2label = getattr(detector.config, "id2label", {}) or {}
            self.person_labels = frozenset(int(i) for i, name in id2label.items() if str(name).lower() == "person")
            if not self.person_labels:
                raise CheckpointError(
                    "The person detector has no 'person' class in its config (id2label); use a detector "
                    "trained on COCO or Objects365, such as PekingU/rtdetr_r50vd_coco_o365."
                )

    @classmethod
    def from_folders(
        cls,
        pose_path: str | Path,
        detector_path: str | Path | None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **options: Any,
    ) -> PoseEstimator:
        """Load VitPose from `pose_path` and a person detector from `detector_path` (None: whole-image box).

        `options` go to the constructor (`detection_threshold`, `keypoint_threshold`, `max_people`).
        """
        from transformers import AutoModelForObjectDetection, VitPoseForPoseEstimation

        pose_model, pose_processor = _load_model("pose estimator", pose_path, VitPoseForPoseEstimation, device, dtype)
        detector: Any = None
        detector_processor: Any = None
        if detector_path is not None:
            detector, detector_processor = _load_model(
                "person detector", detector_path, AutoModelForObjectDetection, device, dtype
            )
        return cls(pose_model, pose_processor, detector, detector_processor, device, dtype, **options)

    @property
    def device(self) -> torch.device:
        return _device_of(self.pose_model)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Its torch modules by role, for the memory report."""
        return {"pose_model": self.pose_model, **({"detector": self.detector} if self.detector is not None else {})}

    @torch.inference_mode()
    def detect_people(self, image: PIL.Image.Image) -> np.ndarray:
        """Person boxes `(n, 4)` as (x0, y0, x1, y1) in pixels, most confident first; never empty."""
        rgb = _as_rgb(image)
        whole = np.array([[0.0, 0.0, float(rgb.width), float(rgb.height)]], dtype=np.float32)
        if self.detector is None or self.detector_processor is None:
            return whole
        inputs = self.detector_processor(images=rgb, return_tensors="pt")
        outputs = self.detector(pixel_values=inputs["pixel_values"].to(_device_of(self.detector), self.dtype))
        # Post-processing in float32 on the CPU keeps sigmoid/top-k exact whatever dtype the model runs in.
        outputs.logits = outputs.logits.float().cpu()
        outputs.pred_boxes = outputs.pred_boxes.float().cpu()
        result = self.detector_processor.post_process_object_detection(
            outputs, threshold=self.detection_threshold, target_sizes=[(rgb.height, rgb.width)]
        )[0]
        keep = [i for i, label in enumerate(result["labels"].tolist()) if int(label) in self.person_labels]
        if not keep:
            return whole
        boxes = result["boxes"][keep].numpy().astype(np.float32)
        scores = result["scores"][keep].numpy()
        boxes = boxes[np.argsort(-scores)][: self.max_people]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, rgb.width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, rgb.height)
        # A box squashed to nothing at the border would make the crop degenerate.
        sized = (boxes[:, 2] - boxes[:, 0] >= 2) & (boxes[:, 3] - boxes[:, 1] >= 2)
        return boxes[sized] if sized.any() else whole

    @torch.inference_mode()
    def keypoints(self, image: PIL.Image.Image) -> list[np.ndarray]:
        """COCO-17 keypoints per detected person, each `(17, 3)` of (x, y, score) in pixels."""
        rgb = _as_rgb(image)
        boxes_xyxy = self.detect_people(rgb)
        # VitPose's processor takes COCO (x, y, width, height) boxes.
        boxes = boxes_xyxy.copy()
        boxes[:, 2:] -= boxes[:, :2]
        box_lists = [boxes.tolist()]
        inputs = self.pose_processor(images=rgb, boxes=box_lists, return_tensors="pt")
        kwargs: dict[str, Any] = {}
        backbone = getattr(self.pose_model.config, "backbone_config", None)
        if getattr(backbone, "num_experts", 1) > 1:
            # ViTPose+ checkpoints are mixtures of experts, one per training set; index 0 is COCO.
            kwargs["dataset_index"] = torch.zeros(len(boxes), dtype=torch.long, device=self.device)
        outputs = self.pose_model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype), **kwargs)
        outputs.heatmaps = outputs.heatmaps.float().cpu()
        results = self.pose_processor.post_process_pose_estimation(outputs, boxes=box_lists)[0]
        people = []
        for person in results:
            xy = person["keypoints"].numpy().astype(np.float32)
            score = person["scores"].numpy().astype(np.float32).reshape(-1)
            people.append(np.concatenate([xy, score[:, None]], axis=1))
        return people

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        rgb = _as_rgb(image)
        people = [coco_to_openpose(p) for p in self.keypoints(rgb) if p.shape == (17, 3)]
        return draw_openpose(people, rgb.size, threshold=self.keypoint_threshold)


# --- the registry ----------------------------------------------------------------------------------------


class Estimator(Protocol):
    """A model that makes a condition image from a photo: built by `from_folders` from one local folder per
    `ControlType.estimator_fields` entry, in that order, then called on photos."""

    @classmethod
    def from_folders(cls, *folders: str | Path, device: str | torch.device = "cpu") -> Estimator: ...

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image: ...

    def modules(self) -> dict[str, torch.nn.Module]: ...


class WriteEstimator(Protocol):
    """Writes a random estimator checkpoint into `folder`: tiny, or at the released checkpoint's shape."""

    def __call__(self, folder: Path, *, released_shape: bool = False) -> None: ...


@dataclass(frozen=True)
class ControlCode:
    """The code of one control type, by reference: `settings.CONTROL_TYPES[name]` declares the rest.

    A kind with estimator fields has an `estimator` class and a writer per field; one without has a
    `condition` maker (plain CPU work, photo -> image). `check_control` says when a piece is missing.
    """

    name: str
    condition: ConditionFn | None = None
    estimator: type[Estimator] | None = None
    # Per estimator field: the writer of its random checkpoint (the tiny preset's, and the benchmarks').
    writers: Mapping[str, WriteEstimator] = field(default_factory=dict)


def check_control(kind: ControlType, code: ControlCode) -> None:
    """Raise TypeError unless `code` has exactly the pieces `kind` needs, each callable with the right arguments."""

    def fail(what: str) -> TypeError:
        return TypeError(f"The {kind.name} control type's ControlCode {what}.")

    def takes(fn: Any, what: str, *args: Any, **kwargs: Any) -> None:
        try:
            inspect.signature(fn).bind(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise fail(f"has {what} that cannot be called that way: {exc}") from None

    if code.name != kind.name:
        raise fail(f"is named {code.name!r}")
    settings_fields = {f.name for f in dataclasses.fields(Settings)}
    if missing := [f for f in kind.estimator_fields if f not in settings_fields]:
        raise fail(f"reads estimator fields that Settings lacks: {', '.join(missing)}")
    if set(code.writers) != set(kind.estimator_fields):
        fields = sorted(kind.estimator_fields)
        raise fail(f"has writers for {sorted(code.writers)}, not for exactly its estimator fields {fields}")
    for field_name, write in code.writers.items():
        takes(write, f"a writer for {field_name}", Path("folder"), released_shape=True)
    if kind.has_estimator:
        if code.estimator is None or code.condition is not None:
            raise fail("needs an estimator class (it has estimator fields) and no condition maker")
        for method in ("from_folders", "modules", "__call__"):
            if not callable(getattr(code.estimator, method, None)):
                raise fail(f"has an estimator {code.estimator!r} without {method}")
        takes(code.estimator.from_folders, "an estimator", *kind.estimator_fields, device="cpu")
    else:
        if code.condition is None or code.estimator is not None:
            raise fail("needs a condition maker (it has no estimator fields) and no estimator")
        takes(code.condition, "a condition maker", PIL.Image.new("RGB", (1, 1)))


def control_registry(kinds: Mapping[str, ControlType], codes: Sequence[ControlCode]) -> dict[str, ControlCode]:
    """The code records by name, checked against the declarations: one per kind, each complete."""
    registry = {code.name: code for code in codes}
    if len(registry) != len(codes) or set(registry) != set(kinds):
        raise TypeError(
            f"The control code records {[c.name for c in codes]} do not match CONTROL_TYPES {list(kinds)}: "
            "give each control type exactly one ControlCode."
        )
    for name, kind in kinds.items():
        check_control(kind, registry[name])
    return registry


# Each control type's code, held by reference beside its declaration in `settings.CONTROL_TYPES` (which must
# stay importable without torch, so it cannot hold these). Checked at import, so a type with a missing or
# mismatched piece cannot even start.
CONTROLS: dict[str, ControlCode] = control_registry(
    CONTROL_TYPES,
    (
        ControlCode(
            "pose",
            estimator=PoseEstimator,
            writers={
                "pose_estimator": tiny_controls.save_pose_estimator,
                "person_detector": tiny_controls.save_person_detector,
            },
        ),
        ControlCode("canny", condition=canny_condition),
        ControlCode("depth", estimator=DepthEstimator, writers={"depth_estimator": tiny_controls.save_depth_estimator}),
    ),
)


def estimator_writers() -> dict[str, WriteEstimator]:
    """The writer of every estimator checkpoint, by its `Settings` field, in declaration order."""
    return {f: CONTROLS[name].writers[f] for name, kind in CONTROL_TYPES.items() for f in kind.estimator_fields}


# --- dispatch ------------------------------------------------------------------------------------------


def make_condition(name: str, image: PIL.Image.Image, estimators: Mapping[str, ConditionFn]) -> PIL.Image.Image:
    """The condition image for the extra ControlNet `name` (a `CONTROL_TYPES` entry).

    Types with an estimator read it from `estimators` (any callable photo -> image); only the entry for
    `name` is read, so a lazily loading Mapping loads nothing else. The others are plain CPU work, made by
    their record's `condition` maker.
    """
    code = CONTROLS.get(name)
    if code is None:
        raise InvalidParameter("controlnet", name, f"use one of {', '.join(CONTROL_TYPES)}")
    rgb = _as_rgb(image)
    if code.condition is not None:
        return code.condition(rgb)
    if name not in estimators:
        raise LookupError(f"No {name} estimator was given to make_condition; the engine must load it first.")
    return estimators[name](rgb)
