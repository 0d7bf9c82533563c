"""The request and result types that flow UI/API/CLI -> engine -> back, and their validation.

Plain dataclasses with no torch inside, so they pickle (ZeroGPU sends them across processes) and the
UI can import them without importing torch.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..declaration import (
    AUTOMATIC,
    DEFAULT_SPEED,
    DERIVED,
    GATHERED,
    MAX_LCM_STEPS,
    MAX_PEOPLE,
    MAX_PHOTOS_PER_PERSON,
    MODE_SPECS,
    MODES,
    PARAMS,
    SPEEDS,
    ImageInput,
    Param,
    Speed,
    params_for,
    split_names,
)
from ..errors import InvalidParameter, UserError


def _default(name: str) -> Any:
    """A request field's default: its parameter's declaration, the one place defaults are written."""
    return PARAMS[name].default


def _unset(value: Any, default: Any) -> bool:
    """`value` is the parameter's default, or empty (photos may be arrays: never compared with ==)."""
    if value is None or value is default or (isinstance(value, (str, Mapping)) and not value):
        return True
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return isinstance(value, (numbers.Real, str)) and type(value) is not bool and value == default


@dataclass(frozen=True)
class Request:
    """One request of any mode, checked when it is made (a `Request` that exists is valid).

    The fields carry the `PARAMS` of the same name, with their declared defaults; the photos are in one list
    (`face_images`) and the people's in `people` (`GATHERED`); None (or 0) is "automatic" in `AUTOMATIC`. What
    depends on the server (its largest output side, the profile's image count, parts that did not load) is the
    engine's to check.
    """

    face_images: Sequence[ImageInput] = ()  # group: left empty, the people's photos are in `people`
    prompt: str = _default("prompt")
    negative_prompt: str = _default("negative_prompt")
    pose_image: ImageInput | None = _default("pose_image")
    style: str = _default("style")
    num_images: int = _default("num_images")
    width: int = _default("width")  # 0 = automatic from the face (or pose) photo
    height: int = _default("height")
    num_steps: int | None = _default("num_steps")  # 0 or None = the speed's own
    guidance_scale: float | None = _default("guidance_scale")
    identitynet_strength: float = _default("identitynet_strength")
    adapter_strength: float = _default("adapter_strength")
    controlnets: Mapping[str, float] | None = _default("controlnets")  # checked into a mapping ({} = none)
    scheduler: str = _default("scheduler")
    enable_lcm: bool = _default("enable_lcm")
    speed: str = _default("speed")
    seed: int | None = _default("seed")  # None = random; the result says which seed was used
    enhance_face_region: bool = _default("enhance_face_region")
    mode: str = "generate"  # one of MODES
    source_image: ImageInput | None = _default("source_image")  # restyle: the photo to redraw
    strength: float = _default("strength")  # restyle: how far from the source
    target_image: ImageInput | None = _default("target_image")  # swap: the photo whose face is replaced
    face_index: int = _default("face_index")  # swap: 0 = the target's largest face
    people: Sequence[Sequence[ImageInput]] = ()  # group: each person's photo(s), in person order
    names: str = _default("names")  # group: comma-separated, in person order ("" = Person 1, Person 2, ...)
    layout_image: ImageInput | None = _default("layout_image")  # group: the photo whose faces give the layout
    order: str = _default("order")  # group: person numbers for the layout's faces, left to right ("" = 1, 2, ...)
    refine_faces: str = _default("refine_faces")  # one of REFINE_CHOICES; `refines` says what it means for this mode
    framing: str = _default("framing")  # generate, group: where the face goes without a pose (layout) photo
    head_angle: str = _default("head_angle")  # generate, group: which way it looks ("photo": the photo's own)
    head_yaw: float | None = _default("head_yaw")  # degrees instead of head_angle (None: head_angle decides)
    head_pitch: float | None = _default("head_pitch")
    # What the checks adjusted, for the result's warnings (control characters removed from a prompt).
    notes: tuple[str, ...] = field(default=(), init=False, compare=False)
    # Group: each person's name (given or "Person k") and the person on each layout face, left to right (0-based).
    person_names: tuple[str, ...] = field(default=(), init=False, compare=False)
    person_order: tuple[int, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODE_SPECS:
            raise InvalidParameter("mode", self.mode, f"choose one of {', '.join(MODES)}")
        if MODE_SPECS[self.mode].people:
            self._check_people()
        elif self.people:
            takers = ", ".join(m.name for m in MODE_SPECS.values() if m.people)
            raise InvalidParameter("people", f"{len(self.people)} person(s)",
                                   f"is used by {takers} only, not {self.mode}")
        faces = self.face_images
        if not faces:
            raise UserError("No face photo: add a photo of the person's face (API: face_image).")
        if isinstance(faces, (str, bytes, Path)) or not isinstance(faces, Sequence):
            faces = [faces]
        if len(faces) > 8:
            raise InvalidParameter("extra_face_images", len(faces), "use at most 8 photos in all")
        object.__setattr__(self, "face_images", list(faces))
        self._check_mode()
        notes = []
        for f in fields(self):
            value = checked = getattr(self, f.name)
            zero = f.name != "seed" and type(value) in (int, float) and value == 0  # a seed of 0 is a seed
            if f.name in AUTOMATIC and (value is None or zero):
                checked = None
            elif value is None and f.name in PARAMS and PARAMS[f.name].default is None and PARAMS[f.name].kind in (
                    "integer", "number"):
                checked = None  # a number that may stay unset (head_yaw, head_pitch: head_angle decides)
            elif f.name in PARAMS:
                checked = PARAMS[f.name].check(value)
            if isinstance(value, str) and len(checked) < len(value):
                what = f.name.replace("_", " ")
                notes.append(f"Removed {len(value) - len(checked)} control character(s) from the {what}.")
            object.__setattr__(self, f.name, checked)
        object.__setattr__(self, "notes", tuple(notes))
        if (self.width == 0) != (self.height == 0):
            raise InvalidParameter("width/height", (self.width, self.height), "set both or neither (0 = automatic)")
        if self.enable_lcm and self.speed != DEFAULT_SPEED:
            raise InvalidParameter("speed", self.speed, "LCM fast mode is a speed of its own: switch LCM off, or use "
                                   f"speed {DEFAULT_SPEED}")
        if self.enable_lcm and (self.num_steps or 0) > MAX_LCM_STEPS:
            limit = f"use 1..{MAX_LCM_STEPS} with LCM fast mode (its scheduler's limit), or switch LCM off"
            raise InvalidParameter("num_steps", self.num_steps, limit)
        self._check_composition()

    def _check_composition(self) -> None:
        """Head angle in one way only, and extra ControlNets only where a photo sets the layout."""
        degrees = (self.head_yaw, self.head_pitch)
        if degrees != (None, None) and self.head_angle != "photo":
            raise InvalidParameter("head_angle", self.head_angle, "give either head_angle or head_yaw/head_pitch, "
                                   "not both")
        if self.composed and self.controlnets:
            # Their conditions (pose, depth, edges) come from a photo's layout, which the framing replaces: mapped
            # like the face, a close-up's edges would stand where the framing puts a body.
            raise InvalidParameter("controlnets", ", ".join(self.controlnets), "must come from a photo's layout, which "
                                   "framing and head angle replace: add a pose photo (it then sets the layout), set "
                                   "framing and head angle to photo, or leave the extra ControlNets out")

    @property
    def angle(self) -> tuple[float, float] | None:
        """The head angle asked, (yaw, pitch) in degrees, or None: the photo's own."""
        from ..vision.framing import head_angle

        return head_angle(self.head_angle, self.head_yaw, self.head_pitch)

    @property
    def composed(self) -> bool:
        """Whether framing or head angle place the face: asked for, and no photo (pose, layout) sets the layout."""
        asked = self.framing != "photo" or self.angle is not None
        return asked and self.pose_image is None and self.layout_image is None

    @property
    def refines(self) -> bool:
        """Whether small faces are re-rendered after the image ("auto": the mode's default, and on where a
        framing places the face: the faces it makes small are then refined, the others are not)."""
        if self.refine_faces == "auto":
            return MODE_SPECS[self.mode].refines or (self.composed and self.framing != "photo")
        return self.refine_faces == "on"

    @property
    def sampling(self) -> Speed:
        """How this request samples: its speed, or LCM."""
        return SPEEDS["lcm" if self.enable_lcm else self.speed]

    def _check_people(self) -> None:
        """Group: 1 to MAX_PEOPLE people, each with a photo; their names; the order. The first person's photos
        stand in `face_images` (what one identity's checks and the one-person case read)."""
        names = split_names(PARAMS["names"].check(self.names))
        people = [
            [photo] if isinstance(photo, (str, bytes, Path)) or not isinstance(photo, Sequence) else list(photo)
            for photo in (self.people or ())
        ]
        # Empty names past the last photo are stray commas ("Ada, Ben,"), not people; a name there is a person.
        while len(names) > len(people) and not names[-1]:
            names.pop()
        count = max(len(people), len(names))
        if count > MAX_PEOPLE:
            raise UserError(f"{count} people: a group portrait holds at most {MAX_PEOPLE}; leave the others out.")
        if not people:
            raise UserError("No people: add a photo of each person (API: person_1, person_2, ...).")

        def who(k: int) -> str:
            return f"{names[k]} (person {k + 1})" if k < len(names) and names[k] else f"person {k + 1}"

        for k in range(count):
            photos = [photo for photo in people[k] if photo is not None] if k < len(people) else []
            if not photos and k >= len(people):  # a person only `names` makes: say so
                raise UserError(f"No photo of {who(k)}: names lists {len(names)} people for {len(people)} with "
                                f"photos; add one (API: person_{k + 1}), or remove that name.")
            if not photos:
                raise UserError(f"No photo of {who(k)}: add one (API: person_{k + 1}), or leave that person out.")
            if len(photos) > MAX_PHOTOS_PER_PERSON:
                raise InvalidParameter(f"person_{k + 1}", f"{len(photos)} photos",
                                       f"use at most {MAX_PHOTOS_PER_PERSON} photos of one person")
            people[k] = photos
        names = [names[k] if k < len(names) and names[k] else f"Person {k + 1}" for k in range(count)]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise InvalidParameter("names", twice[0], "is given twice: give each person their own name")
        spec = PARAMS["order"].check(self.order).strip()
        try:
            order = [int(part) - 1 for part in spec.split(",")] if spec else list(range(count))
        except ValueError:
            order = []
        if sorted(order) != list(range(count)):
            numbers = ",".join(str(k + 1) for k in range(count))
            raise InvalidParameter("order", spec, f"list each person's number once, e.g. {numbers}")
        object.__setattr__(self, "people", people)
        object.__setattr__(self, "person_names", tuple(names))
        object.__setattr__(self, "person_order", tuple(order))
        object.__setattr__(self, "face_images", people[0])

    def _check_mode(self) -> None:
        """The mode's own photo is there, and no other mode's parameter was changed from its default."""
        params = params_for(self.mode)
        spec = MODE_SPECS[self.mode]
        if spec.photo and _unset(getattr(self, spec.photo), None):
            what = spec.photo_what
            raise UserError(f"No {what.split(' ', 1)[1]}: add {what} (API: {spec.photo}).")
        for f in fields(self):
            if f.name in PARAMS and f.name not in params and not _unset(getattr(self, f.name), PARAMS[f.name].default):
                modes = ", ".join(PARAMS[f.name].modes)
                raise InvalidParameter(f.name, getattr(self, f.name), f"is not used by {self.mode} (only by {modes})")

    @classmethod
    def from_api(cls, values: Mapping[str, Any], mode: str = "generate") -> Request:
        """The request that the `mode` endpoint's flat parameters (`params_for(mode)`, by name) describe; missing
        ones take defaults.

        None stands for the default of any parameter but a boolean, as gradio_client may send it.
        """
        params = params_for(mode)
        unknown = set(values) - set(params)
        if unknown:
            raise InvalidParameter(sorted(unknown)[0], values[sorted(unknown)[0]], f"use {', '.join(params)}")
        given: dict[str, Any] = {}
        for name, param in params.items():
            value = values.get(name, param.default)
            given[name] = param.default if value is None and param.kind != "boolean" else value
        # Every parameter is a field of its own name or gathered below: none is dropped (`_check_declaration`).
        kwargs: dict[str, Any] = {name: value for name, value in given.items() if name not in GATHERED}
        kwargs["mode"] = mode
        if MODE_SPECS[mode].people:
            # One photo alone stands for a list of one.
            given_slots = [given[f"person_{k}"] for k in range(1, MAX_PEOPLE + 1)]
            slots = [
                PARAMS[f"person_{k + 1}"].check([x] if isinstance(x, (str, Path, dict)) else x) or []
                for k, x in enumerate(given_slots)
            ]
            while slots and not slots[-1]:
                slots.pop()  # empty slots at the end are people not asked for; one in between is an empty person
            kwargs["people"] = [[_file_path(x) for x in slot if x] for slot in slots]
            kwargs["face_images"] = []
        else:
            extras = PARAMS["extra_face_images"].check(given["extra_face_images"]) or []
            faces = [given["face_image"], *[_file_path(x) for x in extras]]
            kwargs["face_images"] = [face for face in faces if face]
        for name in given:
            if PARAMS[name].kind == "image" and name in kwargs:
                kwargs[name] = given[name] or None
        if PARAMS["randomize_seed"].check(given["randomize_seed"]):
            kwargs["seed"] = None
        return cls(**kwargs)


def _check_declaration(params: Mapping[str, Param], request: type) -> None:
    """Every declared parameter reaches the request: a field of its name with the declared default, or one
    `GATHERED` into another field; every field is a parameter or `DERIVED`. Run at import: a declaration that
    nothing takes (or a default written twice that drifted) stops the app from starting, never drops a value."""
    taken = {f.name: f for f in fields(request)}
    for name, param in params.items():
        if name in GATHERED:
            if GATHERED[name] not in taken:
                raise TypeError(f"parameter {name} is gathered into {GATHERED[name]}, which {request.__name__} lacks")
            continue
        if name not in taken:
            raise TypeError(f"parameter {name} is declared but {request.__name__} has no field for it: add the "
                            "field (its default from the declaration) or gather it in from_api (GATHERED)")
        if taken[name].default is not param.default and taken[name].default != param.default:
            raise TypeError(f"parameter {name}: {request.__name__}'s default {taken[name].default!r} is not the "
                            f"declared {param.default!r}; take it from the declaration (_default)")
    for name in taken:
        if name not in params and name not in DERIVED:
            raise TypeError(f"{request.__name__}.{name} is no declared parameter: declare it in PARAMS")
    for name, mode in ((n, m) for n, p in params.items() for m in p.modes):
        if mode not in MODE_SPECS:
            raise TypeError(f"parameter {name} names mode {mode!r}, which is not declared in MODE_SPECS")


_check_declaration(PARAMS, Request)


def _file_path(item: Any) -> Any:
    """A photo from a list of files: gradio_client may send each as a {"path": ...} mapping."""
    return item.get("path") if isinstance(item, dict) else item


@dataclass
class Result:
    """What a request of any mode returns. Images are PIL images; everything else is plain data."""

    images: list[Any]
    seed: int
    similarities: list[float | None]
    keypoint_image: Any
    timings_ms: dict[str, float]
    width: int
    height: int
    num_steps: int
    guidance_scale: float
    faces_found: int
    profile: str
    warnings: list[str] = field(default_factory=list)
    # Group: per image, each person's name -> the similarity of the output face matched to them (None: no face
    # matched); in person order. Empty in the other modes.
    person_similarities: list[dict[str, float | None]] = field(default_factory=list)
    # Group of two or more: per image, each person's name -> {"margin": their face's similarity to them minus its
    # best similarity to another person, "nearest_other": that person's name}, None where no face was matched.
    person_margins: list[dict[str, dict[str, Any] | None]] = field(default_factory=list)
    # The faces re-rendered at working size (refine_faces): the people's names in a group, "the face" otherwise.
    refined: list[str] = field(default_factory=list)


# A group face's margin below this is shown in its caption: unrelated people's ArcFace embeddings score
# 0.03 +- 0.07 (mean +- sd; 36 pairs of 9 people in the test photos, w600k_mbf), so a face within 0.1 of another
# person is about as close to them as the spread between strangers allows telling apart.
LOW_MARGIN = 0.1


# --- the three stages' hand-overs -------------------------------------------------------------------
# A request runs as prepare (CPU, main process) -> render (the GPU) -> finish (CPU, main process). On
# ZeroGPU render runs in a forked worker, so what crosses between the stages must pickle and stay small:
# numbers, text, numpy arrays and PIL images, never modules or tensors.


@dataclass
class Paste:
    """Where a face swap's redrawn crop goes back: the target photo, the crop box in it (x1, y1, x2, y2)
    and the feathered mask over the crop (float32, crop height x width, 0..1); `face` is the swapped face's
    box in the target (x1, y1, x2, y2), where the identity check looks."""

    target: Any
    box: tuple[int, int, int, int]
    region: Any
    face: tuple[float, float, float, float] | None = None


@dataclass
class GroupPerson:
    """One person of a group portrait, laid out: their identity embedding, their keypoint image (at the output
    size, their face alone) and their region (float32 height x width, 0 or 1; the people's regions do not
    overlap), where their face tokens and their IdentityNet residuals act."""

    embedding: Any
    keypoint_image: Any
    region: Any


@dataclass
class Refine:
    """One small face to re-render after the image, as a face swap onto it: the crop box around the face on the
    canvas (x1, y1, x2, y2), the working size it is drawn at, the face's keypoints there, the region redrawn
    (`mask_image`, white = redraw; hard-edged so it covers the feathered paste), the identity-conditioning mask
    (`face_mask`, None without enhance_face_region), and the feathered mask over the crop (float32, crop height x
    width, 0..1) it is pasted back through. `label` names the face in the result ("Ada", or "the face")."""

    label: str
    embedding: Any  # np.ndarray (512,), the person's identity
    box: tuple[int, int, int, int]
    width: int
    height: int
    keypoint_image: Any
    mask_image: Any
    face_mask: Any
    region: Any


@dataclass
class Job:
    """A prepared request: everything the GPU stage needs, with the inputs already decoded and measured.

    Restyle and swap add the photo the pipeline starts from (`init_image`, at the output size), swap the
    region it redraws (`mask_image`, white = redraw) and where the result goes back (`paste`).
    """

    prompt: str
    negative_prompt: str
    embedding: Any  # np.ndarray (512,), the averaged identity embedding
    keypoint_image: Any  # PIL image at the output size
    face_mask: Any  # np.ndarray (height, width) or None
    # Extra ControlNets: name -> (strength, image). Canny's edges are made in prepare; depth and pose carry
    # the cropped photo, which their estimators (GPU models) turn into the condition in render.
    controls: dict[str, tuple[float, Any]]
    width: int
    height: int
    num_images: int
    num_steps: int
    guidance_scale: float
    identitynet_strength: float
    adapter_strength: float
    scheduler: str  # the sampler that runs: the speed's own, or the request's
    speed: str  # a SPEEDS name: which LoRA (if any) the UNet runs with
    seed: int
    faces_found: int
    warnings: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    started: float = 0.0  # time.time() when prepare began: finish reports the request's total from it
    mode: str = "generate"
    init_image: Any = None  # PIL image (restyle, swap)
    mask_image: Any = None  # PIL "L" image (swap)
    strength: float = 1.0  # the share of the schedule that runs (restyle); 1 = all of it
    paste: Paste | None = None  # swap; finish's alone, never sent to the GPU stage (see __getstate__)
    # Group: the people's names in person order and their embeddings (np.ndarray (512,) each). With two or more
    # people, `group` holds what the pipeline needs per person (see `GroupPerson`); with one, the job is
    # Generate's own and `group` is empty.
    people: list[str] = field(default_factory=list)
    embeddings: list[Any] = field(default_factory=list)
    group: list[GroupPerson] = field(default_factory=list)
    # The small faces to re-render after the image (refine_faces), decided here so the GPU time asked is exact.
    refine: list[Refine] = field(default_factory=list)
    # The prompt the refined faces are drawn with, where it differs from `prompt` ("": the same): without the
    # framing's words, which in a crop around the face would ask for a whole body again.
    refine_prompt: str = ""

    @property
    def denoising_steps(self) -> int:
        """The steps the pipeline really runs: img2img skips the first (1 - strength) of the schedule, as
        diffusers computes it."""
        return min(int(self.num_steps * self.strength), self.num_steps)

    @property
    def total_steps(self) -> int:
        """Every denoising step of the GPU stage: the image's, then each refined face's full schedule per image."""
        return self.denoising_steps + len(self.refine) * self.num_images * self.num_steps

    def __getstate__(self) -> dict[str, Any]:
        # The GPU stage never reads `paste`, and its target photo can be tens of megapixels: ZeroGPU would
        # pickle it into the worker for nothing.
        return {**self.__dict__, "paste": None}


@dataclass(frozen=True)
class Step:
    """Progress of the GPU stage: `done` of `total` denoising steps, with a live preview of the first image every
    few steps (`models.preview.latent_preview`: RGB uint8 (h, w, 3) at 1/8 of the image's side, a few KB to pickle)."""

    done: int
    total: int
    preview: Any = field(default=None, compare=False, repr=False)
    stage: str = "denoising"  # or "refining faces": the small faces' passes after the image's own


@dataclass
class Rendered:
    """What the GPU stage returns: the images and its own timings."""

    images: list[Any]
    timings_ms: dict[str, float]


class Partial(tuple):
    """What an endpoint (`instantid.frontends.api`) yields while it works, before its final outputs (a plain tuple):
    the gallery holds the live preview (or is `gr.skip()`), seed, similarities and keypoints are `gr.skip()`, and the
    info is {"progress": {"stage": ..., "elapsed_s": ..., "step": i, "steps": n}} (step and steps once denoising
    began). gradio_client's `submit()` sees them as the job's outputs before the final ones; `predict()` returns
    the final ones alone."""
