"""How many GPU seconds a ZeroGPU call asks for: a conservative prior until this hardware has shown its costs,
then what it has shown, times a margin.

A visitor's call is admitted only while the quota left covers the time asked (`spaces`' "requested vs. left"),
so asking for a fixed worst case costs visitors images; asking too little gets the call cut off. The GPU stage
reports what it measured (its `Rendered.timings_ms`); the main process adds the wall time it saw between asking
and getting the result, which holds what the worker cannot time itself (the grant, the worker's fork and the
move of the packed weights to the GPU). `Record` keeps recent observations; `ask_seconds` is a pure function of
a request's `Shape` and the record's `Figures`, so it can be tested without a GPU.

A call that needs more than one ZeroGPU call may take (`MAX_DURATION_S`, after `spaces`' factor) is never asked
for: ZeroGPU would cut it off at the cap after spending the visitor's quota. `Record.ask` raises `OverCap`
instead, with a sentence priced by the same figures that names the single changes that fit (a faster speed,
fewer images, fewer people, no refined faces, fewer steps), or the changes that fit together. Refused rather
than split into several calls: a group's people share every step of one image, and its refined faces need
that image, so only the images of a request could be split, at one worker start and one grant wait each.

No torch here: the main process of a ZeroGPU Space must not need it for this.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..declaration import SPEED_CHOICES, SPEEDS
from ..errors import UserError

MEGAPIXEL = 1024 * 1024
# Width/height 0 means "automatic": the short side becomes 1024 and the long side at most 1280.
AUTO_PIXELS = 1024 * 1280

# --- the prior: ZeroGPU's default `large` size, half an NVIDIA RTX Pro 6000 Blackwell (48 GB) -------------
# Nobody here has run on that card. What is known: one guided step of a 1024x1024 image through SDXL +
# IdentityNet + IP attention in fp16 took 0.122 s on a whole H200 (bench gpu, 2026-11-27, BENCHMARKS.md), and
# ZeroGPU's former `large` size was a 60-of-132-multiprocessor slice of an H200 (0.122 x 132/60 = 0.27 s);
# `spaces` 0.51 rates the Blackwell half card 1.5x slower than that slice (its zero/configs.json duration
# factor), so 0.27 x 1.5. Per batch item: a guided step runs a batch of 2.
PRIOR_STEP_S = 0.41 / 2
# VAE decoding of one 1024x1024 image: 0.12 s on the whole H200 (measured), x 132/60 x 1.5 as above.
PRIOR_DECODE_S = 0.41
# Everything else a call costs (the grant, a fresh worker's fork and its move of about 10 GB of packed weights
# to the GPU, the text encoders): not measured anywhere; generous.
PRIOR_FIXED_S = 10.0
# A depth or pose estimator's run, per extra control: not measured.
PRIOR_CONTROL_S = 3.0
# The prior covers its unmeasured parts with this factor on the step and decode time, and never asks for less.
PRIOR_SAFETY = 1.5
PRIOR_MIN_S = 15

# Each ControlNet pass beyond the first in a UNet pass (an extra ControlNet) adds
# this share of a step's cost (measured on an H200: +33 %; a second run on another H200: +22 %; the larger kept).
CONTROLNET_PASS_SHARE = 0.33

# --- once observed -----------------------------------------------------------------------------------------
# The ask is the observed cost times MARGIN. Each figure is the largest of the last WINDOW observations: a
# slow worker raises the next ask at once, and one fresh worker's fork and weight move (workers are reused
# only sometimes) stays in the ask for the calls after it.
MARGIN = 1.3
WINDOW = 8
# The least a calibrated call asks for: a few seconds of slack for the grant and the pickling.
OBSERVED_MIN_S = 5
# The most one ZeroGPU call may ask for, in seconds after `spaces`' factor: a call that needs more is refused
# here, before any GPU time is asked (`OverCap`). ZeroGPU caps a call per visitor tier and documents no numbers
# (hub-docs spaces-zerogpu.md names only daily quotas: 2 min without login, more logged in, 8x that with PRO);
# its answer to a larger ask is "The requested GPU duration (Ns) is larger than the maximum allowed"
# (`spaces/zero/client.py`). Reports on its forum (2024-25) put the logged-in cap at 300 s and refuse 300 s to
# visitors who are not logged in. `spaces` 0.51 learns the visitor's tier only from the answer to the schedule
# call (`ScheduleMetadata.auth`, its X-Authenticated header), after the ask, and the X-IP-Token it forwards is
# read for nothing but an error field: so the lowest tier's cap applies to everyone. 120 s: a visitor who is not
# logged in has 2 minutes of quota a day, so ZeroGPU can never admit more for them.
MAX_DURATION_S = 120
# Requests shown on the Status tab.
RECENT = 20


@dataclass(frozen=True)
class Shape:
    """What a GPU call's cost depends on, from the prepared job.

    `controlnet_passes` counts the ControlNet runs per UNet pass: the IdentityNet once, plus each extra
    ControlNet. `unet_passes` counts the UNet passes per step: a group portrait runs one per person, each with
    that person's IdentityNet run (`InstantIDPipeline._person_pass_hooks`), so n people cost about n steps.
    Speeds need nothing of their own: a few-step LoRA is fused, so its steps cost the base UNet's, and its
    steps and guidance are in the job.
    """

    steps: int  # denoising steps that really run (a restyle's steps x strength)
    images: int
    megapixels: float
    guided: bool  # guidance > 1: the UNet runs a batch of 2 per image
    controlnet_passes: int = 1
    unet_passes: int = 1
    extra_controls: int = 0  # extra controls whose condition is made in the GPU call (an estimator may run)
    # Refined faces (refine_faces): each is a face swap onto each image, one image of `refine_megapixels` (the
    # largest of their working sizes) through `refine_steps` steps with one ControlNet pass.
    refine_passes: int = 0
    refine_steps: int = 0
    refine_megapixels: float = 0.0
    # The share of the schedule that runs (a restyle's strength): `steps` of a schedule of `refine_steps`, or of
    # `steps / strength` without refined faces. What another speed or step count would run (`OverCap`).
    strength: float = 1.0

    @property
    def people(self) -> int:
        return self.unet_passes

    @property
    def batch(self) -> int:
        return self.images * (2 if self.guided else 1)

    @property
    def step_units(self) -> float:
        """Steps x batch items x megapixels x UNet passes x ControlNet weight: what one figure's per-step cost
        multiplies."""
        weight = 1 + CONTROLNET_PASS_SHARE * max(0, self.controlnet_passes - 1)
        refine = self.refine_passes * self.refine_steps * (2 if self.guided else 1) * self.refine_megapixels
        return self.steps * self.batch * self.megapixels * self.unet_passes * weight + refine

    @property
    def decode_units(self) -> float:
        """Images x megapixels decoded: the image's, and each refined face's crop."""
        return self.images * self.megapixels + self.refine_passes * self.refine_megapixels


def shape_of(job: Any) -> Shape:
    """The `Shape` of a prepared `Job` (or of anything with its fields)."""
    width, height = float(job.width or 0), float(job.height or 0)
    pixels = width * height if width > 0 and height > 0 else AUTO_PIXELS
    extra = len(job.controls or {})
    people = max(1, len(getattr(job, "group", None) or ()))
    refine = list(getattr(job, "refine", None) or ())
    return Shape(
        steps=max(0, int(job.denoising_steps)),
        images=max(1, int(job.num_images)),
        megapixels=pixels / MEGAPIXEL,
        guided=float(job.guidance_scale) > 1,
        controlnet_passes=1 + extra,
        # A group portrait runs the UNet and the IdentityNet once per person per step.
        unet_passes=people,
        extra_controls=extra,
        # Each small face chosen in prepare is redrawn in every image, through the whole schedule (strength 1).
        refine_passes=len(refine) * max(1, int(job.num_images)),
        refine_steps=max(0, int(job.num_steps)) if refine else 0,
        refine_megapixels=max((float(r.width) * float(r.height) / MEGAPIXEL for r in refine), default=0.0),
        strength=min(1.0, max(0.0, float(getattr(job, "strength", 1.0) or 0.0))),
    )


@dataclass(frozen=True)
class Figures:
    """Costs observed on this hardware, in seconds; None where nothing was observed yet."""

    fixed_s: float | None = None  # per call: everything but steps, decode and estimators
    step_s: float | None = None  # per denoising step, batch item and megapixel, with one ControlNet pass
    decode_s: float | None = None  # per image and megapixel
    control_s: float | None = None  # per extra control (its estimator, if it has one)

    @property
    def observed(self) -> bool:
        return self.step_s is not None


def prior_seconds(shape: Shape) -> float:
    """What a call costs by the prior (already with its safety factor)."""
    variable = shape.step_units * PRIOR_STEP_S + shape.decode_units * PRIOR_DECODE_S
    fixed = PRIOR_FIXED_S + shape.extra_controls * PRIOR_CONTROL_S
    return max(float(PRIOR_MIN_S), fixed + PRIOR_SAFETY * variable)


def predicted_seconds(shape: Shape, figures: Figures) -> float:
    """What a call costs by the observed figures (the prior's for any figure not observed yet), no margin."""
    step = PRIOR_STEP_S * PRIOR_SAFETY if figures.step_s is None else figures.step_s
    decode = PRIOR_DECODE_S * PRIOR_SAFETY if figures.decode_s is None else figures.decode_s
    fixed = PRIOR_FIXED_S if figures.fixed_s is None else figures.fixed_s
    control = PRIOR_CONTROL_S if figures.control_s is None else figures.control_s
    return fixed + shape.extra_controls * control + shape.step_units * step + shape.decode_units * decode


def wanted_seconds(shape: Shape, figures: Figures | None) -> float:
    """What a call should be granted, in seconds after `spaces`' factor, before any cap: the prior's until
    observed, else observed x MARGIN."""
    if figures is None or not figures.observed:
        return prior_seconds(shape)
    return max(float(OBSERVED_MIN_S), MARGIN * predicted_seconds(shape, figures))


def _factor(factor: float) -> float:
    return factor if math.isfinite(factor) and factor >= 1 else 1.0


def ask_seconds(shape: Shape, figures: Figures | None, factor: float = 1.0, cap: float = MAX_DURATION_S) -> int:
    """The duration to hand `spaces`, in whole seconds: `spaces` multiplies it by its per-hardware `factor` and
    asks ZeroGPU for that, which is then at least the cost (the prior's until observed, else observed x
    MARGIN) and at most `cap`. A request over the cap is refused before this is asked (`Record.ask`)."""
    factor = _factor(factor)
    wanted = wanted_seconds(shape, figures)
    most = max(1, math.floor(cap / factor))
    if not math.isfinite(wanted):
        return most
    return int(min(most, max(1, math.ceil(wanted / factor))))


def needed_seconds(shape: Shape, figures: Figures | None, factor: float = 1.0) -> float:
    """What `spaces` would ask ZeroGPU for this call with no cap: the seconds that are compared with the cap
    (inf for a cost that is not finite)."""
    factor = _factor(factor)
    wanted = wanted_seconds(shape, figures)
    if not math.isfinite(wanted):
        return math.inf
    return float(asked_after_factor(max(1, math.ceil(wanted / factor)), factor))


def asked_after_factor(seconds: int, factor: float) -> int:
    """What `spaces` asks ZeroGPU for when handed `seconds` (its own rounding, `zero/client.py`)."""
    return round(seconds * factor)


class OverCap(UserError):
    """A request that needs more GPU time than one ZeroGPU call may take: refused before any is asked."""


def _with_steps(shape: Shape, steps: int, guided: bool) -> Shape:
    """`shape` run with a schedule of `steps` (the same share of it, for a restyle) and guidance on or off."""
    return replace(shape, steps=min(int(steps * shape.strength), steps), guided=guided,
                   refine_steps=steps if shape.refine_passes else 0)


def _with_images(shape: Shape, images: int) -> Shape:
    return replace(shape, images=images, refine_passes=shape.refine_passes // shape.images * images)


def _with_people(shape: Shape, people: int) -> Shape:
    # Fewer people stand larger side by side: at most one refined face each.
    per_image = min(shape.refine_passes // shape.images, people)
    return replace(shape, unet_passes=people, refine_passes=per_image * shape.images)


def alternatives(shape: Shape, need: Any, cap: float, speed: str = "quality") -> list[tuple[str, float]]:
    """The single changes that bring `shape` within `cap`, each with what it would ask (`need(shape)`): a
    faster speed (its own steps and guidance), fewer images, fewer people, no refined faces, fewer steps."""
    found: list[tuple[str, float]] = []

    def fits(label: str, changed: Shape) -> bool:
        seconds = need(changed)
        if seconds <= cap:
            found.append((label, seconds))
            return True
        return False

    schedule = shape.refine_steps or max(shape.steps, round(shape.steps / shape.strength) if shape.strength else 0)
    faster = SPEED_CHOICES[SPEED_CHOICES.index(speed) + 1:] if speed in SPEED_CHOICES else ()
    for name in faster:  # the least change first: fast before turbo
        if fits(f"speed {name}", _with_steps(shape, SPEEDS[name].steps, SPEEDS[name].guidance > 1)):
            break
    for images in range(shape.images - 1, 0, -1):
        if fits(f"at most {images} image{'s' if images > 1 else ''}", _with_images(shape, images)):
            break
    for people in range(shape.people - 1, 1, -1):  # a group has two people at least
        if fits(f"at most {people} people", _with_people(shape, people)):
            break
    if shape.refine_passes:
        fits("refine_faces off", replace(shape, refine_passes=0, refine_steps=0, refine_megapixels=0.0))
    for steps in range(schedule - 1, 0, -1):
        if fits(f"at most {steps} steps", _with_steps(shape, steps, shape.guided)):
            break
    return found


def over_cap(shape: Shape, figures: Figures | None, factor: float, cap: float, speed: str = "quality") -> str | None:
    """None if the call fits `cap`; else the sentence that refuses it and says what would fit, priced as
    the call itself would be."""
    def need(changed: Shape) -> float:
        return needed_seconds(changed, figures, factor)

    seconds = need(shape)
    if seconds <= cap:
        return None
    what = "" if not math.isfinite(seconds) else f"about {seconds:.0f} s of GPU, "
    head = f"This request needs {what}more than the {cap:.0f} s one ZeroGPU call may take here"
    options = alternatives(shape, need, cap, speed)
    if options:
        return f"{head}: use " + ", or ".join(f"{label} (about {s:.0f} s)" for label, s in options) + "."
    together = combined(shape, need, cap, speed)
    if together is None:
        return f"{head}, even at its smallest: this server cannot run it on ZeroGPU."
    labels, seconds = together
    listed = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + f" and {labels[-1]}"
    return f"{head}: use {listed} together (about {seconds:.0f} s)."


def combined(shape: Shape, need: Any, cap: float, speed: str = "quality") -> tuple[list[str], float] | None:
    """Where no single change fits (`alternatives`): the changes taken one after another (the fastest speed,
    one image, two people, no refined faces, then the largest square size that fits), up to the first that
    brings `shape` within `cap`, with what it would ask; None if even the smallest does not fit."""
    labels: list[str] = []
    steps: list[tuple[str, Any]] = []
    fastest = SPEED_CHOICES[-1]
    if speed in SPEED_CHOICES and speed != fastest:
        steps.append((f"speed {fastest}",
                      lambda s: _with_steps(s, SPEEDS[fastest].steps, SPEEDS[fastest].guidance > 1)))
    if shape.images > 1:
        steps.append(("1 image", lambda s: _with_images(s, 1)))
    if shape.people > 2:
        steps.append(("2 people", lambda s: _with_people(s, 2)))
    if shape.refine_passes:
        steps.append(("refine_faces off", lambda s: replace(s, refine_passes=0, refine_steps=0, refine_megapixels=0.0)))
    for label, change in steps:
        shape = change(shape)
        labels.append(label)
        if need(shape) <= cap:
            return labels, need(shape)
    largest = int(math.sqrt(shape.megapixels * MEGAPIXEL)) // 64 * 64
    for side in range(largest, 63, -64):
        smaller = replace(shape, megapixels=side * side / MEGAPIXEL)
        if need(smaller) <= cap:
            return [*labels, f"a size of at most {side}x{side}"], need(smaller)
    return None


def describe(mode: str, shape: Shape, images: bool = True) -> str:
    """A request in words: "group, 3 people, 2 images" ("3 people, 2 images" without a mode; the Status tab's
    rows leave the images to their own column)."""
    parts = [mode] if mode else []
    if shape.people > 1:
        parts.append(f"{shape.people} people")
    if images:
        parts.append(f"{shape.images} image{'s' if shape.images > 1 else ''}")
    return ", ".join(parts)


def _max(values: deque[float]) -> float | None:
    return max(values) if values else None


class Record:
    """This process's observations of its GPU calls, and its recent requests' asked and used seconds.

    Thread-safe: requests run in Gradio's worker threads; the duration function runs in whichever of them
    calls the GPU function.
    """

    def __init__(self, window: int = WINDOW, recent: int = RECENT) -> None:
        self._lock = threading.Lock()
        self._fixed: deque[float] = deque(maxlen=window)
        self._step: deque[float] = deque(maxlen=window)
        self._decode: deque[float] = deque(maxlen=window)
        self._control: deque[float] = deque(maxlen=window)
        self._asks: dict[int, tuple[int, str]] = {}
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)

    def figures(self) -> Figures:
        with self._lock:
            return Figures(
                fixed_s=_max(self._fixed), step_s=_max(self._step), decode_s=_max(self._decode),
                control_s=_max(self._control),
            )

    def ask(
        self, key: int, shape: Shape, factor: float, cap: float = MAX_DURATION_S, *, speed: str = "quality",
        mode: str = "",
    ) -> int:
        """The duration for a GPU call (see `ask_seconds`); remembers what was asked under `key` for `observe`.

        Raises `OverCap` (and keeps a row for the Status tab) where the call needs more than `cap`: ZeroGPU would
        cut it off at the cap, after spending the visitor's quota. Priced from the same figures as the ask."""
        figures = self.figures()
        refusal = over_cap(shape, figures, factor, cap, speed)
        if refusal is not None:
            with self._lock:
                self._recent.append({**self._row(mode, shape), "asked_s": None, "basis": "refused: over the cap",
                                     "needed_s": needed_seconds(shape, figures, factor), "used_s": 0.0,
                                     "gpu_function_s": 0.0, "denoise_s": 0.0})
            raise OverCap(refusal)
        seconds = ask_seconds(shape, figures, factor, cap)
        with self._lock:
            self._asks[key] = (asked_after_factor(seconds, factor), "observed" if figures.observed else "prior")
        return seconds

    def forget(self, key: int) -> None:
        """Drop the ask of a call that gave no result (cancelled or failed)."""
        with self._lock:
            self._asks.pop(key, None)

    def observe(self, key: int, shape: Shape, timings_ms: dict[str, float], wall_s: float, mode: str = "") -> None:
        """Learn from one finished GPU call: the worker's `timings_ms` (encode, denoise, decode, controls, and
        its whole time in the GPU function as `gpu_ms`) and the `wall_s` this process saw from asking to the
        result."""
        ms = {k: float(v) for k, v in (timings_ms or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        denoise, decode, controls = (ms.get(k, 0.0) / 1000 for k in ("denoise_ms", "decode_ms", "controls_ms"))
        if not shape.extra_controls:
            controls = 0.0  # nothing to learn a per-control figure from: it stays in the fixed cost
        gpu = ms.get("gpu_ms", wall_s * 1000) / 1000
        with self._lock:
            asked, basis = self._asks.pop(key, (None, "not asked"))
            if "denoise_ms" in ms and shape.step_units > 0:
                self._step.append(denoise / shape.step_units)
                if "decode_ms" in ms:
                    self._decode.append(decode / shape.decode_units)
                if shape.extra_controls and "controls_ms" in ms:
                    self._control.append(controls / shape.extra_controls)
                self._fixed.append(max(0.0, wall_s - denoise - decode - controls))
            self._recent.append({
                **self._row(mode, shape),
                "asked_s": asked,  # None off ZeroGPU: nothing is asked there
                "basis": basis,
                "used_s": round(wall_s, 2),
                "gpu_function_s": round(gpu, 2),  # the part inside the worker's GPU function
                "denoise_s": round(denoise, 2),
            })

    @staticmethod
    def _row(mode: str, shape: Shape) -> dict[str, Any]:
        """What a Status tab row says of the request: mode, people, images and their size."""
        return {
            "at": time.time(),
            "mode": mode,
            "request": describe(mode, shape, images=False),  # the mode, and a group's people
            "people": shape.people,
            "steps": shape.steps,
            "images": shape.images,
            "megapixels": round(shape.megapixels, 3),
            "controlnet_passes": shape.controlnet_passes,
            "refine_passes": shape.refine_passes,
        }

    def last_asked(self, key: int) -> int | None:
        """What was asked under `key` (after the factor), until `observe` or `forget` takes it."""
        with self._lock:
            return self._asks.get(key, (None, ""))[0]

    def report(self, factor: float, cap: float = MAX_DURATION_S) -> dict[str, Any]:
        """The `durations` section of the status report (JSON-ready)."""
        figures = self.figures()
        with self._lock:
            recent = list(self._recent)
        return {
            "card": "ZeroGPU large: half an NVIDIA RTX Pro 6000 Blackwell (48 GB) unless observed otherwise",
            "factor": factor,
            "cap_s": cap,
            "margin": MARGIN,
            "basis": "observed" if figures.observed else "prior",
            "observed": asdict(figures),
            "prior": {"fixed_s": PRIOR_FIXED_S, "step_s": PRIOR_STEP_S, "decode_s": PRIOR_DECODE_S,
                      "control_s": PRIOR_CONTROL_S, "safety": PRIOR_SAFETY, "min_s": PRIOR_MIN_S},
            "recent": recent,
        }


RECORD = Record()
