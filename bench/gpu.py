"""gpu: seconds per image and peak VRAM per memory profile, against plain diffusers, in one run.

Made for a GPU machine with nothing to download: full-size SDXL parts (UNet, IdentityNet, VAE, both
text encoders, resampler and IP layers of the released shapes, a LoRA per speed of lcm-lora-sdxl's shape)
are built with random weights directly on the GPU in fp16. Random weights cost exactly what real
ones cost: the work per step depends on shapes, not values.

Rows (each profile that fits the GPU; the wall-clock budget skips the rest and says so):
- `plain`: diffusers' own `StableDiffusionXLControlNetPipeline` with the same UNet and ControlNet,
  everything resident (the baseline), alternating with
- `large`: `InstantIDPipeline` placed by `instantid.models.memory.apply_profile` with everything resident;
  both at every speed (quality 30 steps, fast 8, turbo 4 without guidance, LCM 5), the speed's LoRA folded in,
  5 repeats each, median and spread;
- `large` quality `+ previews`: the same call with the engine's live previews (a latent projection every few
  steps, copied to the host), alternating with it; `checks.preview_share` is its extra time (goal 3 %);
- `medium`: model CPU offload (the IdentityNet stays on the GPU), quality and turbo (peft adapter);
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
# Issue #17's goals: quality within 5 % of plain diffusers, fast and turbo as shares of quality's time.
GOALS = {
    "instantid_vs_plain_quality": 1.05,
    "large_quality_s": 2.5,
    "fast_vs_quality": 0.35,
    "turbo_vs_quality": 0.12,
    "large_peak_vram_gb": 14.0,
    "medium_peak_vram_gb": 11.0,
    "small_peak_vram_gb": 6.0,
    # Issue 26: the live previews (a latent projection every few steps, copied to the host) within 3 %.
    "preview_share": 0.03,
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


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: str
    size: str
    resolution: int
    steps: int  # quality's (the dry run's for every speed); the LoRA speeds run their own
    repeats: int
    lora_rank: int
    dry_run: bool


def plan_for(dry_run: bool) -> Plan:
    if dry_run:
        return Plan("cpu", "float32", "micro", 128, 2, 1, 4, True)
    return Plan("cuda", "float16", "full", 1024, 30, 5, 64, False)


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
    from instantid.models.memory import LARGE_MIN_BYTES, MEDIUM_MIN_BYTES

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
    from instantid.models.tiny import ModelShape, build_parts, ip_adapter_payload

    from . import SIZES

    shape = ModelShape.sdxl(SIZES[plan.size])
    parts = build_parts(shape, plan.device, _dtype(plan.dtype))
    return parts, ip_adapter_payload(shape, parts["unet"], _dtype(plan.dtype), plan.device)


def _instantid(parts: dict[str, Any], payload: dict[str, Any], plan: Plan) -> Any:
    """InstantID on the same UNet and ControlNet objects as the plain pipeline, so the comparison is fair."""
    from instantid.models.attention import install_ip_processors
    from instantid.models.pipeline import InstantIDPipeline
    from instantid.models.resampler import build_resampler

    resampler = build_resampler(payload["image_proj"], source="bench", dtype=_dtype(plan.dtype), device=plan.device)
    install_ip_processors(parts["unet"], payload["ip_adapter"], resampler.config.num_queries, source="bench")
    pipe = InstantIDPipeline(**parts, resampler=resampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_loras(pipe: Any, plan: Plan, mode: str, names: tuple[str, ...] = ("fast", "turbo", "lcm")) -> Any:
    """The engine's `LoraSwitch` on `pipe`, with a random LoRA per speed of lcm-lora-sdxl's layers and rank, in fp16
    as released (the real fast and turbo LoRAs adapt a similar set: what a step costs does not depend on it)."""
    from instantid.models.loras import LoraSwitch
    from instantid.models.tiny import write_lora

    loras = LoraSwitch(pipe, mode)
    with tempfile.TemporaryDirectory() as tmp:
        for seed, name in enumerate(names):
            write_lora(Path(tmp), pipe.unet, LCM_TARGETS, plan.lora_rank, _dtype("float16"), seed=seed,
                       file_name=f"{name}.safetensors")
            loras.load(name, tmp, f"{name}.safetensors", source=f"bench {name}")
    return loras


def _profile(name: str, plan: Plan) -> Any:
    from instantid.models.memory import PROFILES

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
    from instantid.vision import geometry

    r = plan.resolution
    # A face in the middle of a portrait: eyes, nose, mouth corners, at the scale of a 1024 px image.
    kps = np.array([[0.40, 0.40], [0.60, 0.40], [0.50, 0.52], [0.42, 0.62], [0.58, 0.62]], np.float32) * r
    rng = np.random.default_rng(0)
    return {
        "face_embedding": (rng.standard_normal(512) * 1.2).astype(np.float32),
        "keypoint_image": geometry.draw_keypoints((r, r), kps),
        "face_mask": geometry.face_mask((r, r), (0.3 * r, 0.25 * r, 0.7 * r, 0.75 * r)),
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


def _time(calls: dict[str, Callable[[int], Any]], steps: int, repeats: int) -> dict[str, tuple[list[float], Any]]:
    """Each call `repeats` times, alternating between them (so a clock or thermal drift hits all alike); the
    times and the last output of each."""
    for call in calls.values():
        call(2)  # warm-up: kernels chosen, allocator primed, hooks moved once
    _sync()
    out: dict[str, tuple[list[float], Any]] = {name: ([], None) for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            last = call(steps)
            _sync()
            out[name] = ([*out[name][0], time.perf_counter() - t0], last)
    return out


def _figures(times: list[float]) -> dict[str, Any]:
    return {"seconds_per_image": round(statistics.median(times), 3), "spread_s": [round(min(times), 3),
            round(max(times), 3)], "repeats": len(times)}


def _speed_runs(plan: Plan) -> list[tuple[str, int, float, str]]:
    """(speed, steps, guidance, scheduler) per speed, as the engine runs them (`requests.SPEEDS`)."""
    from instantid.declaration import SPEEDS

    return [(s.name, plan.steps if plan.dry_run else s.steps, s.guidance, s.scheduler or "EulerDiscreteScheduler")
            for s in SPEEDS.values()]


def _ours(
    pipe: Any,
    plan: Plan,
    inputs: dict[str, Any],
    guidance: float,
    extras: tuple[Any, ...] = (),
    step_callback: Callable[[int], Any] | None = None,
) -> Any:
    """A call of our pipeline for n steps; `step_callback(n)`, where given, makes its step-end callback."""
    import torch

    def call(n: int) -> Any:
        return pipe(
            "a portrait photo of a person, studio light",
            "blurry, low quality",
            height=plan.resolution,
            width=plan.resolution,
            num_inference_steps=n,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(0),
            extra_controls=extras,
            callback_on_step_end=step_callback(n) if step_callback else None,
            **inputs,
        )

    return call


def _plain(pipe: Any, plan: Plan, inputs: dict[str, Any], guidance: float) -> Any:
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

    return call


def _row(pipeline: str, profile: str, speed: str, steps: int, times: list[float], out: Any = None) -> dict[str, Any]:
    row = {"pipeline": pipeline, "profile": profile, "speed": speed, "mode": f"{speed} {steps} steps", "steps": steps,
           **_figures(times), **_vram()}
    if out is not None:
        row["stages_ms"] = {k: round(v, 1) for k, v in out.timings_ms.items()}
    return row


def _use(pipe: Any, loras: Any, speed: str, scheduler: str) -> float:
    """Switch the speed's LoRA in (timed: what a request that changes speed pays once) and its sampler."""
    t0 = time.perf_counter()
    loras.use(None if speed == "quality" else speed)
    _sync()
    pipe.set_scheduler(scheduler)
    return time.perf_counter() - t0


def _resident_phase(plan: Plan, log: Any) -> list[dict[str, Any]]:
    """Every speed, plain diffusers and InstantID alternating on the same modules and the same (folded) weights.

    The two pipelines share one UNet; each call runs with its own attention processors (diffusers' defaults
    for plain, the IP-attention ones for ours), swapped in as they are, with no weight made anew.
    """
    from diffusers import StableDiffusionXLControlNetPipeline

    from instantid.models.memory import apply_profile
    from instantid.models.pipeline import SCHEDULER_FACTORIES

    parts, payload = _build(plan)
    inputs = _inputs(plan)
    plain = StableDiffusionXLControlNetPipeline(**parts, add_watermarker=False)
    plain.set_progress_bar_config(disable=True)
    plain.to(plan.device)
    unet = parts["unet"]
    plain_procs = dict(unet.attn_processors)
    pipe = _instantid(parts, payload, plan)
    apply_profile(pipe, _profile("large", plan))
    plain.vae.to(dtype=_dtype(plan.dtype))  # plain diffusers' VAE handling (fp16, upcast to decode)
    our_procs = dict(unet.attn_processors)
    loras = _load_loras(pipe, plan, "fused")
    config = dict(pipe._scheduler_config)

    def with_procs(procs: dict[str, Any], call: Callable[[int], Any]) -> Callable[[int], Any]:
        def run(n: int) -> Any:
            unet.set_attn_processor(dict(procs))  # a copy: diffusers pops the entries it sets
            return call(n)

        return run

    rows = []
    for speed, steps, guidance, scheduler in _speed_runs(plan):
        switch_s = _use(pipe, loras, speed, scheduler)
        cls, extra = SCHEDULER_FACTORIES[scheduler]
        plain.scheduler = cls.from_config(config, **extra)
        _reset_peak()
        timed = _time({"plain": with_procs(plain_procs, _plain(plain, plan, inputs, guidance)),
                       "instantid": with_procs(our_procs, _ours(pipe, plan, inputs, guidance))}, steps, plan.repeats)
        rows.append(_row("plain", "resident", speed, steps, timed["plain"][0]))
        rows.append({**_row("instantid", "large", speed, steps, *timed["instantid"]), "switch_s": round(switch_s, 4)})
        log(f"  {speed} {steps} steps: plain {rows[-2]['seconds_per_image']} s, ours {rows[-1]['seconds_per_image']} s")
    unet.set_attn_processor(dict(our_procs))
    _use(pipe, loras, "quality", "EulerDiscreteScheduler")
    rows.append(_extra_controlnet_row(pipe, parts, plan, inputs))
    log(f"  instantid {rows[-1]['mode']}: {rows[-1]['seconds_per_image']} s")
    held = sum(t.numel() * t.element_size() for ts in loras.tensors().values() for t in ts)
    rows[-2]["lora_bytes_held"] = held  # the factors of three LoRAs and the touched layers' originals
    rows.append(_preview_row(pipe, plan, inputs))
    shown = rows[-1]
    log(f"  instantid {shown['mode']}: {shown['seconds_per_image']} s (without: {shown['without_previews_s']} s)")
    del plain, pipe, parts, payload, loras
    return rows


def _extra_controlnet_row(pipe: Any, parts: dict[str, Any], plan: Plan, inputs: dict[str, Any]) -> dict[str, Any]:
    """InstantID with one extra SDXL ControlNet beside the IdentityNet: what ZeroGPU's duration model
    charges per extra control (the net is a second IdentityNet-shaped ControlNet, like the canny/depth ones).
    """
    import copy

    from instantid.models.pipeline import ExtraControl

    net = copy.deepcopy(parts["controlnet"])
    extra = (ExtraControl(name="canny", net=net, image=inputs["keypoint_image"], scale=0.4),)
    _reset_peak()
    times, out = _time({"ours": _ours(pipe, plan, inputs, 5.0, extra)}, plan.steps, plan.repeats)["ours"]
    row = _row("instantid", "large", "quality", plan.steps, times, out)
    row["mode"] += " + 1 extra ControlNet"
    return row


def _preview_row(pipe: Any, plan: Plan, inputs: dict[str, Any]) -> dict[str, Any]:
    """InstantID quality with the engine's live previews (`models.preview.latent_preview` of the latents in the step
    callback every `preview_every` steps, never the last, with its device-to-host copy) against the same call
    without them, alternating; and the projection alone on the GPU, on a 1024 px image's latents."""
    import torch

    from instantid.models.preview import latent_preview, preview_every

    def previews(n: int) -> Any:
        every = preview_every(n)

        def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if i + 1 < n and (i + 1) % every == 0:
                latent_preview(kwargs["latents"])
            return {}

        return on_step

    without, with_previews = _ours(pipe, plan, inputs, 5.0), _ours(pipe, plan, inputs, 5.0, step_callback=previews)
    timed = _time({"without": without, "with": with_previews}, plan.steps, plan.repeats)
    row = _row("instantid", "large", "quality", plan.steps, *timed["with"])
    row["mode"] += " + previews"
    row["without_previews_s"] = _figures(timed["without"][0])["seconds_per_image"]
    side = plan.resolution // 8
    latents = torch.randn(1, 4, side, side, device=plan.device, dtype=_dtype(plan.dtype))
    row["preview_projection_ms"] = round(statistics.median(_projection_times(latents, latent_preview)), 4)
    return row


def _projection_times(latents: Any, project: Callable[[Any], Any], repeats: int = 50) -> list[float]:
    project(latents)
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        project(latents)  # ends with the copy to the host, so the time includes the GPU's work
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _offload_phase(name: str, plan: Plan, log: Any) -> list[dict[str, Any]]:
    """Placed by `apply_profile`; quality, then turbo with its LoRA the profile's way (peft adapters here)."""
    from instantid.models.memory import apply_profile

    pipe = _instantid(*_build(plan), plan)
    profile = _profile(name, plan)
    if name == "small-fp8":
        # A LoRA loaded after layerwise casting wraps fp8 convolutions that then run uncast
        # ("slow_conv2d not implemented for Float8"): the adapter has to join first.
        loras = _load_loras(pipe, plan, profile.lora_mode, ("turbo",))
        _layerwise_fp8(pipe, plan)
    apply_profile(pipe, profile)
    _free()
    if name != "small-fp8":
        loras = _load_loras(pipe, plan, profile.lora_mode, ("turbo",))
    inputs = _inputs(plan)
    rows = []
    for speed, steps, guidance, scheduler in _speed_runs(plan):
        if speed not in ("quality", "turbo"):
            continue
        try:
            _use(pipe, loras, speed, scheduler)
            _reset_peak()
            times, out = _time({"ours": _ours(pipe, plan, inputs, guidance)}, steps, 1)["ours"]
            rows.append(_row("instantid", name, speed, steps, times, out))
            log(_row_text(rows[-1]))
        except Exception as exc:  # keep the other rows; the failure is itself a finding
            rows.append({"pipeline": "instantid", "profile": name, "speed": speed, "mode": speed,
                         "error": f"{type(exc).__name__}: {exc}"[:400]})
            log(f"  {speed} failed: {rows[-1]['error']}")
    del pipe
    return rows


def _row_text(r: dict[str, Any]) -> str:
    return f"  {r['pipeline']} {r['mode']}: {r['seconds_per_image']} s, peak {_gb(r['peak_reserved_bytes'])}"


# --- report --------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| pipeline | profile | mode | s/image (median) | spread | peak VRAM allocated | peak VRAM reserved |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['pipeline']} | {r['profile']} | {r['mode']} | failed: {r['error'][:80]} | | | |")
            continue
        spread = "{:.3f}-{:.3f} ({} runs)".format(*r["spread_s"], r["repeats"])
        lines.append(
            f"| {r['pipeline']} | {r['profile']} | {r['mode']} | {r['seconds_per_image']:.3f} | {spread} | "
            f"{_gb(r['peak_allocated_bytes'])} | {_gb(r['peak_reserved_bytes'])} |"
        )
    return "\n".join(lines)


def _checks(rows: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    def find(pipeline: str, profile: str, speed: str) -> dict[str, Any] | None:
        for r in rows:
            if "error" not in r and "+" not in r["mode"] and (r["pipeline"], r["profile"], r["speed"]) == (
                pipeline, profile, speed
            ):
                return r
        return None

    out: dict[str, Any] = {}
    quality = find("instantid", "large", "quality")
    for speed in ("quality", "fast", "turbo", "lcm"):
        ours, plain = find("instantid", "large", speed), find("plain", "resident", speed)
        if ours and plain:
            out[f"instantid_vs_plain_{speed}"] = round(ours["seconds_per_image"] / plain["seconds_per_image"], 3)
        if ours and quality and speed != "quality":
            out[f"{speed}_vs_quality"] = round(ours["seconds_per_image"] / quality["seconds_per_image"], 3)
        if ours:
            out[f"large_{speed}_s"] = ours["seconds_per_image"]
            if "switch_s" in ours:
                out[f"switch_to_{speed}_s"] = ours["switch_s"]
    if quality:
        extra = next((r for r in rows if "extra ControlNet" in r.get("mode", "") and "error" not in r), None)
        if extra:
            out["extra_controlnet_factor"] = round(extra["seconds_per_image"] / quality["seconds_per_image"] - 1, 3)
    shown = next((r for r in rows if r.get("mode", "").endswith("+ previews") and "error" not in r), None)
    if shown:
        out["preview_share"] = round(shown["seconds_per_image"] / shown["without_previews_s"] - 1, 4)
        out["preview_projection_ms"] = shown["preview_projection_ms"]
    held = next((r["lora_bytes_held"] for r in rows if "lora_bytes_held" in r), None)
    if held is not None:
        out["lora_gb_held"] = round(held / GB, 2)
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
