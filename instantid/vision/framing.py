"""Composition without a pose photo: where a face goes on the canvas (`framing`) and which way it looks
(`head_angle`), as keypoints and a face box for the IdentityNet's drawing. Pure numpy, no model.

Without a pose photo the face photo's own keypoints used to set the picture: a selfie gave close-ups, a tilted
head gave tilted heads. Here the photo's five keypoints are lifted onto a canonical 3D five-point face, turned to
the asked angle and projected (`turned`), then scaled and moved so the face box takes the framing's share of the
canvas height with the eyes on the framing's line (`frame`). The identity still comes from the photo's embedding;
only the layout the IdentityNet sees changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from PIL import Image

from ..declaration import FRAMING_CHOICES, HEAD_ANGLE_CHOICES, MAX_PITCH, MAX_YAW
from . import geometry

Box = tuple[float, float, float, float]

# --- the canonical face ---------------------------------------------------------------------------------------
# x and y: ArcFace's 112 x 112 alignment template (the five points insightface aligns every face to: left eye, right
# eye, nose tip, left and right mouth corner, image pixels). z (towards the camera, same unit: the eyes are 35.2
# apart, about 63 mm, so a unit is about 1.8 mm): the nose tip about 30 mm in front of the eyes, the mouth corners
# about 4 mm; rounded anthropometric averages, our estimate, not a fitted model. The face box in that frame comes
# from the detector's own boxes on ten real faces (astronaut, t1.jpg's six, Grace Hopper, the two people of
# assets/): the eyes at 0.38 of the box height from its top, the mouth corners at 0.72, the box 0.77 as wide as
# high. Eyes to mouth is 40.7 template pixels = 0.34 of the box: the box is 120 high, its top at y 6.
CANONICAL_FACE = np.array(
    [
        [38.2946, 51.6963, 0.0],
        [73.5318, 51.5014, 0.0],
        [56.0252, 71.7366, 17.0],
        [41.5493, 92.3655, 2.0],
        [70.7299, 92.2041, 2.0],
    ],
    dtype=np.float64,
)
CANONICAL_BOX: Box = (9.8, 6.0, 102.2, 126.0)
# A left/right mirror swaps the eyes and the mouth corners (insightface's order).
MIRRORED = (1, 0, 2, 4, 3)

# --- head angles ------------------------------------------------------------------------------------------------
# Yaw turns the face towards the picture's right (positive) or left (negative); pitch raises it (positive) or
# lowers it; the ranges are the declaration's (MAX_YAW, MAX_PITCH).
HEAD_ANGLES: dict[str, tuple[float, float] | None] = {
    "photo": None,  # the photo's own keypoints, as they are
    "front": (0.0, 0.0),
    "left": (-30.0, 0.0),
    "right": (30.0, 0.0),
    "up": (0.0, 20.0),
    "down": (0.0, -20.0),
}


@dataclass(frozen=True)
class Framing:
    """A framing: the face box's height as a share of the canvas height, the eyes' line as a share of the height
    from the top, and the canvas it asks for at SDXL's trained size (width, height; None: the face photo's own)."""

    name: str
    face_share: float
    eye_line: float
    canvas: tuple[int, int] | None
    summary: str
    # The words put before a prompt that names no such framing (`framed_prompt`): the keypoints place the face, and
    # the words tell SDXL what to draw around it, a body rather than a face floating on a backdrop.
    words: str = ""
    said: tuple[str, ...] = ()  # what, in a prompt, already names the framing


# Shares measured on real photographs with the face detector (the face box's height over the image height; the
# eyes' line from the top): Grace Hopper's and the two people's tight head shots 0.53-0.55 with the eyes at
# 0.31-0.38; the astronaut, head and chest on a square, 0.234 with the eyes at 0.20; the cameraman, head to knees,
# 0.163. Portrait sits between the head shots and the astronaut; half body is the astronaut's share on a portrait
# canvas, so the waist fits; full body is the canon of a standing adult, about 7.5 head heights, filling 0.9 of the
# height (a head 0.12 of it, the face box 0.85 of the head: the detector's box ends at the forehead).
# Canvases: SDXL's trained sizes near one megapixel (1024 x 1024, 896 x 1152, 832 x 1216).
FRAMINGS: dict[str, Framing] = {
    f.name: f
    for f in (
        Framing("photo", 0.0, 0.0, None, "the face where the photo has it (the photo's size and crop)"),
        Framing("portrait", 0.32, 0.34, (1024, 1024), "head and shoulders, square", "head and shoulders portrait",
                ("portrait", "head and shoulders", "headshot", "head shot", "close-up", "closeup")),
        Framing("half body", 0.23, 0.21, (896, 1152), "head to waist, portrait orientation", "half body shot",
                ("half body", "half-body", "upper body", "waist up", "waist-up", "medium shot")),
        Framing("full body", 0.09, 0.10, (832, 1216), "the whole figure, portrait orientation; its small face is "
                "refined by default", "full body shot", ("full body", "full-body", "whole body", "full length",
                                                         "full-length", "head to toe")),
    )
}
if tuple(FRAMINGS) != FRAMING_CHOICES or tuple(HEAD_ANGLES) != HEAD_ANGLE_CHOICES:
    raise ImportError("the framings and head angles here are not the declaration's choices")
if any(abs(a[0]) > MAX_YAW or abs(a[1]) > MAX_PITCH for a in HEAD_ANGLES.values() if a):
    raise ImportError("a named head angle lies outside MAX_YAW / MAX_PITCH")


def canvas_size(framing: str, short_side: int, max_side: int, multiple: int = 64) -> tuple[int, int] | None:
    """The canvas a framing asks for, its SDXL size scaled by `short_side` / 1024 (the profile's working size;
    1024 on a GPU), each side rounded to `multiple`; a portrait canvas stays taller than wide even at the tiny
    preset's 128. None for `photo` (the face photo's own size)."""
    base = FRAMINGS[framing].canvas
    if base is None:
        return None
    scale = short_side / 1024
    width, height = (max(multiple, int(side * scale / multiple + 0.5) * multiple) for side in base)
    if base[1] > base[0] and height <= width:
        height = width + multiple
    limit = max(multiple, max_side // multiple * multiple)
    return min(width, limit), min(height, limit)


def planned_canvas(framing: str, people: int, asked: tuple[int, int] | None, short_side: int,
                   max_side: int) -> tuple[int, int] | None:
    """The canvas a run lays its faces on where no pose or layout photo does, decided before any photo is read:
    the size asked (`asked`, both sides), else a group's side-by-side canvas (`people` > 1), else the framing's
    (`canvas_size`); None where the face photo's own size decides (framing photo, one person). The scenes, the
    page's price and its preview all ask here, so that they agree."""
    if asked:
        return asked
    if people > 1:
        return geometry.output_size(*geometry.GROUP_ASPECT, short_side=short_side, max_side=max_side)
    return canvas_size(framing, short_side, max_side)


def framed_face_height(framing: str, canvas: tuple[int, int], people: int = 1) -> float:
    """The face box's height the canonical face gets on `canvas`, placed as a run places it (`frame`, or
    `frame_side_by_side` for `people` > 1)."""
    face = (CANONICAL_FACE[:, :2], CANONICAL_BOX)
    spots = frame_side_by_side([face] * people, canvas, framing) if people > 1 else [frame(*face, canvas, framing)]
    _, (_, y1, _, y2) = spots[0]
    return y2 - y1


def framed_prompt(framing: str, prompt: str) -> str | None:
    """`prompt` with the framing's words in front, where it names no such framing itself; None: nothing to add."""
    spec = FRAMINGS[framing]
    if not spec.words or any(phrase in prompt.lower() for phrase in spec.said):
        return None
    return f"{spec.words}, {prompt}" if prompt else spec.words


def head_angle(name: str, yaw: float | None, pitch: float | None) -> tuple[float, float] | None:
    """The (yaw, pitch) in degrees a request asks: its degrees when either is given (the other 0), else the named
    angle's; None for the photo's own."""
    if yaw is not None or pitch is not None:
        return (float(yaw or 0.0), float(pitch or 0.0))
    return HEAD_ANGLES[name]


# --- turning a face -----------------------------------------------------------------------------------------------


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    """Image axes (x right, y down, z towards the camera): pitch about x, then yaw about the vertical."""
    a, p = math.radians(yaw), math.radians(pitch)
    # Positive pitch brings what is in front (the nose) up: y' = y cos p - z sin p.
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    # Positive yaw brings what is in front to the right: x' = x cos a + z sin a.
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    return ry @ rx


def photo_pose(kps: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """How the canonical face sits in a photo's keypoints, seen from afar (scaled orthographic projection): the
    scale, the rotation (3 x 3) and the translation (2,) that best map CANONICAL_FACE onto `kps`.

    A least-squares affine map of the five 3D points onto the five 2D ones (8 unknowns, 10 equations), whose two
    rows are then made the first two rows of a rotation: the same shape of answer as a perspective fit, without
    needing the camera."""
    points = np.asarray(kps, dtype=np.float64)
    model = CANONICAL_FACE - CANONICAL_FACE.mean(axis=0)
    design = np.hstack([model, np.ones((5, 1))])
    solution, *_ = np.linalg.lstsq(design, points, rcond=None)  # (4, 2): the map's columns, then the shift
    m, shift = solution[:3].T, solution[3]
    scale = (np.linalg.norm(m[0]) + np.linalg.norm(m[1])) / 2
    r1 = m[0] / np.linalg.norm(m[0])
    r2 = m[1] - (m[1] @ r1) * r1
    r2 /= np.linalg.norm(r2)
    return float(scale), np.vstack([r1, r2, np.cross(r1, r2)]), shift


def angles(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of a rotation made as roll (in the picture's plane) after yaw after pitch,
    the order `turned` uses (roll 0 there)."""
    r = np.asarray(rotation, dtype=np.float64)
    roll = math.atan2(r[1, 0], r[0, 0])
    c, s = math.cos(roll), math.sin(roll)
    m = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) @ r  # the roll taken off
    return math.degrees(math.atan2(m[0, 2], m[2, 2])), math.degrees(math.asin(max(-1.0, min(1.0, -m[1, 2])))), \
        math.degrees(roll)


def frontal_shape(kps: np.ndarray) -> np.ndarray:
    """The person's face as a front view: CANONICAL_FACE with the photo's own proportions (where its keypoints
    depart from the fitted canonical face, turned back to the front), made symmetric about its vertical axis
    (what is left of the asymmetry is mostly the photo's pose, which the fit cannot tell from the face)."""
    points = np.asarray(kps, dtype=np.float64)
    scale, rotation, shift = photo_pose(points)
    model = CANONICAL_FACE - CANONICAL_FACE.mean(axis=0)
    fitted = scale * (model @ rotation.T)[:, :2] + shift
    # The departures are in the photo's plane: turn them back by the photo's roll and size to the template's unit.
    roll = math.radians(angles(rotation)[2])
    back = np.array([[math.cos(roll), math.sin(roll)], [-math.sin(roll), math.cos(roll)]])
    shape = model.copy()
    shape[:, :2] += (points - fitted) @ back.T / scale
    mirror = shape[list(MIRRORED)] * np.array([-1.0, 1.0, 1.0])
    return (shape + mirror) / 2


def turned(kps: np.ndarray, bbox: Sequence[float], yaw: float, pitch: float) -> tuple[np.ndarray, Box]:
    """A face's keypoints and box turned to (`yaw`, `pitch`) degrees, upright (no roll), at the photo's size and
    place: the keypoints of `frontal_shape` rotated and projected, the box CANONICAL_BOX at the photo box's
    height, centred where the photo's box is. The box rides with the face (its centre at the eyes' depth)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    shape = frontal_shape(kps)
    centre = CANONICAL_FACE.mean(axis=0)
    bx1, by1, bx2, by2 = CANONICAL_BOX
    # On the face's axis of symmetry (x 0 of the symmetric shape), so a mirrored angle mirrors the box too.
    box_centre = np.array([0.0, (by1 + by2) / 2 - centre[1], 0.0])
    rotation = _rotation(yaw, pitch)
    points = (shape @ rotation.T)[:, :2]
    anchor = (box_centre @ rotation.T)[:2]
    unit = (y2 - y1) / (by2 - by1)  # photo pixels per template unit
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    out = (points - anchor) * unit + np.array([cx, cy])
    half_w, half_h = (bx2 - bx1) * unit / 2, (y2 - y1) / 2
    return out.astype(np.float32), (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


# --- placing a face -------------------------------------------------------------------------------------------------


def frame(kps: np.ndarray, bbox: Sequence[float], size: tuple[int, int], framing: str | Framing,
          centre_x: float | None = None, max_width: float | None = None) -> tuple[np.ndarray, Box]:
    """A face (keypoints and box, any unit) moved onto a `size` canvas by `framing` (a FRAMINGS name, or a
    Framing's shares): the box's height the framing's share of the canvas height (narrower than `max_width` where
    given, a group's slot), the eyes on its line, the box centred on `centre_x` (default the canvas' middle)."""
    spec = framing if isinstance(framing, Framing) else FRAMINGS[framing]
    width, height = size
    x1, y1, x2, y2 = (float(v) for v in bbox)
    points = np.asarray(kps, dtype=np.float64)
    scale = spec.face_share * height / max(y2 - y1, 1e-6)
    if max_width is not None:
        scale = min(scale, max_width / max(x2 - x1, 1e-6))
    eyes_y = (points[0, 1] + points[1, 1]) / 2
    dx = (width / 2 if centre_x is None else centre_x) - (x1 + x2) / 2 * scale
    dy = spec.eye_line * height - eyes_y * scale
    out = points * scale + np.array([dx, dy])
    box = (x1 * scale + dx, y1 * scale + dy, x2 * scale + dx, y2 * scale + dy)
    return out.astype(np.float32), box


def frame_side_by_side(faces: Sequence[tuple[np.ndarray, Sequence[float]]], size: tuple[int, int],
                       framing: str) -> list[tuple[np.ndarray, Box]]:
    """Faces (keypoints, box) side by side on a `size` canvas, left to right, each `frame`d in its slot of the
    width: the framing's face size, at most GROUP_FACE_SHARE of the slot wide (a group without a layout photo)."""
    slot = size[0] / len(faces)
    return [frame(kps, box, size, framing, centre_x=slot * (i + 0.5), max_width=slot * geometry.GROUP_FACE_SHARE)
            for i, (kps, box) in enumerate(faces)]


def eye_angle(kps: np.ndarray) -> float:
    """The eyes' line's angle to the horizontal in degrees (the head's roll as drawn)."""
    (lx, ly), (rx, ry) = np.asarray(kps, dtype=np.float64)[:2]
    return math.degrees(math.atan2(ry - ly, rx - lx))


# --- the page's preview -------------------------------------------------------------------------------------------
# What the page shows before a run: the keypoint drawing of the framing and head angle chosen, for the canonical
# face (the photo's own proportions replace it in the run). With framing photo the face's place and size are the
# photo's, unknown before it is read: the preview places it as the tight head shots measured above have theirs
# (face box 0.54 of the height, eyes at 0.35), the face photo most people upload.
HEAD_SHOT = Framing("photo", 0.54, 0.35, None, "a tight head shot, as most face photos are")
PREVIEW_WIDTH = 160


def model_layout(framing_name: str, angle: str, canvas: tuple[int, int], people: int = 1,
                 width: int = PREVIEW_WIDTH) -> Image.Image:
    """The IdentityNet's keypoint drawing (a PIL image) that a run of `framing_name` and head `angle` (a
    HEAD_ANGLES name) would draw on a `canvas` (width, height), for the canonical face, shrunk to `width` pixels
    wide. `people` > 1: a group side by side, placed as the group scene places them (each its slot's share, or
    `geometry.group_layout` for framing photo)."""
    kps: np.ndarray = CANONICAL_FACE[:, :2].astype(np.float64)
    box: Box = CANONICAL_BOX
    turn = HEAD_ANGLES[angle]
    if turn is not None:
        kps, box = turned(kps, box, *turn)
    w, h = canvas
    if people > 1 and framing_name == "photo":
        points = [p for p, _ in geometry.group_layout(canvas, [SimpleNamespace(bbox=box, kps=kps)] * people)]
    elif people > 1:
        points = [p for p, _ in frame_side_by_side([(kps, box)] * people, canvas, framing_name)]
    elif framing_name == "photo":
        points = [frame(kps, box, canvas, HEAD_SHOT)[0]]  # FRAMINGS["photo"] places nothing: a head shot's shares
    else:
        points = [frame(kps, box, canvas, framing_name)[0]]
    drawing = geometry.draw_group_keypoints(canvas, [geometry.draw_keypoints(canvas, p) for p in points])
    # An area average keeps the thin limbs and small points of a shrunk 1024 px drawing visible.
    return drawing.resize((width, max(1, round(width * h / w))), Image.Resampling.BOX)
