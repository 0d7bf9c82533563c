"""The declaration of what a request can ask: each parameter (`PARAMS`), mode (`MODE_SPECS`) and speed
(`SPEEDS`) as one record, with the checks and bounds they share.

The API's signatures and docstrings, the page's controls, the command line's flags and `Request`'s validation
are all made from these records (requests.py holds `Request` and the types that flow between the stages). No
torch here: the front ends import it.
"""

from __future__ import annotations

import math
import numbers
import random
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .errors import InvalidParameter
from .settings import CONTROL_TYPES, CONTROLNET_NAMES
from .styles import NO_STYLE, STYLE_NAMES

# An image as any caller may hand it over: a path, raw bytes, a PIL image or an RGB uint8 array.
ImageInput = Union[str, Path, bytes, Any]

MAX_SEED = 2**31 - 1
MAX_IMAGES = 4
MAX_STEPS = 100
MAX_PROMPT_CHARS = 2000
MAX_STRENGTH = 1.5
# The largest output side a server may allow (INSTANTID_MAX_OUTPUT_SIDE; its default is 1280).
MAX_SIDE = 4096
# refine_faces: "auto" is the mode's own default (`Mode.refines`).
REFINE_CHOICES: tuple[str, ...] = ("auto", "on", "off")
# Composition without a pose photo (`instantid.vision.framing` holds the shares and the 3D face behind them).
FRAMING_CHOICES: tuple[str, ...] = ("photo", "portrait", "half body", "full body")
HEAD_ANGLE_CHOICES: tuple[str, ...] = ("photo", "front", "left", "right", "up", "down")
# Degrees. Within +-45 of yaw both eyes stay in view, so a five-point detector (which made the IdentityNet's
# training keypoints) still finds them; past +-30 of pitch the nose covers the mouth line or the eyes go under
# the brows, and the five points stop describing a face.
MAX_YAW = 45
MAX_PITCH = 30
# Face numbers a swap may ask for (0 = the largest); a photo holds rarely more, the detector finds few more.
MAX_FACE_INDEX = 99

# Same names as the official InstantID Space, plus Euler ancestral; "-Karras" / "-SDE" are variants.
SCHEDULERS: tuple[str, ...] = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverMultistepScheduler-Karras",
    "DPMSolverMultistepScheduler-Karras-SDE",
    "UniPCMultistepScheduler",
)
DEFAULT_SCHEDULER = "EulerDiscreteScheduler"

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 5.0
LCM_STEPS = 5
# diffusers' LCMScheduler spreads its steps over the 50 it was distilled on (original_inference_steps) and
# raises past them: the visitor got the generic "try again" message for LCM with 60 steps.
MAX_LCM_STEPS = 50
LCM_GUIDANCE = 1.5
DEFAULT_STRENGTH = 0.8
DEFAULT_CONTROLNET_STRENGTH = 0.4
DEFAULT_PROMPT = "a portrait photo of a person, high quality, detailed face"
DEFAULT_RESTYLE_STRENGTH = 0.8


@dataclass(frozen=True)
class Speed:
    """One way to sample: the LoRA it folds into the UNet and the settings that LoRA's model card prescribes.

    `steps` and `guidance` are the automatic values (a request's 0); `scheduler` overrides the request's own
    (None: the request's). The LoRA is named by the `Settings` field holding its Hub reference.
    """

    name: str
    lora: str | None  # a Settings field (its checkpoint), or None: the base weights
    steps: int
    guidance: float  # 1 or less: guidance off
    scheduler: str | None
    summary: str


# The speeds a visitor chooses from, and LCM (`enable_lcm`, kept for callers of the earlier API). Sampler
# settings from the LoRAs' model cards: Hyper-SDXL's 8-step CFG LoRA (ByteDance/Hyper-SD: guidance 5 to 8,
# DDIM with trailing timesteps) keeps guidance, so the negative prompt still works; SDXL-Lightning's 4-step
# LoRA (ByteDance/SDXL-Lightning: Euler, trailing timesteps, no guidance) is the fastest that the PuLID paper
# (section 4.2) reports InstantID to work well with. Both are openrail++.
SPEEDS: dict[str, Speed] = {
    s.name: s
    for s in (
        Speed("quality", None, DEFAULT_STEPS, DEFAULT_GUIDANCE, None, "30 steps with guidance, any scheduler"),
        Speed("fast", "fast_lora", 8, 5.0, "DDIMScheduler-trailing",
              "8 steps with guidance (Hyper-SDXL 8-step CFG LoRA)"),
        Speed("turbo", "turbo_lora", 4, 1.0, "EulerDiscreteScheduler-trailing",
              "4 steps without guidance (SDXL-Lightning 4-step LoRA)"),
        Speed("lcm", "lcm_lora", LCM_STEPS, LCM_GUIDANCE, "LCMScheduler", "LCM-LoRA: 5 steps, guidance 1.5"),
    )
}
SPEED_CHOICES: tuple[str, ...] = ("quality", "fast", "turbo")
DEFAULT_SPEED = "quality"

# The pipelines a mode can run with: text to image, img2img (a photo redrawn) and inpainting (a region redrawn).
PIPELINES: tuple[str, ...] = ("base", "img2img", "inpaint")
_CONTROLS_LABEL = "Extra ControlNets (from the pose photo, or the face photo)"


@dataclass(frozen=True)
class Mode:
    """One thing a request can ask for, declared once: it is an API endpoint and a command of its name and a
    choice on the page. The API docstring, the command's help, the page's labels and the request's checks read
    it; the engine runs it with `pipeline` and draws it with its scene (`instantid.request.scenes.SCENES`, one per mode,
    checked at import). Which parameters it takes is each `Param`'s `modes`.
    """

    name: str
    label: str  # the page's mode choice
    button: str  # the page's run button
    photos_label: str  # the page's accordion of optional photos
    summary: str  # the API docstring's first paragraph
    command_help: str  # `python -m instantid --help`'s line
    pipeline: str  # one of PIPELINES
    photo: str = ""  # its own photo, required (a Param name), e.g. the photo to restyle
    photo_what: str = ""  # that photo, as a sentence names it ("a photo to restyle")
    people: bool = False  # identities from person_1 .. person_N, else from face_image and its extras
    refines: bool = False  # refine_faces "auto": re-render small faces by default
    controls_label: str = ""  # the page's label of the extra ControlNets; "": the mode takes none
    before_after: bool = False  # the page shows its own photo and the first result as before/after

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINES:
            raise ValueError(f"mode {self.name}: pipeline {self.pipeline!r} is not one of {PIPELINES}")
        if bool(self.photo) != bool(self.photo_what) or (self.before_after and not self.photo):
            raise ValueError(f"mode {self.name}: photo and photo_what go together, and before_after needs a photo")


MODE_SPECS: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("generate", "Generate", "Generate", "More photos and a pose reference",
             "Generate images of the person in a face photo, in the scene the prompt describes (InstantID on SDXL).",
             "generate images of the person in --face", "base", controls_label=_CONTROLS_LABEL),
        Mode("restyle", "Restyle", "Restyle", "More photos of the same person",
             "Restyle a photo: redraw source_image under the prompt and style with the identity of the person in "
             "face_image (InstantID on SDXL img2img); strength says how far from the source.",
             "redraw --source under the prompt and style with the identity of --face", "img2img",
             photo="source_image", photo_what="a photo to restyle",
             controls_label="Extra ControlNets (from the photo to restyle)"),
        Mode("swap", "Face swap", "Swap face", "More photos of the same person",
             "Face swap: replace a face of target_image (face_index, 0 = the largest) by the person in face_image "
             "(InstantID on SDXL inpainting); every pixel away from that face keeps the target's value.",
             "replace a face of --target (--face-index, 0 = the largest) by the person in --face", "inpaint",
             photo="target_image", photo_what="a photo to swap a face into", before_after=True),
        Mode("group", "Group", "Make group portrait", "More people and a layout photo",
             "Group portrait: two to four people (person_1 .. person_4, one photo or several each) in one image, "
             "each keeping their own identity in their own place; the faces are placed as in layout_image (left to "
             "right, or in the given order) or side by side. The similarities are per image, {name: score} per "
             "person.",
             "a group portrait of two to four people (--person, once per person), each keeping their identity",
             "base", people=True, refines=True),
    )
}
# The modes' names, in the order the API, the command line and the page list them.
MODES: tuple[str, ...] = tuple(MODE_SPECS)
# Group portraits: people per image (one photo slot each in the API: person_1 .. person_4).
MAX_PEOPLE = 4
# Photos of one person (averaged into one identity), as for the face photo and its extras.
MAX_PHOTOS_PER_PERSON = 8


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a request: consecutive seeds, so each image can be made again alone."""
    return (seed + index) % (MAX_SEED + 1)


def clean_text(text: str) -> str:
    """`text` without control characters (newline and tab stay) and without lone UTF-16 surrogates.

    Control characters carry nothing a text encoder can use (and terminal escapes have no business in
    logs); lone surrogates (from JSON escapes, or undecodable bytes on a command line) make the fast
    tokenizers raise. Format characters such as the zero-width joiner stay: emoji sequences need them.
    """
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs"))


def split_names(text: str) -> list[str]:
    """A group's names as typed: separated by commas (or line breaks), each stripped of spaces; a name in
    double quotes may hold commas (`"Smith, Ada", Ben`), and `""` inside quotes is one quote character, as in
    CSV. Empty entries stay (a doubled comma leaves that person's default name); "" gives no names."""
    names: list[str] = []
    name: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == '"' and text[i + 1:i + 2] == '"':
                name.append('"')
                i += 1
            elif ch == '"':
                quoted = False
            else:
                name.append(ch)
        elif ch == '"' and not "".join(name).strip():  # a quote opens only at a name's start (O"Neil stays)
            name, quoted = [], True
        elif ch in ",\n":
            names.append("".join(name).strip())
            name = []
        else:
            name.append(ch)
        i += 1
    if quoted:
        raise InvalidParameter("names", text, 'a quote is not closed: write "Smith, Ada", Ben to keep a comma '
                               "inside a name")
    names.append("".join(name).strip())
    return [] if names == [""] else names


def format_bound(value: float) -> str:
    # Whole bounds in full ("0..2147483647", not "0..2.14748e+09"): the caller must be able to use them.
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_number(name: str, value: Any, lo: float, hi: float, *, integer: bool = False, step: float = 0) -> Any:
    """`value` if it is a number in lo..hi (a whole one for `integer`; a multiple of `step` when > 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameter(name, value, f"must be a number, not {type(value).__name__}")
    span = f"{format_bound(lo)}..{format_bound(hi)}"
    whole = math.isfinite(float(value)) and float(value).is_integer()
    if not math.isfinite(float(value)) or not lo <= float(value) <= hi or (integer and not whole):
        raise InvalidParameter(name, value, f"must be {'an integer' if integer else 'a number'} in {span}")
    if step > 1 and value % step:
        raise InvalidParameter(name, value, f"use 0 (automatic) or a multiple of {step:g} up to {format_bound(hi)}")
    return int(value) if integer else float(value)


def check_controls(name: str, value: Any) -> dict[str, float]:
    """Extra ControlNets as {name: strength}; a list of names takes the default strength for each."""
    if value is None:
        return {}
    if isinstance(value, (list, tuple)):
        value = dict.fromkeys(value, DEFAULT_CONTROLNET_STRENGTH)
    if not isinstance(value, Mapping):
        example = f'{{"{CONTROLNET_NAMES[0]}": {DEFAULT_CONTROLNET_STRENGTH}}}'
        names = ", ".join(CONTROLNET_NAMES)
        raise InvalidParameter(name, value, f"must map names ({names}) to strengths, e.g. {example}")
    out = {}
    for key, strength in value.items():
        if key not in CONTROLNET_NAMES:
            raise InvalidParameter(name, key, f"choose from {', '.join(CONTROLNET_NAMES)}")
        out[key] = float(check_number(f"{name}[{key}]", strength, 0, MAX_STRENGTH))
    return out


@dataclass(frozen=True)
class Param:
    """One request parameter, declared once. The API signature and its docstring (`instantid.frontends.api`),
    the page's controls (`instantid.frontends.ui`), the command-line flags (`instantid.frontends.cli`) and validation
    (`check`) are all made from these entries; `Request` holds the checked values.
    """

    name: str
    kind: str  # image | images | text | choice | integer | number | boolean | controls
    default: Any
    help: str  # the API docstring's line and the command-line help
    label: str = ""  # the page's label ("" = API only)
    lo: float = 0
    hi: float = 0
    step: float = 0  # integers with a step > 1 must be multiples of it (0 = automatic stays allowed)
    choices: tuple[str, ...] = ()
    flag: str | None = ""  # command line: "" = --<name-with-dashes>; None = none of its own
    info: str = ""  # the hint under the page's control
    section: str = "advanced"  # where the page shows it: main | photos | advanced
    required: bool = False  # the API signature gives it no default
    modes: tuple[str, ...] = MODES  # the endpoints (and commands) that take it

    def check(self, value: Any) -> Any:
        """`value` as sent, checked strictly (nothing converted that a caller did not mean); the clean value."""
        if self.kind == "boolean":
            if not isinstance(value, bool):
                raise InvalidParameter(self.name, value, "must be true or false (a boolean, not text or a number)")
            return value
        if self.kind in ("text", "choice"):
            if not isinstance(value, str):
                raise InvalidParameter(self.name, value, f"must be text, not {type(value).__name__}")
            if self.choices and value not in self.choices:
                raise InvalidParameter(self.name, value, f"choose one of {', '.join(self.choices)}")
            if len(value) > MAX_PROMPT_CHARS:
                limit = f"use at most {MAX_PROMPT_CHARS} characters"
                raise InvalidParameter(self.name, f"{len(value)} characters", limit)
            return clean_text(value)
        if self.kind in ("integer", "number"):
            return check_number(self.name, value, self.lo, self.hi, integer=self.kind == "integer", step=self.step)
        if self.kind == "controls":
            return check_controls(self.name, value)
        if self.kind == "images" and value is not None and not isinstance(value, (list, tuple)):
            raise InvalidParameter(self.name, value, "must be a list of photos")
        return value  # photos: `instantid.vision.images` checks them when it decodes them


_STRENGTH: dict[str, Any] = {"kind": "number", "lo": 0, "hi": MAX_STRENGTH, "step": 0.05}
_SIDE: dict[str, Any] = {"kind": "integer", "default": 0, "lo": 0, "hi": MAX_SIDE, "step": 64, "info": "0 = automatic"}
_CONTROLLED = tuple(m.name for m in MODE_SPECS.values() if m.controls_label)  # the modes with extra ControlNets
# The modes that draw a whole picture: its size can be chosen and its small faces refined. An inpainting mode
# redraws a crop at the working size (a face swap's is its face's).
_PICTURE = tuple(m.name for m in MODE_SPECS.values() if m.pipeline != "inpaint")
# The modes that place faces themselves when no photo sets the layout (framing, head angle).
_COMPOSED = ("generate", "group")
_ONE_FACE = tuple(m.name for m in MODE_SPECS.values() if not m.people)  # one identity: face_image and its extras
_AUTO_STEPS = ", ".join(f"{s.steps} {s.name}" for s in SPEEDS.values())
_AUTO_GUIDANCE = ", ".join(f"{s.guidance:g} {s.name}" if s.guidance > 1 else f"off {s.name}" for s in SPEEDS.values())

# Every parameter of a generation, in the API's order.
PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param("face_image", "image", None, "Photo of the person's face; with several faces the largest is used.",
              "Face photo", flag="--face", section="main", required=True, modes=_ONE_FACE),
        Param("source_image", "image", None, "Photo to restyle: it is noised and redrawn under the prompt and style "
              "with the identity of face_image; its face (if any) gives the face layout.", "Photo to restyle",
              flag="--source", section="main", required=True, modes=("restyle",)),
        Param("target_image", "image", None, "Photo whose face is replaced by the identity of face_image; every pixel "
              "away from that face is kept.", "Photo to swap a face into", flag="--target", section="main",
              required=True, modes=("swap",)),
        *(Param(f"person_{k}", "images", None, f"Group: photo(s) of person {k} (several are averaged into one "
                "identity). People are numbered by these slots; fill them from person_1 on.",
                f"Person {k}: photo(s)", flag=None, section="main" if k <= 2 else "photos", modes=("group",),
                required=k <= 2)  # two people at least (the API's signature asks for both; the engine takes one)
          for k in range(1, 3)),
        Param("prompt", "text", "", 'What to draw, e.g. "a woman as an astronaut, cinematic light"; empty gives a '
              "plain portrait.", "Prompt", section="main", required=True),
        Param("extra_face_images", "images", None, "More photos of the same person (optional); their identity "
              "embeddings are averaged.", "More photos of the same person (optional, averaged)", flag=None,
              section="photos", modes=_ONE_FACE),
        *(Param(f"person_{k}", "images", None, f"Group: photo(s) of person {k} (optional).",
                f"Person {k}: photo(s) (optional)", flag=None, section="photos", modes=("group",))
          for k in range(3, MAX_PEOPLE + 1)),
        Param("names", "text", "", 'Group: the people\'s names in person order, separated by commas, e.g. "Ada, Ben" '
              "(used in the captions and scores); quote a name that holds a comma (\"Smith, Ada\", Ben); an empty name "
              "gives Person 1, Person 2, ...", "Names (comma-separated, "
              "optional)", section="main", modes=("group",)),
        Param("layout_image", "image", None, "Group: optional photo whose faces give the layout (at least as many "
              "faces as people; the largest are used, assigned left to right); without it the people stand side "
              "by side.", "Layout photo (optional)", flag="--layout", section="photos", modes=("group",)),
        Param("order", "text", "", 'Group: which person goes on which layout face, left to right, as person numbers, '
              'e.g. "2,1" puts person 2 on the left; empty = 1,2,...', "Order, left to right (optional)",
              section="photos", modes=("group",)),
        Param("pose_image", "image", None, "Optional photo whose face position (and pose, depth or edges, see "
              "controlnets) is followed.", "Pose photo (optional)", flag="--pose", section="photos",
              modes=("generate",)),
        Param("framing", "choice", "photo", "Where the face goes without a pose photo: photo keeps the face photo's "
              "own place, size and crop; portrait is head and shoulders (square), half body head to waist and full "
              "body the whole figure (both portrait orientation, SDXL's 896x1152 and 832x1216 unless width and "
              "height are given); full body refines its small face by default (refine_faces auto). A prompt that names "
              "no framing gets the framing's words in front (e.g. \"full body shot, \"). Group: each person's face "
              "size side by side. Ignored (with a warning) when a pose or layout photo is given.",
              "Framing", choices=FRAMING_CHOICES, section="main", modes=_COMPOSED,
              info="photo: as in the face photo"),
        Param("head_angle", "choice", "photo", "Which way the face looks without a pose photo: photo keeps the face "
              "photo's own angle; front, left, right (30 degrees towards the picture's side), up, down (20 degrees) "
              "turn the photo's keypoints on a 3D face model. Only the layout changes, the identity stays the "
              "photo's. head_yaw and head_pitch give exact degrees instead.", "Head angle",
              choices=HEAD_ANGLE_CHOICES, section="main", modes=_COMPOSED,
              info="photo: as in the face photo"),
        Param("head_yaw", "number", None, f"Head turn in degrees, -{MAX_YAW} (towards the picture's left) to "
              f"{MAX_YAW} (its right), instead of head_angle; not given (null): head_angle decides.", lo=-MAX_YAW,
              hi=MAX_YAW, modes=_COMPOSED),
        Param("head_pitch", "number", None, f"Head tilt in degrees, -{MAX_PITCH} (down) to {MAX_PITCH} (up), instead "
              "of head_angle; not given (null): head_angle decides.", lo=-MAX_PITCH, hi=MAX_PITCH, modes=_COMPOSED),
        Param("negative_prompt", "text", "", "What to avoid in the image.", "Negative prompt", section="main"),
        Param("style", "choice", NO_STYLE, f'Style template applied to the prompt; "{NO_STYLE}" uses the prompt '
              "as written.", "Style", choices=STYLE_NAMES, section="main"),
        Param("num_images", "integer", 1, f"How many images to make (1 to {MAX_IMAGES}), from consecutive seeds.",
              "Number of images", lo=1, hi=MAX_IMAGES, step=1, section="main"),
        Param("width", help="Output width in pixels, a multiple of 64; 0 sizes the output from the photo (short "
              "side 1024).", label="Width", modes=_PICTURE, **_SIDE),
        Param("height", help="Output height in pixels, a multiple of 64; 0 sizes it from the photo. Set both or "
              "neither.", label="Height", modes=_PICTURE, **_SIDE),
        Param("strength", "number", DEFAULT_RESTYLE_STRENGTH, "How far the result may move from the source photo, 0 to "
              "1: low keeps its colours and shapes, 1 redraws it entirely (only the steps x strength last denoising "
              "steps run).", "Restyle strength", lo=0, hi=1, step=0.05, flag="--strength", section="main",
              modes=("restyle",)),
        Param("face_index", "integer", 0, "Which face of the target photo to replace: 0 is the largest, 1 the next, "
              "and so on (the order `python -m instantid faces` lists them in).", "Face to replace (0 = largest)",
              lo=0, hi=MAX_FACE_INDEX, step=1, flag="--face-index", section="main", modes=("swap",)),
        Param("num_steps", "integer", 0, f"Denoising steps, 1 to {MAX_STEPS} (1 to {MAX_LCM_STEPS} with LCM); 0 "
              f"means the speed's own ({_AUTO_STEPS}).", "Steps", lo=0, hi=MAX_STEPS, step=1, flag="--steps",
              info=f"0 = automatic ({_AUTO_STEPS})"),
        Param("guidance_scale", "number", 0.0, f"Guidance scale up to 20; 0 means the speed's own ({_AUTO_GUIDANCE});"
              " 1 or less is off.", "Guidance scale", lo=0, hi=20, step=0.1, flag="--guidance",
              info=f"0 = automatic ({_AUTO_GUIDANCE}); 1 or less turns guidance off"),
        Param("identitynet_strength", default=DEFAULT_STRENGTH, help="IdentityNet (face ControlNet) strength, 0 "
              "to 1.5; higher follows the face layout more.", label="IdentityNet strength (face layout)",
              flag="--identity-strength", **_STRENGTH),
        Param("adapter_strength", default=DEFAULT_STRENGTH, help="Face adapter strength, 0 to 1.5; higher keeps "
              "the identity closer, the prompt less.", label="Adapter strength (identity detail)", **_STRENGTH),
        Param("controlnets", "controls", None, f"Extra ControlNets ({', '.join(CONTROLNET_NAMES)}) fed from the "
              f"pose photo (or the face photo; restyle: the source photo), each with its strength, 0 to 1.5 "
              f"({DEFAULT_CONTROLNET_STRENGTH} when not given): in the API a mapping such as {{\"pose\": 0.4}} or a "
              "list of names.",
              _CONTROLS_LABEL, flag="--controlnet", modes=_CONTROLLED),
        Param("scheduler", "choice", DEFAULT_SCHEDULER, 'Sampler, e.g. "EulerDiscreteScheduler" or '
              '"DPMSolverMultistepScheduler-Karras".', "Scheduler", choices=SCHEDULERS),
        Param("speed", "choice", DEFAULT_SPEED, "quality: 30 steps with guidance, any scheduler; fast: 8 steps "
              "with guidance (Hyper-SDXL 8-step LoRA, about a quarter of the time); turbo: 4 steps without guidance "
              "(SDXL-Lightning 4-step LoRA, about a tenth; the negative prompt has no effect). fast and turbo use "
              "their own sampler.", "Speed", choices=SPEED_CHOICES, section="main",
              info="quality: 30 steps; fast: 8 steps; turbo: 4 steps, no negative prompt"),
        Param("enable_lcm", "boolean", False, "The earlier fast mode, with the LCM LoRA (5 steps, guidance 1.5); "
              "speed fast or turbo gives better images in the same time.", "LCM fast mode", flag="--lcm",
              info="few steps, lower quality; prefer Speed"),
        # No seed given is a random one, on every front end (the page's Randomize box draws it, on by default);
        # the seed used is always returned, so any image can be made again.
        Param("seed", "integer", None, f"Random seed, 0 to {MAX_SEED}; the same seed and settings give the same "
              "images. Not given (or null): a random one; the seed used is returned.", "Seed", lo=0, hi=MAX_SEED,
              step=1),
        Param("randomize_seed", "boolean", False, "Ignore seed and pick a random one (the seed used is returned)."),
        Param("enhance_face_region", "boolean", True, "Confine the identity conditioning to the face region, "
              "leaving the rest to the prompt.", "Enhance face region"),
        # Three states, not a boolean: Group wants it on by default and the others off, and a Param has one
        # default; "auto" (the mode's own) is a value every caller (API, page, command line) can send and see.
        Param("refine_faces", "choice", "auto", "Re-render each face smaller than a quarter of the working size's "
              "short side at full working size with its person's identity (a face swap onto the image: crop, "
              "inpaint, feathered paste-back, same seed); each such face costs one more render. auto: on for "
              "group and for a framing other than photo (full body's face is small), off otherwise.",
              "Refine small faces", choices=REFINE_CHOICES, flag="--refine-faces", modes=_PICTURE,
              info="auto: on for Group and full body, off otherwise; each small face costs one more render"),
    )
}


def params_for(mode: str) -> dict[str, Param]:
    """The parameters the `mode` endpoint (and command) takes, in the API's order."""
    if mode not in MODES:
        raise InvalidParameter("mode", mode, f"choose one of {', '.join(MODES)}")
    return {name: p for name, p in PARAMS.items() if mode in p.modes}


def field_label(name: str) -> str:
    """A parameter as the page labels it, without the label's parenthesis ("Face to replace (0 = largest)" is
    "Face to replace"); a strength inside `controlnets` ("controlnets[pose]") is its slider's label."""
    base, bracket, key = name.partition("[")
    if bracket and key.rstrip("]") in CONTROL_TYPES:
        return f"{CONTROL_TYPES[key.rstrip(']')].label} strength"
    label = PARAMS[base].label if base in PARAMS and PARAMS[base].label else base.replace("_", " ").capitalize()
    return re.sub(r"\s+\([^()]*\)$", "", label)


def labelled_sentence(exc: InvalidParameter) -> str:
    """The refusal `exc` as the page says it, naming the field as labelled: "Steps must be an integer in
    0..100 (you gave 1000)." where the API says "Invalid num_steps=1000: ...". The API's names stay the API's
    (its callers send those); a visitor of the page sees only the labels."""
    subject = " and ".join(field_label(part) for part in exc.name.split("/"))
    value = exc.value
    shown = str(value) if isinstance(value, (numbers.Real, str)) and value != "" else repr(value)
    if isinstance(value, tuple):
        shown = " and ".join(str(v) for v in value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    joined = f"{subject} {exc.allowed}" if exc.allowed.startswith(("must ", "is ")) else f"{subject}: {exc.allowed}"
    return f"{joined} (you gave {shown})."


# Request fields where None means "automatic": the mode's default steps and guidance (0 too), a random seed.
AUTOMATIC = ("num_steps", "guidance_scale", "seed")
# The parameters that reach the request gathered into a field of another name (`from_api` does it): the face
# photos into one list, the person slots into the people, randomize_seed into a seed of None. Every other
# parameter is the request's field of its own name, with the declaration's default (`_check_declaration`).
GATHERED: dict[str, str] = {
    "face_image": "face_images",
    "extra_face_images": "face_images",
    **{f"person_{k}": "people" for k in range(1, MAX_PEOPLE + 1)},
    "randomize_seed": "seed",
}
# The request's fields that are no parameter: what `GATHERED` fills, the mode, and what the checks work out.
DERIVED: tuple[str, ...] = ("face_images", "people", "mode", "notes", "person_names", "person_order")
