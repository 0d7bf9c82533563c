"""The functions the Gradio app exposes: the UI buttons, `gradio_client` and MCP all call these.

Their signatures and docstrings are the public API documentation (Gradio reads the parameter names
from the signature and the descriptions from the `Args:` sections). `generate`, `restyle`, `swap` and `group` are
made by one factory (`_endpoint`) from the declaration of the request's parameters
(`instantid.requests.params_for(mode)`), as are the page's controls.

No torch here: the engine is imported on first use. A request runs in three stages: the engine's
`prepare` (CPU: validation, decoding, faces, condition images) and `finish` (CPU: identity check) run
here, in the main process; only `_render_on_gpu` runs in ZeroGPU's GPU worker. What it receives and
yields pickles (a `Job` of arrays and images; `Step`s, then a `Rendered` with PIL images).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
import spaces

from .errors import UserError
from .requests import GenerateRequest, GenerateResult, Job, Param, Rendered, Step, image_seed, params_for

log = logging.getLogger(__name__)

GENERIC_ERROR = "Something went wrong on the server while generating; please try again in a minute."

# How long a request waits for the models to finish loading before it gives up.
LOAD_WAIT_S = 30 * 60
LOAD_POLL_S = 0.5
# The longest a generation runs without handing control to Gradio (how soon a cancel takes effect).
HEARTBEAT_S = 0.5

# --- ZeroGPU duration model -------------------------------------------------------------------
# Measured on a whole NVIDIA H200 (bench gpu, 2026-11-27, BENCHMARKS.md): one guided denoising step of a
# 1024x1024 image through SDXL + IdentityNet + IP attention in fp16 takes 0.122 s; ZeroGPU's default
# "large" size is half an H200 (a MIG slice with 60 of its 132 multiprocessors, per spaces' own
# zero/configs.json), so 0.122 x 132/60.
STEP_S_1MP = 0.27
# Each extra ControlNet beside the IdentityNet: +33 % per step (measured; a second run on another H200: +22 %).
EXTRA_CONTROLNET_FACTOR = 0.33
# LCM-LoRA stays unfused (it is switched per request): 0.322 s per step against 0.122 s (measured; 1.6x in
# the second run: the slower figure is kept).
LCM_STEP_FACTOR = 2.64
# Without guidance (scale <= 1) the UNet runs a batch of 1 instead of 2 (not measured: the batch halves,
# the weights are read as often).
NO_CFG_FACTOR = 0.55
# VAE decoding of a 1024x1024 image: 0.12 s on the whole H200 (measured), x 132/60 on the slice.
VAE_DECODE_S_1MP = 0.27
# Fixed costs inside the GPU call, not measured here: a fresh worker (a fork) moves the packed weights,
# about 10 GB, to the GPU; the depth/pose estimators run once per extra control.
BASE_OVERHEAD_S = 10.0
EXTRA_CONTROLNET_OVERHEAD_S = 3.0
SAFETY = 1.5
MIN_DURATION_S = 15
# 120 s is also what ZeroGPU grants visitors who are not logged in; asking for more gets refused.
MAX_DURATION_S = 120
# Width/height 0 means "automatic": the short side becomes 1024 and the long side at most 1280.
AUTO_PIXELS = 1024 * 1280


def _engine() -> Any:
    # Imported here so that importing this module (and the UI) never pulls in torch.
    from .engine import get_engine

    return get_engine()


def duration_seconds(
    *, steps: Any, images: Any, width: Any, height: Any, guidance: Any, extra_controls: int, lcm: bool,
    people: int = 1,
) -> int:
    """GPU seconds to ask ZeroGPU for (see the constants above), capped so that the time `spaces` asks
    for after its own per-hardware duration factor stays within `MAX_DURATION_S`.

    A group portrait runs the IdentityNet once per person: each person after the first costs a step what an
    extra ControlNet does (the same network size), without an estimator's overhead."""
    cap = MAX_DURATION_S / _duration_factor()
    try:
        steps = max(1.0, float(steps))
        images = max(1.0, float(images))
        width, height = float(width or 0), float(height or 0)
        guidance = float(guidance)
    except (TypeError, ValueError):
        return int(cap)  # invalid values fail validation before any GPU is asked for; ask for the most
    pixels = width * height if width > 0 and height > 0 else AUTO_PIXELS
    megapixels = pixels / (1024 * 1024)
    per_step = STEP_S_1MP * megapixels * (1 + EXTRA_CONTROLNET_FACTOR * (extra_controls + max(0, people - 1)))
    if guidance <= 1:
        per_step *= NO_CFG_FACTOR
    if lcm:
        per_step *= LCM_STEP_FACTOR
    seconds = steps * images * per_step + images * VAE_DECODE_S_1MP * megapixels
    seconds = BASE_OVERHEAD_S + extra_controls * EXTRA_CONTROLNET_OVERHEAD_S + SAFETY * seconds
    if not math.isfinite(seconds):
        return int(cap)
    return int(min(cap, max(MIN_DURATION_S, math.ceil(seconds))))


def _duration_factor() -> float:
    """`spaces` multiplies the duration we ask for by a per-hardware factor (its zero/configs.json)."""
    try:
        from spaces.config import Config
        from spaces.zero.config import get_config

        if Config.zero_gpu:
            return max(1.0, float(get_config()["duration_factor"]))
    except Exception:  # an older or newer `spaces` without it: no factor
        pass
    return 1.0


def _gpu_duration(job: Job) -> int:
    # ZeroGPU calls the duration function with the GPU function's own arguments: the prepared job knows
    # the real output size, steps and controls. A restyle runs only steps x strength of its steps; a swap's
    # size is the working size of its crop, not of the target photo.
    return duration_seconds(
        steps=job.denoising_steps,
        images=job.num_images,
        width=job.width,
        height=job.height,
        guidance=job.guidance_scale,
        extra_controls=len(job.controls),
        lcm=job.enable_lcm,
        people=max(1, len(job.group)),
    )


@spaces.GPU(duration=_gpu_duration)
def _render_on_gpu(job: Job) -> Iterator[Step | Rendered | None]:
    """The only code that needs the accelerator: a `Step` per denoising step, then the `Rendered` images.

    A generator because that is how `spaces` lets a GPU call be stopped: when the main process closes
    it, `spaces` closes this one in the worker at its next step. Off ZeroGPU `spaces.GPU` returns it
    unchanged and it runs in this process. Errors are turned into `gr.Error` here because only a
    `gr.Error` crosses ZeroGPU's process boundary with its message.
    """
    try:
        yield from _engine().render_steps(job, heartbeat_s=HEARTBEAT_S)
    except gr.Error:
        raise
    except UserError as exc:  # includes running out of memory after the leaner retry
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception:
        log.exception("generation failed on the GPU")
        raise gr.Error(GENERIC_ERROR, print_exception=False) from None


def _load_state(engine: Any) -> dict[str, Any]:
    # The engine's `state` is the cheap part of `report()` (which also walks every tensor); both take no lock.
    state = getattr(engine, "state", None)
    if not isinstance(state, dict):
        state = (engine.report() or {}).get("state")
    return state or {}


def _wait_for_models(engine: Any, progress: Any) -> None:
    """Block until the engine has loaded (starting the load if nobody has), showing load progress.

    The lazy start-up mode's wait; on ZeroGPU everything was loaded before launch and this returns at
    once (a load started here would run outside the thread `spaces` watches, and a GPU worker forked
    halfway through it would wait for a loader thread it does not have).
    """
    if _load_state(engine).get("phase") == "not loaded":
        engine.start_background_load()
    deadline = time.monotonic() + LOAD_WAIT_S
    while True:
        state = _load_state(engine)
        if state.get("phase") != "loading":
            return  # ready, or an error that the engine's stages turn into a UserError with its message
        if time.monotonic() > deadline:
            raise gr.Error("The models are taking too long to load; please try again later.")
        if progress is not None:
            fraction = state.get("progress")
            message = state.get("message") or "Loading the models (only the first request waits)"
            progress(float(fraction) if isinstance(fraction, (int, float)) else None, desc=message)
        time.sleep(LOAD_POLL_S)


def _gallery(result: GenerateResult) -> list[tuple[Any, str]]:
    items = []
    for index, image in enumerate(result.images):
        similarity = result.similarities[index] if index < len(result.similarities) else None
        caption = f"seed {image_seed(result.seed, index)}"
        if len(result.images) > 1:
            caption = f"#{index + 1}, {caption}"
        if index < len(result.person_similarities):
            # A group: "#1, seed 42: Ada 0.71, Ben 0.68", each person's own face's score.
            scores = result.person_similarities[index]
            caption += ": " + ", ".join(
                f"{name} {'no face' if score is None else f'{score:.2f}'}" for name, score in scores.items()
            )
        else:
            # The identity check of the output: the same face found again, or not at all.
            caption += "; no face found" if similarity is None else f"; identity {similarity:.2f}"
        items.append((image, caption))
    return items


# What generate returns, in the order of the page's outputs.
OUTPUTS_DOC = (
    "Images with captions, seed used, identity similarity per image (cosine), face keypoint image, timings (ms)."
)
STOPPED = "generation stopped: the client cancelled or disconnected"
_TYPES: dict[str, Any] = {
    "image": str | None, "images": list[str] | None, "text": str, "choice": str, "integer": int,
    "number": float, "boolean": bool, "controls": dict[str, float] | None,
}


def _signature(params: dict[str, Param]) -> inspect.Signature:
    """The endpoint's signature, from the declaration: Gradio names the API's parameters after it."""
    plain = inspect.Parameter.POSITIONAL_OR_KEYWORD
    made = [
        inspect.Parameter(p.name, plain, annotation=_TYPES[p.kind], **({} if p.required else {"default": p.default}))
        for p in params.values()
    ]
    # Gradio injects its progress tracker through this default.
    made.append(inspect.Parameter("progress", plain, default=gr.Progress(), annotation=gr.Progress))
    return inspect.Signature(made, return_annotation=Iterator[Any])


def _docstring(summary: str, params: dict[str, Param], returns: str) -> str:
    """The endpoint's docstring, from the declaration: Gradio and MCP read the `Args:` lines."""
    args = "\n".join(f"        {p.name}: {p.help}" for p in params.values())
    return f"{summary}\n\n    Args:\n{args}\n\n    Returns:\n        {returns}\n"


class _Activity:
    """What the generations of this process are doing, for the status report: "ready" alone said nothing
    while one ran. On ZeroGPU too: the steps reach this process from the GPU worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[object, str] = {}

    def set(self, key: object, doing: str) -> None:
        with self._lock:
            self._running[key] = doing

    def clear(self, key: object) -> None:
        with self._lock:
            self._running.pop(key, None)

    def summary(self) -> str:
        with self._lock:
            doings = list(self._running.values())
        if not doings:
            return "idle"
        what = "generating" if len(doings) == 1 else f"{len(doings)} generations"
        return f"{what} ({'; '.join(doings)})"


ACTIVITY = _Activity()


def _run(request: GenerateRequest, progress: Any, key: object) -> Iterator[Any]:
    """The three stages; yields `gr.skip()` after each denoising step, then the outputs.

    A generator so that Gradio's own cancel handling reaches it: when a client cancels or disconnects,
    Gradio closes the generator it is iterating (its documented behaviour for generator events), which
    closes the GPU stage at its next step and frees the pipeline for the next request.
    """
    engine = _engine()
    engine.check(request)  # the server's limits, before waiting for a model or a GPU
    _wait_for_models(engine, progress)
    ACTIVITY.set(key, "preparing")
    job = engine.prepare(request)  # CPU, in this process: a photo without a face asks for no GPU time
    ACTIVITY.set(key, "starting")
    progress(0.0, desc="Starting")
    steps = _render_on_gpu(job)
    try:
        for event in steps:
            if isinstance(event, Rendered):
                break
            # Control goes to Gradio at each step and heartbeat: a cancel or a lost client closes this generator
            # here. The progress comes after it, so that it is the client's latest status while the next step runs.
            yield gr.skip()
            if event is not None:
                progress((event.done, event.total), desc="Denoising", unit="steps")
                ACTIVITY.set(key, f"step {event.done} of {event.total}")
        else:
            raise RuntimeError("the GPU stage ended without a result")
    except GeneratorExit:
        log.info(STOPPED)
        # Closing the GPU stage waits for the step under way (the pipeline stops after it); Gradio's cancel
        # call waits for this generator, so that wait happens beside it. The next request queues on the
        # pipeline's lock until the step is done.
        threading.Thread(target=steps.close, name="instantid-stop", daemon=True).start()
        raise
    except BaseException:
        steps.close()
        raise
    steps.close()
    result = engine.finish(job, event)
    for warning in result.warnings:
        gr.Warning(warning)
    timings = {key: round(float(value), 1) for key, value in (result.timings_ms or {}).items()}
    # A group's similarities are per image, per person ({name: score}); the other modes' one number per image.
    similarities = list(result.person_similarities or result.similarities)
    yield _gallery(result), int(result.seed), similarities, result.keypoint_image, timings


SUMMARIES = {
    "generate": "Generate images of the person in a face photo, in the scene the prompt describes (InstantID on "
    "SDXL).",
    "restyle": "Restyle a photo: redraw source_image under the prompt and style with the identity of the person in "
    "face_image (InstantID on SDXL img2img); strength says how far from the source.",
    "swap": "Face swap: replace a face of target_image (face_index, 0 = the largest) by the person in face_image "
    "(InstantID on SDXL inpainting); every pixel away from that face keeps the target's value.",
    "group": "Group portrait: two to four people (person_1 .. person_4, one photo or several each) in one image, "
    "each keeping their own identity in their own place; the faces are placed as in layout_image (left to right, "
    "or in the given order) or side by side. The similarities are per image, {name: score} per person.",
}


def _endpoint(mode: str) -> Callable[..., Iterator[Any]]:
    """The API function of one mode: its signature and docstring are made from `params_for(mode)`, and it
    runs the same three stages as every other mode (`_run`)."""
    params = params_for(mode)

    def endpoint(*args: Any, **kwargs: Any) -> Iterator[Any]:
        bound = endpoint.__signature__.bind(*args, **kwargs)  # type: ignore[attr-defined]
        bound.apply_defaults()
        values = dict(bound.arguments)
        progress = values.pop("progress")
        if progress is None:  # a caller in Python may pass None: no tracker
            progress = gr.Progress()
        key = object()
        try:
            yield from _run(GenerateRequest.from_api(values, mode), progress, key)
        except gr.Error:
            raise
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception:
            log.exception("%s failed", mode)
            raise gr.Error(GENERIC_ERROR, print_exception=False) from None
        finally:
            ACTIVITY.clear(key)

    # Gradio and MCP name the tool after the function and read its parameters from the signature.
    endpoint.__name__ = endpoint.__qualname__ = mode
    endpoint.__signature__ = _signature(params)  # type: ignore[attr-defined]
    endpoint.__doc__ = _docstring(SUMMARIES[mode], params, OUTPUTS_DOC)
    return endpoint


generate = _endpoint("generate")
restyle = _endpoint("restyle")
swap = _endpoint("swap")
group = _endpoint("group")


def status() -> dict[str, Any]:
    """Memory and model-loading report of the server: host RAM, GPU memory, loaded components, profile, load state.

    Returns:
        A JSON object with keys host, gpu (null without a GPU), components, profile and state.
    """
    try:
        report = _engine().report()
        report.setdefault("state", {})["activity"] = ACTIVITY.summary()
        return report
    except Exception:
        log.exception("status report failed")
        raise gr.Error("The server could not produce its status report.", print_exception=False) from None
