"""The request and result types that flow UI/API/CLI -> engine -> back, and their validation.

Plain dataclasses with no torch inside, so they pickle (ZeroGPU sends them across processes) and the
UI can import them without importing torch.
"""

from __future__ import annotations

import math
import numbers
import random
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from .errors import InvalidParameter, UserError
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
    it; the engine runs it with `pipeline` and draws it with its scene (`instantid.engine.SCENES`, one per mode,
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
    """One request parameter, declared once. The API signature and its docstring (`instantid.api`), the
    page's controls (`instantid.ui`), the command-line flags (`instantid.__main__`) and validation (`check`)
    are all made from these entries; `Request` holds the checked values.
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
        return value  # photos: `instantid.images` checks them when it decodes them


_STRENGTH: dict[str, Any] = {"kind": "number", "lo": 0, "hi": MAX_STRENGTH, "step": 0.05}
_SIDE: dict[str, Any] = {"kind": "integer", "default": 0, "lo": 0, "hi": MAX_SIDE, "step": 64, "info": "0 = automatic"}
_CONTROLLED = tuple(m.name for m in MODE_SPECS.values() if m.controls_label)  # the modes with extra ControlNets
# The modes that draw a whole picture: its size can be chosen and its small faces refined. An inpainting mode
# redraws a crop at the working size (a face swap's is its face's).
_PICTURE = tuple(m.name for m in MODE_SPECS.values() if m.pipeline != "inpaint")
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
              "group, off for generate and restyle.", "Refine small faces", choices=REFINE_CHOICES,
              flag="--refine-faces", modes=_PICTURE,
              info="auto: on for Group, off otherwise; each small face costs one more render"),
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

    @property
    def refines(self) -> bool:
        """Whether small faces are re-rendered after the image ("auto": the mode's default)."""
        if self.refine_faces == "auto":
            return MODE_SPECS[self.mode].refines
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
    few steps (`pipeline.latent_preview`: RGB uint8 (h, w, 3) at 1/8 of the image's side, a few KB to pickle)."""

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
    """What an endpoint (`instantid.api`) yields while it works, before its final outputs (a plain tuple): the
    gallery holds the live preview (or is `gr.skip()`), seed, similarities and keypoints are `gr.skip()`, and the
    info is {"progress": {"stage": ..., "elapsed_s": ..., "step": i, "steps": n}} (step and steps once denoising
    began). gradio_client's `submit()` sees them as the job's outputs before the final ones; `predict()` returns
    the final ones alone."""
