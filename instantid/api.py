"""The functions the Gradio app exposes: the UI buttons, `gradio_client` and MCP all call these.

Their signatures and docstrings are the public API documentation (Gradio reads the parameter names
from the signature and the descriptions from the `Args:` sections), so keep them in step with the
components in `instantid.ui`, which are listed in the same order.

No torch here: the engine is imported on first use. A request runs in three stages: the engine's
`prepare` (CPU: validation, decoding, faces, condition images) and `finish` (CPU: identity check) run
here, in the main process; only `_render_on_gpu` runs in ZeroGPU's GPU worker. What it receives and
yields pickles (a `Job` of arrays and images; `Step`s, then a `Rendered` with PIL images).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import gradio as gr
import spaces

from .errors import UserError
from .requests import (
    DEFAULT_CONTROLNET_STRENGTH,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    LCM_STEPS,
    GenerateRequest,
    GenerateResult,
    Job,
    Rendered,
    Step,
    check_kind,
    random_seed,
)
from .styles import NO_STYLE

log = logging.getLogger(__name__)

GENERIC_ERROR = "Something went wrong on the server while generating; please try again in a minute."

# How long a request waits for the models to finish loading before it gives up.
LOAD_WAIT_S = 30 * 60
LOAD_POLL_S = 0.5

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


def _settings_max_side() -> int:
    from .settings import get_settings

    return get_settings().max_output_side


def _automatic(value: Any) -> Any:
    """0 (or less, or None) means "the default for this mode"; anything else goes on to validation as is."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0):
        return None
    return value


def _build_request(
    face_image: str | None,
    prompt: str | None,
    extra_face_images: Sequence[Any] | None,
    pose_image: str | None,
    negative_prompt: str | None,
    style: str | None,
    num_images: float,
    width: float,
    height: float,
    num_steps: float,
    guidance_scale: float,
    identitynet_strength: float,
    adapter_strength: float,
    controlnets: Sequence[str] | None,
    pose_strength: float,
    canny_strength: float,
    depth_strength: float,
    scheduler: str | None,
    enable_lcm: bool,
    seed: float | None,
    randomize_seed: bool,
    enhance_face_region: bool,
) -> GenerateRequest:
    """Map the flat API arguments (with their sentinels) onto a `GenerateRequest`.

    Only what the request cannot check itself is checked here: the API-only flag and the names list.
    """
    check_kind("randomize_seed", randomize_seed, "boolean")
    check_kind("controlnets", controlnets, "names")
    faces: list[Any] = [face_image] if face_image else []
    for extra in extra_face_images or []:
        # gr.File hands over paths; older clients may send {"path": ...} dicts.
        path = extra.get("path") if isinstance(extra, dict) else extra
        if path:
            faces.append(str(path))
    strengths = {"pose": pose_strength, "canny": canny_strength, "depth": depth_strength}
    chosen = {}
    for name in controlnets or []:
        chosen[name] = strengths.get(name, DEFAULT_CONTROLNET_STRENGTH)
    return GenerateRequest(
        face_images=faces,
        prompt=prompt or "",  # the engine substitutes a plain portrait prompt for an empty one, with a warning
        negative_prompt=negative_prompt or "",
        pose_image=pose_image or None,
        style=style or NO_STYLE,
        num_images=num_images,
        width=0 if width is None else width,
        height=0 if height is None else height,
        # 0 (or less) means "the default for this mode": 30 steps / guidance 5, or 5 / 1.5 with LCM.
        num_steps=_automatic(num_steps),
        guidance_scale=_automatic(guidance_scale),
        identitynet_strength=identitynet_strength,
        adapter_strength=adapter_strength,
        controlnets=chosen,
        scheduler=scheduler or DEFAULT_SCHEDULER,
        enable_lcm=enable_lcm,
        seed=None if randomize_seed or seed is None else seed,
        enhance_face_region=enhance_face_region,
    )


def duration_seconds(
    *, steps: Any, images: Any, width: Any, height: Any, guidance: Any, extra_controls: int, lcm: bool
) -> int:
    """GPU seconds to ask ZeroGPU for (see the constants above), capped so that the time `spaces` asks
    for after its own per-hardware duration factor stays within `MAX_DURATION_S`."""
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
    per_step = STEP_S_1MP * megapixels * (1 + EXTRA_CONTROLNET_FACTOR * extra_controls)
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


def _duration_for(request: GenerateRequest) -> int:
    steps = request.num_steps or (LCM_STEPS if request.enable_lcm else DEFAULT_STEPS)
    guidance = request.guidance_scale
    if guidance is None:
        guidance = 1.5 if request.enable_lcm else 5.0
    return duration_seconds(
        steps=steps,
        images=request.num_images,
        width=request.width,
        height=request.height,
        guidance=guidance,
        extra_controls=len(request.controlnets or {}),
        lcm=bool(request.enable_lcm),
    )


def _gpu_duration(job: Job) -> int:
    # ZeroGPU calls the duration function with the GPU function's own arguments: the prepared job knows
    # the real output size, steps and controls.
    return duration_seconds(
        steps=job.num_steps,
        images=job.num_images,
        width=job.width,
        height=job.height,
        guidance=job.guidance_scale,
        extra_controls=len(job.controls),
        lcm=job.enable_lcm,
    )


class ClientGone(Exception):
    """The client cancelled the request or disconnected: stop denoising and free the pipeline."""


class _RequestWatch:
    """Tells whether Gradio has given up on the request this worker thread serves.

    Gradio cannot stop a sync function: on a cancel or a disconnect it drops the request from its queue
    (or marks it dead) while the worker thread runs on, holding the one shared pipeline until its last
    step and making the next request wait. Built in the worker thread, checked between denoising steps.
    It reads Gradio 6 queue internals defensively: when the request is not in the queue to begin with
    (no Gradio request, a direct call, the ZeroGPU worker process) it never reports the client gone.
    """

    def __init__(self) -> None:
        self._events: Any = None
        self._event_id: str | None = None
        try:
            from gradio.context import LocalContext

            blocks = LocalContext.blocks.get(None)
            event_id = LocalContext.event_id.get(None)
            events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", None)
            if event_id and isinstance(events, dict) and event_id in events:
                self._events, self._event_id = events, event_id
        except Exception:  # no watch is better than a failed generation
            pass

    def client_gone(self) -> bool:
        if self._events is None:
            return False
        event = self._events.get(self._event_id)
        return event is None or not getattr(event, "alive", True)


@spaces.GPU(duration=_gpu_duration)
def _render_on_gpu(job: Job) -> Iterator[Step | Rendered]:
    """The only code that needs the accelerator: a `Step` per denoising step, then the `Rendered` images.

    A generator because that is how `spaces` lets a GPU call be stopped: when the main process closes
    it, `spaces` closes this one in the worker at its next step. Off ZeroGPU `spaces.GPU` returns it
    unchanged and it runs in this process. Errors are turned into `gr.Error` here because only a
    `gr.Error` crosses ZeroGPU's process boundary with its message.
    """
    try:
        yield from _engine().render_steps(job)
    except gr.Error:
        raise
    except UserError as exc:  # includes running out of memory after the leaner retry
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception:
        log.exception("generation failed on the GPU")
        raise gr.Error(GENERIC_ERROR, print_exception=False) from None


def _render(job: Job, progress: Any) -> Rendered:
    """Drive the GPU stage, showing its steps; stop it when the client has gone (it frees the GPU)."""
    watch = _RequestWatch()
    steps = _render_on_gpu(job)
    try:
        for event in steps:
            if isinstance(event, Rendered):
                return event
            if progress is not None:
                progress((event.done, event.total), desc="Denoising", unit="steps")
            if watch.client_gone():
                raise ClientGone
    finally:
        steps.close()
    raise RuntimeError("the GPU stage ended without a result")


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
        caption = f"seed {result.seed}"
        if len(result.images) > 1:
            caption = f"#{index + 1}, {caption}"
        if similarity is not None:
            caption += f", identity similarity {similarity:.2f}"
        items.append((image, caption))
    return items


def generate(
    face_image: str,
    prompt: str,
    extra_face_images: list[str] | None = None,
    pose_image: str | None = None,
    negative_prompt: str = "",
    style: str = NO_STYLE,
    num_images: int = 1,
    width: int = 0,
    height: int = 0,
    num_steps: int = 0,
    guidance_scale: float = 0.0,
    identitynet_strength: float = DEFAULT_STRENGTH,
    adapter_strength: float = DEFAULT_STRENGTH,
    controlnets: list[str] | None = None,
    pose_strength: float = DEFAULT_CONTROLNET_STRENGTH,
    canny_strength: float = DEFAULT_CONTROLNET_STRENGTH,
    depth_strength: float = DEFAULT_CONTROLNET_STRENGTH,
    scheduler: str = DEFAULT_SCHEDULER,
    enable_lcm: bool = False,
    seed: int = 42,
    randomize_seed: bool = False,
    enhance_face_region: bool = True,
    progress: gr.Progress = gr.Progress(),  # Gradio injects its tracker through this default
) -> tuple[list[tuple[Any, str]], int, list[float | None], Any, dict[str, Any]]:
    """Generate images of the person in a face photo, in the scene the prompt describes (InstantID on SDXL).

    Args:
        face_image: Photo of the person's face (path or URL); with several faces the largest is used.
        prompt: What to draw, e.g. "a woman as an astronaut, cinematic light"; empty gives a plain portrait.
        extra_face_images: More photos of the same person (optional); their identity embeddings are averaged.
        pose_image: Optional photo whose face position (and pose, depth or edges, see controlnets) is followed.
        negative_prompt: What to avoid in the image.
        style: Style template applied to the prompt; "(No style)" uses the prompt as written.
        num_images: How many images to make (1 to 4), from consecutive seeds.
        width: Output width in pixels, a multiple of 64; 0 sizes the output from the photo (short side 1024).
        height: Output height in pixels, a multiple of 64; 0 sizes it from the photo. Set both or neither.
        num_steps: Denoising steps, 1 to 100 (1 to 50 with LCM); 0 means the mode default (30, or 5 with LCM).
        guidance_scale: Guidance scale up to 20; 0 means the mode default (5, or 1.5 with LCM); 1 or less is off.
        identitynet_strength: IdentityNet (face ControlNet) strength, 0 to 1.5; higher follows the face layout more.
        adapter_strength: Face adapter strength, 0 to 1.5; higher keeps the identity closer, the prompt less.
        controlnets: Extra ControlNets from the pose photo (or the face photo): any of "pose", "canny", "depth".
        pose_strength: Strength of the body-pose ControlNet, 0 to 1.5 (used when "pose" is chosen).
        canny_strength: Strength of the canny-edge ControlNet, 0 to 1.5 (used when "canny" is chosen).
        depth_strength: Strength of the depth ControlNet, 0 to 1.5 (used when "depth" is chosen).
        scheduler: Sampler, e.g. "EulerDiscreteScheduler" or "DPMSolverMultistepScheduler-Karras".
        enable_lcm: Fast mode with the LCM LoRA: few steps and low guidance, lower quality.
        seed: Random seed, 0 to 2147483647; the same seed and settings give the same images.
        randomize_seed: Ignore seed and pick a random one (the seed used is returned).
        enhance_face_region: Confine the identity conditioning to the face region, leaving the rest to the prompt.

    Returns:
        Images with captions, seed used, identity similarity per image (cosine), face keypoint image, timings (ms).
    """
    try:
        request = _build_request(
            face_image, prompt, extra_face_images, pose_image, negative_prompt, style, num_images, width,
            height, num_steps, guidance_scale, identitynet_strength, adapter_strength, controlnets,
            pose_strength, canny_strength, depth_strength, scheduler, enable_lcm, seed, randomize_seed,
            enhance_face_region,
        )
        # Validate before waiting for a model or a GPU, so a bad value costs nothing; the engine validates again.
        request = request.validated(max_side=_settings_max_side())
        if request.seed is None:
            request = replace(request, seed=random_seed())
        engine = _engine()
        _wait_for_models(engine, progress)
        job = engine.prepare(request)  # CPU, in this process: a photo without a face asks for no GPU time
        if progress is not None:
            progress(0.0, desc="Starting")
        result = engine.finish(job, _render(job, progress))
    except gr.Error:
        raise
    except ClientGone:
        log.info("generation stopped: the client cancelled or disconnected")
        raise gr.Error("The request was cancelled.", print_exception=False) from None
    except UserError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception:
        log.exception("generation failed")
        raise gr.Error(GENERIC_ERROR, print_exception=False) from None
    for warning in result.warnings:
        gr.Warning(warning)
    timings = {key: round(float(value), 1) for key, value in (result.timings_ms or {}).items()}
    return _gallery(result), int(result.seed), list(result.similarities), result.keypoint_image, timings


def estimate_gpu_duration(
    face_image: str | None = None,
    prompt: str = "",
    extra_face_images: list[str] | None = None,
    pose_image: str | None = None,
    negative_prompt: str = "",
    style: str = NO_STYLE,
    num_images: int = 1,
    width: int = 0,
    height: int = 0,
    num_steps: int = 0,
    guidance_scale: float = 0.0,
    identitynet_strength: float = DEFAULT_STRENGTH,
    adapter_strength: float = DEFAULT_STRENGTH,
    controlnets: list[str] | None = None,
    pose_strength: float = DEFAULT_CONTROLNET_STRENGTH,
    canny_strength: float = DEFAULT_CONTROLNET_STRENGTH,
    depth_strength: float = DEFAULT_CONTROLNET_STRENGTH,
    scheduler: str = DEFAULT_SCHEDULER,
    enable_lcm: bool = False,
    seed: int = 42,
    randomize_seed: bool = False,
    enhance_face_region: bool = True,
    progress: Any = None,
) -> int:
    """Seconds of GPU time to reserve on ZeroGPU for a `generate` call with these arguments.

    Model: steps x images x (0.27 s per step for a 1024x1024 image with guidance on half an H200, scaled
    by pixel count, +33 % per extra ControlNet, x2.64 with the LCM-LoRA, x0.55 without guidance) plus VAE
    decoding, times a 1.5 safety factor, plus 10 s of fixed overhead (+3 s per extra ControlNet); clamped
    to 15..120 s after ZeroGPU's own duration factor. Automatic size counts as 1024x1280.
    """
    request = _build_request(
        face_image, prompt, extra_face_images, pose_image, negative_prompt, style, num_images, width, height,
        num_steps, guidance_scale, identitynet_strength, adapter_strength, controlnets, pose_strength,
        canny_strength, depth_strength, scheduler, enable_lcm, seed, randomize_seed, enhance_face_region,
    )
    return _duration_for(request)


def status() -> dict[str, Any]:
    """Memory and model-loading report of the server: host RAM, GPU memory, loaded components, profile, load state.

    Returns:
        A JSON object with keys host, gpu (null without a GPU), components, profile and state.
    """
    try:
        return _engine().report()
    except Exception:
        log.exception("status report failed")
        raise gr.Error("The server could not produce its status report.", print_exception=False) from None
