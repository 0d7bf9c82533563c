"""The functions the Gradio app exposes: the UI buttons, `gradio_client` and MCP all call these.

Their signatures and docstrings are the public API documentation (Gradio reads the parameter names
from the signature and the descriptions from the `Args:` sections). `generate`, `restyle`, `swap` and `group` are
made by one factory (`_endpoint`) from the declarations of the modes (`instantid.declaration.MODE_SPECS`) and of
the request's parameters (`instantid.declaration.params_for(mode)`), as are the page's controls.

No torch here: the engine is imported on first use. A request runs in three stages: the engine's
`prepare` (CPU: validation, decoding, faces, condition images) and `finish` (CPU: identity check) run
here, in the main process; only `_render_on_gpu` runs in ZeroGPU's GPU worker. What it receives and
yields pickles (a `Job` of arrays and images; `Step`s, then a `Rendered` with PIL images).
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gradio as gr
import spaces

from ..declaration import MODE_SPECS, MODES, PARAMS, Param, image_seed, params_for
from ..errors import InvalidParameter, UserError
from ..request import durations
from ..request.requests import LOW_MARGIN, Job, Partial, Rendered, Request, Result, Step

log = logging.getLogger(__name__)
# Where the engine lives once something imported it (`_profile` only looks, it never imports it).
_ENGINE_MODULE = f"{__package__.rpartition('.')[0]}.engine"

GENERIC_ERROR = "Something went wrong on the server while generating; please try again in a minute."

# How long a request waits for the models to finish loading before it gives up.
LOAD_WAIT_S = 30 * 60
LOAD_POLL_S = 0.5
# The longest a generation runs without handing control to Gradio (how soon a cancel takes effect).
HEARTBEAT_S = 0.5
# The live preview's longest side on the page and for gradio_client. The projection has 1/8 of the image's side
# (128 px for 1024): more pixels add no detail, only PNG time in this process (170 ms a preview at 512 px, bench
# preview), and the browser scales it up smoothly anyway.
PREVIEW_SIDE = 256

def _engine() -> Any:
    # Imported here so that importing this module (and the UI) never pulls in torch.
    from ..engine import get_engine

    return get_engine()


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


def _duration_cap() -> int:
    """The most one GPU call may ask for here, after `spaces`' factor: the lowest tier's (`durations.MAX_DURATION_S`
    says why `spaces` cannot tell us the visitor's)."""
    return durations.MAX_DURATION_S


def _gpu_duration(job: Job) -> int:
    # ZeroGPU calls the duration function with the GPU function's own arguments, in the main process, before it
    # schedules anything: the prepared job knows the real output size, steps and controls (a restyle runs only
    # steps x strength of its steps; a swap's size is the working size of its crop, not of the target photo).
    # What is asked is kept under the job's id until `_run` hands the call's measurements to the same record.
    # A call over the cap raises `durations.OverCap` here, so nothing is scheduled: it reaches the visitor through
    # `_run` and the endpoint as any UserError does.
    try:
        shape = durations.shape_of(job)
    except (TypeError, ValueError, AttributeError):
        # Invalid values fail validation before any GPU is asked for; ask for the most.
        return math.floor(_duration_cap() / _duration_factor())
    return durations.RECORD.ask(id(job), shape, _duration_factor(), _duration_cap(), speed=str(job.speed),
                                mode=str(getattr(job, "mode", "")))


def _profile() -> tuple[Any, int] | None:
    """The memory profile requests run under and their working short side, where known without loading
    anything: the engine's once it exists (on ZeroGPU always: it loads before launch), else ZeroGPU's; None
    off ZeroGPU before the engine exists."""
    from ..models.memory import PROFILES, is_zerogpu

    engine = getattr(sys.modules.get(_ENGINE_MODULE), "_engine", None)
    if engine is not None:
        from ..request.scenes import Workshop

        # The tiny preset's sizes too: the working size the engine's prepare stage would choose.
        return engine.profile, Workshop(engine.settings, engine.profile, engine.faces).working_short_side()
    if is_zerogpu():
        return PROFILES["zerogpu"], PROFILES["zerogpu"].default_short_side
    return None


def _settings_shape(mode: str, values: Mapping[str, Any], profile: Any, short: int) -> tuple[durations.Shape, str]:
    """What a request of the page's current `values` (parameter names; `controlnets` a list of names) would
    cost, as `durations.shape_of` prices a prepared job, and its speed. Before the photos are read, so where the
    faces decide (their sizes: which are refined; a layout photo's size) it takes the larger cost."""
    from types import SimpleNamespace

    from ..declaration import DEFAULT_SPEED, SPEEDS
    from ..settings import get_settings
    from ..vision import framing, geometry
    from .hints import people_on_page

    spec = MODE_SPECS[mode]
    values = {**{name: p.default for name, p in params_for(mode).items()}, **values}
    speed = "lcm" if values.get("enable_lcm") else str(values.get("speed") or DEFAULT_SPEED)
    sampling = SPEEDS[speed]
    steps = int(values.get("num_steps") or 0) or ((sampling.lora is None and profile.default_steps) or sampling.steps)
    guidance = float(values.get("guidance_scale") or 0) or sampling.guidance
    strength = float(values["strength"] or 0) if mode in PARAMS["strength"].modes else 1.0
    images = max(1, min(int(values.get("num_images") or 1), profile.max_images))
    longest = get_settings().max_output_side
    width, height = int(values.get("width") or 0), int(values.get("height") or 0)
    people = people_on_page(mode, values)
    # A framing places the face where no pose or layout photo does (`Request.composed`): its canvas, its face size.
    framed = str(values.get("framing") or "photo") if mode in PARAMS["framing"].modes else "photo"
    laid_out = bool(values.get("pose_image") or values.get("layout_image"))
    if laid_out:
        framed = "photo"
    elif mode in PARAMS["framing"].modes:  # Generate and Group: the canvas the scene will take, where it is known
        asked = (width, height) if width else None
        width, height = framing.planned_canvas(framed, people, asked, short, longest) or (width, height)
    refine_choice = values.get("refine_faces") or "auto"
    refines = mode in PARAMS["refine_faces"].modes and (
        refine_choice == "on" or (refine_choice == "auto" and (spec.refines or framed != "photo")))
    refined = 0
    if refines and framed != "photo" and width:
        refined = max(1, people) if framing.framed_face_height(framed, (width, height), people) < (
            geometry.REFINE_BELOW * short) else 0
    elif refines and spec.people and width and not laid_out:
        # Side by side, as `geometry.group_layout` places them: every face the same width, refined when small.
        refined = people if geometry.group_face_width((width, height), people) < geometry.REFINE_BELOW * short else 0
    elif refines:
        refined = max(1, people)
    controls = values.get("controlnets") or ()
    job = SimpleNamespace(
        width=width, height=height, num_images=images, num_steps=steps, guidance_scale=guidance, strength=strength,
        denoising_steps=min(int(steps * strength), steps),
        controls=dict.fromkeys(controls) if mode in PARAMS["controlnets"].modes else {},
        group=[None] * people if people > 1 else [],
        refine=[SimpleNamespace(width=short, height=short)] * refined,
    )
    return durations.shape_of(job), speed


def estimate(mode: str, values: Mapping[str, Any]) -> str:
    """The page's line beside the run button, for the settings shown (`values` by parameter name): on ZeroGPU
    the GPU seconds they will ask of the visitor's quota (or why they would be refused), priced as the call
    will be; elsewhere the expected time on this hardware from the figures observed so far, or nothing before.
    Cheap and torch-free: the page calls it outside the queue at every change."""
    from ..models.memory import is_zerogpu

    try:
        known = _profile()
        if known is None:
            return ""
        shape, speed = _settings_shape(mode, values, *known)
        figures = durations.RECORD.figures()
        head = f"**GPU time** ({durations.describe('', shape)}, speed {speed})"
        # Said, as it is what a framing (full body) or a group of three adds without the visitor asking for it.
        passes = shape.refine_passes
        refined = (f" Includes {passes} refined faces (one more render each)." if passes > 1 else
                   " Includes 1 refined face (one more render)." if passes else "")
        if is_zerogpu():
            factor, cap = _duration_factor(), _duration_cap()
            refusal = durations.over_cap(shape, figures, factor, cap, speed)
            if refusal is not None:
                return f"{head}: over the limit, would be refused. {refusal.replace('This request', 'It')}{refined}"
            seconds = durations.needed_seconds(shape, figures, factor)
            return f"{head}: about {seconds:.0f} s of your ZeroGPU quota; one call may take {cap} s.{refined}"
        if not figures.observed:
            return ""
        seconds = durations.predicted_seconds(shape, figures)
        return f"{head}: about {seconds:.0f} s expected on this hardware, from the runs so far.{refined}"
    except Exception:  # a half-filled page (or a value being typed) must never raise in the visitor's face
        log.debug("no estimate for %s", mode, exc_info=True)
        return ""


@spaces.GPU(duration=_gpu_duration)
def _render_on_gpu(job: Job) -> Iterator[Step | Rendered | None]:
    """The only code that needs the accelerator: a `Step` per denoising step, then the `Rendered` images.

    A generator because that is how `spaces` lets a GPU call be stopped: when the main process closes
    it, `spaces` closes this one in the worker at its next step. Off ZeroGPU `spaces.GPU` returns it
    unchanged and it runs in this process. Errors are turned into `gr.Error` here because only a
    `gr.Error` crosses ZeroGPU's process boundary with its message.
    """
    entered = time.perf_counter()
    try:
        for event in _engine().render_steps(job, heartbeat_s=HEARTBEAT_S):
            if isinstance(event, Rendered):
                # The whole call as the worker saw it: with the main process's wall time, what the worker
                # could not time itself (its start, the weights' move) is known too (`durations`).
                event.timings_ms["gpu_ms"] = (time.perf_counter() - entered) * 1000
            yield event
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


def _wait_for_models(engine: Any, progress: Any) -> Iterator[None]:
    """Wait until the engine has loaded (starting the load if nobody has), showing load progress; yields at each
    look, so that its consumer can show the wait and be closed (a cancel) meanwhile.

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
        yield
        time.sleep(LOAD_POLL_S)


def _gallery(result: Result) -> list[tuple[Any, str]]:
    items = []
    for index, image in enumerate(result.images):
        similarity = result.similarities[index] if index < len(result.similarities) else None
        caption = f"seed {image_seed(result.seed, index)}"
        if len(result.images) > 1:
            caption = f"#{index + 1}, {caption}"
        if index < len(result.person_similarities):
            # A group: "#1, seed 42: Ada 0.71, Ben 0.68", each person's own face's score.
            scores = result.person_similarities[index]
            margins = result.person_margins[index] if index < len(result.person_margins) else {}
            caption += ": " + ", ".join(
                f"{name} {'no face' if score is None else f'{score:.2f}'}{_low_margin(margins.get(name))}"
                for name, score in scores.items()
            )
        else:
            # The identity check of the output: the same face found again, or not at all.
            caption += "; no face found" if similarity is None else f"; identity {similarity:.2f}"
        if result.refined:
            caption += f"; refined: {', '.join(result.refined)}"
        items.append((image, caption))
    return items


def _low_margin(margin: dict[str, Any] | None) -> str:
    """A group caption's note on a face that is nearly as like (or more like) another person of the request."""
    if margin is None or margin["margin"] >= LOW_MARGIN:
        return ""
    if margin["margin"] < 0:
        return f" (more like {margin['nearest_other']}, by {-margin['margin']:.2f})"
    return f" (only {margin['margin']:.2f} above {margin['nearest_other']})"


# What generate returns, in the order of the page's outputs.
OUTPUTS_DOC = (
    "Images with captions, seed used, identity similarity per image (cosine), face keypoint image, timings (ms) "
    "with a list of warnings under \"warnings\" (e.g. several faces found, an empty prompt); a group of two or more "
    "also has \"identity_margins\": per image, per person, their face's similarity to them minus its best "
    "similarity to another person (negative: it looks more like that person, named as \"nearest_other\")."
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
        inspect.Parameter(p.name, plain, annotation=_TYPES[p.kind] | None if p.default is None else _TYPES[p.kind],
                          **({} if p.required else {"default": p.default}))
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


def _observe(job: Job, rendered: Rendered, wall_s: float) -> None:
    """Hand a finished GPU call's measurements to the duration record; never fails the request."""
    try:
        shape = durations.shape_of(job)
        asked = durations.RECORD.last_asked(id(job))
        durations.RECORD.observe(id(job), shape, rendered.timings_ms, wall_s, mode=str(getattr(job, "mode", "")))
        # The caller's timings say what the call asked of ZeroGPU (absent off ZeroGPU) and what it used, from
        # asking to the result.
        if asked is not None:
            rendered.timings_ms["gpu_asked_ms"] = asked * 1000.0
        rendered.timings_ms["gpu_used_ms"] = wall_s * 1000.0
    except Exception:
        log.exception("could not record the GPU call's durations")
        durations.RECORD.forget(id(job))


def _preview_image(rgb: Any) -> Any:
    """The projection (latent resolution, 1/8 of the image's side) upsampled to PREVIEW_SIDE on its long side."""
    import PIL.Image

    height, width = rgb.shape[:2]
    scale = PREVIEW_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return PIL.Image.fromarray(rgb).resize(size, PIL.Image.Resampling.BILINEAR)


def _partial(started: float, stage: str, step: Step | None = None, preview: Any = None) -> Partial:
    """Intermediate outputs: where the run is (for the page's progress line and for API clients) and, every few
    steps, the preview in the gallery. Each reaches the client as an output: Gradio's own progress overlay would be
    reset by it (its timer restarts and its bar goes at every yield), so the page draws this instead."""
    where: dict[str, Any] = {"stage": stage, "elapsed_s": round(time.monotonic() - started, 1)}
    if step is not None:
        where.update(step=step.done, steps=step.total)
    gallery = gr.skip()
    if preview is not None and step is not None:
        gallery = [(preview, f"preview, step {step.done} of {step.total}")]
    return Partial((gallery, gr.skip(), gr.skip(), gr.skip(), {"progress": where}))


def _run(request: Request, progress: Any, key: object) -> Iterator[Any]:
    """The three stages; yields `Partial` outputs (progress, previews) at each denoising step, every heartbeat and
    while the models load, then the final outputs.

    A generator so that Gradio's own cancel handling reaches it: when a client cancels or disconnects,
    Gradio closes the generator it is iterating (its documented behaviour for generator events), which
    closes the GPU stage at its next step and frees the pipeline for the next request.
    """
    started = time.monotonic()
    engine = _engine()
    engine.check(request)  # the server's limits, before waiting for a model or a GPU
    yield _partial(started, "starting")
    for _ in _wait_for_models(engine, progress):
        yield _partial(started, "loading the models")
    ACTIVITY.set(key, "preparing")
    job = engine.prepare(request)  # CPU, in this process: a photo without a face asks for no GPU time
    ACTIVITY.set(key, "starting")
    shown: tuple[Any, dict[str, Any]] = (0.0, {"desc": "Starting"})
    progress(shown[0], **shown[1])
    step: Step | None = None
    asked = time.perf_counter()  # on ZeroGPU the first step below asks for the GPU (`_gpu_duration`)
    steps = _render_on_gpu(job)
    try:
        for event in steps:
            if isinstance(event, Rendered):
                break
            # Control goes to Gradio at each step and heartbeat: a cancel or a lost client closes this generator
            # here. gradio_client's job.status() reads the progress sent after each yield; the page reads the
            # Partial outputs (Gradio's overlay would be reset by each yield).
            preview = None
            if event is not None:
                step = event
                shown = ((event.done, event.total), {"desc": "Denoising", "unit": "steps"})
                ACTIVITY.set(key, f"step {event.done} of {event.total}")
                if event.preview is not None:
                    preview = _preview_image(event.preview)
            yield _partial(started, "starting" if step is None else step.stage, step, preview)
            progress(shown[0], **shown[1])
        else:
            raise RuntimeError("the GPU stage ended without a result")
    except GeneratorExit:
        log.info(STOPPED)
        # Closing the GPU stage waits for the step under way (the pipeline stops after it); Gradio's cancel
        # call waits for this generator, so that wait happens beside it. The next request queues on the
        # pipeline's lock until the step is done.
        threading.Thread(target=steps.close, name="instantid-stop", daemon=True).start()
        durations.RECORD.forget(id(job))
        raise
    except BaseException:
        steps.close()
        durations.RECORD.forget(id(job))
        raise
    steps.close()
    _observe(job, event, time.perf_counter() - asked)
    result = engine.finish(job, event)
    for warning in result.warnings:
        gr.Warning(warning)  # the page's toast; gradio_client keeps it only as a passing status (`log`)
    info: dict[str, Any] = {key: round(float(value), 1) for key, value in (result.timings_ms or {}).items()}
    # So the warnings reach every caller, not only the page: gradio_client's predict() returns the outputs alone.
    info["warnings"] = list(result.warnings)
    # A group's similarities are per image, per person ({name: score}); the other modes' one number per image.
    similarities = list(result.person_similarities or result.similarities)
    if result.person_margins:
        # Per image, per person: {"margin": own similarity minus the best other person's, "nearest_other": name}.
        info["identity_margins"] = list(result.person_margins)
    yield _gallery(result), int(result.seed), similarities, result.keypoint_image, info


def _call_error(mode: str, kwargs: dict[str, Any], exc: TypeError) -> str:
    """Python's own TypeError, as the sentence a caller of the endpoint function (MCP, a script) can act on:
    a keyword of another mode is named with the modes that take it."""
    params = params_for(mode)
    for name, value in kwargs.items():
        if name in PARAMS and name not in params:
            modes = ", ".join(PARAMS[name].modes)
            return str(InvalidParameter(name, value, f"is not used by {mode} (only by {modes})"))
        if name not in params and name != "progress":
            return str(InvalidParameter(name, value, f"{mode} takes {', '.join(params)}"))
    return f"{mode}: {exc}"


def _endpoint(mode: str) -> Callable[..., Iterator[Any]]:
    """The API function of one mode: its signature and docstring are made from `params_for(mode)`, and it
    runs the same three stages as every other mode (`_run`)."""
    params = params_for(mode)

    def endpoint(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            bound = endpoint.__signature__.bind(*args, **kwargs)  # type: ignore[attr-defined]
        except TypeError as exc:
            raise gr.Error(_call_error(mode, kwargs, exc), print_exception=False) from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        progress = values.pop("progress")
        if progress is None:  # a caller in Python may pass None: no tracker
            progress = gr.Progress()
        key = object()
        try:
            yield from _run(Request.from_api(values, mode), progress, key)
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
    endpoint.__doc__ = _docstring(MODE_SPECS[mode].summary, params, OUTPUTS_DOC)
    return endpoint


# One endpoint per mode (`instantid.declaration.MODE_SPECS`), served as /<mode>.
ENDPOINTS: dict[str, Callable[..., Iterator[Any]]] = {mode: _endpoint(mode) for mode in MODES}


def __getattr__(name: str) -> Any:
    # `api.generate`, `api.swap`, ...: each mode's endpoint by its name, with no line per mode here.
    if name in ENDPOINTS:
        return ENDPOINTS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def status() -> dict[str, Any]:
    """Memory and model-loading report of the server: host RAM, GPU memory, loaded components, profile, load
    state, and the GPU seconds recent requests asked for and used.

    Returns:
        A JSON object with keys host, gpu (null without a GPU), components, profile, state and durations.
    """
    try:
        report = _engine().report()
        report.setdefault("state", {})["activity"] = ACTIVITY.summary()
        report["durations"] = durations.RECORD.report(_duration_factor(), _duration_cap())
        return report
    except Exception:
        log.exception("status report failed")
        raise gr.Error("The server could not produce its status report.", print_exception=False) from None
