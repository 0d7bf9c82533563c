"""Geometry: where faces go on a canvas and what is drawn there, with no model involved (numpy, OpenCV's
drawing, PIL).

The layout of a photo's face on the output canvas and the output sizes, the side-by-side group layout and its
regions, the crops, regions and paste-back of a redrawn face (a swap, a refined face), the face masks, and
InstantID's keypoint drawing. Face detection and embeddings are faces.py's; this module only moves and draws
the boxes and keypoints they found.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import numpy as np
from PIL import Image

from ..errors import ImageError


class Placed(Protocol):
    """What the layouts need of a face found (faces.Face): its box and its five keypoints, photo pixels."""

    bbox: Any
    kps: Any


# InstantID's keypoint image (IdentityNet condition): one colour per keypoint, in insightface's order
# (left eye, right eye, nose, left mouth corner, right mouth corner), and limbs from eyes and mouth
# corners to the nose drawn in the colour of their first point.
KPS_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
)
KPS_LIMBS: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (3, 2), (4, 2))
# Half-thickness of a limb ellipse (its semi-minor axis), the "stick width" of the reference drawing.
KPS_STICK_WIDTH = 4
KPS_LIMB_DIM = 0.6
_LIMB_DIM_LUT = (np.arange(256, dtype=np.float64) * KPS_LIMB_DIM).astype(np.uint8)
KPS_RADIUS = 10


def drawn_face_box(keypoint_image: Image.Image, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """Where the face generated from `keypoint_image` should be, in an image of `size` (width, height).

    The IdentityNet draws the face on the keypoints: eyes to mouth corners span about half a face, so
    the face is about twice the drawing (points and their circles) around its centre. None when the
    drawing is empty.
    """
    gray = cv2.cvtColor(np.asarray(keypoint_image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    x, y, w, h = cv2.boundingRect(gray)  # the box of every non-black pixel
    if w == 0 or h == 0:
        return None
    sx, sy = size[0] / gray.shape[1], size[1] / gray.shape[0]
    cx, cy, side = (x + w / 2) * sx, (y + h / 2) * sy, 2 * max(w * sx, h * sy)
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


# --- conditions derived from a face --------------------------------------------------------------


def draw_keypoints(size: tuple[int, int], kps: np.ndarray) -> Image.Image:
    """InstantID's keypoint image at `size` (width, height), the IdentityNet's condition.

    Black canvas; four limbs (eyes and mouth corners to the nose) as filled ellipses in the colour of
    their first point; the whole canvas dimmed to 0.6; then a filled circle of radius 10 per point.
    The IdentityNet was trained on exactly this drawing, so integer truncation and order matter.
    """
    # Provenance: re-derived from the description of InstantID's reference `draw_kps` (DESIGN.md section 3).
    width, height = int(size[0]), int(size[1])
    points = np.asarray(kps, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"kps must have shape (5, 2), got {points.shape}")
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for a, b in KPS_LIMBS:
        (xa, ya), (xb, yb) = points[a], points[b]
        half_length = math.hypot(xa - xb, ya - yb) / 2
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        center = (int((xa + xb) / 2), int((ya + yb) / 2))
        polygon = cv2.ellipse2Poly(center, (int(half_length), KPS_STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, KPS_COLORS[a])
    canvas = cv2.LUT(canvas, _LIMB_DIM_LUT)  # same pixels as (canvas * 0.6).astype(uint8), ten times faster
    for (x, y), color in zip(points, KPS_COLORS, strict=True):
        cv2.circle(canvas, (int(x), int(y)), KPS_RADIUS, color, -1)
    return Image.fromarray(canvas)


def face_mask(size: tuple[int, int], bbox: Sequence[float]) -> np.ndarray:
    """A float32 (height, width) mask: 1 inside the face box (clipped to the image, whole pixels), 0 elsewhere."""
    width, height = int(size[0]), int(size[1])
    x1, y1, x2, y2 = (float(v) for v in bbox)
    x1, x2 = (int(min(max(v, 0.0), width)) for v in (x1, x2))
    y1, y2 = (int(min(max(v, 0.0), height)) for v in (y1, y2))
    mask = np.zeros((height, width), dtype=np.float32)
    mask[y1:y2, x1:x2] = 1.0
    return mask


def scale_kps(kps: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Keypoints mapped from one image size to another (x times `sx`, y times `sy`)."""
    out = np.asarray(kps, dtype=np.float32).copy()
    out[..., 0] *= sx
    out[..., 1] *= sy
    return out


def layout(
    src: tuple[int, int], out: tuple[int, int], face_box: tuple[float, float, float, float]
) -> tuple[float, float, float]:
    """(scale, x offset, y offset) mapping photo coordinates onto the output canvas.

    One scale for both axes, so the face is never stretched; when the output's aspect differs from the
    photo's, the canvas covers the photo and the crop is centred on the face (clamped to the photo), so
    a wide output of a portrait keeps the face in frame.
    """
    (src_w, src_h), (width, height) = src, out
    scale = max(width / src_w, height / src_h)
    cx, cy = (face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2
    ox = min(0.0, max(width - src_w * scale, width / 2 - cx * scale))
    oy = min(0.0, max(height - src_h * scale, height / 2 - cy * scale))
    return scale, ox, oy


def output_size(
    width: int,
    height: int,
    *,
    short_side: int = 1024,
    max_side: int = 1280,
    multiple: int = 64,
) -> tuple[int, int]:
    """Generation size for a photo of `width` x `height`, keeping its aspect ratio.

    The short side goes to `short_side`; if the long side then exceeds `max_side` both shrink; both
    are floored to multiples of `multiple` (SDXL's latent grid) and never drop below `multiple`.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    if short_side <= 0 or max_side <= 0 or multiple <= 0:
        raise ValueError("short_side, max_side and multiple must be positive")
    ratio = short_side / min(width, height)
    w, h = width * ratio, height * ratio
    if max(w, h) > max_side:
        shrink = max_side / max(w, h)
        w, h = w * shrink, h * shrink
    # The epsilon keeps 1279.9999 from flooring a whole step below 1280.
    w_out = max(multiple, int(w + 1e-6) // multiple * multiple)
    h_out = max(multiple, int(h + 1e-6) // multiple * multiple)
    return w_out, h_out


# --- face swap geometry ---------------------------------------------------------------------------
# The swap redraws a crop around one face at the model's working size and pastes it back. The crop
# holds the face with room around it (SWAP_PADDING face sizes on each side) so that the model sees the
# head in context; the repainted region is the face box grown by SWAP_GROW, softened over SWAP_FEATHER
# face sizes. GROW + 3 x FEATHER (a Gaussian's reach) stays well inside PADDING, so the softened edge
# never reaches the crop's border and every pixel outside it keeps the target's value.
SWAP_PADDING = 0.6
SWAP_GROW = 0.15
SWAP_FEATHER = 0.05
# More of the face box than this outside the photo, and the crop would have to leave the image.
MAX_FACE_OUTSIDE = 0.1
# Refining small faces (refine_faces) redraws a face through the swap's crop, where it fills 1 / (1 + 2 x
# SWAP_PADDING), about 45 %, of the working size. A face whose box's longer side is under REFINE_BELOW of the
# working size's short side (256 px at 1024) thus gets at least 1.8x its pixels, and SDXL draws faces that
# small without detail (the InstantID issues #6 and #164 on distant faces); a larger face would gain too little
# to pay for another render.
REFINE_BELOW = 0.25


def needs_refining(bbox: Sequence[float], short_side: int) -> bool:
    """Whether a face with box `bbox` is small enough to be refined at a working size of short side `short_side`."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return max(x2 - x1, y2 - y1) < REFINE_BELOW * short_side


def swap_crop(size: tuple[int, int], bbox: Sequence[float]) -> tuple[int, int, int, int]:
    """The crop box (x1, y1, x2, y2, whole pixels, inside the photo) around the face in `bbox`.

    A square of the face's larger side plus padding, moved (not cut) to stay inside the photo, and cut
    only where the photo is smaller than the square. A box that lies partly outside the photo is refused:
    the crop could not hold it. Detected boxes never do (the detector's box of a face cut by the photo's
    edge ends at the edge), so such a face is swapped where it lies inside the photo.
    """
    width, height = int(size[0]), int(size[1])
    x1, y1, x2, y2 = (float(v) for v in bbox)
    inside_w = max(0.0, min(x2, width) - max(x1, 0.0))
    inside_h = max(0.0, min(y2, height) - max(y1, 0.0))
    area = max(1e-6, (x2 - x1) * (y2 - y1))
    if 1 - inside_w * inside_h / area > MAX_FACE_OUTSIDE:
        raise ImageError(
            "The face to replace is cut by the edge of the target photo, so the area around it would leave the "
            "image: use a photo with the whole face inside it, or pick another face (face_index)."
        )
    side = max(x2 - x1, y2 - y1) * (1 + 2 * SWAP_PADDING)
    cw, ch = min(side, width), min(side, height)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = min(max(cx - cw / 2, 0.0), width - cw)
    top = min(max(cy - ch / 2, 0.0), height - ch)
    return round(left), round(top), round(left + cw), round(top + ch)


def swap_region(size: tuple[int, int], bbox: Sequence[float], *, feather: bool = True) -> np.ndarray:
    """A float32 (height, width) mask of the region a swap repaints: the face box grown by SWAP_GROW,
    softened over SWAP_FEATHER face sizes (`feather`), or hard-edged and covering the softened edge too
    (for the inpainting, which must redraw every pixel the paste will take)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    face = max(x2 - x1, y2 - y1, 1.0)
    sigma = SWAP_FEATHER * face
    grow = SWAP_GROW * face + (0 if feather else 3 * sigma + 1)
    mask = face_mask(size, (x1 - grow, y1 - grow, x2 + grow, y2 + grow))
    if not feather:
        return mask
    # A kernel of 3 sigma each side: beyond it the Gaussian is cut to exactly 0, so the region is bounded.
    radius = max(1, math.ceil(3 * sigma))
    soft = cv2.GaussianBlur(mask, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_CONSTANT)
    # The kernel's float32 sum falls a hair short of 1: inside the face the drawn pixels replace the target's.
    return np.where(soft > 1 - 1e-5, np.float32(1), soft)


def paste_face(target: Image.Image, drawn: Image.Image, box: Sequence[int], region: np.ndarray) -> Image.Image:
    """`target` with `drawn` (the redrawn crop) scaled back into `box` and blended in through `region`
    (the crop's feathered mask). Where `region` is 0, the target's own pixels are kept exactly."""
    x1, y1, x2, y2 = (int(v) for v in box)
    base = np.asarray(target.convert("RGB"))
    out = base.copy()
    patch = np.asarray(drawn.convert("RGB").resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), dtype=np.float32)
    weight = region[..., None]
    old = base[y1:y2, x1:x2].astype(np.float32)
    blended = np.clip(np.rint(old * (1 - weight) + patch * weight), 0, 255).astype(np.uint8)
    out[y1:y2, x1:x2] = np.where(weight > 0, blended, base[y1:y2, x1:x2])
    return Image.fromarray(out)


# --- group portraits --------------------------------------------------------------------------------
# Without a layout photo the people stand side by side: one slot of the canvas width each, the face
# GROUP_FACE_SHARE of its slot wide but at most GROUP_FACE_OF_HEIGHT of the canvas height, its centre at
# GROUP_FACE_Y of the height (a head-and-shoulders framing). Each person's region, where their identity acts,
# is their face box grown by GROUP_GROW face sizes on each side; where two grown boxes meet, a pixel belongs
# to the nearer face, so no pixel carries two identities.
GROUP_FACE_SHARE = 0.5
GROUP_FACE_OF_HEIGHT = 0.4
GROUP_FACE_Y = 0.42
GROUP_GROW = 0.25
GROUP_ASPECT = (3, 2)  # the automatic canvas, before the profile's short side and the size cap


Box = tuple[float, float, float, float]


def group_face_width(size: tuple[int, int], people: int) -> float:
    """How wide `group_layout` draws each of `people` faces side by side on a `size` canvas."""
    width, height = size
    return min(width / people * GROUP_FACE_SHARE, height * GROUP_FACE_OF_HEIGHT)


def group_layout(size: tuple[int, int], faces: Sequence[Placed]) -> list[tuple[np.ndarray, Box]]:
    """(keypoints, face box) for each of `faces` side by side on a `size` canvas, left to right in the given
    order; each face keeps its own photo's proportions and keypoint shape, scaled to the slot."""
    width, height = size
    slot = width / len(faces)
    side = group_face_width(size, len(faces))
    out = []
    for i, face in enumerate(faces):
        x1, y1, x2, y2 = face.bbox
        scale = side / max(x2 - x1, 1e-6)
        face_h = (y2 - y1) * scale
        left, top = slot * (i + 0.5) - side / 2, height * GROUP_FACE_Y - face_h / 2
        kps = scale_kps(np.asarray(face.kps, np.float32) - np.array([x1, y1], np.float32), scale, scale)
        out.append((kps + np.array([left, top], np.float32), (left, top, left + side, top + face_h)))
    return out


def group_regions(size: tuple[int, int], boxes: Sequence[Sequence[float]], grow: float = GROUP_GROW) -> list[Any]:
    """Each face's region (float32 height x width, 0 or 1): its box grown by `grow` face sizes, a pixel in two
    grown boxes going to the face whose centre is nearer (in face sizes). The regions never overlap."""
    width, height = int(size[0]), int(size[1])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    masks, distances = [], []
    for box in boxes:
        x1, y1, x2, y2 = (float(v) for v in box)
        face = max(x2 - x1, y2 - y1, 1.0)
        masks.append(face_mask(size, (x1 - grow * face, y1 - grow * face, x2 + grow * face, y2 + grow * face)) > 0)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        distances.append(np.where(masks[-1], np.hypot(xs - cx, ys - cy) / face, np.inf))
    nearest = np.argmin(np.stack(distances), axis=0)
    return [(mask & (nearest == k)).astype(np.float32) for k, mask in enumerate(masks)]


def draw_group_keypoints(size: tuple[int, int], drawings: Sequence[Image.Image]) -> Image.Image:
    """Several people's keypoint images as one picture (what the page shows as the face layout)."""
    return Image.fromarray(np.maximum.reduce([np.asarray(d.convert("RGB")) for d in drawings]))




# --- a photo's face on the canvas (the scenes, the refined faces) -------------------------------------


def shown_crop(placement: tuple[float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The part of a photo (x1, y1, x2, y2, photo pixels) that a `size` canvas shows under `layout`'s
    placement (scale, x offset, y offset)."""
    scale, ox, oy = placement
    return (-ox / scale, -oy / scale, (size[0] - ox) / scale, (size[1] - oy) / scale)


def placed(
    image_size: tuple[int, int], face: Placed, size: tuple[int, int]
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """`face`'s keypoints and box on a `size` canvas laid out from a photo of `image_size`."""
    scale, ox, oy = layout(image_size, size, face.bbox)
    kps = scale_kps(face.kps, scale, scale) + np.array([ox, oy], dtype=np.float32)
    x1, y1, x2, y2 = face.bbox
    return kps, (x1 * scale + ox, y1 * scale + oy, x2 * scale + ox, y2 * scale + oy)


def redraw_geometry(
    image_size: tuple[int, int], bbox: Any, kps: np.ndarray, *, short_side: int, max_side: int
) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int], np.ndarray, tuple, tuple]:
    """How a face is redrawn at working size (a swap; a refined face): the crop box around it in the image, the
    crop's size, the working size (`output_size` of the crop with `short_side` and `max_side`), the face's
    keypoints at working size, and its box in the crop and at working size."""
    box = swap_crop(image_size, bbox)
    crop_size = (box[2] - box[0], box[3] - box[1])
    size = output_size(*crop_size, short_side=short_side, max_side=max_side)
    sx, sy = size[0] / crop_size[0], size[1] / crop_size[1]
    origin = np.array([box[0], box[1]], dtype=np.float32)
    kps = scale_kps(np.asarray(kps, dtype=np.float32) - origin, sx, sy)
    x1, y1, x2, y2 = (float(v) for v in bbox)
    in_crop = (x1 - box[0], y1 - box[1], x2 - box[0], y2 - box[1])
    in_work = (in_crop[0] * sx, in_crop[1] * sy, in_crop[2] * sx, in_crop[3] * sy)
    return box, crop_size, size, kps, in_crop, in_work


def face_on_canvas(
    image_size: tuple[int, int], face: Placed, size: tuple[int, int], *, enhance: bool
) -> tuple[Image.Image, np.ndarray | None, tuple[float, float, float, float]]:
    """The keypoint image and (with `enhance`, the request's enhance_face_region) face mask of `face` laid out on
    a `size` canvas, and the crop of its photo (x1, y1, x2, y2, photo pixels) that the canvas shows."""
    kps, box = placed(image_size, face, size)
    mask = face_mask(size, box) if enhance else None
    return draw_keypoints(size, kps), mask, shown_crop(layout(image_size, size, face.bbox), size)
