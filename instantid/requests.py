"""The request and result types that flow UI/API/CLI -> engine -> back, and their validation.

Plain dataclasses with no torch inside, so they pickle (ZeroGPU sends them across processes) and the
UI can import them without importing torch.
"""

from __future__ import annotations

import math
import numbers
import random
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from .errors import InvalidParameter
from .settings import CONTROLNET_NAMES
from .styles import NO_STYLE, STYLE_NAMES

# An image as any caller may hand it over: a path, raw bytes, a PIL image or an RGB uint8 array.
ImageInput = Union[str, Path, bytes, Any]

MAX_SEED = 2**31 - 1
MAX_IMAGES = 4
MAX_STEPS = 100
MAX_PROMPT_CHARS = 2000
MAX_STRENGTH = 1.5

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


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def clean_text(text: str) -> str:
    """`text` without control characters (newline and tab stay) and without lone UTF-16 surrogates.

    Control characters carry nothing a text encoder can use (and terminal escapes have no business in
    logs); lone surrogates (from JSON escapes, or undecodable bytes on a command line) make the fast
    tokenizers raise. Format characters such as the zero-width joiner stay: emoji sequences need them.
    """
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs"))


def format_bound(value: float) -> str:
    # Whole bounds in full ("0..2147483647", not "0..2.14748e+09"): the caller must be able to use them.
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# What each API parameter accepts, checked on the value as sent, before anything converts it: Gradio would
# otherwise read "false" as true, round 3.7 to 4 and take a dict's keys for a list of names.
API_KINDS: dict[str, str] = {
    **dict.fromkeys(("prompt", "negative_prompt", "style", "scheduler"), "text"),
    **dict.fromkeys(("num_images", "width", "height", "num_steps", "seed"), "integer"),
    **dict.fromkeys(
        ("guidance_scale", "identitynet_strength", "adapter_strength", "pose_strength", "canny_strength",
         "depth_strength"),
        "number",
    ),
    **dict.fromkeys(("enable_lcm", "randomize_seed", "enhance_face_region"), "boolean"),
    "controlnets": "names",
}


def check_kind(name: str, value: object, kind: str) -> None:
    """Refuse `value` unless it is of `kind` (see `API_KINDS`); None is left to the range checks."""
    if kind == "boolean":
        if not isinstance(value, bool):
            raise InvalidParameter(name, value, "must be true or false (a boolean, not text or a number)")
        return
    if value is None:
        return
    if kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidParameter(name, value, f"must be a number, not {type(value).__name__}")
        if kind == "integer" and math.isfinite(float(value)) and not float(value).is_integer():
            raise InvalidParameter(name, value, "must be a whole number")
    elif kind == "text":
        if not isinstance(value, str):
            raise InvalidParameter(name, value, f"must be text, not {type(value).__name__}")
    elif kind == "names":
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise InvalidParameter(
                name, value, f"must be a list of names from {', '.join(CONTROLNET_NAMES)} (their strengths go "
                "in pose_strength, canny_strength and depth_strength)"
            )
        for item in value:
            if item not in CONTROLNET_NAMES:
                raise InvalidParameter(name, item, f"choose from {', '.join(CONTROLNET_NAMES)}")


def _number(name: str, value: object, lo: float, hi: float, *, integer: bool) -> float:
    span = f"{format_bound(lo)}..{format_bound(hi)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameter(name, value, f"must be {'an integer' if integer else 'a number'} in {span}")
    if not math.isfinite(float(value)) or not lo <= float(value) <= hi:
        raise InvalidParameter(name, value, f"must be {'an integer' if integer else 'a number'} in {span}")
    if integer and float(value) != int(float(value)):
        raise InvalidParameter(name, value, f"must be an integer in {span}")
    return float(value)


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request. `None` means "the default for this mode" (LCM changes steps/guidance)."""

    face_images: Sequence[ImageInput]
    prompt: str = ""
    negative_prompt: str = ""
    pose_image: ImageInput | None = None
    style: str = NO_STYLE
    num_images: int = 1
    width: int = 0  # 0 = automatic from the face (or pose) photo
    height: int = 0
    num_steps: int | None = None
    guidance_scale: float | None = None
    identitynet_strength: float = DEFAULT_STRENGTH
    adapter_strength: float = DEFAULT_STRENGTH
    controlnets: Mapping[str, float] = field(default_factory=dict)
    scheduler: str = DEFAULT_SCHEDULER
    enable_lcm: bool = False
    seed: int | None = None  # None = random; the result says which seed was used
    enhance_face_region: bool = True

    def validated(self, *, max_side: int = 1280) -> GenerateRequest:
        """Return a copy with defaults filled in, or raise `InvalidParameter` naming what is wrong."""
        if not self.face_images:
            raise InvalidParameter("face_image", None, "a face photo is required")
        if len(self.face_images) > 8:
            raise InvalidParameter("extra_face_images", len(self.face_images), "use at most 8 photos in all")
        for name in ("enable_lcm", "enhance_face_region"):
            check_kind(name, getattr(self, name), "boolean")
        texts = {}
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidParameter(name, value, "must be text")
            if len(value) > MAX_PROMPT_CHARS:
                raise InvalidParameter(name, f"{len(value)} characters", f"use at most {MAX_PROMPT_CHARS} characters")
            texts[name] = clean_text(value)
        if self.style not in STYLE_NAMES:
            raise InvalidParameter("style", self.style, f"choose one of {', '.join(STYLE_NAMES)}")
        if self.scheduler not in SCHEDULERS:
            raise InvalidParameter("scheduler", self.scheduler, f"choose one of {', '.join(SCHEDULERS)}")
        num_images = int(_number("num_images", self.num_images, 1, MAX_IMAGES, integer=True))
        sizes = {}
        for name in ("width", "height"):
            value = int(_number(name, getattr(self, name), 0, max_side, integer=True))
            if value % 64:
                raise InvalidParameter(name, value, f"use 0 (automatic) or a multiple of 64 up to {max_side}")
            sizes[name] = value
        if (sizes["width"] == 0) != (sizes["height"] == 0):
            raise InvalidParameter(
                "width/height", (sizes["width"], sizes["height"]), "set both or neither (0 = automatic)"
            )
        steps_default = LCM_STEPS if self.enable_lcm else DEFAULT_STEPS
        guidance_default = LCM_GUIDANCE if self.enable_lcm else DEFAULT_GUIDANCE
        steps = (
            steps_default
            if self.num_steps in (None, 0)
            else int(_number("num_steps", self.num_steps, 1, MAX_STEPS, integer=True))
        )
        if self.enable_lcm and steps > MAX_LCM_STEPS:
            limit = f"use 1..{MAX_LCM_STEPS} with LCM fast mode (its scheduler's limit), or switch LCM off"
            raise InvalidParameter("num_steps", steps, limit)
        guidance = (
            guidance_default
            if self.guidance_scale is None
            else _number("guidance_scale", self.guidance_scale, 0.0, 20.0, integer=False)
        )
        identity = _number("identitynet_strength", self.identitynet_strength, 0.0, MAX_STRENGTH, integer=False)
        adapter = _number("adapter_strength", self.adapter_strength, 0.0, MAX_STRENGTH, integer=False)
        if not isinstance(self.controlnets, Mapping):
            raise InvalidParameter("controlnets", self.controlnets, "must map names (pose, canny, depth) to strengths")
        controlnets: dict[str, float] = {}
        for name, strength in self.controlnets.items():
            if name not in CONTROLNET_NAMES:
                raise InvalidParameter("controlnets", name, f"choose from {', '.join(CONTROLNET_NAMES)}")
            controlnets[name] = _number(f"controlnets[{name}]", strength, 0.0, MAX_STRENGTH, integer=False)
        seed = None if self.seed is None else int(_number("seed", self.seed, 0, MAX_SEED, integer=True))
        return replace(
            self,
            face_images=list(self.face_images),
            prompt=texts["prompt"],
            negative_prompt=texts["negative_prompt"],
            num_images=num_images,
            width=sizes["width"],
            height=sizes["height"],
            num_steps=steps,
            guidance_scale=guidance,
            identitynet_strength=identity,
            adapter_strength=adapter,
            controlnets=controlnets,
            seed=seed,
            enable_lcm=self.enable_lcm,
            enhance_face_region=self.enhance_face_region,
        )


@dataclass
class GenerateResult:
    """What a generation returns. Images are PIL images; everything else is plain data."""

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


# --- the three stages' hand-overs -------------------------------------------------------------------
# A request runs as prepare (CPU, main process) -> render (the GPU) -> finish (CPU, main process). On
# ZeroGPU render runs in a forked worker, so what crosses between the stages must pickle and stay small:
# numbers, text, numpy arrays and PIL images, never modules or tensors.


@dataclass
class Job:
    """A prepared request: everything the GPU stage needs, with the inputs already decoded and measured."""

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
    scheduler: str
    enable_lcm: bool
    seed: int
    faces_found: int
    warnings: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    started: float = 0.0  # time.time() when prepare began: finish reports the request's total from it


@dataclass(frozen=True)
class Step:
    """Progress of the GPU stage: `done` of `total` denoising steps."""

    done: int
    total: int


@dataclass
class Rendered:
    """What the GPU stage returns: the images and its own timings."""

    images: list[Any]
    timings_ms: dict[str, float]
    interrupted: bool = False
