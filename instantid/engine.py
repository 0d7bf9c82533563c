"""The one shared model holder: thread-safe loading and a request in three stages.

Everything that owns memory lives here: the pipeline, the face models, the extra ControlNets, the speeds'
LoRAs (and LCM's) and the condition estimators. Two start-up modes:

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from . import faces as face_lib
from .errors import BusyError, CheckpointError, ImageError, InvalidParameter, OutOfMemoryError, UserError
from .images import image_to_array, load_image, release_memory
from .loading import (
    LORA_LABELS,
    checkpoint_entry,
    load_estimator,
    load_extra_controlnet,
    load_face_analyzer,
    load_pipeline,
    load_speed_lora,
    place_like_profile,
)
from .loras import LoraSwitch
from .memory import Hardware, apply_profile, choose_profile, memory_report, probe_hardware
from .requests import (
    DEFAULT_PROMPT,
    DEFAULT_SCHEDULER,
    MODE_SPECS,
    MODES,
    PARAMS,
    SPEEDS,
    GroupPerson,
    Job,
    Paste,
    Refine,
    Rendered,
    Request,
    Result,
    Step,
    image_seed,
    random_seed,
)
from .settings import CONTROL_TYPES, Settings, get_settings
from .styles import apply_style

log = logging.getLogger("instantid")

# (step done, total steps) -> None; may raise to cancel (Gradio does when a client leaves).
ProgressFn = Callable[[int, int], None]
# A live preview of the image (`pipeline.latent_preview`: RGB uint8 at latent resolution) -> None.
PreviewFn = Callable[[np.ndarray], None]

TINY_SHORT_SIDE = 128  # the tiny preset's noise images need no more; keeps CPU requests instant


def _shown_crop(placement: tuple[float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The part of a photo (x1, y1, x2, y2, photo pixels) that a `size` canvas shows under `face_lib.layout`'s
    placement (scale, x offset, y offset)."""
    scale, ox, oy = placement
    return (-ox / scale, -oy / scale, (size[0] - ox) / scale, (size[1] - oy) / scale)


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
            from .tiny import ensure_tiny_checkpoints

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
        from .pipeline import mode_pipelines

        self.pipes = mode_pipelines(self.pipe)

    def _load_faces(self) -> face_lib.FaceAnalyzer:
        return load_face_analyzer(self.settings, self._record)

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

    def _prepare(self, req: Request) -> Job:
        started = time.time()  # wall clock: the stages may run in different processes
        self.check(req)
        from .prompts import check_emphasis  # imports torch, as the engine's later stages do

        # Before any photo is decoded or GPU time asked for: the styles' templates add no emphasis.
        check_emphasis(req.prompt, "prompt")
        check_emphasis(req.negative_prompt, "negative_prompt")
        speed = req.sampling
        # The cpu profile's fewer steps are for the base sampler; a LoRA is distilled for its own count.
        steps = req.num_steps or ((speed.lora is None and self.profile.default_steps) or speed.steps)
        guidance = req.guidance_scale or speed.guidance
        spec = MODE_SPECS[req.mode]
        # Only a mode that takes `strength` runs part of the schedule (restyle); an inpainting one redraws its
        # region from noise.
        strength = req.strength if req.mode in PARAMS["strength"].modes else 1.0
        if min(int(steps * strength), steps) < 1:
            # diffusers would run no step at all and fail; say what works instead.
            raise InvalidParameter("strength", strength, f"runs no step of {steps}: use at least {1 / steps:.2f}")
        num_images = min(req.num_images, self.profile.max_images)
        timings: dict[str, float] = {}
        warnings = list(req.notes) + _speed_warnings(req, guidance)
        if num_images < req.num_images:
            warnings.append(f"This hardware ({self.profile.name} profile) makes at most {num_images} images.")

        t0 = time.perf_counter()
        people: list[tuple[np.ndarray, face_lib.Face]] = []
        if spec.people:
            embedding, ref_img, ref_face, faces_found, people = self._people(req, warnings)
        else:
            embedding, ref_img, ref_face, faces_found = self._identity(req, warnings)
        timings["faces_ms"] = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        canvas = SCENES[req.mode](self, req, ref_img, ref_face, warnings, people)
        spots = canvas.pop("spots", [])
        if req.refines:
            if spec.people:
                identities, labels = [e for e, _ in people], list(req.person_names)
            else:
                identities, labels = [embedding], ["the face"]
            size = (canvas["width"], canvas["height"])
            canvas["refine"] = self._refine_plans(req, size, spots, identities, labels, warnings)
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
            num_images=num_images,
            num_steps=steps,
            guidance_scale=guidance,
            identitynet_strength=req.identitynet_strength,
            adapter_strength=req.adapter_strength,
            scheduler=speed.scheduler or req.scheduler,
            speed=speed.name,
            seed=req.seed if req.seed is not None else random_seed(),
            faces_found=faces_found,
            warnings=warnings,
            timings_ms=timings,
            started=started,
            mode=req.mode,
            strength=strength,
            people=list(req.person_names),
            embeddings=[embedding for embedding, _ in people],
            **canvas,
        )

    def _decode(self, source: Any, what: str, warnings: list[str]) -> Any:
        s = self.settings
        image, w = load_image(source, max_bytes=s.max_upload_bytes, max_pixels=s.max_upload_pixels, what=what)
        warnings += w
        return image

    def _identity(self, req: Request, warnings: list[str]) -> tuple[np.ndarray, Any, face_lib.Face, int]:
        """The averaged identity embedding, the first face photo, its largest face and how many it holds."""
        analyzer = self.faces()
        embeddings = []
        ref_img = ref_face = None
        faces_found = 0
        for i, src in enumerate(req.face_images):
            what = "face photo" if i == 0 else f"extra face photo {i}"
            img = self._decode(src, what, warnings)
            face, count = analyzer.embed_largest(image_to_array(img), what=what)
            if count > 1:
                warnings.append(f"Found {count} faces in the {what}; using the largest.")
            embeddings.append(face.embedding)
            if i == 0:
                # Only the first photo's pixels are used again: up to 8 extra 50-megapixel photos must not
                # all stay decoded at once (150 MB each), only their embeddings.
                ref_img, ref_face, faces_found = img, face, count
            del img
        assert ref_face is not None  # Request holds at least one face photo
        return face_lib.average_embedding(embeddings), ref_img, ref_face, faces_found

    def _people(
        self, req: Request, warnings: list[str]
    ) -> tuple[np.ndarray, Any, face_lib.Face, int, list[tuple[np.ndarray, face_lib.Face]]]:
        """Group: each person's averaged embedding and the largest face of their first photo, in person order;
        and, as `_identity` gives them, the first person's embedding, first photo, face and face count."""
        analyzer = self.faces()
        people: list[tuple[np.ndarray, face_lib.Face]] = []
        ref_img: Any = None
        faces_found = 0
        for k, (name, photos) in enumerate(zip(req.person_names, req.people, strict=True)):
            embeddings = []
            first: face_lib.Face | None = None
            for i, src in enumerate(photos):
                # The person's name in every message: with four people, "the face photo" would not say whose.
                what = f"photo of {name}" if len(photos) == 1 else f"photo {i + 1} of {name}"
                img = self._decode(src, what, warnings)
                face, count = analyzer.embed_largest(image_to_array(img), what=what)
                if count > 1:
                    warnings.append(f"Found {count} faces in the {what}; using the largest.")
                embeddings.append(face.embedding)
                if i == 0:
                    first = face
                    if k == 0:  # only one photo stays decoded: the first person's (one person: the layout)
                        ref_img, faces_found = img, count
                del img
            assert first is not None  # Request gives every person a photo
            people.append((face_lib.average_embedding(embeddings), first))
        return people[0][0], ref_img, people[0][1], faces_found, people

    def _size(self, req: Request, image: Any) -> tuple[int, int]:
        """The output size: the request's, or from `image`."""
        return (req.width, req.height) if req.width else self._auto_size(image.size)

    def _working_short_side(self) -> int:
        return TINY_SHORT_SIDE if self.settings.preset == "tiny" else self.profile.default_short_side

    def _auto_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The working size for a picture of `size`: short side from the profile, long side capped."""
        short = self._working_short_side()
        return face_lib.output_size(*size, short_side=short, max_side=self.settings.max_output_side)

    def _placed(
        self, image_size: tuple[int, int], face: face_lib.Face, size: tuple[int, int]
    ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """`face`'s keypoints and box on a `size` canvas laid out from a photo of `image_size`."""
        scale, ox, oy = face_lib.layout(image_size, size, face.bbox)
        kps = face_lib.scale_kps(face.kps, scale, scale) + np.array([ox, oy], dtype=np.float32)
        x1, y1, x2, y2 = face.bbox
        return kps, (x1 * scale + ox, y1 * scale + oy, x2 * scale + ox, y2 * scale + oy)

    def _redraw_geometry(
        self, image_size: tuple[int, int], bbox: Any, kps: np.ndarray
    ) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int], np.ndarray, tuple, tuple]:
        """How a face is redrawn at working size (a swap; a refined face): the crop box around it in the image, the
        crop's size, the working size, the face's keypoints at working size, and its box in the crop and at
        working size."""
        box = face_lib.swap_crop(image_size, bbox)
        crop_size = (box[2] - box[0], box[3] - box[1])
        size = self._auto_size(crop_size)
        sx, sy = size[0] / crop_size[0], size[1] / crop_size[1]
        origin = np.array([box[0], box[1]], dtype=np.float32)
        kps = face_lib.scale_kps(np.asarray(kps, dtype=np.float32) - origin, sx, sy)
        x1, y1, x2, y2 = (float(v) for v in bbox)
        in_crop = (x1 - box[0], y1 - box[1], x2 - box[0], y2 - box[1])
        in_work = (in_crop[0] * sx, in_crop[1] * sy, in_crop[2] * sx, in_crop[3] * sy)
        return box, crop_size, size, kps, in_crop, in_work

    def _refine_plans(
        self, req: Request, size: tuple[int, int], spots: list[tuple[np.ndarray, Any]],
        identities: list[np.ndarray], labels: list[str], warnings: list[str],
    ) -> list[Refine]:
        """The faces on a `size` canvas (keypoints and box per person, where the layout put them) that are small
        enough to refine, each as a swap onto the image with its person's identity."""
        plans = []
        for (kps, bbox), identity, label in zip(spots, identities, labels, strict=True):
            if not face_lib.needs_refining(bbox, self._working_short_side()):
                continue
            try:
                box, crop_size, work, work_kps, in_crop, in_work = self._redraw_geometry(size, bbox, kps)
            except ImageError:
                warnings.append(f"{label[:1].upper()}{label[1:]} is not refined: the layout puts it across the "
                                "image's edge.")
                continue
            redraw = face_lib.swap_region(work, in_work, feather=False)
            plans.append(Refine(
                label=label, embedding=identity, box=box, width=work[0], height=work[1],
                keypoint_image=face_lib.draw_keypoints(work, work_kps),
                mask_image=PIL.Image.fromarray((redraw * 255).astype(np.uint8), mode="L"),
                face_mask=face_lib.face_mask(work, in_work) if req.enhance_face_region else None,
                region=face_lib.swap_region(crop_size, in_crop),
            ))
        return plans

    def _face_on_canvas(
        self, req: Request, image_size: tuple[int, int], face: face_lib.Face, size: tuple[int, int]
    ) -> tuple[Any, np.ndarray | None, tuple[float, float, float, float]]:
        """The keypoint image and face mask of `face` laid out on a `size` canvas, and the crop of its photo
        (x1, y1, x2, y2, photo pixels) that the canvas shows."""
        kps, box = self._placed(image_size, face, size)
        mask = face_lib.face_mask(size, box) if req.enhance_face_region else None
        return face_lib.draw_keypoints(size, kps), mask, _shown_crop(face_lib.layout(image_size, size, face.bbox), size)

    # A mode's scene: what its pipeline draws, from the request and the identity found (`_prepare`): the keypoint
    # image, face mask, extra controls and size, plus what its pipeline kind needs (the photo to start from, the
    # region to redraw, the people). `people` is each person's (embedding, face) for a mode of `Mode.people`.

    def _generate_scene(
        self, req: Request, ref_img: Any, ref_face: face_lib.Face, warnings: list[str], people: list[Any],
    ) -> dict:
        """Generate: the face layout (and extra ControlNets) from the pose photo, or else the face photo."""
        pose_img, pose_face = ref_img, ref_face
        if req.pose_image is not None:
            pose_img = self._decode(req.pose_image, "pose photo", warnings)
            pose_faces = self.faces().detect(image_to_array(pose_img), with_embedding=False)
            if not pose_faces:
                raise face_lib.NoFaceError(
                    "No face found in the pose photo: use a pose photo where the face is visible, or leave it empty."
                )
            pose_face = pose_faces[0]
        return self._posed_scene(req, pose_img, pose_face)

    def _posed_scene(self, req: Request, pose_img: Any, pose_face: face_lib.Face) -> dict:
        """One face laid out as `pose_face` sits in `pose_img` (Generate's scene; a group of one person's)."""
        size = self._size(req, pose_img)
        keypoint_image, mask, crop = self._face_on_canvas(req, pose_img.size, pose_face, size)
        controls = self._prepare_controls(req, pose_img, size, crop)
        return {"keypoint_image": keypoint_image, "face_mask": mask, "controls": controls,
                "width": size[0], "height": size[1], "spots": [self._placed(pose_img.size, pose_face, size)]}

    def _group_scene(
        self, req: Request, ref_img: Any, ref_face: face_lib.Face, warnings: list[str],
        people: list[tuple[np.ndarray, face_lib.Face]],
    ) -> dict:
        """Group: where each person's face goes (the layout photo's faces, left to right, in `req.person_order`;
        or side by side), each person's keypoint image and region. One person is Generate's scene exactly, with
        the layout photo as the pose photo."""
        n = len(people)
        if req.layout_image is not None:
            layout_img = self._decode(req.layout_image, "layout photo", warnings)
            found = self.faces().detect(image_to_array(layout_img), with_embedding=False)
            if len(found) < n:
                raise face_lib.NoFaceError(
                    f"The layout photo has {len(found)} face(s) for {n} people: use a layout photo with at least "
                    f"{n} faces, or leave it empty for an automatic side-by-side layout."
                )
            if len(found) > n:
                warnings.append(f"The layout photo has {len(found)} faces: the {n} largest are used.")
            chosen = sorted(found[:n], key=lambda f: f.bbox[0] + f.bbox[2])  # left to right
            if n == 1:
                return self._posed_scene(req, layout_img, chosen[0])
            size = self._size(req, layout_img)
            union = (min(f.bbox[0] for f in chosen), min(f.bbox[1] for f in chosen),
                     max(f.bbox[2] for f in chosen), max(f.bbox[3] for f in chosen))
            scale, ox, oy = face_lib.layout(layout_img.size, size, union)
            offset = np.array([ox, oy], dtype=np.float32)
            spots = [(face_lib.scale_kps(f.kps, scale, scale) + offset,
                      (f.bbox[0] * scale + ox, f.bbox[1] * scale + oy, f.bbox[2] * scale + ox, f.bbox[3] * scale + oy))
                     for f in chosen]
        else:
            if n == 1:
                return self._posed_scene(req, ref_img, ref_face)
            size = (req.width, req.height) if req.width else self._auto_size(face_lib.GROUP_ASPECT)
            spots = face_lib.group_layout(size, [people[p][1] for p in req.person_order])
        # Spot i (left to right) holds person order[i]; back to person order.
        by_person = {person: spots[i] for i, person in enumerate(req.person_order)}
        regions = face_lib.group_regions(size, [by_person[k][1] for k in range(n)])
        group = [
            GroupPerson(embedding=people[k][0], keypoint_image=face_lib.draw_keypoints(size, by_person[k][0]),
                        region=regions[k])
            for k in range(n)
        ]
        return {"keypoint_image": face_lib.draw_group_keypoints(size, [p.keypoint_image for p in group]),
                "face_mask": None, "controls": {}, "width": size[0], "height": size[1], "group": group,
                "spots": [by_person[k] for k in range(n)]}

    def _restyle_scene(
        self, req: Request, ref_img: Any, ref_face: face_lib.Face, warnings: list[str], people: list[Any],
    ) -> dict:
        """Restyle: the source photo at the output size; the face layout from its largest face, or from the
        face photo's when the source has none."""
        source = self._decode(req.source_image, "photo to restyle", warnings)
        size = self._size(req, source)
        found = self.faces().detect(image_to_array(source), with_embedding=False)
        if found:
            keypoint_image, mask, crop = self._face_on_canvas(req, source.size, found[0], size)
            spot = self._placed(source.size, found[0], size)
        else:
            warnings.append("No face in the photo to restyle: the face is placed as in the face photo.")
            keypoint_image, mask, _ = self._face_on_canvas(req, ref_img.size, ref_face, size)
            spot = self._placed(ref_img.size, ref_face, size)
            whole = (0.0, 0.0, float(source.width), float(source.height))
            crop = _shown_crop(face_lib.layout(source.size, size, whole), size)  # centred: no face to centre on
        return {"keypoint_image": keypoint_image, "face_mask": mask, "width": size[0], "height": size[1],
                "controls": self._prepare_controls(req, source, size, crop),
                "init_image": source.convert("RGB").resize(size, box=crop), "spots": [spot]}

    def _swap_scene(
        self, req: Request, ref_img: Any, ref_face: face_lib.Face, warnings: list[str], people: list[Any],
    ) -> dict:
        """Face swap: a crop around the chosen face of the target, at the working size, with the region to redraw
        and where it goes back."""
        target = self._decode(req.target_image, "photo to swap a face into", warnings).convert("RGB")
        found = self.faces().detect(image_to_array(target), with_embedding=False)
        if not found:
            raise face_lib.NoFaceError(
                "No face found in the photo to swap a face into: use a photo where the face is visible."
            )
        if req.face_index >= len(found):
            fix = f"the photo has {len(found)} face(s): use 0..{len(found) - 1} (0 = the largest)"
            raise InvalidParameter("face_index", req.face_index, fix)
        face = found[req.face_index]
        box, crop_size, size, kps, in_crop, in_work = self._redraw_geometry(target.size, face.bbox, face.kps)
        x1, y1, x2, y2 = (float(v) for v in face.bbox)
        redraw = face_lib.swap_region(size, in_work, feather=False)
        return {
            "keypoint_image": face_lib.draw_keypoints(size, kps),
            "face_mask": face_lib.face_mask(size, in_work) if req.enhance_face_region else None,
            "controls": {}, "width": size[0], "height": size[1],
            "init_image": target.resize(size, box=box),
            "mask_image": PIL.Image.fromarray((redraw * 255).astype(np.uint8), mode="L"),
            "paste": Paste(
                target=target, box=box, region=face_lib.swap_region(crop_size, in_crop), face=(x1, y1, x2, y2)
            ),
        }

    def check(self, req: Request) -> None:
        """Refuse, before any GPU time, what this server cannot run: a size over its limit, or parts that did
        not load at start-up. Cheap: no model is loaded for it."""
        limit = self.settings.max_output_side
        for name in ("width", "height"):
            if getattr(req, name) > limit:
                raise InvalidParameter(name, getattr(req, name), f"use 0 (automatic) or a multiple of 64 up to {limit}")
        if self.resident and self._state.phase == "error":
            raise BusyError(
                f"The models did not load when the server started ({self._state.error}); "
                "the Space must be restarted, ask its owner."
            )
        speed = req.sampling.name
        for name in [*req.controlnets, speed]:
            reason = self.unavailable.get(name)
            if reason is None:
                continue
            if name in CONTROL_TYPES:
                what, fix = f"The {name} ControlNet", f"untick '{name}' in the extra ControlNets"
            elif name == "lcm":
                what, fix = "LCM fast mode", "switch LCM off, or choose speed fast or turbo"
            else:
                what, fix = f"Speed {name}", "choose speed quality"
            raise CheckpointError(f"{what} is not available on this server ({reason}): {fix}.")

    def _prepare_controls(
        self, req: Request, pose_img: Any, size: tuple[int, int], crop: tuple[float, float, float, float]
    ) -> dict[str, tuple[float, Any]]:
        """Each extra ControlNet's input at the output size, cropped like the keypoint layout."""
        if not req.controlnets:
            return {}
        from . import controls

        resized = pose_img.resize(size, box=crop)
        out: dict[str, tuple[float, Any]] = {}
        for name, strength in req.controlnets.items():
            # Plain CPU work (canny) is done here; an estimator is a GPU model, run in render.
            image = resized if CONTROL_TYPES[name].has_estimator else controls.make_condition(name, resized, {})
            out[name] = (strength, image)
        return out

    def render(self, job: Job, progress: ProgressFn | None = None, preview: PreviewFn | None = None) -> Rendered:
        """The GPU stage: the condition estimators, the pipeline call and the small faces' refinement, nothing else.

        `progress(step, total)` is called after every denoising step and may raise to stop the run; `preview(rgb)`,
        when given, every few steps of the image's pass (`pipeline.preview_every`), before that step's progress.
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
            out = self._run_pipeline(job, extras, progress, preview)
        timings = {"controls_ms": controls_ms, **out.timings_ms}
        return Rendered(images=list(out.images), timings_ms=timings)

    def render_steps(self, job: Job, heartbeat_s: float | None = None) -> Iterator[Step | Rendered | None]:
        """`render` as a generator: a `Step` after each denoising step, then the `Rendered` result; with
        `heartbeat_s`, also None whenever that long passed without a step (its consumer can then be closed
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
                events.put(("done", self.render(job, on_step, on_preview)))
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

    def finish(self, job: Job, rendered: Rendered) -> Result:
        """The CPU stage after the GPU: identity similarity of each image, warnings, timings."""
        try:
            return self._finish(job, rendered)
        finally:
            # The render's activations (GBs at 1280x1280 on the CPU) were freed in the threads that ran it, and
            # glibc keeps a thread's freed memory in that thread's arena: measured, a 4-person 1280x1280 group
            # on the cpu profile left the process 623 MB bigger until the next request's trim.
            release_memory()

    def _finish(self, job: Job, rendered: Rendered) -> Result:
        t0 = time.perf_counter()
        images = list(rendered.images)
        if job.paste is not None:  # swap: each redrawn crop back into the target, through the feathered mask
            images = [face_lib.paste_face(job.paste.target, im, job.paste.box, job.paste.region) for im in images]
        timings_paste = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        analyzer = self.faces()
        # Where each image's face was drawn (the keypoint image, at the output's size) is looked at first. A
        # swap scores the face it redrew, and only that one: the target's other faces are untouched, and the
        # largest of them would score the target photo, not the swap.
        drawn = job.keypoint_image if job.paste is None else None
        at = job.paste.face if job.paste is not None else None
        people: list[dict[str, float | None]] = []
        margins: list[dict[str, dict[str, Any] | None]] = []
        mixed: list[str] = []
        if job.group:
            # Each face found matched to one person; the image's score is the mean of the matched ones.
            matches = [face_lib.match_people_detail(analyzer, job.embeddings, image_to_array(im)) for im in images]
            scores = [[None if m is None else m.similarity for m in row] for row in matches]
            people = [dict(zip(job.people, row, strict=True)) for row in scores]
            if len(job.people) > 1:
                margins, mixed = _margins(job.people, matches)
            sims = [None if not (got := [v for v in row if v is not None]) else round(sum(got) / len(got), 4)
                    for row in scores]
        else:
            sims = [
                face_lib.identity_similarity(analyzer, job.embedding, image_to_array(im), drawn, at=at)
                for im in images
            ]
            if job.people:  # a group of one
                people = [{job.people[0]: sim} for sim in sims]
        timings = {**job.timings_ms, **rendered.timings_ms, "identity_check_ms": (time.perf_counter() - t0) * 1000}
        if job.paste is not None:
            timings["paste_ms"] = timings_paste
        timings["total_ms"] = (time.time() - job.started) * 1000
        warnings = list(job.warnings) + mixed
        refined = [plan.label for plan in job.refine]
        if refined:
            warnings.append(f"Refined small face(s), re-rendered at working size: {', '.join(refined)}.")
        return Result(
            images=images,
            seed=job.seed,
            similarities=sims,
            keypoint_image=job.keypoint_image,
            timings_ms={k: round(v, 1) for k, v in timings.items()},
            # A swap's images are the whole target photo, not the working size of its crop.
            width=images[0].width if job.paste is not None and images else job.width,
            height=images[0].height if job.paste is not None and images else job.height,
            num_steps=job.num_steps,
            guidance_scale=job.guidance_scale,
            faces_found=job.faces_found,
            profile=self.profile.name,
            warnings=warnings,
            person_similarities=people,
            person_margins=margins,
            refined=refined,
        )

    def _extra_controls(self, job: Job) -> list[Any]:
        if not job.controls:
            return []
        from . import controls
        from .pipeline import ExtraControl

        extras = []
        for name, (strength, image) in job.controls.items():
            net = self._extra_controlnet(name)
            if CONTROL_TYPES[name].has_estimator:
                image = controls.make_condition(name, image, {name: self._estimator(name)})
            extras.append(ExtraControl(name=name, net=net, image=image, scale=strength))
        return extras

    def _run_pipeline(
        self, job: Job, extras: list[Any], progress: ProgressFn | None, preview: PreviewFn | None = None
    ) -> Any:
        import torch

        from .pipeline import latent_preview, preview_every

        kind = MODE_SPECS[job.mode].pipeline
        # The base kind is `self.pipe` itself, read now: an out-of-memory step-down re-places it (and the
        # hardening tests stand in for it there); the other kinds share its modules.
        pipe = self.pipe if kind == "base" else self.pipes[kind]
        lora = SPEEDS[job.speed].lora
        # The switch and the pipelines share one UNet: folding a speed's LoRA in serves every mode.
        loras = self._lora(job.speed) if lora is not None else self.loras
        assert loras is not None
        loras.use(job.speed if lora is not None else None)
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
                out = self._refine(job, out, on_step, done)
            return out

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
                "use fewer images, a smaller size, or speed turbo."
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

    def _refine(self, job: Job, out: Any, on_step: Callable[..., dict[str, Any]], done: list[int]) -> Any:
        """Each image's small faces re-rendered at working size as face swaps onto it (`job.refine`): the crop
        around the face, inpainted by the swap pipeline with that face's keypoints and person's identity and the
        image's own seed, pasted back through the feathered region (outside it every pixel stays the image's)."""
        import torch

        from .pipeline import InstantIDOutput

        t0 = time.perf_counter()
        pipe = self.pipes["inpaint"]
        pipe.set_scheduler(job.scheduler)
        timings = dict(out.timings_ms)
        images = list(out.images)
        for i, image in enumerate(images):
            for plan in job.refine:
                drawn = pipe(
                    job.prompt,
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
                image = face_lib.paste_face(image, drawn.images[0], plan.box, plan.region)
            images[i] = image
        timings["refine_ms"] = (time.perf_counter() - t0) * 1000
        return InstantIDOutput(images=images, timings_ms=timings)

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


# Each mode's scene (`Engine._prepare`), by the mode's name: a mode declared without its scene stops the import.
SCENES: dict[str, Callable[..., dict]] = {
    "generate": Engine._generate_scene,
    "restyle": Engine._restyle_scene,
    "swap": Engine._swap_scene,
    "group": Engine._group_scene,
}
if set(SCENES) != set(MODES):
    raise ImportError(f"the engine's scenes ({', '.join(SCENES)}) are not the declared modes ({', '.join(MODES)})")


def _margins(
    names: list[str], matches: list[list[face_lib.PersonMatch | None]]
) -> tuple[list[dict[str, dict[str, Any] | None]], list[str]]:
    """Per image, each person's margin as the result carries it; and a warning for each face that looks more
    like another person of the request than like its own (a negative margin: the identities mixed)."""
    margins: list[dict[str, dict[str, Any] | None]] = []
    warnings: list[str] = []
    for index, row in enumerate(matches):
        shown: dict[str, dict[str, Any] | None] = {}
        for name, m in zip(names, row, strict=True):
            if m is None or m.margin is None or m.nearest_other is None:
                shown[name] = None
                continue
            other = names[m.nearest_other]
            shown[name] = {"margin": m.margin, "nearest_other": other}
            if m.margin < 0:
                where = f"Image #{index + 1}: " if len(matches) > 1 else ""
                warnings.append(
                    f"{where}{name}'s face looks more like {other} than like {name} (similarity "
                    f"{m.similarity:.2f} to {name}, {m.similarity - m.margin:.2f} to {other}); try another seed."
                )
        margins.append(shown)
    return margins, warnings


def _speed_warnings(req: Request, guidance: float) -> list[str]:
    """What a request asks that its speed ignores: a LoRA speed's own sampler, no guidance's negative prompt."""
    speed = req.sampling
    out = []
    if speed.scheduler is not None and req.scheduler != DEFAULT_SCHEDULER:
        out.append(f"Speed {speed.name} uses its own sampler ({speed.scheduler}); the scheduler choice applies to "
                   "speed quality only.")
    if guidance <= 1 and req.negative_prompt.strip():
        out.append("Guidance is off (speed turbo, or a guidance scale of 1 or less): the negative prompt has no "
                   "effect.")
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
