"""The one shared model holder: thread-safe loading and a request in three stages.

Everything that owns memory lives here: the pipeline, the face models, the extra ControlNets, LCM-LoRA
and the condition estimators. Two start-up modes:

- resident (ZeroGPU): `load_all()` in the main thread before launch loads everything a request can
  need, placed on "cuda", so that `spaces` packs it; nothing is ever loaded inside a GPU call;
- lazy (everywhere else): the base models load once, in the background or on first need, even when two
  first requests arrive together; the extras load on first use.

A request runs as `prepare` (CPU) -> `render` (GPU) -> `finish` (CPU); `generate` runs the three in turn.
Generation is serialised on the shared pipeline, while `report()` never waits for either lock.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import faces as face_lib
from .errors import BusyError, CheckpointError, OutOfMemoryError, UserError
from .hub import (
    RepoRef,
    choose_weights,
    component_files,
    face_model_files,
    fetch,
    fetch_component,
    ip_adapter_file,
    list_files,
    lora_file,
    resolve_face_models,
)
from .images import image_to_array, load_image, release_memory
from .memory import Hardware, Profile, apply_profile, choose_profile, memory_report, probe_hardware, torch_dtype
from .requests import DEFAULT_PROMPT, GenerateRequest, GenerateResult, Job, Rendered, Step, random_seed
from .settings import CONTROLNET_NAMES, Settings, get_settings
from .styles import apply_style

log = logging.getLogger("instantid")

# (step done, total steps) -> None; may raise to cancel (Gradio does when a client leaves).
ProgressFn = Callable[[int, int], None]

TINY_SHORT_SIDE = 128  # the tiny preset's noise images need no more; keeps CPU requests instant
# Extra controls whose condition image comes from a model (run in the GPU stage); canny's is plain CPU work.
ESTIMATED_CONTROLS = ("depth", "pose")


class RenderCancelled(Exception):
    """Raised inside the pipeline's step callback when the consumer of `render_steps` stopped listening."""


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
        self.profile, self.profile_reason = choose_profile(self.hardware, self.settings.memory_profile)
        self._load_lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._extras_lock = threading.Lock()
        self._state = LoadState()
        self._thread: threading.Thread | None = None
        self.pipe: Any = None
        self.face_analyzer: face_lib.FaceAnalyzer | None = None
        self._extra_nets: dict[str, Any] = {}
        self._estimators: dict[str, Any] = {}
        # True once `load_all` ran: every part is resident and nothing may load on a request's path.
        self.resident = False
        # Optional parts ("lcm", "pose", "canny", "depth") that failed to load at start-up -> the reason.
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
            if getattr(pipe, "has_lcm", False):
                # The LoRA's layers live inside the UNet: listed apart, counted once.
                components["unet"] = (pipe.unet, lambda n: "lora_" not in n)
                components["lcm_lora"] = (pipe.unet, lambda n: "lora_" in n)
        for name, net in list(self._extra_nets.items()):
            components[f"controlnet_{name}"] = net
        for name, est in list(self._estimators.items()):
            for attr in ("model", "pose_model", "detector"):
                if getattr(est, attr, None) is not None:
                    components[f"{name}_{attr}"] = getattr(est, attr)
        report = memory_report(
            components=components, profile=self.profile, reason=self.profile_reason, state=self.state
        )
        report["preset"] = self.settings.preset
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
        parts: list[tuple[str, str, Callable[[], Any]]] = [("lcm", "LCM-LoRA", self._lcm)]
        for name in CONTROLNET_NAMES:
            if name in self.settings.controlnets:
                parts.append((name, f"{name} ControlNet", lambda name=name: self._extra_controlnet(name)))
                if name in ESTIMATED_CONTROLS:
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

    def _cache(self) -> Path | None:
        return self.settings.hub_cache

    def _load(self) -> None:
        s = self.settings
        if s.preset == "tiny":
            self._progress(0.01, "writing tiny checkpoints (first run only)")
            from .tiny import ensure_tiny_checkpoints

            ensure_tiny_checkpoints(s)
        self._progress(0.05, "face models")
        self.face_analyzer = self._load_faces()
        self._state.loaded.append("face models")
        self.pipe = load_pipeline(s, self.profile, self._progress, record=self._record)
        self._state.loaded.extend(["base model", "IdentityNet", "ip-adapter"])

    def _load_faces(self) -> face_lib.FaceAnalyzer:
        s = self.settings
        folder = resolve_face_models(s.face_models, cache_dir=self._cache(), offline=s.hub_offline)
        self._record("face models", s.face_models, folder)
        return face_lib.FaceAnalyzer(folder, providers=s.onnx_providers, det_size=s.face_det_size)

    def faces(self) -> face_lib.FaceAnalyzer:
        """The face analyzer alone (the `faces` command needs no diffusion models)."""
        if self.face_analyzer is None:
            with self._load_lock:
                if self.face_analyzer is None:
                    if self.settings.preset == "tiny":
                        from .tiny import ensure_tiny_checkpoints

                        ensure_tiny_checkpoints(self.settings)
                    self.face_analyzer = self._load_faces()
        return self.face_analyzer

    def _extra_controlnet(self, name: str) -> Any:
        """Load an extra ControlNet on first use and place it like the IdentityNet."""
        with self._extras_lock:
            if name not in self._extra_nets:
                from diffusers import ControlNetModel

                repo = RepoRef.parse(self.settings.controlnets[name])
                files = list_files(repo, cache_dir=self._cache(), offline=self.settings.hub_offline)
                folder, variant = fetch_component(
                    repo, repo.subfolder, files=files, cache_dir=self._cache(), offline=self.settings.hub_offline
                )
                net = _from_pretrained(ControlNetModel, folder, variant, torch_dtype(self.profile.dtype)).eval()
                self._extra_nets[name] = place_like_profile(net, self.profile)
                self._record(f"{name} ControlNet", repo, folder)
            return self._extra_nets[name]

    def _estimator(self, name: str) -> Any:
        from . import controls

        with self._extras_lock:
            if name not in self._estimators:
                s = self.settings
                # Estimators run once per request: on the GPU only when everything is resident anyway.
                device = self.profile.device if self.profile.offload == "none" else "cpu"
                if name == "depth":
                    folder = _snapshot(s.depth_estimator, s, self._cache())
                    self._estimators[name] = controls.DepthEstimator.from_folder(folder, device=device)
                    self._record("depth estimator", s.depth_estimator, folder)
                elif name == "pose":
                    pose = _snapshot(s.pose_estimator, s, self._cache())
                    det = _snapshot(s.person_detector, s, self._cache())
                    self._estimators[name] = controls.PoseEstimator.from_folders(pose, det, device=device)
                    self._record("pose estimator", s.pose_estimator, pose)
                    self._record("person detector", s.person_detector, det)
            return self._estimators.get(name)

    def _lcm(self) -> None:
        with self._extras_lock:
            if not self.pipe.has_lcm:
                s = self.settings
                repo = RepoRef.parse(s.lcm_lora)
                files = list_files(repo, cache_dir=self._cache(), offline=s.hub_offline)
                name = lora_file(repo, files)
                path = fetch(repo, name, cache_dir=self._cache(), offline=s.hub_offline)
                self.pipe.load_lcm_lora(str(path.parent), weight_name=name)
                self._record("LCM-LoRA", repo, path)

    def _record(self, role: str, repo: Any, path: Path) -> None:
        self.checkpoints = [c for c in self.checkpoints if c["role"] != role] + [checkpoint_entry(role, repo, path)]

    # --- the three stages ----------------------------------------------------------------------
    # prepare (CPU) -> render (GPU) -> finish (CPU). On ZeroGPU only render runs in the GPU worker, so a
    # user error found by prepare never asks for GPU time; everywhere else the same three run in turn.

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

    def generate(self, request: GenerateRequest, progress: ProgressFn | None = None) -> GenerateResult:
        """Run one request end to end. User-fixable problems raise `UserError` subclasses."""
        job = self.prepare(request)
        return self.finish(job, self.render(job, progress))

    def prepare(self, request: GenerateRequest) -> Job:
        """The CPU stage: validate, decode the photos, find the faces, lay out every condition image.

        Needs the face models only (onnxruntime on the CPU), never the diffusion models or a GPU.
        """
        try:
            return self._prepare(request)
        except BaseException as exc:
            # A refusal's traceback holds the frames that hold the decoded photos: drop their locals, so the
            # memory is free when it is handed back below, not only when the caller lets go of the error.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            release_memory()  # decoded photos can be hundreds of MB, refused or not

    def _prepare(self, request: GenerateRequest) -> Job:
        started = time.time()  # wall clock: the stages may run in different processes
        s = self.settings
        req = request.validated(max_side=s.max_output_side)
        self._check_available(req)
        if request.num_steps in (None, 0) and not req.enable_lcm and self.profile.default_steps:
            req = replace(req, num_steps=self.profile.default_steps)  # the cpu profile's shorter default
        if req.num_images > self.profile.max_images:
            req = replace(req, num_images=self.profile.max_images)
        timings: dict[str, float] = {}
        warnings: list[str] = []
        if request.num_images != req.num_images:
            warnings.append(f"This hardware ({self.profile.name} profile) makes at most {req.num_images} images.")
        for name, raw, clean in (
            ("prompt", request.prompt, req.prompt),
            ("negative prompt", request.negative_prompt, req.negative_prompt),
        ):
            if len(raw) != len(clean):
                warnings.append(f"Removed {len(raw) - len(clean)} control character(s) from the {name}.")

        t0 = time.perf_counter()
        analyzer = self.faces()
        embeddings = []
        ref_img = ref_face = None
        faces_found = 0
        for i, src in enumerate(req.face_images):
            what = "face photo" if i == 0 else f"extra face photo {i}"
            img, w = load_image(src, max_bytes=s.max_upload_bytes, max_pixels=s.max_upload_pixels, what=what)
            warnings += w
            face, count = analyzer.embed_largest(image_to_array(img), what=what)
            if count > 1:
                warnings.append(f"Found {count} faces in the {what}; using the largest.")
            embeddings.append(face.embedding)
            if i == 0:
                # Only the first photo's pixels are used again: up to 8 extra 50-megapixel photos must not
                # all stay decoded at once (150 MB each), only their embeddings.
                ref_img, ref_face, faces_found = img, face, count
            del img
        embedding = face_lib.average_embedding(embeddings)
        pose_img, pose_face = ref_img, ref_face
        if req.pose_image is not None:
            pose_img, w = load_image(
                req.pose_image, max_bytes=s.max_upload_bytes, max_pixels=s.max_upload_pixels, what="pose photo"
            )
            warnings += w
            pose_faces = analyzer.detect(image_to_array(pose_img), with_embedding=False)
            if not pose_faces:
                raise face_lib.NoFaceError(
                    "No face found in the pose photo: use a pose photo where the face is visible, or leave it empty."
                )
            pose_face = pose_faces[0]
        timings["faces_ms"] = (time.perf_counter() - t0) * 1000

        t1 = time.perf_counter()
        src_w, src_h = pose_img.size
        if req.width:
            width, height = req.width, req.height
        else:
            short = TINY_SHORT_SIDE if s.preset == "tiny" else self.profile.default_short_side
            width, height = face_lib.output_size(src_w, src_h, short_side=short, max_side=s.max_output_side)
        scale, ox, oy = layout((src_w, src_h), (width, height), pose_face.bbox)
        kps = face_lib.scale_kps(pose_face.kps, scale, scale) + np.array([ox, oy], dtype=np.float32)
        keypoint_image = face_lib.draw_keypoints((width, height), kps)
        x1, y1, x2, y2 = pose_face.bbox
        mask = (
            face_lib.face_mask((width, height), (x1 * scale + ox, y1 * scale + oy, x2 * scale + ox, y2 * scale + oy))
            if req.enhance_face_region
            else None
        )
        crop = (-ox / scale, -oy / scale, (width - ox) / scale, (height - oy) / scale)
        controls = self._prepare_controls(req, pose_img, (width, height), crop)
        timings["conditions_ms"] = (time.perf_counter() - t1) * 1000

        prompt = req.prompt.strip()
        if not prompt:
            prompt = DEFAULT_PROMPT
            warnings.append(f"Empty prompt: used '{DEFAULT_PROMPT}'.")
        prompt, negative = apply_style(req.style, prompt, req.negative_prompt.strip())
        return Job(
            prompt=prompt,
            negative_prompt=negative,
            embedding=embedding,
            keypoint_image=keypoint_image,
            face_mask=mask,
            controls=controls,
            width=width,
            height=height,
            num_images=req.num_images,
            num_steps=int(req.num_steps or 1),
            guidance_scale=float(req.guidance_scale or 0.0),
            identitynet_strength=req.identitynet_strength,
            adapter_strength=req.adapter_strength,
            scheduler=req.scheduler,
            enable_lcm=req.enable_lcm,
            seed=req.seed if req.seed is not None else random_seed(),
            faces_found=faces_found,
            warnings=warnings,
            timings_ms=timings,
            started=started,
        )

    def _check_available(self, req: GenerateRequest) -> None:
        """Refuse, before any GPU time, what this server cannot run: parts that did not load at start-up."""
        if self.resident and self._state.phase == "error":
            raise BusyError(
                f"The models did not load when the server started ({self._state.error}); "
                "the Space must be restarted, ask its owner."
            )
        asked = [*req.controlnets, *(["lcm"] if req.enable_lcm else [])]
        for name in asked:
            reason = self.unavailable.get(name)
            if reason is not None:
                what = "LCM fast mode" if name == "lcm" else f"The {name} ControlNet"
                fix = "switch LCM off" if name == "lcm" else f"untick '{name}' in the extra ControlNets"
                raise CheckpointError(f"{what} is not available on this server ({reason}): {fix}.")

    def _prepare_controls(
        self, req: GenerateRequest, pose_img: Any, size: tuple[int, int], crop: tuple[float, float, float, float]
    ) -> dict[str, tuple[float, Any]]:
        """Each extra ControlNet's input at the output size, cropped like the keypoint layout."""
        if not req.controlnets:
            return {}
        from . import controls

        resized = pose_img.resize(size, box=crop)
        out: dict[str, tuple[float, Any]] = {}
        for name, strength in req.controlnets.items():
            # Canny is plain CPU image work; depth and pose need their estimators, GPU models run in render.
            image = controls.make_condition(name, resized, {}) if name not in ESTIMATED_CONTROLS else resized
            out[name] = (strength, image)
        return out

    def render(self, job: Job, progress: ProgressFn | None = None) -> Rendered:
        """The GPU stage: the condition estimators and the pipeline call, nothing else.

        `progress(step, total)` is called after every denoising step and may raise to stop the run.
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
        extras = self._extra_controls(job)
        controls_ms = (time.perf_counter() - t0) * 1000
        with self._gen_lock:
            out = self._run_pipeline(job, extras, progress)
        timings = {"controls_ms": controls_ms, **out.timings_ms}
        return Rendered(images=list(out.images), timings_ms=timings, interrupted=bool(out.interrupted))

    def render_steps(self, job: Job) -> Iterator[Step | Rendered]:
        """`render` as a generator: a `Step` after each denoising step, then the `Rendered` result.

        The pipeline runs in a thread so that each step can be handed out as it finishes. Closing the
        generator (a visitor who cancelled; on ZeroGPU, `spaces` closes it in the worker when the main
        process's generator is closed) stops the pipeline at its next step and waits for that, so the GPU
        is free when `close()` returns.
        """
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = threading.Event()

        def on_step(done: int, total: int) -> None:
            if stop.is_set():
                raise RenderCancelled
            events.put(("step", Step(done, total)))

        def run() -> None:
            try:
                events.put(("done", self.render(job, on_step)))
            except BaseException as exc:  # handed to the consuming thread, which re-raises it
                events.put(("error", exc))

        worker = threading.Thread(target=run, name="instantid-render", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                yield value
                if kind == "done":
                    return
        finally:
            stop.set()
            worker.join()

    def finish(self, job: Job, rendered: Rendered) -> GenerateResult:
        """The CPU stage after the GPU: identity similarity of each image, warnings, timings."""
        t0 = time.perf_counter()
        analyzer = self.faces()
        sims = [face_lib.identity_similarity(analyzer, job.embedding, image_to_array(im)) for im in rendered.images]
        timings = {**job.timings_ms, **rendered.timings_ms, "identity_check_ms": (time.perf_counter() - t0) * 1000}
        timings["total_ms"] = (time.time() - job.started) * 1000
        warnings = list(job.warnings) + self._prompt_warnings(job.prompt, job.negative_prompt)
        if rendered.interrupted:
            warnings.append("Generation was stopped early.")
        return GenerateResult(
            images=rendered.images,
            seed=job.seed,
            similarities=sims,
            keypoint_image=job.keypoint_image,
            timings_ms={k: round(v, 1) for k, v in timings.items()},
            width=job.width,
            height=job.height,
            num_steps=job.num_steps,
            guidance_scale=job.guidance_scale,
            faces_found=job.faces_found,
            profile=self.profile.name,
            warnings=warnings,
        )

    def _prompt_warnings(self, prompt: str, negative: str) -> list[str]:
        tok = getattr(self.pipe, "tokenizer", None)
        if tok is None:
            return []
        out = []
        for name, text in (("prompt", prompt), ("negative prompt", negative)):
            n = len(tok(text, truncation=False).input_ids)
            if n > tok.model_max_length:
                out.append(
                    f"The {name} (with the style) is {n} tokens; the text encoders read only the first "
                    f"{tok.model_max_length}, the rest is ignored."
                )
        return out

    def _extra_controls(self, job: Job) -> list[Any]:
        if not job.controls:
            return []
        from . import controls
        from .pipeline import ExtraControl

        extras = []
        for name, (strength, image) in job.controls.items():
            net = self._extra_controlnet(name)
            if name in ESTIMATED_CONTROLS:
                image = controls.make_condition(name, image, {name: self._estimator(name)})
            extras.append(ExtraControl(name=name, net=net, image=image, scale=strength))
        return extras

    def _run_pipeline(self, job: Job, extras: list[Any], progress: ProgressFn | None) -> Any:
        import torch

        pipe = self.pipe
        if job.enable_lcm:
            self._lcm()
            pipe.use_lcm(True)
            pipe.set_scheduler("LCMScheduler")
        else:
            pipe.use_lcm(False)
            pipe.set_scheduler(job.scheduler)
        steps = job.num_steps

        def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if progress is not None:
                progress(i + 1, steps)
            return {}

        def call() -> Any:
            # A CPU generator gives the same noise on every device, so a seed means the same image.
            generator = torch.Generator("cpu").manual_seed(job.seed)
            return pipe(
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
                num_inference_steps=steps,
                guidance_scale=job.guidance_scale,
                num_images_per_prompt=job.num_images,
                generator=generator,
                callback_on_step_end=on_step,
            )

        try:
            return call()
        except torch.OutOfMemoryError:
            log.warning("CUDA out of memory; freeing and retrying once with a leaner profile")
        # Freed and retried only here, outside the `except` block: the exception's traceback holds the
        # failed attempt's frames and, through them, its activations; they die with the block.
        self._free_cuda()
        if not self._make_leaner():
            raise OutOfMemoryError(
                f"The GPU ran out of memory ({self.profile.name} profile, no leaner one to fall back to): "
                "use fewer images, a smaller size, or LCM fast mode."
            )
        try:
            return call()
        except torch.OutOfMemoryError:
            log.warning("CUDA out of memory again with the %s profile", self.profile.name)
        self._free_cuda()
        raise OutOfMemoryError(
            f"The GPU ran out of memory even with the leaner {self.profile.name} profile: "
            "use fewer images or a smaller size."
        )

    def _free_cuda(self) -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _make_leaner(self) -> bool:
        """Switch to the next leaner GPU profile in place; False when there is none."""
        from .memory import leaner_profile

        nxt = leaner_profile(self.profile)
        if nxt is None:
            return False
        apply_profile(self.pipe, nxt)
        for name, net in list(self._extra_nets.items()):
            self._extra_nets[name] = place_like_profile(net, nxt)
        self.profile = nxt
        self.profile_reason += f"; switched to {nxt.name} after running out of GPU memory"
        return True


# --- loading the pipeline ------------------------------------------------------------------------


def layout(
    src: tuple[int, int], out: tuple[int, int], face_box: tuple[float, float, float, float]
) -> tuple[float, float, float]:
    """(scale, x offset, y offset) mapping photo coordinates onto the output canvas.

    One scale for both axes, so the face is never stretched; when the output's aspect differs from the
    photo's, the canvas covers the photo and the crop is centred on the face (clamped to the photo), so
    a wide output of a portrait keeps the face in frame.
    """
    (src_w, src_h), (width, height) = src, out
    scale = max(width / src_w, height / src_h)
    cx, cy = (face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2
    ox = min(0.0, max(width - src_w * scale, width / 2 - cx * scale))
    oy = min(0.0, max(height - src_h * scale, height / 2 - cy * scale))
    return scale, ox, oy


def resampler_dtype(profile: Profile) -> Any:
    """The resampler's dtype: the profile's on a GPU; on a CPU bfloat16 where it has native bf16 matmuls.

    On the CPU the resampler (1280 wide, 4 layers) is the largest per-request cost outside the denoising
    loop; with AVX512-BF16/AMX bf16 halves it (bench overhead). Its tokens are cast to the text
    embeddings' dtype before the UNet sees them.
    """
    import torch

    if profile.device != "cpu":
        return torch_dtype(profile.dtype)
    try:
        fast_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast_bf16 = False
    return torch.bfloat16 if fast_bf16 else torch.float32


def _from_pretrained(cls: Any, folder: Path, variant: str | None, dtype: Any) -> Any:
    """from_pretrained of one local component folder with the weight format `hub` chose."""
    # Judged by the weight file names from_pretrained will look for: a cached snapshot can also hold
    # unrelated .safetensors files (e.g. a single-file checkpoint beside a diffusers .bin).
    chosen = choose_weights([p.name for p in folder.iterdir()], "")
    use_safetensors = bool(chosen) and ".safetensors" in chosen[0]
    return cls.from_pretrained(
        str(folder), variant=variant, use_safetensors=use_safetensors, dtype=dtype, low_cpu_mem_usage=True
    )


def place_like_profile(net: Any, profile: Profile) -> Any:
    """Place an extra ControlNet the way the profile placed the IdentityNet (it runs beside it every step)."""
    import torch

    if profile.device == "cpu":
        return net.to("cpu")
    if profile.offload == "group":
        net.enable_group_offload(
            onload_device=torch.device(profile.device),
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=True,
        )
        return net
    return net.to(profile.device)


def _snapshot(spec: str, s: Settings, cache: Path | None) -> Path:
    """A transformers model folder (config, processor config, one weight format) through the cache."""
    repo = RepoRef.parse(spec)
    files = list_files(repo, cache_dir=cache, offline=s.hub_offline)
    folder, _ = fetch_component(repo, repo.subfolder, files=files, cache_dir=cache, offline=s.hub_offline)
    return folder


def load_ip_adapter_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(image_proj, ip_adapter) state dicts from `ip-adapter.bin` (weights only) or a safetensors file."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        parts: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if head in parts:
                parts[head][rest] = value
        sd: Any = parts
    else:
        try:
            # weights_only: a pickle from the Hub must not be able to run code. mmap: no second copy in RAM.
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path.name} could not be read safely ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(sd, dict) or "image_proj" not in sd or "ip_adapter" not in sd:
        raise CheckpointError(f"{path.name} is not an InstantID ip-adapter: expected 'image_proj' and 'ip_adapter'.")
    return sd["image_proj"], sd["ip_adapter"]


def checkpoint_entry(role: str, repo: Any, path: Path) -> dict[str, str]:
    """Role, repo, the revision served from the cache (its snapshot's commit) and the weight file(s) used."""
    path = Path(path)
    parts = path.parts
    revision = parts[parts.index("snapshots") + 1][:12] if "snapshots" in parts else "local folder"
    if path.is_dir():
        weights = ", ".join(Path(w).name for w in choose_weights([p.name for p in path.iterdir()], "")) or "-"
    else:
        weights = path.name
    return {"role": role, "repo": str(repo), "revision": revision, "weights": weights}


def load_pipeline(
    s: Settings,
    profile: Profile,
    progress: Callable[[float, str], None] | None = None,
    record: Callable[[str, Any, Path], None] | None = None,
) -> Any:
    """Resolve and load every component, build the InstantID pipeline and place it per `profile`.

    `record(role, repo, path)` hears where each component came from (the status report lists them).
    """
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .attention import install_ip_processors
    from .pipeline import InstantIDPipeline
    from .resampler import build_resampler

    def say(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    def note(role: str, repo: Any, path: Path) -> None:
        if record is not None:
            record(role, repo, path)

    cache, offline = s.hub_cache, s.hub_offline
    dtype = torch_dtype(profile.dtype)
    vae_dtype = torch_dtype(getattr(profile, "vae_dtype", profile.dtype))

    base = RepoRef.parse(s.base_model)
    say(0.1, f"listing {base}")
    files = list_files(base, cache_dir=cache, offline=offline)
    if "model_index.json" not in files:
        raise CheckpointError(f"'{base}' is not a diffusers SDXL repo (no model_index.json): set INSTANTID_BASE_MODEL.")
    parts = {
        "unet": (UNet2DConditionModel, dtype),
        "vae": (AutoencoderKL, vae_dtype),
        "text_encoder": (CLIPTextModel, dtype),
        "text_encoder_2": (CLIPTextModelWithProjection, dtype),
    }
    loaded: dict[str, Any] = {}
    for i, (name, (cls, dt)) in enumerate(parts.items()):
        say(0.15 + 0.12 * i, f"{base}: {name}")
        folder, variant = fetch_component(base, name, files=files, cache_dir=cache, offline=offline)
        loaded[name] = _from_pretrained(cls, folder, variant, dt).eval()
        note(f"base model: {name}", base, folder)
    for name in ("tokenizer", "tokenizer_2"):
        folder, _ = fetch_component(base, name, files=files, cache_dir=cache, offline=offline)
        loaded[name] = CLIPTokenizer.from_pretrained(str(folder))
    sched_folder, _ = fetch_component(base, "scheduler", files=files, cache_dir=cache, offline=offline)
    # Euler is the official Space's default; other schedulers are built from the same config per request.
    loaded["scheduler"] = EulerDiscreteScheduler.from_pretrained(str(sched_folder))

    repo = RepoRef.parse(s.instantid_repo)
    say(0.65, f"{repo}: IdentityNet")
    id_files = list_files(repo, cache_dir=cache, offline=offline)
    cn_folder, cn_variant = fetch_component(
        repo,
        "/".join(p for p in (repo.subfolder, "ControlNetModel") if p),
        files=id_files,
        cache_dir=cache,
        offline=offline,
    )
    identitynet = _from_pretrained(ControlNetModel, cn_folder, cn_variant, dtype).eval()
    note("IdentityNet", repo, cn_folder)

    say(0.8, f"{repo}: ip-adapter")
    ip_name = ip_adapter_file(repo, id_files)
    ip_path = fetch(repo, ip_name, cache_dir=cache, offline=offline)
    note("ip-adapter", repo, ip_path)
    image_proj, ip_weights = load_ip_adapter_file(ip_path)
    source = f"{repo}/{ip_name}"
    resampler = build_resampler(image_proj, source=f"{source}[image_proj]", dtype=resampler_dtype(profile))
    unet = loaded["unet"]
    if resampler.config.output_dim != unet.config.cross_attention_dim:
        raise CheckpointError(
            f"{source}: the resampler makes {resampler.config.output_dim}-wide face tokens but the base model's "
            f"UNet attends over {unet.config.cross_attention_dim}: the ip-adapter does not match the base model."
        )
    install_ip_processors(unet, ip_weights, resampler.config.num_queries, source=f"{source}[ip_adapter]")
    del image_proj, ip_weights

    pipe = InstantIDPipeline(
        vae=loaded["vae"],
        text_encoder=loaded["text_encoder"],
        text_encoder_2=loaded["text_encoder_2"],
        tokenizer=loaded["tokenizer"],
        tokenizer_2=loaded["tokenizer_2"],
        unet=unet,
        controlnet=identitynet,
        scheduler=loaded["scheduler"],
        resampler=resampler,
    )
    pipe.set_progress_bar_config(disable=True)
    say(0.9, f"placing models ({profile.name} profile)")
    apply_profile(pipe, profile)
    say(1.0, "ready")
    return pipe


BASE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def loader_files(s: Settings) -> dict[tuple[str, str], list[str]]:
    """(repo type, repo id) -> the files the resident start-up fetches from it, chosen by the loaders' own rules
    from each repo's listing (the Hub's, or the cache's offline): what a Space should download at build time.
    """
    out: dict[tuple[str, str], list[str]] = {}

    def add(spec: str, pick: Callable[[RepoRef, list[str]], list[str]]) -> None:
        repo = RepoRef.parse(spec)
        files = list_files(repo, cache_dir=s.hub_cache, offline=s.hub_offline)
        key = (repo.repo_type, repo.repo_id)
        out[key] = sorted(set(out.get(key, [])) | set(pick(repo, files)))

    def component(folder: Callable[[RepoRef], str]) -> Callable[[RepoRef, list[str]], list[str]]:
        return lambda repo, files: component_files(files, folder(repo))

    add(s.base_model, lambda repo, files: [f for name in BASE_COMPONENTS for f in component_files(files, name)])
    add(s.instantid_repo, lambda repo, files: [
        *component_files(files, "/".join(p for p in (repo.subfolder, "ControlNetModel") if p)),
        ip_adapter_file(repo, files),
    ])
    add(s.lcm_lora, lambda repo, files: [lora_file(repo, files)])
    for spec in [*s.controlnets.values(), s.depth_estimator, s.pose_estimator, s.person_detector]:
        add(spec, component(lambda repo: repo.subfolder))
    if not Path(s.face_models).expanduser().is_dir():
        add(s.face_models, face_model_files)
    return out


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine(settings: Settings | None = None) -> Engine:
    """The process-wide engine (created on first call)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine(settings)
        return _engine
