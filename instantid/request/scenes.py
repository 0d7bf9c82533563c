"""Each mode's scene: what its pipeline draws, from the request, its photos and the faces found in them.

A scene gives the keypoint image, face mask, extra controls and size, plus what its pipeline kind needs (the
photo to start from, the region to redraw, the people), as the fields of the job (`prepare` adds the rest).
It runs on the CPU with the face models only: no diffusion model, no GPU. What it needs of the engine comes in
a `Workshop` (the settings, the profile, the face analyzer), so nothing here imports the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from ..declaration import MODES
from ..errors import InvalidParameter, NoFaceError
from ..models.memory import Profile
from ..settings import CONTROL_TYPES, Settings
from ..vision import framing, geometry
from ..vision.faces import Face, FaceAnalyzer
from ..vision.images import image_to_array, load_image
from .requests import GroupPerson, Paste, Request

TINY_SHORT_SIDE = 128  # the tiny preset's noise images need no more; keeps CPU requests instant
SDXL_SHORT_SIDE = 1024


def working_short_side(preset: str, profile: Profile | None) -> int:
    """The working size's short side on this server: the tiny preset's, else the memory profile's (SDXL's own
    where no profile is known yet: a page built before the engine named one)."""
    if preset == "tiny":
        return TINY_SHORT_SIDE
    return profile.default_short_side if profile is not None else SDXL_SHORT_SIDE


@dataclass(frozen=True)
class Workshop:
    """What the CPU stage takes from the engine: its settings, its memory profile (sizes, steps, images) and
    its face analyzer, loaded on first use (`faces()`)."""

    settings: Settings
    profile: Profile
    faces: Callable[[], FaceAnalyzer]

    def decode(self, source: Any, what: str, warnings: list[str]) -> Any:
        s = self.settings
        image, w = load_image(source, max_bytes=s.max_upload_bytes, max_pixels=s.max_upload_pixels, what=what)
        warnings += w
        return image

    def size(self, req: Request, image: Any) -> tuple[int, int]:
        """The output size: the request's, or from `image`."""
        return (req.width, req.height) if req.width else self.auto_size(image.size)

    def working_short_side(self) -> int:
        return working_short_side(self.settings.preset, self.profile)

    def planned_canvas(self, req: Request, people: int) -> tuple[int, int] | None:
        """`framing.planned_canvas` for `req` at this server's working size."""
        asked = (req.width, req.height) if req.width else None
        return framing.planned_canvas(req.framing, people, asked, self.working_short_side(),
                                      self.settings.max_output_side)

    def auto_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The working size for a picture of `size`: short side from the profile, long side capped."""
        short = self.working_short_side()
        return geometry.output_size(*size, short_side=short, max_side=self.settings.max_output_side)

    def redraw_geometry(self, image_size: tuple[int, int], bbox: Any, kps: np.ndarray) -> tuple:
        """`geometry.redraw_geometry` at this server's working size."""
        return geometry.redraw_geometry(
            image_size, bbox, kps, short_side=self.working_short_side(), max_side=self.settings.max_output_side
        )


# A mode's scene: what its pipeline draws, from the request and the identity found (`prepare`): the keypoint
# image, face mask, extra controls and size, plus what its pipeline kind needs (the photo to start from, the
# region to redraw, the people). `people` is each person's (embedding, face) for a mode of `Mode.people`.


def generate_scene(
    ws: Workshop, req: Request, ref_img: Any, ref_face: Face, warnings: list[str], people: list[Any],
) -> dict:
    """Generate: the face layout (and extra ControlNets) from the pose photo; or else placed by the framing and
    head angle; or else the face photo's."""
    pose_img, pose_face = ref_img, ref_face
    _ignored_composition(req, req.pose_image, "pose photo", warnings)
    if req.composed:
        return composed_scene(ws, req, ref_img, ref_face)
    if req.pose_image is not None:
        pose_img = ws.decode(req.pose_image, "pose photo", warnings)
        pose_faces = ws.faces().detect(image_to_array(pose_img), with_embedding=False)
        if not pose_faces:
            raise NoFaceError(
                "No face found in the pose photo: use a pose photo where the face is visible, or leave it empty."
            )
        pose_face = pose_faces[0]
    return posed_scene(ws, req, pose_img, pose_face)


def posed_scene(ws: Workshop, req: Request, pose_img: Any, pose_face: Face) -> dict:
    """One face laid out as `pose_face` sits in `pose_img` (Generate's scene; a group of one person's)."""
    size = ws.size(req, pose_img)
    keypoint_image, mask, crop = geometry.face_on_canvas(
        pose_img.size, pose_face, size, enhance=req.enhance_face_region
    )
    controls = prepare_controls(req, pose_img, size, crop)
    return {"keypoint_image": keypoint_image, "face_mask": mask, "controls": controls,
            "width": size[0], "height": size[1], "spots": [geometry.placed(pose_img.size, pose_face, size)]}


def _ignored_composition(req: Request, photo: Any, what: str, warnings: list[str]) -> None:
    """Say that a photo setting the layout (`what`) overrides the framing and head angle asked."""
    asked = [name for name, value in (("framing", req.framing != "photo"), ("head angle", req.angle is not None))
             if value]
    if photo is not None and asked:
        warnings.append(f"{' and '.join(asked).capitalize()} ignored: the {what} sets the face's place, size and "
                        "angle; leave it empty to use them.")


def _turned(req: Request, face: Face) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """`face`'s keypoints and box at the request's head angle (as found, for the photo's own angle)."""
    if req.angle is None:
        return np.asarray(face.kps, np.float32), tuple(float(v) for v in face.bbox)  # type: ignore[return-value]
    return framing.turned(face.kps, face.bbox, *req.angle)


def composed_size(ws: Workshop, req: Request, photo: Any) -> tuple[int, int]:
    """The canvas of a placed face: the request's size, or the framing's (the photo's own for framing photo)."""
    return ws.planned_canvas(req, 1) or ws.auto_size(photo.size)


def composed_scene(ws: Workshop, req: Request, ref_img: Any, ref_face: Face) -> dict:
    """One face placed by the framing and turned to the head angle (no pose photo): the keypoints and box moved
    onto the framing's canvas, or, for framing photo, laid out as the photo has the face. No extra ControlNets
    (the request refuses them: their conditions would come from the photo's layout)."""
    kps, box = _turned(req, ref_face)
    size = composed_size(ws, req, ref_img)
    if req.framing == "photo":
        spot = geometry.placed(ref_img.size, Face(bbox=box, kps=kps, det_score=ref_face.det_score), size)
    else:
        spot = framing.frame(kps, box, size, req.framing)
    mask = geometry.face_mask(size, spot[1]) if req.enhance_face_region else None
    return {"keypoint_image": geometry.draw_keypoints(size, spot[0]), "face_mask": mask, "controls": {},
            "width": size[0], "height": size[1], "spots": [spot]}


def group_scene(
    ws: Workshop, req: Request, ref_img: Any, ref_face: Face, warnings: list[str],
    people: list[tuple[np.ndarray, Face]],
) -> dict:
    """Group: where each person's face goes (the layout photo's faces, left to right, in `req.person_order`;
    or side by side), each person's keypoint image and region. One person is Generate's scene exactly, with
    the layout photo as the pose photo."""
    n = len(people)
    _ignored_composition(req, req.layout_image, "layout photo", warnings)
    if req.layout_image is not None:
        layout_img = ws.decode(req.layout_image, "layout photo", warnings)
        found = ws.faces().detect(image_to_array(layout_img), with_embedding=False)
        if len(found) < n:
            raise NoFaceError(
                f"The layout photo has {len(found)} face(s) for {n} people: use a layout photo with at least "
                f"{n} faces, or leave it empty for an automatic side-by-side layout."
            )
        if len(found) > n:
            warnings.append(f"The layout photo has {len(found)} faces: the {n} largest are used.")
        chosen = sorted(found[:n], key=lambda f: f.bbox[0] + f.bbox[2])  # left to right
        if n == 1:
            return posed_scene(ws, req, layout_img, chosen[0])
        size = ws.size(req, layout_img)
        union = (min(f.bbox[0] for f in chosen), min(f.bbox[1] for f in chosen),
                 max(f.bbox[2] for f in chosen), max(f.bbox[3] for f in chosen))
        scale, ox, oy = geometry.layout(layout_img.size, size, union)
        offset = np.array([ox, oy], dtype=np.float32)
        spots = [(geometry.scale_kps(f.kps, scale, scale) + offset,
                  (f.bbox[0] * scale + ox, f.bbox[1] * scale + oy, f.bbox[2] * scale + ox, f.bbox[3] * scale + oy))
                 for f in chosen]
    else:
        if n == 1:
            scene = composed_scene if req.composed else posed_scene
            return scene(ws, req, ref_img, ref_face)
        size = ws.planned_canvas(req, n)
        faces = [people[p][1] for p in req.person_order]
        if req.composed:
            faces = [Face(bbox=box, kps=kps, det_score=face.det_score)
                     for face in faces for kps, box in [_turned(req, face)]]
        if req.framing == "photo":
            spots = geometry.group_layout(size, faces)
        else:
            spots = framing.frame_side_by_side([(f.kps, f.bbox) for f in faces], size, req.framing)
    # Spot i (left to right) holds person order[i]; back to person order.
    by_person = {person: spots[i] for i, person in enumerate(req.person_order)}
    regions = geometry.group_regions(size, [by_person[k][1] for k in range(n)])
    group = [
        GroupPerson(embedding=people[k][0], keypoint_image=geometry.draw_keypoints(size, by_person[k][0]),
                    region=regions[k])
        for k in range(n)
    ]
    return {"keypoint_image": geometry.draw_group_keypoints(size, [p.keypoint_image for p in group]),
            "face_mask": None, "controls": {}, "width": size[0], "height": size[1], "group": group,
            "spots": [by_person[k] for k in range(n)]}


def restyle_scene(
    ws: Workshop, req: Request, ref_img: Any, ref_face: Face, warnings: list[str], people: list[Any],
) -> dict:
    """Restyle: the source photo at the output size; the face layout from its largest face, or from the
    face photo's when the source has none."""
    source = ws.decode(req.source_image, "photo to restyle", warnings)
    size = ws.size(req, source)
    found = ws.faces().detect(image_to_array(source), with_embedding=False)
    enhance = req.enhance_face_region
    if found:
        keypoint_image, mask, crop = geometry.face_on_canvas(source.size, found[0], size, enhance=enhance)
        spot = geometry.placed(source.size, found[0], size)
    else:
        warnings.append("No face in the photo to restyle: the face is placed as in the face photo.")
        keypoint_image, mask, _ = geometry.face_on_canvas(ref_img.size, ref_face, size, enhance=enhance)
        spot = geometry.placed(ref_img.size, ref_face, size)
        whole = (0.0, 0.0, float(source.width), float(source.height))
        crop = geometry.shown_crop(geometry.layout(source.size, size, whole), size)  # centred: no face to centre on
    return {"keypoint_image": keypoint_image, "face_mask": mask, "width": size[0], "height": size[1],
            "controls": prepare_controls(req, source, size, crop),
            "init_image": source.convert("RGB").resize(size, box=crop), "spots": [spot]}


def swap_scene(
    ws: Workshop, req: Request, ref_img: Any, ref_face: Face, warnings: list[str], people: list[Any],
) -> dict:
    """Face swap: a crop around the chosen face of the target, at the working size, with the region to redraw
    and where it goes back."""
    target = ws.decode(req.target_image, "photo to swap a face into", warnings).convert("RGB")
    found = ws.faces().detect(image_to_array(target), with_embedding=False)
    if not found:
        raise NoFaceError(
            "No face found in the photo to swap a face into: use a photo where the face is visible."
        )
    if req.face_index >= len(found):
        fix = f"the photo has {len(found)} face(s): use 0..{len(found) - 1} (0 = the largest)"
        raise InvalidParameter("face_index", req.face_index, fix)
    face = found[req.face_index]
    box, crop_size, size, kps, in_crop, in_work = ws.redraw_geometry(target.size, face.bbox, face.kps)
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    redraw = geometry.swap_region(size, in_work, feather=False)
    return {
        "keypoint_image": geometry.draw_keypoints(size, kps),
        "face_mask": geometry.face_mask(size, in_work) if req.enhance_face_region else None,
        "controls": {}, "width": size[0], "height": size[1],
        "init_image": target.resize(size, box=box),
        "mask_image": PIL.Image.fromarray((redraw * 255).astype(np.uint8), mode="L"),
        "paste": Paste(
            target=target, box=box, region=geometry.swap_region(crop_size, in_crop), face=(x1, y1, x2, y2)
        ),
    }


def prepare_controls(
    req: Request, pose_img: Any, size: tuple[int, int], crop: tuple[float, float, float, float]
) -> dict[str, tuple[float, Any]]:
    """Each extra ControlNet's input at the output size, cropped like the keypoint layout."""
    if not req.controlnets:
        return {}
    from ..models import controls

    resized = pose_img.resize(size, box=crop)
    out: dict[str, tuple[float, Any]] = {}
    for name, strength in req.controlnets.items():
        # Plain CPU work (canny) is done here; an estimator is a GPU model, run in render.
        image = resized if CONTROL_TYPES[name].has_estimator else controls.make_condition(name, resized, {})
        out[name] = (strength, image)
    return out


# Each mode's scene (`prepare`), by the mode's name: a mode declared without its scene stops the import.
SCENES: dict[str, Callable[..., dict]] = {
    "generate": generate_scene,
    "restyle": restyle_scene,
    "swap": swap_scene,
    "group": group_scene,
}
if set(SCENES) != set(MODES):
    raise ImportError(f"the scenes ({', '.join(SCENES)}) are not the declared modes ({', '.join(MODES)})")
