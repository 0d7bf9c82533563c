"""load-memory: host RAM the engine needs to load the whole pipeline, against the official demo's way.

Random SDXL-architecture checkpoints in the real repos' file layouts are written once into a local
Hugging Face cache (`write_checkpoints`, with `instantid.models.tiny`'s builder); then fresh subprocesses each
import everything first, note their resident set, load, and report how far RSS rose (peak and end):

- `engine`: `instantid.models.loading.load_pipeline` with a GPU-class fp16 profile placed on the CPU (the
  `large` profile with device "cpu"), so the weights stay fp16 and host RAM is what is measured;
- with `cpu_profile`, also the `cpu` profile's own load, as a machine without a GPU runs it: bfloat16
  below 22 GiB of RAM (HF's free CPU basic), and float32 above (quick and micro sizes only: at full size
  its 20.6 GB does not fit beside this machine's other work);
- `baseline`: the official demo's sequence: `ControlNetModel.from_pretrained(..., float16)`,
  `StableDiffusionXLControlNetPipeline.from_pretrained(..., controlnet=..., float16)`, then
  `ip-adapter.bin` read with `torch.load` twice (once for the resampler, once for the IP layers), each
  module first built with random float32 weights and then cast.

RSS counts file pages mapped into the process too (safetensors and `torch.load(mmap=True)` map files),
so a weight that is only mapped, not copied, is counted once, as it should be.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import SIZES
from .rss import RSSWatch, import_all, touch

DEFAULT_CACHE = Path.home() / ".cache" / "instantid" / "bench-hub"
GOAL_RATIO = 1.05  # issue #10: peak RSS <= 1.05 x the weights, and below the demo's on both repo layouts


def cache_dir() -> Path:
    return Path(os.environ.get("INSTANTID_BENCH_CACHE", str(DEFAULT_CACHE))).expanduser()


def repo_ids(size: str) -> dict[str, str]:
    return {
        "base_model": f"instantid-bench/sdxl-{size}",
        "base_model_fp16": f"instantid-bench/sdxl-fp16-{size}",
        "instantid_repo": f"instantid-bench/InstantID-{size}",
    }


def write_checkpoints(cache: Path, size: str, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Publish random SDXL checkpoints of `size` into `cache`, once, in three real layouts: the base model as
    stabilityai/stable-diffusion-xl-base-1.0 ships it (float32 files plus `.fp16` variants), the same weights
    as fp16 data under the plain names (as some fine-tunes ship them; hard links, no extra disk), and
    InstantX/InstantID (an fp16 IdentityNet under the plain name, a float32 ip-adapter.bin).

    Returns the repo ids, the seconds spent writing (0 when everything was reused) and bytes on disk.
    """
    import torch

    from instantid.models.hub import is_published
    from instantid.models.tiny import ModelShape, build_parts, file_lock, publish, write_instantid, write_sdxl

    shape = ModelShape.sdxl(SIZES[size])
    parts = functools.cache(lambda: build_parts(shape, "meta"))  # written tensor by tensor, never in RAM
    ids = repo_ids(size)
    fp32_and_fp16 = {"": torch.float32, "fp16": torch.float16}
    writers = (
        ("base_model", "model_index.json", lambda d: write_sdxl(d, parts(), fp32_and_fp16)),
        ("base_model_fp16", "model_index.json", lambda d: _link_fp16_only(_snapshot(cache, ids["base_model"]), d)),
        ("instantid_repo", "ip-adapter.bin", lambda d: write_instantid(d, parts(), shape, torch.float16)),
    )
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wrote = False
    with file_lock(cache / ".instantid-bench.lock"):
        for key, marker, write in writers:
            if not is_published(cache, ids[key], marker=marker):
                log(f"writing {ids[key]} ({size} size) into {cache}")
                publish(cache, ids[key], write, marker)
                wrote = True
    return {
        **ids,
        "write_seconds": round(time.perf_counter() - t0, 1) if wrote else 0.0,
        "files_bytes": {k: _repo_bytes(cache, v) for k, v in ids.items()},
    }


def _link_fp16_only(base_snapshot: Path, folder: Path) -> None:
    for src in base_snapshot.rglob("*"):
        if not src.is_file() or (src.suffix == ".safetensors" and ".fp16." not in src.name):
            continue
        dst = folder / src.relative_to(base_snapshot)
        dst = dst.with_name(dst.name.replace(".fp16.", "."))
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src.resolve(), dst)
        except OSError:
            shutil.copyfile(src, dst)


def _snapshot(cache: Path, repo_id: str) -> Path:
    from instantid.models.hub import cached_snapshot

    snapshot = cached_snapshot(cache, repo_id)
    if snapshot is None:
        raise FileNotFoundError(f"{repo_id} is not in the cache at {cache}")
    return snapshot


def _repo_bytes(cache: Path, repo_id: str) -> int:
    snap = _snapshot(cache, repo_id)
    return sum(p.stat().st_size for p in snap.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))


def run(
    *,
    quick: bool = False,
    size: str | None = None,
    cache: Path | None = None,
    all_parts: bool = False,
    cpu_profile: bool = False,
    log=print,
) -> dict[str, Any]:
    """The base pipeline's load against the demo's; with `all_parts` also the resident start-up with every
    optional part (bench/all_parts.py), and with `cpu_profile` the `cpu` profile's loads, in the same run."""
    size = size or ("quick" if quick else "full")
    cache = cache or cache_dir()
    t0 = time.perf_counter()
    info = write_checkpoints(cache, size, log=log)
    results = {}
    for mode, base in (
        ("engine", info["base_model"]),
        ("baseline", info["base_model"]),
        ("baseline", info["base_model_fp16"]),
    ):
        key = mode if base == info["base_model"] else f"{mode}_fp16_files"
        _prewarm(_files_read(cache, base, info["instantid_repo"], fp16=mode == "engine"))
        log(f"loading in a fresh process: {key} ({base})")
        results[key] = _child(mode, cache, base, info["instantid_repo"])
    ours, base, base16 = results["engine"], results["baseline"], results["baseline_fp16_files"]
    weights = ours["weights_bytes"]
    ratio = ours["peak_rss_bytes"] / weights
    baseline_ratio = base["peak_rss_bytes"] / weights
    out = {
        "benchmark": "load-memory",
        "size": size,
        "weights_bytes": weights,
        "peak_rss_bytes": ours["peak_rss_bytes"],
        "baseline_peak_rss_bytes": base["peak_rss_bytes"],
        "ratio": round(ratio, 3),
        "baseline_ratio": round(baseline_ratio, 3),
        "ratio_vs_baseline": round(ratio / baseline_ratio, 3),
        "load_seconds": ours["load_seconds"],
        "baseline_load_seconds": base["load_seconds"],
        # The official demo on a repo that ships fp16 data under the plain names (no fp32 files to read).
        "baseline_fp16_files_peak_rss_bytes": base16["peak_rss_bytes"],
        "baseline_fp16_files_ratio": round(base16["peak_rss_bytes"] / weights, 3),
        "baseline_fp16_files_load_seconds": base16["load_seconds"],
        "end_rss_bytes": ours["end_rss_bytes"],
        "baseline_end_rss_bytes": base["end_rss_bytes"],
        "baseline_weights_bytes": base["weights_bytes"],
        "files_bytes": info["files_bytes"],
        "write_seconds": info["write_seconds"],
        "profile": ours["profile"],
        "goal": f"ratio <= {GOAL_RATIO} and below the demo's ratio on both repo layouts",
        "goal_met": ratio <= GOAL_RATIO and ratio < baseline_ratio and ratio < base16["peak_rss_bytes"] / weights,
        "stages": ours["stages"],
        "baseline_stages": base["stages"],
    }
    if all_parts:
        out["all_parts"] = _all_parts(cache, size, info, log)
    if cpu_profile:
        out["cpu_profile"] = {}
        for mode in ("cpu-bf16", "cpu-float32") if size != "full" else ("cpu-bf16",):
            _prewarm(_files_read(cache, info["base_model"], info["instantid_repo"], fp16=True))
            log(f"loading in a fresh process: {mode} ({info['base_model']})")
            got = _child(mode, cache, info["base_model"], info["instantid_repo"])
            out["cpu_profile"][mode] = {
                "weights_bytes": got["weights_bytes"],
                "peak_rss_bytes": got["peak_rss_bytes"],
                "ratio": round(got["peak_rss_bytes"] / got["weights_bytes"], 3),
                # RSS counts the fp16 file pages being cast, which the kernel can reclaim; anonymous memory
                # (the cast copies and everything else) is what a container's limit must hold.
                "end_anon_bytes": got["stages"][-1][2],
                "load_seconds": got["load_seconds"],
            }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _all_parts(cache: Path, size: str, info: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from . import all_parts

    t0 = time.perf_counter()
    all_parts.write_extras(cache, size, log=log)
    wrote = round(time.perf_counter() - t0, 1)
    log("loading in a fresh process: Engine.load_all with every optional part")
    res = all_parts.run_child(cache, {k: info[k] for k in ("base_model", "instantid_repo")}, size)
    # Every weight must be resident after start-up, so the weights are a floor. A peak below them means the
    # kernel dropped clean file pages for lack of free RAM (other processes): the peak is then a lower bound.
    need = max(res["peak_rss_bytes"], res["weights_bytes"])
    return {
        **res,
        "ratio": round(res["peak_rss_bytes"] / res["weights_bytes"], 3),
        "peak_is_lower_bound": res["peak_rss_bytes"] < res["weights_bytes"],
        "goal": f"max(peak RSS, weights) <= {all_parts.GOAL_BYTES / 1e9:g} GB at full size",
        # The goal is about the real models: smaller sizes only prove the path (None: not judged).
        "goal_met": need <= all_parts.GOAL_BYTES if size == "full" else None,
        "write_seconds": wrote,
    }


def _files_read(cache: Path, base: str, repo: str, *, fp16: bool) -> list[Path]:
    """The weight files a loader reads: the engine the `.fp16` variants, the demo the plain names."""
    files = [p for p in _snapshot(cache, base).rglob("*.safetensors") if (".fp16." in p.name) == fp16]
    return files + [p for p in _snapshot(cache, repo).rglob("*") if p.suffix in (".safetensors", ".bin")]


def _prewarm(files: list[Path]) -> None:
    """Read the files once so every loader starts from the page cache: load seconds then compare
    loading, not which loader happened to run after the other had read the same files."""
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def _child(mode: str, cache: Path, base: str, repo: str) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(root), env.get("PYTHONPATH", "")])})
    cmd = [
        sys.executable,
        "-m",
        "bench.load_memory",
        mode,
        str(cache),
        base,
        repo,
    ]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {mode} load failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- inside the fresh subprocess -----------------------------------------------------------------


def _module_bytes(modules: dict[str, Any]) -> int:
    from instantid.models.memory_report import component_info

    return sum(int(component_info(n, m)["bytes"]) for n, m in modules.items() if m is not None)


def _load_engine(
    cache: str, base: str, repo: str, watch: RSSWatch, profile_name: str = "large-on-cpu"
) -> tuple[dict[str, Any], str]:
    from dataclasses import replace

    from instantid.models.loading import load_pipeline
    from instantid.models.memory import CPU_BF16, PROFILES
    from instantid.settings import Settings

    settings = Settings.from_env(
        {
            "INSTANTID_PRESET": "real",
            "INSTANTID_BASE_MODEL": base,
            "INSTANTID_REPO": repo,
            "HF_HUB_CACHE": cache,
            "HF_HUB_OFFLINE": "1",
        }
    )
    # A GPU-class profile (fp16 weights, bf16 VAE as on Ampere and newer), placed on the CPU: what is
    # measured is host RAM, which is what runs out while loading (Colab) and what offload profiles keep.
    profile = {
        "large-on-cpu": replace(PROFILES["large"], name="large-on-cpu", device="cpu", vae_dtype="bfloat16"),
        "cpu-bf16": replace(CPU_BF16, name="cpu-bf16"),
        "cpu-float32": replace(PROFILES["cpu"], name="cpu-float32"),
    }[profile_name]
    pipe = load_pipeline(settings, profile, lambda f, m: watch.mark(m))
    names = ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2", "resampler")
    return {n: getattr(pipe, n) for n in names}, profile.name


def _load_baseline(cache: str, base: str, repo: str, watch: RSSWatch) -> tuple[dict[str, Any], str]:
    """The official demo's loading, re-derived: fp16 from_pretrained, then ip-adapter.bin loaded twice."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from huggingface_hub import snapshot_download
    from torch import nn

    from instantid.models.attention import IPAttnProcessor, SelfAttnProcessor
    from instantid.models.resampler import Resampler, ResamplerConfig

    iid = Path(snapshot_download(repo, cache_dir=cache, local_files_only=True))
    controlnet = ControlNetModel.from_pretrained(str(iid / "ControlNetModel"), dtype=torch.float16)
    watch.mark("IdentityNet")
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        base, controlnet=controlnet, dtype=torch.float16, cache_dir=cache
    )
    watch.mark("SDXL pipeline")
    ckpt = iid / "ip-adapter.bin"
    # 1) the resampler: built with random float32 weights, cast, then loaded from a full torch.load.
    state = torch.load(str(ckpt), map_location="cpu")
    config = ResamplerConfig.from_state_dict(state["image_proj"])  # the demo hard-codes the same numbers
    resampler = Resampler.from_resampler_config(config).eval().to(pipe.device, dtype=torch.float16)
    state = state["image_proj"]
    resampler.load_state_dict(state)
    del state
    watch.mark("resampler")
    # 2) the IP attention layers: random float32 processors, cast, then a second full torch.load.
    unet = pipe.unet
    modules = dict(unet.named_modules())
    procs: dict[str, Any] = {}
    for name in unet.attn_processors:
        attn = modules[name.removesuffix(".processor")]
        if name.endswith("attn1.processor"):
            procs[name] = SelfAttnProcessor()
        else:
            proc = IPAttnProcessor(attn.to_q.out_features, attn.to_k.in_features, config.num_queries)
            procs[name] = proc.to(unet.device, dtype=unet.dtype)
    unet.set_attn_processor(procs)
    state = torch.load(str(ckpt), map_location="cpu")["ip_adapter"]
    layers = nn.ModuleList(p if isinstance(p, nn.Module) else nn.Identity() for p in unet.attn_processors.values())
    layers.load_state_dict(state)
    del state, layers
    watch.mark("IP layers")
    names = ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2")
    modules_out = {n: getattr(pipe, n) for n in names}
    modules_out["resampler"] = resampler
    return modules_out, "official demo (fp16 from_pretrained, torch.load x2)"


def child_main(mode: str, cache: str, base: str, repo: str) -> dict[str, Any]:
    import gc

    import_all()
    gc.collect()
    loaders = {"engine": _load_engine, "baseline": _load_baseline}
    loader = loaders.get(mode) or functools.partial(_load_engine, profile_name=mode)
    with RSSWatch() as watch:
        t0 = time.perf_counter()
        modules, profile = loader(cache, base, repo, watch)
        seconds = time.perf_counter() - t0
        gc.collect()
        # Weights that are only mapped from a file become resident when first read; the first
        # generation reads them all, so page every one in: the peak is then what running needs.
        touch(modules)
        watch.mark("every weight paged in")
    return {
        "mode": mode,
        "profile": profile,
        "weights_bytes": _module_bytes(modules),
        **watch.result(seconds),
    }


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(child_main(*sys.argv[1:5])))
