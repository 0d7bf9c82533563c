"""The GPU stage: the condition estimators' inputs, the pipeline call, the small faces' refinement and the
out-of-memory step-down, nothing else.

The engine holds the models and hands them in: the pipeline of each kind (`pipeline(kind)`, read when it is
needed, since a step-down re-places them), and what a step-down does to them (`free`, `step_down`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..declaration import MODE_SPECS, image_seed
from ..errors import OutOfMemoryError
from ..settings import CONTROL_TYPES
from ..vision import geometry
from ..vision.images import release_memory
from .requests import Job, Rendered, Step

log = logging.getLogger("instantid")

# (step done, total steps) -> None; may raise to cancel (Gradio does when a client leaves).
ProgressFn = Callable[[int, int], None]
# A live preview of the image (`models.preview.latent_preview`: RGB uint8 at latent resolution) -> None.
PreviewFn = Callable[[np.ndarray], None]


class RenderCancelled(Exception):
    """Raised inside the pipeline's step callback when the consumer of `render_steps` stopped listening."""


def extra_controls(job: Job, controlnet: Callable[[str], Any], estimator: Callable[[str], Any]) -> list[Any]:
    """Each extra ControlNet of the job with its condition image (an estimator's, run here, on the GPU)."""
    if not job.controls:
        return []
    from ..models import controls
    from ..models.pipeline import ExtraControl

    extras = []
    for name, (strength, image) in job.controls.items():
        net = controlnet(name)
        if CONTROL_TYPES[name].has_estimator:
            image = controls.make_condition(name, image, {name: estimator(name)})
        extras.append(ExtraControl(name=name, net=net, image=image, scale=strength))
    return extras


def run_pipeline(
    job: Job, extras: list[Any], progress: ProgressFn | None, *, pipeline: Callable[[str], Any], profile: str,
    free: Callable[[], None], step_down: Callable[[], str | None], preview: PreviewFn | None = None,
) -> Any:
    """The job's images (and refined faces). `pipeline(kind)` is the pipeline of a `Mode.pipeline` kind; the
    speed's LoRA is already in use. `preview(rgb)`, when given, every few steps of the image's pass. On CUDA
    out-of-memory: `free()`, then `step_down()` to the next leaner profile (its name; None when `profile` has
    none) and one retry."""
    import torch

    from ..models.preview import latent_preview, preview_every

    kind = MODE_SPECS[job.mode].pipeline
    # The base kind is the engine's `pipe` itself, read now: an out-of-memory step-down re-places it (and the
    # hardening tests stand in for it there); the other kinds share its modules.
    pipe = pipeline(kind)
    pipe.set_scheduler(job.scheduler)
    steps = job.total_steps  # refined faces' steps included: one progress bar for the whole GPU stage
    done = [0]  # steps of the passes before the one running (the image, then each refined face)
    # What only the img2img (restyle) and inpaint (swap) pipelines take; diffusers' own names.
    mode_args: dict[str, Any] = {}
    if kind != "base":
        mode_args = {"image": job.init_image, "strength": job.strength}
    if kind == "inpaint":
        mode_args["mask_image"] = job.mask_image
    if job.group:  # two or more people: per-person tokens, IdentityNet runs and regions
        mode_args["group"] = job.group

    main = job.denoising_steps
    every = preview_every(main)

    def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        # Previews of the image's own pass only, never of its last step (the result follows at once): a
        # refined face's pass works on a crop, and the page keeps the whole image's last preview meanwhile.
        step = done[0] + i + 1
        if preview is not None and step < main and step % every == 0 and "latents" in kwargs:
            preview(latent_preview(kwargs["latents"]))
        if progress is not None:
            progress(step, steps)
        return {}

    def call() -> Any:
        # A CPU generator gives the same noise on every device, so a seed means the same image; one per
        # image, from consecutive seeds, so that image 2 of a run with seed 7 is the image of seed 8.
        done[0] = 0
        generator = [torch.Generator("cpu").manual_seed(image_seed(job.seed, i)) for i in range(job.num_images)]
        out = pipe(
            job.prompt,
            job.negative_prompt,
            face_embedding=job.embedding,
            keypoint_image=job.keypoint_image,
            extra_controls=extras,
            identitynet_strength=job.identitynet_strength,
            adapter_strength=job.adapter_strength,
            face_mask=job.face_mask,
            height=job.height,
            width=job.width,
            num_inference_steps=job.num_steps,
            guidance_scale=job.guidance_scale,
            num_images_per_prompt=job.num_images,
            generator=generator,
            callback_on_step_end=on_step,
            **mode_args,
        )
        if job.refine:
            done[0] = job.denoising_steps
            out = refine(job, out, on_step, done, pipeline("inpaint"))
        return out

    try:
        return call()
    except torch.OutOfMemoryError:
        log.warning("CUDA out of memory; freeing and retrying once with a leaner profile")
    # Freed and retried only here, outside the `except` block: the exception's traceback holds the
    # failed attempt's frames and, through them, its activations; they die with the block.
    free()
    leaner = step_down()
    if leaner is None:
        raise OutOfMemoryError(
            f"The GPU ran out of memory ({profile} profile, no leaner one to fall back to): "
            "use fewer images, a smaller size, or speed turbo."
        )
    try:
        return call()
    except torch.OutOfMemoryError:
        log.warning("CUDA out of memory again with the %s profile", leaner)
    free()
    raise OutOfMemoryError(
        f"The GPU ran out of memory even with the leaner {leaner} profile: "
        "use fewer images or a smaller size."
    )


def refine(job: Job, out: Any, on_step: Callable[..., dict[str, Any]], done: list[int], pipe: Any) -> Any:
    """Each image's small faces re-rendered at working size as face swaps onto it (`job.refine`): the crop
    around the face, inpainted by the swap pipeline `pipe` with that face's keypoints and person's identity and
    the image's own seed, pasted back through the feathered region (outside it every pixel stays the image's)."""
    import torch

    from ..models.pipeline import InstantIDOutput

    t0 = time.perf_counter()
    pipe.set_scheduler(job.scheduler)
    timings = dict(out.timings_ms)
    images = list(out.images)
    for i, image in enumerate(images):
        for plan in job.refine:
            drawn = pipe(
                job.refine_prompt or job.prompt,
                job.negative_prompt,
                face_embedding=plan.embedding,
                keypoint_image=plan.keypoint_image,
                identitynet_strength=job.identitynet_strength,
                adapter_strength=job.adapter_strength,
                face_mask=plan.face_mask,
                height=plan.height,
                width=plan.width,
                num_inference_steps=job.num_steps,
                guidance_scale=job.guidance_scale,
                num_images_per_prompt=1,
                generator=[torch.Generator("cpu").manual_seed(image_seed(job.seed, i))],
                callback_on_step_end=on_step,
                image=image.convert("RGB").resize((plan.width, plan.height), box=plan.box),
                mask_image=plan.mask_image,
                strength=1.0,
            )
            done[0] += job.num_steps
            # The passes' costs join the image's, so that the ZeroGPU record learns per step and decode.
            for key in ("encode_ms", "denoise_ms", "decode_ms"):
                timings[key] = timings.get(key, 0.0) + drawn.timings_ms.get(key, 0.0)
            image = geometry.paste_face(image, drawn.images[0], plan.box, plan.region)
        images[i] = image
    timings["refine_ms"] = (time.perf_counter() - t0) * 1000
    return InstantIDOutput(images=images, timings_ms=timings)


def render_steps(
    render: Callable[[Job, ProgressFn, PreviewFn], Rendered], job: Job, heartbeat_s: float | None = None
) -> Iterator[Step | Rendered | None]:
    """`render(job, progress, preview)` as a generator: a `Step` after each denoising step (with the live preview
    made for it, if any), then the `Rendered` result;
    with `heartbeat_s`, also None whenever that long passed without a step (its consumer can then be closed
    within that time, however long a step takes: a CPU step can take many seconds).

    The pipeline runs in a thread so that each step can be handed out as it finishes. Closing the
    generator (a visitor who cancelled; on ZeroGPU, `spaces` closes it in the worker when the main
    process's generator is closed) stops the pipeline at its next step and waits for that, so the GPU
    is free when `close()` returns.
    """
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    stop = threading.Event()

    shown: list[np.ndarray] = []  # the preview made for the step about to be reported

    def on_preview(rgb: np.ndarray) -> None:
        shown.append(rgb)

    def on_step(done: int, total: int) -> None:
        if stop.is_set():
            raise RenderCancelled
        stage = "denoising" if done <= job.denoising_steps else "refining faces"
        events.put(("step", Step(done, total, preview=shown.pop() if shown else None, stage=stage)))

    def run() -> None:
        try:
            events.put(("done", render(job, on_step, on_preview)))
        except BaseException as exc:  # handed to the consuming thread, which re-raises it
            events.put(("error", exc))

    worker = threading.Thread(target=run, name="instantid-render", daemon=True)
    worker.start()
    try:
        while True:
            try:
                kind, value = events.get(timeout=heartbeat_s)
            except queue.Empty:
                yield None
                continue
            if kind == "error":
                raise value
            yield value
            if kind == "done":
                return
    finally:
        stop.set()
        worker.join()
        release_memory()  # a stopped or failed render never reaches `finish`, which hands it back otherwise
