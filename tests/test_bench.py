"""The benchmarks' smallest forms run offline and report what BENCHMARKS.md needs (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "INSTANTID_LOG_LEVEL": "WARNING"})
    env.pop("SPACES_ZERO_GPU", None)
    return env


def _last_json(cmd: list[str], timeout: int = 600) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class BenchRuns:
    cache: Path  # load-memory's Hugging Face cache
    parts_cache: Path  # the all-parts run's: the micro checkpoints and every optional part
    runs: dict[str, Future]

    def result(self, name: str) -> dict[str, Any]:
        return self.runs[name].result()


@pytest.fixture(scope="module")
def bench_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchRuns]:
    """The bench's own runs that the selected tests read, each in its own processes, started together: they wait on
    their children, and each child is mostly imports and micro models on one core, so a 2-core machine ran them
    one after the other with a core idle. Nothing here asserts a time: running side by side changes no assertion."""
    import torch

    from bench import overhead

    cache, parts_cache = tmp_path_factory.mktemp("bench") / "hub", tmp_path_factory.mktemp("all-parts") / "hub"
    commands: dict[str, Any] = {
        "load-memory": lambda: _last_json([sys.executable, "-m", "bench", "load-memory", "--size", "micro",
                                           "--cache", str(cache), "--cpu-profile"]),
        "all-parts": lambda: _all_parts_run(parts_cache),
        "overhead": lambda: overhead.run(requests=3, what_ifs=False, log=lambda m: None),
        "gpu": lambda: _last_json([sys.executable, "-m", "instantid", "bench", "gpu"]),
    }
    if torch.cuda.is_available():  # the real benchmark would run, not the dry run
        del commands["gpu"]
    readers = {"test_load_memory_micro": "load-memory", "test_load_memory_all_parts_micro": "all-parts",
               "test_overhead_three_requests": "overhead", "test_gpu_dry_run_through_the_cli": "gpu"}
    wanted = {readers.get(item.originalname) for item in request.session.items if item.module is request.module}
    commands = {name: run for name, run in commands.items() if name in wanted}
    with ThreadPoolExecutor(max(1, len(commands))) as pool:
        runs = {name: pool.submit(run) for name, run in commands.items()}
        yield BenchRuns(cache, parts_cache, runs)


def _all_parts_run(cache: Path) -> dict[str, Any]:
    """The micro checkpoints and every optional part written in this process, then Engine.load_all in its own."""
    from bench import all_parts
    from bench.load_memory import write_checkpoints

    info = write_checkpoints(cache, "micro")
    all_parts.write_extras(cache, "micro")
    return all_parts.run_child(cache, {k: info[k] for k in ("base_model", "instantid_repo")}, "micro")


@pytest.mark.slow  # `python -m` processes
def test_load_memory_micro(bench_runs: BenchRuns) -> None:
    from bench import summary

    cache = bench_runs.cache
    out = bench_runs.result("load-memory")
    # The cpu profile's own loads: bfloat16 holds the fp16 weights' bytes, float32 twice them.
    bf16, fp32 = out["cpu_profile"]["cpu-bf16"], out["cpu_profile"]["cpu-float32"]
    assert bf16["weights_bytes"] == pytest.approx(out["weights_bytes"], rel=0.02)
    assert fp32["weights_bytes"] == pytest.approx(2 * out["weights_bytes"], rel=0.05)
    assert bf16["end_anon_bytes"] > 0 and bf16["ratio"] > 0 and "`cpu-bf16` profile" in summary(out)[0]
    for key in (
        "weights_bytes",
        "peak_rss_bytes",
        "baseline_peak_rss_bytes",
        "ratio",
        "baseline_ratio",
        "load_seconds",
        "baseline_load_seconds",
        "baseline_fp16_files_ratio",
        "machine",
        "command",
    ):
        assert key in out, key
    assert out["benchmark"] == "load-memory" and out["size"] == "micro"
    assert out["weights_bytes"] > 0 and out["peak_rss_bytes"] > 0 and out["baseline_peak_rss_bytes"] > 0
    assert out["ratio"] == pytest.approx(out["peak_rss_bytes"] / out["weights_bytes"], rel=1e-2)
    # The real repos' layout: fp32 files beside .fp16 variants, the fp16-only twin shares the bytes.
    from bench.load_memory import _snapshot, repo_ids

    snap = _snapshot(cache, repo_ids("micro")["base_model"])
    names = {p.name for p in (snap / "unet").iterdir()}
    assert {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"} <= names
    assert out["write_seconds"] >= 0


def test_checkpoints_are_loadable_and_shaped_like_the_release(tmp_path: Path) -> None:
    """The written files load with the readers the engine uses, with the released ip-adapter layout."""
    import torch
    from safetensors import safe_open

    from bench.load_memory import _snapshot, write_checkpoints
    from instantid.models.loading import load_ip_adapter_file
    from instantid.models.resampler import ResamplerConfig

    info = write_checkpoints(tmp_path, "micro")
    again = write_checkpoints(tmp_path, "micro")
    assert again["write_seconds"] == 0.0  # reused, not rewritten
    base = _snapshot(tmp_path, info["base_model"])
    with (
        safe_open(str(base / "unet" / "diffusion_pytorch_model.fp16.safetensors"), "pt") as f16,
        safe_open(str(base / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f32,
    ):
        key = next(iter(f16.keys()))
        assert f16.get_tensor(key).dtype == torch.float16 and f32.get_tensor(key).dtype == torch.float32
        assert torch.equal(f32.get_tensor(key).half(), f16.get_tensor(key))  # one set of weights, two dtypes
    proj, ip = load_ip_adapter_file(_snapshot(tmp_path, info["instantid_repo"]) / "ip-adapter.bin")
    cfg = ResamplerConfig.from_state_dict(proj)
    assert (cfg.depth, cfg.num_queries, cfg.output_dim, cfg.ff_mult) == (4, 16, 2048 // 16, 4)
    assert proj["latents"].dtype == torch.float32  # as released
    assert len(ip) == 2 * 70  # SDXL's 70 cross-attention layers, to_k_ip and to_v_ip each


def test_full_size_shapes_match_sdxl() -> None:
    """Full size is real SDXL: the parameter counts of the released checkpoints."""
    import torch

    from instantid.models.tiny import ModelShape, build_parts, ip_adapter_payload

    shape = ModelShape.sdxl()
    parts = build_parts(shape, "meta")
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if isinstance(m, torch.nn.Module)}
    assert round(count["unet"] / 1e6) == 2567
    assert round(count["controlnet"] / 1e6) == 1251
    assert round(count["text_encoder_2"] / 1e6) == 695
    payload = ip_adapter_payload(shape, parts["unet"], device="meta")
    total = sum(t.numel() * 4 for part in payload.values() for t in part.values())
    assert 1.65e9 < total < 1.75e9  # ip-adapter.bin is 1.69 GB


def test_face_model_architectures_have_antelopev2_sizes() -> None:
    """SCRFD-10G: about 10 GMACs at VGA (the paper's convention); IResNet-100: glintr100's 65.2 M parameters."""
    import torch

    from bench.face_models import iresnet100, macs, scrfd_10g

    with torch.device("meta"):  # shapes only: nothing is computed
        detector, recognizer = scrfd_10g(), iresnet100()
    assert 9.5e9 < macs(detector, (1, 3, 480, 640)) < 10.5e9
    assert 65.0e6 < sum(p.numel() for p in recognizer.parameters()) < 65.4e6
    assert 11.9e9 < macs(recognizer, (1, 3, 112, 112)) < 12.3e9


@pytest.mark.slow  # three requests, each in its own process
def test_overhead_three_requests(bench_runs: BenchRuns) -> None:
    from bench import overhead

    out = bench_runs.result("overhead")
    for key in ("median_ms", "p90_ms", "stages_median_ms", "baseline_median_ms", "baseline_stages_median_ms"):
        assert key in out, key
    assert out["requests"] == 3
    assert set(out["stages_median_ms"]) == set(overhead.STAGES)
    assert out["median_ms"] > 0 and out["p90_ms"] >= out["median_ms"] * 0.5


def test_overhead_what_if_path_runs_in_process() -> None:
    from bench import overhead
    from instantid.models.loading import resampler_dtype
    from instantid.models.memory import PROFILES

    out = overhead.child_main(overhead.WHAT_IFS[0], 1)
    # bfloat16 where the CPU has native bf16 matmuls, float32 elsewhere (an AMD EPYC without it failed here).
    expected = str(resampler_dtype(PROFILES["cpu"])).removeprefix("torch.")
    assert out["det_size"] == 320 and out["resampler_dtype"] == expected
    assert set(out["stages_median_ms"]) == set(overhead.STAGES)


def test_resampler_what_ifs_report_their_distance_from_float32() -> None:
    import torch

    from bench import overhead

    names = {v.name: v for v in overhead.WHAT_IFS}
    assert names["resampler int8"].resampler_dtype == "qint8" and names["same photo again"].same_photo
    assert overhead._tokens_error(overhead._resampler(torch.float32)) == 0.0
    bf16 = overhead._tokens_error(overhead._resampler(torch.bfloat16))
    int8 = overhead._tokens_error(overhead._resampler(torch.qint8))
    assert 0.0 < bf16 < 0.02 and bf16 < int8 < 0.1


@pytest.mark.slow  # a `python -m` process
def test_gpu_dry_run_through_the_cli(bench_runs: BenchRuns) -> None:
    """`python -m instantid bench gpu` without CUDA runs the CPU-sized form of every profile."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the real benchmark would run, not the dry run")
    out = bench_runs.result("gpu")
    assert out["dry_run"] is True and out["benchmark"] == "gpu"
    assert not out["skipped"], out["skipped"]
    assert not [r for r in out["rows"] if "error" in r], out["rows"]
    seen = {(r["pipeline"], r["profile"], r["speed"]) for r in out["rows"]}
    for speed in ("quality", "fast", "turbo", "lcm"):
        assert {("instantid", "large", speed), ("plain", "resident", speed)} <= seen
    for profile in ("medium", "small", "small-fp8"):
        assert {("instantid", profile, "quality"), ("instantid", profile, "turbo")} <= seen
    checks = out["checks"]
    assert {"instantid_vs_plain_quality", "large_quality_s", "fast_vs_quality", "turbo_vs_quality"} <= set(checks)
    assert checks["lora_gb_held"] > 0 and checks["switch_to_turbo_s"] >= 0
    # The live previews' row: the same quality call with and without them, and the projection alone.
    assert "preview_share" in checks and checks["preview_projection_ms"] > 0
    assert any(r["mode"].endswith("+ previews") and r["without_previews_s"] > 0 for r in out["rows"])
    assert out["table"].startswith("| pipeline |")


def test_record_appends_a_row(tmp_path: Path) -> None:
    from bench import append_record, summary

    result = {
        "benchmark": "overhead",
        "date": "2026-01-01 00:00 UTC",
        "machine": "2 CPU (test), 24 GiB RAM, no GPU",
        "command": "python -m instantid bench overhead --quick",
        "requests": 3,
        "median_ms": 50.0,
        "p90_ms": 60.0,
        "stages_median_ms": {"decode_ms": 1.0},
        "baseline_median_ms": 90.0,
        "baseline_p90_ms": 99.0,
        "baseline_stages_median_ms": {"decode_ms": 2.0},
        "det_size": 640,
        "resampler_dtype": "float32",
    }
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nprose\n")
    append_record(result, path)
    append_record(result, path)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nprose\n") and text.count("## Recorded runs") == 1
    rows = [line for line in text.splitlines() if line.startswith("| 2026-01-01")]
    assert len(rows) == 2 and "median 50.0 ms" in rows[0] and "median 90.0 ms" in rows[0]
    figures, baseline = summary(result)
    assert "p90 60.0 ms" in figures and "p90 99.0 ms" in baseline


def test_unknown_benchmark_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import run_benchmark

    assert run_benchmark("nope") == 2
    assert "unknown benchmark" in capsys.readouterr().err


@pytest.mark.slow  # `python -m` processes
def test_load_memory_all_parts_micro(bench_runs: BenchRuns) -> None:
    """`--all-parts`: Engine.load_all loads every optional part from the bench's repos, all in fp16, and the
    figures add up (the micro size keeps it to seconds; the base loaders are the test above's)."""
    from bench import all_parts
    from bench.load_memory import _snapshot

    cache, out = bench_runs.parts_cache, bench_runs.result("all-parts")
    ids = all_parts.repo_ids("micro")
    # The real repos' formats: openpose float32 only (with a single-file checkpoint beside it), canny with fp16.
    pose = {p.name for p in _snapshot(cache, ids["pose"]).iterdir()}
    assert {"diffusion_pytorch_model.safetensors", "OpenPoseXL2.safetensors"} <= pose
    assert "diffusion_pytorch_model.fp16.safetensors" in {p.name for p in _snapshot(cache, ids["canny"]).iterdir()}
    loaded = set(out["parts_loaded"])
    assert {"LCM-LoRA", "pose ControlNet", "canny ControlNet", "depth ControlNet"} <= loaded
    assert {"pose estimator", "depth estimator"} <= loaded
    parts = out["parts_bytes"]
    # Read in fp16 from a float32 file and from an fp16 variant alike; the small depth ControlNet is smaller.
    assert parts["controlnet_pose"] == parts["controlnet_canny"] == parts["controlnet"]
    assert 0 < parts["controlnet_depth"] < parts["controlnet_pose"]
    assert out["weights_bytes"] == sum(parts.values())
    assert out["stages"][-1][0] == "every weight paged in"
    assert out["peak_rss_bytes"] >= out["stages"][-1][1] > 0


@pytest.mark.slow  # a `python -m` process
def test_framing_bench_measures_the_drawing_within_ten_percent(tiny_env: dict[str, str]) -> None:
    """`python -m instantid bench framing --quick` on the session's tiny cache: every framing x head angle of both
    photos, measured from the drawn keypoints, lands within 10 % of what was asked; the canonical face's reading
    agrees for Grace Hopper (near the template) and turns the right way for the astronaut; the timing rows say
    what ran (no time is asserted)."""
    from instantid.vision import framing

    proc = subprocess.run([sys.executable, "-m", "instantid", "bench", "framing", "--quick"], cwd=ROOT, env=tiny_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "framing" and out["photos"] == ["astronaut.jpg", "grace_hopper.jpg"]
    rows = out["rows"]
    quantities = ("eye_line", "face_share", "eye_angle", "yaw", "pitch", "own_yaw", "own_pitch")
    cases = {(r["photo"], r["framing"], r["head_angle"], r["quantity"]) for r in rows}
    assert len(rows) == len(cases) == 2 * len(framing.FRAMINGS) * len(framing.HEAD_ANGLES) * len(quantities)
    for r in rows:  # the verdict is the row's own numbers
        assert r["within_10pct"] == (r["rel_error"] <= 0.10), r
    placed = [r for r in rows if r["quantity"] not in ("yaw", "pitch") or r["photo"] == "grace_hopper.jpg"
              or r["head_angle"] == "photo"]
    assert [r for r in placed if not r["within_10pct"]] == []
    for r in rows:  # the framing's own shares were asked, where one places the face
        spec = framing.FRAMINGS[r["framing"]]
        if spec.canvas and r["quantity"] in ("eye_line", "face_share"):
            assert r["asked"] == getattr(spec, r["quantity"]), r
    # The astronaut read with the canonical face: her proportions shift the reading, never the direction.
    read = {(r["head_angle"], r["quantity"]): r["measured"] for r in rows
            if r["photo"] == "astronaut.jpg" and r["framing"] == "portrait"}
    assert read["left", "yaw"] < -20 < 20 < read["right", "yaw"]
    assert read["up", "pitch"] - read["front", "pitch"] > 15 and read["front", "pitch"] - read["down", "pitch"] > 15
    t = out["timing"]
    assert t["full body"]["refined"] == ["the face"] and t["photo"]["refined"] == []
    assert t["full body"]["size"] == [128, 192] and t["photo"]["size"] == [128, 128]
    assert t["full body"]["median_refine_ms"] > 0 and t["ratio"] > 0
