"""gpu: seconds per image and peak VRAM per memory profile, against plain diffusers, in one run.

Made for a GPU machine with nothing to download: full-size SDXL parts (UNet, IdentityNet, VAE, both
text encoders, resampler and IP layers of the released shapes, an LCM-LoRA of lcm-lora-sdxl's shape)
are built with random weights directly on the GPU in fp16. Random weights cost exactly what real
ones cost: the work per step depends on shapes, not values.

Rows (each profile that fits the GPU; the wall-clock budget skips the rest and says so):
- `plain`: diffusers' own `StableDiffusionXLControlNetPipeline` with the same UNet and ControlNet,
  everything resident, at 30 steps and with the LCM-LoRA at 5 steps (the baseline);
- `large`: `InstantIDPipeline` placed by `instantid.memory.apply_profile` with everything resident;
- `medium`: model CPU offload (the IdentityNet stays on the GPU);
- `small`: group offload, leaf level, with CUDA streams;
- `small-fp8`: layerwise fp8 storage (UNet, IdentityNet, text encoders computed in fp16) plus model
  offload: the other way to fit 8 GB cards.

Without CUDA (and with `--dry-run`) the same script runs CPU-sized: micro-width parts in float32 at
128 px and 2 steps, every profile placed on the CPU (offload needs an accelerator, so only the code
around it runs). The figures are then not GPU figures; the row says so.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import _gb

# A lent GPU machine gives a session 15 minutes in all, start-up and the GPU tests included: stop
# starting new profiles after this many seconds (BENCH_GPU_BUDGET_S overrides it for a longer lease).
BUDGET_S = int(os.environ.get("BENCH_GPU_BUDGET_S", 5 * 60))
GOALS = {
    "instantid_vs_plain_30": 1.10,
    "large_30_steps_s": 2.5,
    "large_lcm_5_steps_s": 0.6,
    "large_peak_vram_gb": 14.0,
    "medium_peak_vram_gb": 11.0,
    "small_peak_vram_gb": 6.0,
}
# lcm-lora-sdxl adapts these layers at rank 64.
LCM_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]
GB = 1e9
LCM_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: str
    size: str
    resolution: int
    steps: int
    lcm_steps: int
    repeats: int
    lora_rank: int
    dry_run: bool


def plan_for(dry_run: bool) -> Plan:
    if dry_run:
        return Plan("cpu", "float32", "micro", 128, 2, 2, 1, 4, True)
    return Plan("cuda", "float16", "full", 1024, 30, 5, 2, 64, False)


def run(*, quick: bool = False, dry_run: bool | None = None, log=print) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    dry = (not cuda) if dry_run is None else dry_run
    plan = plan_for(dry)
    t_start = time.perf_counter()
    deadline = t_start + BUDGET_S
    device_name = torch.cuda.get_device_name(0) if cuda and not dry else "cpu (dry run)"
    total_vram = torch.cuda.get_device_properties(0).total_memory if cuda and not dry else 0
    log(f"gpu benchmark on {device_name}: {plan}")
    if not cuda and not dry:
        raise RuntimeError("no CUDA GPU: run with --dry-run for the CPU-sized form")

    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    threads = torch.get_num_threads()
    if plan.dry_run:
        # Micro models run thousands of tiny ops; with two OpenMP threads on a busy 2-core machine each op
        # waits for a descheduled thread, which made the dry run 100x slower here.
        torch.set_num_threads(1)
    try:
        for name, fn in _phases(quick):
            fits, why = _fits(name, total_vram, plan)
            if not fits:
                skipped[name] = why
                continue
            if time.perf_counter() > deadline:
                skipped[name] = f"not started: the {BUDGET_S} s budget was spent"
                continue
            log(f"profile {name}")
            try:
                rows.extend(fn(plan, log))
            except Exception as exc:  # one profile failing must not lose the others' rows
                skipped[name] = f"failed: {type(exc).__name__}: {exc}"[:400]
                log(f"  {skipped[name]}")
            _free()
    finally:
        torch.set_num_threads(threads)

    out = {
        "benchmark": "gpu",
        "dry_run": plan.dry_run,
        "device": device_name,
        "vram_total_bytes": total_vram,
        "plan": plan.__dict__,
        "rows": rows,
        "skipped": skipped,
        "checks": _checks(rows, plan),
        "table": table(rows),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if plan.dry_run:
        out["note"] = "CPU-sized dry run: proves the script, the figures are not GPU figures"
    return out


def _phases(quick: bool) -> list[tuple[str, Callable[[Plan, Any], list[dict[str, Any]]]]]:
    phases: list[tuple[str, Callable[[Plan, Any], list[dict[str, Any]]]]] = [("large", _resident_phase)]
    phases += [(name, lambda plan, log, name=name: _offload_phase(name, plan, log)) for name in ("medium", "small")]
    phases.append(("small-fp8", lambda plan, log: _offload_phase("small-fp8", plan, log)))
    return phases[:2] if quick else phases


def _fits(name: str, total_vram: int, plan: Plan) -> tuple[bool, str]:
    from instantid.memory import LARGE_MIN_BYTES, MEDIUM_MIN_BYTES

    if plan.dry_run:
        return True, ""
    need = {"large": LARGE_MIN_BYTES, "medium": MEDIUM_MIN_BYTES}.get(name, 0)
    if total_vram < need:
        return False, f"the GPU has {total_vram / 2**30:.1f} GiB; this profile is for {need / 2**30:.0f} GiB or more"
    return True, ""


# --- building ------------------------------------------------------------------------------------


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _build(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SDXL ControlNet pipeline's parts and ip-adapter.bin's content, random, allocated on the device in
    the plan's dtype from the start (nothing to download, no host copy)."""
    from instantid.tiny import ModelShape, build_parts, ip_adapter_payload

    from . import SIZES

    shape = ModelShape.sdxl(SIZES[plan.size])
    parts = build_parts(shape, plan.device, _dtype(plan.dtype))
    return parts, ip_adapter_payload(shape, parts["unet"], _dtype(plan.dtype), plan.device)


def _instantid(parts: dict[str, Any], payload: dict[str, Any], plan: Plan) -> Any:
    """InstantID on the same UNet and ControlNet objects as the plain pipeline, so the comparison is fair."""
    from instantid.attention import install_ip_processors
    from instantid.pipeline import InstantIDPipeline
    from instantid.resampler import build_resampler

    resampler = build_resampler(payload["image_proj"], source="bench", dtype=_dtype(plan.dtype), device=plan.device)
    install_ip_processors(parts["unet"], payload["ip_adapter"], resampler.config.num_queries, source="bench")
    pipe = InstantIDPipeline(**parts, resampler=resampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _write_lcm_lora(unet: Any, plan: Plan, folder: Path) -> None:
    """A random LoRA with lcm-lora-sdxl's layers and rank, in fp16 as released; the engine loads it like the
    real one (`InstantIDPipeline.load_lcm_lora`), after placement."""
    from instantid.tiny import write_lora

    write_lora(folder, unet, LCM_TARGETS, plan.lora_rank, _dtype("float16"))


def _profile(name: str, plan: Plan) -> Any:
    from instantid.memory import PROFILES

    base = PROFILES["medium" if name == "small-fp8" else name]
    profile = replace(base, name=name, vae_dtype="bfloat16" if not plan.dry_run else "float32")
    if plan.dry_run:
        profile = replace(profile, device="cpu")
    return profile


def _layerwise_fp8(pipe: Any, plan: Plan) -> None:
    import torch
    from diffusers.hooks import apply_layerwise_casting

    compute = _dtype(plan.dtype)
    for name in ("unet", "controlnet"):
        getattr(pipe, name).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
    for name in ("text_encoder", "text_encoder_2"):
        apply_layerwise_casting(
            getattr(pipe, name),
            storage_dtype=torch.float8_e4m3fn,
            compute_dtype=compute,
            skip_modules_pattern=("embeddings", "layer_norm", "norm"),
        )


# --- inputs and timing -----------------------------------------------------------------------------


def _inputs(plan: Plan) -> dict[str, Any]:
    from instantid import faces as face_lib

    r = plan.resolution
    # A face in the middle of a portrait: eyes, nose, mouth corners, at the scale of a 1024 px image.
    kps = np.array([[0.40, 0.40], [0.60, 0.40], [0.50, 0.52], [0.42, 0.62], [0.58, 0.62]], np.float32) * r
    rng = np.random.default_rng(0)
    return {
        "face_embedding": (rng.standard_normal(512) * 1.2).astype(np.float32),
        "keypoint_image": face_lib.draw_keypoints((r, r), kps),
        "face_mask": face_lib.face_mask((r, r), (0.3 * r, 0.25 * r, 0.7 * r, 0.75 * r)),
    }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        # Blocks an earlier pipeline left cached would count as this row's reserved peak (seen on the
        # first H200 run: the plain pipeline's 20 GB showed up in the large row).
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _vram() -> dict[str, int | None]:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_bytes": None, "peak_reserved_bytes": None, "allocated_bytes": None}
    return {
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
        "allocated_bytes": int(torch.cuda.memory_allocated()),
    }


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _time(call: Callable[[int], Any], steps: int, repeats: int) -> tuple[float, Any]:
    call(2)  # warm-up: kernels chosen, allocator primed, hooks moved once
    _sync()
    times, last = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        last = call(steps)
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), last


def _labels(plan: Plan) -> tuple[str, str]:
    return f"{plan.steps} steps", f"LCM {plan.lcm_steps} steps"


def _instantid_rows(
    name: str,
    pipe: Any,
    plan: Plan,
    inputs: dict[str, Any],
    modes: tuple[str, ...] = ("full", "lcm"),
    extra_controls: tuple[Any, ...] = (),
) -> list[dict[str, Any]]:
    import torch

    rows = []
    label30, label_lcm = _labels(plan)
    runs = {"full": (label30, plan.steps, 5.0, False), "lcm": (label_lcm, plan.lcm_steps, 1.5, True)}
    suffix = f" + {len(extra_controls)} extra ControlNet" if extra_controls else ""
    for label, steps, guidance, use_lcm in (runs[m] for m in modes):
        pipe.use_lcm(use_lcm)
        pipe.set_scheduler("LCMScheduler" if use_lcm else "EulerDiscreteScheduler")

        def call(n: int, guidance: float = guidance) -> Any:
            return pipe(
                "a portrait photo of a person, studio light",
                "blurry, low quality",
                height=plan.resolution,
                width=plan.resolution,
                num_inference_steps=n,
                guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(0),
                extra_controls=extra_controls,
                **inputs,
            )

        _reset_peak()
        seconds, out = _time(call, steps, plan.repeats if name == "large" else 1)
        rows.append(
            {
                "pipeline": "instantid",
                "profile": name,
                "mode": label + suffix,
                "steps": steps,
                "seconds_per_image": round(seconds, 3),
                "stages_ms": {k: round(v, 1) for k, v in out.timings_ms.items()},
                **_vram(),
            }
        )
    pipe.use_lcm(False)
    return rows


def _plain_row(
    pipe: Any, plan: Plan, inputs: dict[str, Any], label: str, steps: int, guidance: float
) -> dict[str, Any]:
    import torch

    def call(n: int) -> Any:
        return pipe(
            "a portrait photo of a person, studio light",
            negative_prompt="blurry, low quality",
            image=inputs["keypoint_image"],
            controlnet_conditioning_scale=0.8,
            height=plan.resolution,
            width=plan.resolution,
            num_inference_steps=n,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(0),
        )

    _reset_peak()
    seconds, _ = _time(call, steps, plan.repeats)
    return {
        "pipeline": "plain",
        "profile": "resident",
        "mode": label,
        "steps": steps,
        "seconds_per_image": round(seconds, 3),
        **_vram(),
    }


def _resident_phase(plan: Plan, log: Any) -> list[dict[str, Any]]:
    """Plain diffusers first (default attention processors), then InstantID on the same modules."""
    from diffusers import LCMScheduler, StableDiffusionXLControlNetPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    from instantid.memory import apply_profile

    parts, payload = _build(plan)
    inputs = _inputs(plan)
    plain = StableDiffusionXLControlNetPipeline(**parts, add_watermarker=False)
    plain.set_progress_bar_config(disable=True)
    plain.to(plan.device)
    label30, labellcm = _labels(plan)
    rows = [_plain_row(plain, plan, inputs, label30, plan.steps, 5.0)]
    log(f"  plain {label30}: {rows[-1]['seconds_per_image']} s")

    pipe = _instantid(parts, payload, plan)
    apply_profile(pipe, _profile("large", plan))
    rows += _instantid_rows("large", pipe, plan, inputs, modes=("full",))
    log(f"  instantid {label30}: {rows[-1]['seconds_per_image']} s")
    rows.append(_extra_controlnet_row(pipe, parts, plan, inputs))
    log(f"  instantid {rows[-1]['mode']}: {rows[-1]['seconds_per_image']} s")

    # LCM: the LoRA joins the same UNet the engine's way; InstantID first, then plain with its
    # default processors back.
    with tempfile.TemporaryDirectory() as tmp:
        _write_lcm_lora(pipe.unet, plan, Path(tmp))
        pipe.load_lcm_lora(tmp, weight_name=LCM_WEIGHTS)
    rows += _instantid_rows("large", pipe, plan, inputs, modes=("lcm",))
    log(f"  instantid {labellcm}: {rows[-1]['seconds_per_image']} s")
    plain.unet.set_attn_processor(AttnProcessor2_0())
    plain.vae.to(dtype=_dtype(plan.dtype))  # back to plain diffusers' VAE handling (fp16, upcast to decode)
    plain.scheduler = LCMScheduler.from_config(pipe._scheduler_config)
    plain.enable_lora()
    plain.set_adapters(["lcm"], adapter_weights=[1.0])
    rows.append(_plain_row(plain, plan, inputs, labellcm, plan.lcm_steps, 1.5))
    log(f"  plain {labellcm}: {rows[-1]['seconds_per_image']} s")
    del plain, pipe, parts, payload
    return rows


def _extra_controlnet_row(pipe: Any, parts: dict[str, Any], plan: Plan, inputs: dict[str, Any]) -> dict[str, Any]:
    """InstantID with one extra SDXL ControlNet beside the IdentityNet: what ZeroGPU's duration model
    charges per extra control (the net is a second IdentityNet-shaped ControlNet, like the canny/depth ones).
    """
    import copy

    from instantid.pipeline import ExtraControl

    net = copy.deepcopy(parts["controlnet"])
    extra = (ExtraControl(name="canny", net=net, image=inputs["keypoint_image"], scale=0.4),)
    return _instantid_rows("large", pipe, plan, inputs, modes=("full",), extra_controls=extra)[0]


def _offload_phase(name: str, plan: Plan, log: Any) -> list[dict[str, Any]]:
    """Placed by `apply_profile`; the LCM-LoRA loaded afterwards, as the engine does on a first LCM request."""
    from instantid.memory import apply_profile

    pipe = _instantid(*_build(plan), plan)
    with tempfile.TemporaryDirectory() as tmp:
        _write_lcm_lora(pipe.unet, plan, Path(tmp))
        if name == "small-fp8":
            # A LoRA loaded after layerwise casting wraps fp8 convolutions that then run uncast
            # ("slow_conv2d not implemented for Float8"): the adapter has to join first.
            pipe.load_lcm_lora(tmp, weight_name=LCM_WEIGHTS)
            _layerwise_fp8(pipe, plan)
        apply_profile(pipe, _profile(name, plan))
        _free()
        inputs = _inputs(plan)
        rows = _instantid_rows(name, pipe, plan, inputs, modes=("full",))
        log(_row_text(rows[-1]))
        try:
            if not pipe.has_lcm:
                pipe.load_lcm_lora(tmp, weight_name=LCM_WEIGHTS)
            rows += _instantid_rows(name, pipe, plan, inputs, modes=("lcm",))
            log(_row_text(rows[-1]))
        except Exception as exc:  # keep the 30-step row; the failure is itself a finding
            rows.append(
                {"pipeline": "instantid", "profile": name, "mode": "LCM", "error": f"{type(exc).__name__}: {exc}"[:400]}
            )
            log(f"  LCM failed: {rows[-1]['error']}")
    del pipe
    return rows


def _row_text(r: dict[str, Any]) -> str:
    return f"  {r['pipeline']} {r['mode']}: {r['seconds_per_image']} s, peak {_gb(r['peak_reserved_bytes'])}"


# --- report --------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| pipeline | profile | mode | s/image | peak VRAM allocated | peak VRAM reserved |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['pipeline']} | {r['profile']} | {r['mode']} | failed: {r['error'][:80]} | | |")
            continue
        lines.append(
            f"| {r['pipeline']} | {r['profile']} | {r['mode']} | {r['seconds_per_image']:.3f} | "
            f"{_gb(r['peak_allocated_bytes'])} | {_gb(r['peak_reserved_bytes'])} |"
        )
    return "\n".join(lines)


def _checks(rows: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    def find(pipeline: str, profile: str, lcm: bool) -> dict[str, Any] | None:
        for r in rows:
            if "error" in r:
                continue
            if r["pipeline"] == pipeline and r["profile"] == profile and r["mode"].startswith("LCM") == lcm:
                return r
        return None

    out: dict[str, Any] = {}
    ours, plain = find("instantid", "large", False), find("plain", "resident", False)
    if ours and plain:
        out["instantid_vs_plain_30"] = round(ours["seconds_per_image"] / plain["seconds_per_image"], 3)
    ours_lcm, plain_lcm = find("instantid", "large", True), find("plain", "resident", True)
    if ours_lcm and plain_lcm:
        out["instantid_vs_plain_lcm"] = round(ours_lcm["seconds_per_image"] / plain_lcm["seconds_per_image"], 3)
    if ours:
        out["large_30_steps_s"] = ours["seconds_per_image"]
        extra = next((r for r in rows if "extra ControlNet" in r.get("mode", "") and "error" not in r), None)
        if extra:
            out["extra_controlnet_factor"] = round(extra["seconds_per_image"] / ours["seconds_per_image"] - 1, 3)
    if ours_lcm:
        out["large_lcm_5_steps_s"] = ours_lcm["seconds_per_image"]
    for profile in ("large", "medium", "small", "small-fp8"):
        peaks = [r["peak_reserved_bytes"] for r in rows if r["profile"] == profile and r.get("peak_reserved_bytes")]
        if peaks:
            out[f"{profile}_peak_vram_gb"] = round(max(peaks) / GB, 2)
    if plan.dry_run:
        return out
    met = {}
    for key, limit in GOALS.items():
        value = out.get(key)
        if key == "small_peak_vram_gb":
            values = [v for v in (out.get("small_peak_vram_gb"), out.get("small-fp8_peak_vram_gb")) if v is not None]
            value = min(values) if values else None
        met[key] = None if value is None else value <= limit
    out["goals"] = GOALS
    out["goals_met"] = met
    return out
