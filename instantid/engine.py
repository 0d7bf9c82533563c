"""The one shared model holder: thread-safe loading and a request in three stages.

Everything that owns memory lives here: the pipeline, the face models, the extra ControlNets, the speeds'
LoRAs (and LCM's) and the condition estimators. Two start-up modes:

- resident (ZeroGPU): `load_all()` in the main thread before launch loads everything a request can
  need, placed on "cuda", so that `spaces` packs it; nothing is ever loaded inside a GPU call;
- lazy (everywhere else): the base models load once, in the background or on first need, even when two
  first requests arrive together; the extras load on first use.

A request runs as `prepare` (CPU) -> `render` (GPU) -> `finish` (CPU), each a module under request/ that is
handed what it needs of the models here; `run` runs the three in turn. Generation is serialised on the shared
pipeline, while `report()` never waits for either lock.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .declaration import SPEEDS
from .errors import BusyError, UserError
from .models.loading import (
    LORA_LABELS,
    checkpoint_entry,
    load_estimator,
    load_extra_controlnet,
    load_face_analyzer,
    load_pipeline,
    load_speed_lora,
    place_like_profile,
)
from .models.loras import LoraSwitch
from .models.memory import Hardware, apply_profile, choose_profile, probe_hardware
from .models.memory_report import memory_report
from .request.finish import finish as finish_job
from .request.prepare import check as check_request
from .request.prepare import prepare as prepare_job
from .request.render import PreviewFn, ProgressFn, extra_controls, render_steps, run_pipeline
from .request.requests import Job, Rendered, Request, Result, Step
from .request.scenes import TINY_SHORT_SIDE, Workshop
from .settings import CONTROL_TYPES, Settings, get_settings
from .vision import faces as face_lib
from .vision.images import image_to_array, load_image, release_memory

log = logging.getLogger("instantid")


@dataclass
class LoadState:
    phase: str = "not loaded"  # not loaded | loading | ready | error
    progress: float = 0.0
    message: str = ""
    error: str | None = None
    started_at: float | None = None
    seconds: float | None = None
    loaded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "progress": round(self.progress, 3),
            "message": self.message,
            "error": self.error,
            "load_seconds": None if self.seconds is None else round(self.seconds, 2),
            "loaded": list(self.loaded),
        }


class Engine:
    """Owns the models. Use `get_engine()` for the process-wide instance."""

    def __init__(self, settings: Settings | None = None, hardware: Hardware | None = None) -> None:
        self.settings = settings or get_settings()
        self.hardware = hardware or probe_hardware()
        self.profile, self.profile_reason = choose_profile(
            self.hardware, self.settings.memory_profile, real_models=self.settings.preset != "tiny"
        )
        self._load_lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._extras_lock = threading.Lock()
        self._state = LoadState()
        self._thread: threading.Thread | None = None
        self.pipe: Any = None
        self.pipes: dict[str, Any] = {}  # a `Mode.pipeline` kind -> its pipeline, on `pipe`'s modules
        self.loras: LoraSwitch | None = None  # the speeds' LoRAs on the shared UNet (loras.py)
        self.face_analyzer: face_lib.FaceAnalyzer | None = None
        self._extra_nets: dict[str, Any] = {}
        self._estimators: dict[str, Any] = {}
        # True once `load_all` ran: every part is resident and nothing may load on a request's path.
        self.resident = False
        # Optional parts (a speed's LoRA: "fast", "turbo", "lcm"; an extra ControlNet: "pose", "canny",
        # "depth") that failed to load at start-up -> the reason.
        self.unavailable: dict[str, str] = {}
        # What was loaded from where: role, repo, revision, weight file (the status report shows it).
        self.checkpoints: list[dict[str, str]] = []

    # --- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> dict[str, Any]:
        return self._state.to_dict()

    def _progress(self, fraction: float, message: str) -> None:
        self._state.progress = max(0.0, min(1.0, fraction))
        self._state.message = message
        log.info("loading %3.0f%% %s", fraction * 100, message)

    def report(self) -> dict[str, Any]:
        """The memory report (JSON-ready). Takes no lock, so it answers during loads and generations."""
        components: dict[str, Any] = {}
        pipe = self.pipe
        if pipe is not None:
            for name in ("unet", "controlnet", "text_encoder", "text_encoder_2", "vae", "resampler"):
                components[name if name != "controlnet" else "identitynet"] = getattr(pipe, name, None)
        loras = self.loras
        if pipe is not None and loras is not None and loras.names:
            if loras.mode == "adapter":
                # The adapters' layers live inside the UNet: listed apart, counted once.
                components["unet"] = (pipe.unet, lambda n: "lora_" not in n)
                components["speed_loras"] = (pipe.unet, lambda n: "lora_" in n)
            else:
                components.update(loras.modules())
        for name, net in list(self._extra_nets.items()):
            components[f"controlnet_{name}"] = net
        for name, est in list(self._estimators.items()):
            for role, module in est.modules().items():
                components[f"{name}_{role}"] = module
        report = memory_report(
            components=components, profile=self.profile, reason=self.profile_reason, state=self.state
        )
        report["preset"] = self.settings.preset
        if self.settings.preset == "tiny" and report.get("profile"):
            # The profile's figures are the real models'; the tiny preset's are a different story.
            report["profile"]["description"] = (
                f"Tiny preset: random tiny models, {TINY_SHORT_SIDE} px noise images in seconds on any CPU "
                f"({self.profile.name} profile placement)."
            )
            report["profile"].pop("warning", None)
        if self.face_analyzer is not None:
            report["face_models"] = {"folder": Path(self.face_analyzer.model_dir).name, "device": "cpu (onnxruntime)"}
        if self.hardware.zerogpu:
            # Outside a GPU call `spaces` keeps the "cuda" weights packed on disk and torch shows their host
            # stand-ins; inside one they are on the GPU.
            for info in report["components"]:
                if self.profile.device == "cuda" and not str(info.get("device", "")).startswith("cuda"):
                    info["device"] = "cuda (ZeroGPU: on the GPU during a generation)"
        report["startup"] = {
            "mode": "resident" if self.resident else "lazy",
            "description": (
                "everything loaded in the main thread before launch, placed on cuda for ZeroGPU"
                if self.resident
                else "page first; base models load in the background or on first request, extras on first use"
            ),
            "unavailable": dict(self.unavailable),
        }
        report["checkpoints"] = list(self.checkpoints)
        return report

    # --- loading -------------------------------------------------------------------------------

    def start_background_load(self) -> None:
        """Start loading in a daemon thread (the UI comes up at once); errors land in the state."""
        if self._thread is not None and self._thread.is_alive():
            return

        def run() -> None:
            try:
                self.ensure_loaded()
            except Exception:  # already recorded in the state; the first request will retry
                log.exception("background load failed")

        self._thread = threading.Thread(target=run, name="instantid-load", daemon=True)
        self._thread.start()

    def load_all(self) -> None:
        """Load every part a request can need, now, in the calling thread (the resident start-up mode).

        For ZeroGPU: `spaces` packs at launch only what was placed on "cuda" before it, and only in the
        thread that imported it (torch function modes are thread-local), so this runs in the main thread
        before `launch`. An optional part that fails (LCM-LoRA, an extra ControlNet, an estimator) is
        recorded in `unavailable` with the reason and start-up goes on; if the base models fail, the state
        says so and every request gets that message.
        """
        self.resident = True
        try:
            self.ensure_loaded()
        except Exception:  # recorded in the state; the page still comes up and says why
            log.exception("start-up load failed")
            return
        parts: list[tuple[str, str, Callable[[], Any]]] = [
            (name, LORA_LABELS[name], lambda name=name: self._lora(name)) for name in LORA_LABELS
        ]
        for name, kind in CONTROL_TYPES.items():
            if name in self.settings.controlnets:
                parts.append((name, f"{name} ControlNet", lambda name=name: self._extra_controlnet(name)))
                if kind.has_estimator:
                    parts.append((name, f"{name} estimator", lambda name=name: self._estimator(name)))
        for key, label, load in parts:
            if key in self.unavailable:
                continue  # its ControlNet already failed: the estimator alone would be no use
            self._progress(self._state.progress, f"loading {label}")
            try:
                load()
            except Exception as exc:
                reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                self.unavailable[key] = f"{label} could not be loaded: {reason}"
                log.warning("optional part unavailable: %s", self.unavailable[key])
                continue
            self._state.loaded.append(label)
        self._state.message = f"ready ({self.profile.name} profile): {len(self._state.loaded)} parts resident"

    def ensure_loaded(self) -> None:
        """Load everything once. Concurrent callers wait for the first; a failed load is retried."""
        if self._state.phase == "ready":
            return
        with self._load_lock:
            if self._state.phase == "ready":
                return
            self._state = LoadState(phase="loading", started_at=time.time(), message="starting")
            t0 = time.perf_counter()
            try:
                self._load()
            except Exception as exc:
                self._state.phase = "error"
                self._state.error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                self._state.message = "loading failed; the next request retries"
                self.pipe = None
                gc.collect()
                raise
            self._state.phase = "ready"
            self._state.progress = 1.0
            self._state.seconds = time.perf_counter() - t0
            self._state.message = f"ready in {self._state.seconds:.1f} s ({self.profile.name} profile)"

    def _load(self) -> None:
        s = self.settings
        if s.preset == "tiny":
            self._progress(0.01, "writing tiny checkpoints (first run only)")
            from .models.tiny import ensure_tiny_checkpoints

            ensure_tiny_checkpoints(s)
        self._progress(0.05, "face models")
        self.face_analyzer = self._load_faces()
        self._state.loaded.append("face models")
        self.pipe = load_pipeline(s, self.profile, self._progress, record=self._record)
        self.loras = LoraSwitch(self.pipe, self.profile.lora_mode)
        self._share_modes()
        self._state.loaded.extend(["base model", "IdentityNet", "ip-adapter"])

    def _share_modes(self) -> None:
        """The pipelines the modes run with (`Mode.pipeline`), made here with the rest (never inside a GPU call):
        `self.pipe` itself, and diffusers' img2img and inpaint pipelines on its very modules, so no weight is held
        twice."""
        from .models.pipeline import mode_pipelines

        self.pipes = mode_pipelines(self.pipe)

    def _load_faces(self) -> face_lib.FaceAnalyzer:
        return load_face_analyzer(self.settings, self._record)

    def faces(self) -> face_lib.FaceAnalyzer:
        """The face analyzer alone (the `faces` command needs no diffusion models)."""
        if self.face_analyzer is None:
            with self._load_lock:
                if self.face_analyzer is None:
                    if self.settings.preset == "tiny":
                        from .models.tiny import ensure_tiny_checkpoints

                        ensure_tiny_checkpoints(self.settings)
                    self.face_analyzer = self._load_faces()
        return self.face_analyzer

    def _extra_controlnet(self, name: str) -> Any:
        """An extra ControlNet, loaded on first use (or by `load_all`)."""
        with self._extras_lock:
            if name not in self._extra_nets:
                self._extra_nets[name] = load_extra_controlnet(self.settings, name, self.profile, self._record)
            return self._extra_nets[name]

    def _estimator(self, name: str) -> Any:
        with self._extras_lock:
            if name not in self._estimators:
                # Estimators run once per request: on the GPU only when everything is resident anyway.
                device = self.profile.device if self.profile.offload == "none" else "cpu"
                self._estimators[name] = load_estimator(self.settings, name, device, self._record)
            return self._estimators[name]

    def _lora(self, name: str) -> LoraSwitch:
        """The LoRA switch with speed `name`'s LoRA loaded (on first use, or by `load_all`)."""
        with self._extras_lock:
            assert self.loras is not None, "the base models load first"
            if name not in self.loras.names:
                load_speed_lora(self.loras, self.settings, name, self._record)
            return self.loras

    def _record(self, role: str, repo: Any, path: Path) -> None:
        self.checkpoints = [c for c in self.checkpoints if c["role"] != role] + [checkpoint_entry(role, repo, path)]

    # --- the three stages ----------------------------------------------------------------------
    # prepare (CPU) -> render (GPU) -> finish (CPU), each in its module under request/, handed the models and
    # settings it needs. On ZeroGPU only render runs in the GPU worker, so a user error found by prepare never
    # asks for GPU time; everywhere else the same three run in turn.

    def analyze(self, source: Any, *, what: str = "photo") -> list[face_lib.Face]:
        """All faces in an image, largest first (no embeddings: the `faces` command)."""
        s = self.settings
        try:
            image, _ = load_image(source, max_bytes=s.max_upload_bytes, max_pixels=s.max_upload_pixels, what=what)
            return self.faces().detect(image_to_array(image), with_embedding=False)
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)  # as in prepare: free the decoded photo first
            raise
        finally:
            release_memory()

    def run(self, request: Request, progress: ProgressFn | None = None) -> Result:
        """Run one request end to end. User-fixable problems raise `UserError` subclasses."""
        job = self.prepare(request)
        try:
            rendered = self.render(job, progress)
        except BaseException:
            release_memory()  # a failed or stopped render's activations, as `finish` does after a good one
            raise
        return self.finish(job, rendered)

    def prepare(self, request: Request) -> Job:
        """The CPU stage (request/prepare.py): validate, decode the photos, find the faces, lay out every
        condition image. Needs the face models only (onnxruntime on the CPU), never the diffusion models or a GPU.
        """
        try:
            started = time.time()  # wall clock: the stages may run in different processes
            self.check(request)
            return prepare_job(request, Workshop(self.settings, self.profile, self.faces), started)
        except BaseException as exc:
            # A refusal's traceback holds the frames that hold the decoded photos: drop their locals, so the
            # memory is free when it is handed back below, not only when the caller lets go of the error.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            release_memory()  # decoded photos can be hundreds of MB, refused or not

    def check(self, req: Request) -> None:
        """Refuse, before any GPU time, what this server cannot run (request/prepare.py's `check`). Cheap: no model
        is loaded for it."""
        failed = self.resident and self._state.phase == "error"
        check_request(req, self.settings.max_output_side, f"{self._state.error}" if failed else None, self.unavailable)

    def render(self, job: Job, progress: ProgressFn | None = None, preview: PreviewFn | None = None) -> Rendered:
        """The GPU stage: the condition estimators, the pipeline call and the small faces' refinement, nothing else.

        `progress(step, total)` is called after every denoising step and may raise to stop the run; `preview(rgb)`,
        when given, every few steps of the image's pass (`models.preview.preview_every`), before that step's progress.
        """
        if self.resident and self._state.phase != "ready":
            # A ZeroGPU worker must never load: what it loads dies with it, on the visitor's GPU time.
            raise BusyError("The models are not loaded on this server; try again in a minute.")
        try:
            self.ensure_loaded()
        except UserError:
            raise
        except Exception as exc:
            raise BusyError(f"The models could not be loaded ({type(exc).__name__}); try again in a minute.") from exc
        t0 = time.perf_counter()
        extras = extra_controls(job, self._extra_controlnet, self._estimator)
        controls_ms = (time.perf_counter() - t0) * 1000
        with self._gen_lock:
            self._use_speed(job.speed)
            out = run_pipeline(
                job, extras, progress, pipeline=self._pipeline, profile=self.profile.name, free=self._free_cuda,
                step_down=lambda: self.profile.name if self._make_leaner() else None, preview=preview,
            )
        timings = {"controls_ms": controls_ms, **out.timings_ms}
        return Rendered(images=list(out.images), timings_ms=timings)

    def render_steps(self, job: Job, heartbeat_s: float | None = None) -> Iterator[Step | Rendered | None]:
        """`render` as a generator of its steps (request/render.py's `render_steps`)."""
        return render_steps(self.render, job, heartbeat_s)

    def finish(self, job: Job, rendered: Rendered) -> Result:
        """The CPU stage after the GPU (request/finish.py): paste-back, identity scores, warnings, timings."""
        return finish_job(job, rendered, self.faces, self.profile.name)

    # --- the models the render stage runs --------------------------------------------------------

    def _pipeline(self, kind: str) -> Any:
        """The pipeline of a `Mode.pipeline` kind; the base kind is `self.pipe` itself, read when asked."""
        return self.pipe if kind == "base" else self.pipes[kind]

    def _use_speed(self, speed: str) -> None:
        """The speed's LoRA folded into the shared UNet (or none): the switch and the pipelines share one UNet,
        so this serves every mode."""
        lora = SPEEDS[speed].lora
        loras = self._lora(speed) if lora is not None else self.loras
        assert loras is not None
        loras.use(speed if lora is not None else None)

    def _free_cuda(self) -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _make_leaner(self) -> bool:
        """Switch to the next leaner GPU profile in place; False when there is none."""
        from .models.memory import leaner_profile

        nxt = leaner_profile(self.profile)
        if nxt is None:
            return False
        assert self.loras is not None
        self.loras.use(None)  # base weights back before the placement changes
        apply_profile(self.pipe, nxt)
        if nxt.lora_mode != self.loras.mode:
            # The LoRAs load again on first use, in the new profile's way (their files are in the cache).
            self.loras = LoraSwitch(self.pipe, nxt.lora_mode)
        self._share_modes()  # the other modes' pipelines take the new placement's offload state
        for name, net in list(self._extra_nets.items()):
            self._extra_nets[name] = place_like_profile(net, nxt)
        self.profile = nxt
        self.profile_reason += f"; switched to {nxt.name} after running out of GPU memory"
        return True


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine(settings: Settings | None = None) -> Engine:
    """The process-wide engine (created on first call)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine(settings)
        return _engine
