"""Benchmarks: `python -m instantid bench NAME [--quick] [--record]` (or `python -m bench`, more options).

Each benchmark prints progress on stderr and, as the last line of stdout, one JSON object. `--record`
appends a row (date, machine, exact command, figures, baseline from the same run) to BENCHMARKS.md.

- load-memory: host RAM to load the whole pipeline, against the official demo's loading (bench/load_memory.py)
- overhead: per-request CPU work outside the denoising loop and VAE decode (bench/overhead.py)
- gpu: seconds per image and peak VRAM per memory profile against plain diffusers (bench/gpu.py)
- cpu-contention: a command-line generation beside another, by OpenMP wait policy (bench/cpu_contention.py)
- preview: the live preview's cost against the denoising (bench/preview.py)
- framing: framing and head angle measured from the drawn keypoints, and a full body's refine cost (bench/framing.py)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCHMARKS = ("load-memory", "overhead", "gpu", "cpu-contention", "preview", "framing")
# Checkpoint sizes: SDXL with every width divided by this (`instantid.models.tiny.ModelShape.sdxl`).
SIZES = {"full": 1, "quick": 4, "micro": 16}
ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
RECORD_HEADER = """## Recorded runs

Appended by `--record`: one row per run, the baseline measured in the same run.

| date (UTC) | benchmark | machine | command | figures | baseline (same run) |
|---|---|---|---|---|---|
"""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmark(
    name: str,
    quick: bool = False,
    record: bool = False,
    *,
    command: str | None = None,
    log: Callable[[str], None] = _log,
    **options: Any,
) -> int:
    """Run one benchmark, print its JSON as the last stdout line, optionally record it; the exit code."""
    if name not in BENCHMARKS:
        print(f"error: unknown benchmark {name!r}: choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:
        result = measure(name, quick=quick, log=log, **options)
    except Exception as exc:  # the JSON line must still say what happened
        traceback.print_exc()
        print(json.dumps({"benchmark": name, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    result["machine"] = machine()
    result["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result["command"] = command or _command(name, quick, options)
    if name == "gpu" and result.get("table"):
        print(result["table"])
    if record:
        path = append_record(result)
        log(f"recorded in {path}")
    print(json.dumps(result, default=str))
    return 0


def measure(name: str, *, quick: bool = False, log: Callable[[str], None] = _log, **options: Any) -> dict[str, Any]:
    """The benchmark's result dict (no printing, no recording)."""
    if name == "load-memory":
        from . import load_memory

        return load_memory.run(
            quick=quick,
            size=options.get("size"),
            cache=options.get("cache"),
            all_parts=bool(options.get("all_parts")),
            cpu_profile=bool(options.get("cpu_profile")),
            log=log,
        )
    if name == "overhead":
        from . import overhead

        return overhead.run(
            quick=quick,
            requests=options.get("requests"),
            face_models=options.get("face_models"),
            rounds=options.get("rounds"),
            log=log,
        )
    if name == "gpu":
        from . import gpu

        return gpu.run(quick=quick, dry_run=options.get("dry_run"), log=log)
    if name == "cpu-contention":
        from . import cpu_contention

        return cpu_contention.run(quick=quick, log=log)
    if name == "preview":
        from . import preview

        return preview.run(quick=quick, log=log)
    if name == "framing":
        from . import framing

        return framing.run(quick=quick, log=log)
    raise ValueError(f"unknown benchmark {name!r}")


def _command(name: str, quick: bool, options: dict[str, Any]) -> str:
    parts = ["python -m instantid bench", name] + (["--quick"] if quick else [])
    for key, value in options.items():
        if value in (None, False):
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


# --- the machine ---------------------------------------------------------------------------------


def machine() -> str:
    """`N CPU (model), X GiB RAM[, GPU name]`: enough to tell two rows' machines apart."""
    import psutil

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    out = f"{cpus} CPU ({model}{_bf16_flags()}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    gpu = _gpu_name()
    return out + (f", {gpu}" if gpu else ", no GPU")


def _bf16_flags() -> str:
    """The CPU's bf16 instruction flags (AVX512-BF16, AMX-BF16): they decide the resampler's dtype on a CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                found = [f for f in ("avx512_bf16", "amx_bf16") if f in line.split()]
                return "; " + (" ".join(found) if found else "no bf16 flags")
    except OSError:
        pass
    return ""


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    except Exception:  # a machine description must never fail a benchmark
        return None
    return None


def _git_commit() -> str | None:
    """The commit measured, marked when the code under test differs from it."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        commit = out.stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "bench", "instantid"], cwd=ROOT)
        untracked = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard", "bench", "instantid"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        return commit + (" + local changes" if dirty.returncode or untracked.stdout.strip() else "")
    except OSError:
        return None


# --- BENCHMARKS.md rows ---------------------------------------------------------------------------


def _gb(n: Any) -> str:
    """Decimal gigabytes, as GPU memory is quoted (bench gpu's rows and this module's summaries)."""
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


def summary(result: dict[str, Any]) -> tuple[str, str]:
    """(figures, baseline) cells for one result."""
    name = result.get("benchmark")
    if name == "load-memory":
        figures = (
            f"{result['size']} size: weights {_gb(result['weights_bytes'])}, peak RSS growth "
            f"{_gb(result['peak_rss_bytes'])}, **ratio {result['ratio']}** "
            f"({result['ratio_vs_baseline']} x baseline), load {result['load_seconds']} s"
        )
        baseline = (
            f"official demo: peak {_gb(result['baseline_peak_rss_bytes'])}, ratio {result['baseline_ratio']}, "
            f"load {result['baseline_load_seconds']} s; same demo on an fp16-only repo: ratio "
            f"{result['baseline_fp16_files_ratio']}, load {result['baseline_fp16_files_load_seconds']} s"
        )
        if result.get("all_parts"):
            a = result["all_parts"]
            figures += (
                f"; all parts (`Engine.load_all`, {a['profile']}): weights {_gb(a['weights_bytes'])}, "
                f"**peak RSS growth {_gb(a['peak_rss_bytes'])}** (ratio {a['ratio']}"
                + (", a lower bound: file pages reclaimed" if a.get("peak_is_lower_bound") else "")
                + f"; {_gb(a.get('mem_available_at_start_bytes'))} available at start), load {a['load_seconds']} s, "
                f"15 GB goal {'met' if a.get('goal_met') else 'missed' if a.get('goal_met') is False else 'not judged'}"
            )
        for mode, c in result.get("cpu_profile", {}).items():
            figures += (
                f"; `{mode}` profile: weights {_gb(c['weights_bytes'])}, peak RSS growth {_gb(c['peak_rss_bytes'])}, "
                f"**ratio {c['ratio']}** (anonymous at the end {_gb(c['end_anon_bytes'])}), load {c['load_seconds']} s"
            )
    elif name == "overhead":
        stages = ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in result["stages_median_ms"].items())
        figures = (
            f"**median {result['median_ms']} ms**, p90 {result['p90_ms']} ms over {result['requests']} requests "
            f"(stage medians, ms: {stages}; det_size {result['det_size']}, resampler {result['resampler_dtype']})"
        )
        if result.get("face_models", "").startswith("antelopev2"):
            figures = "antelopev2-sized face models: " + figures
        if result.get("ratio_vs_baseline") is not None:
            rounds = ", ".join(str(r) for r in result.get("round_ratios", []))
            figures += f"; **{result['ratio_vs_baseline']} x baseline** (rounds: {rounds})"
        cpu, base_cpu = result.get("info_median_ms", {}).get("cpu_ms"), result.get("baseline_info_median_ms", {})
        if cpu is not None and base_cpu.get("cpu_ms"):
            figures += f"; process CPU time {cpu} ms vs {base_cpu['cpu_ms']} ms ({cpu / base_cpu['cpu_ms']:.3f} x)"
        if result.get("what_ifs"):
            figures += "; what-ifs: " + "; ".join(
                f"{w['name']} {w['median_ms']} ms ({w['ratio_vs_baseline']} x baseline"
                + (f", tokens {w['resampler_error']} from float32's" if "resampler_error" in w else "")
                + ")"
                for w in result["what_ifs"]
            )
        if result.get("loadavg"):
            figures += f"; load average {result['loadavg'][0]} -> {result['loadavg'][1]}"
        base = ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in result["baseline_stages_median_ms"].items())
        baseline = (
            f"official demo's face path: median {result['baseline_median_ms']} ms, p90 "
            f"{result['baseline_p90_ms']} ms ({base})"
        )
    elif name == "gpu":
        ours = [r for r in result["rows"] if r["pipeline"] == "instantid"]
        plain = [r for r in result["rows"] if r["pipeline"] == "plain"]

        def cell(rows: list[dict[str, Any]]) -> str:
            return "; ".join(
                f"{r['profile']} {r['mode']}: failed ({r['error'][:60]})"
                if "error" in r
                else f"{r['profile']} {r['mode']}: {r['seconds_per_image']} s, peak {_gb(r['peak_reserved_bytes'])}"
                for r in rows
            )

        prefix = "DRY RUN on CPU (not GPU figures): " if result.get("dry_run") else f"{result['device']}: "
        figures = prefix + (cell(ours) or "no rows")
        if result.get("skipped"):
            figures += "; skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items())
        baseline = "plain diffusers SDXL ControlNet pipeline: " + (cell(plain) or "no rows")
    elif name == "cpu-contention":
        m = result["median_s"]
        figures = (
            f"beside a looping generation, medians of {result['rounds']}: product defaults {m['defaults']} s, "
            f"**{result['defaults_vs_passive']} x PASSIVE by hand** (goal <= 1.5: "
            f"{'met' if result['goal_met'] else 'missed'}); what-if ACTIVE by hand {m['active_by_hand']} s "
            f"({result['active_vs_passive']} x); quiet machine {result['quiet_defaults_s']} s; "
            f"load average {result['loadavg'][0]} -> {result['loadavg'][1]}"
        )
        baseline = f"OMP_WAIT_POLICY=PASSIVE set by hand for both processes: {m['passive_by_hand']} s"
    elif name == "preview":
        tiny = result["tiny"]
        figures = (
            f"previews **{tiny['share_of_denoising'] * 100:.2f} %** of the denoising time (goal <= "
            f"{result['goal_share'] * 100:.0f} %; tiny preset, {tiny['steps']} steps, median of {len(tiny['runs'])}); "
            f"SDXL 128 x 128 latents: {result['sdxl_projection_ms']['float32']} ms a projection (float32), "
            f"{result['sdxl_projection_ms_per_30_steps']} ms per 30-step run ({result['sdxl_previews_per_30_steps']} "
            f"previews); main process {result['main_process_ms_per_preview']} ms a preview (upsample + PNG)"
        )
        baseline = "the same runs' denoising: " + ", ".join(f"{r['denoise_ms']} ms" for r in tiny["runs"])
    elif name == "framing":
        s, t = result["summary"], result["timing"]
        placed = ", ".join(f"{q} {s[q]['within_10pct']}/{s[q]['rows']} (worst {s[q]['max_rel_error'] * 100:.1f} %)"
                           for q in ("eye_line", "face_share", "eye_angle", "own_yaw", "own_pitch"))
        read = ", ".join(f"{q} {s[q]['within_10pct']}/{s[q]['rows']} (worst {s[q]['worst']})" for q in ("yaw", "pitch"))
        figures = (
            f"from the drawn keypoints ({', '.join(result['photos'])}; every framing x head angle), rows within 10 %: "
            f"{placed}; read back with the canonical face: {read}; full body with its refined face "
            f"{t['full body']['median_s']} s at {' x '.join(map(str, t['full body']['size']))}, **{t['ratio']} x** "
            f"framing photo (tiny preset, median of {len(t['photo']['runs_s'])}; load average "
            f"{result['loadavg'][0]} -> {result['loadavg'][1]})"
        )
        baseline = (f"framing photo, same face and seed: {t['photo']['median_s']} s at "
                    f"{' x '.join(map(str, t['photo']['size']))}")
    else:
        figures, baseline = json.dumps(result, default=str)[:300], ""
    return figures, baseline


def append_record(result: dict[str, Any], path: Path = BENCHMARKS_MD) -> Path:
    """Append one row to the recorded-runs table at the end of `path` (created if missing)."""
    figures, baseline = summary(result)
    commit = _git_commit()
    command = f"`{result['command']}`" + (f" at {commit}" if commit else "")
    row = [result["date"], result["benchmark"], result["machine"], command, figures, baseline]
    line = "| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if "## Recorded runs" not in text:
        text = text.rstrip("\n") + "\n\n" + RECORD_HEADER
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text + line)
    return path
