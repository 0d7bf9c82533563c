"""preview: what the live preview costs against the denoising it shows, on this machine's CPU.

1. tiny preset: `Engine.render` of a Generate request (20 steps, the cpu profile's quality steps) with the
   previews the app asks for (render's `preview` callback), each projection timed where it runs (in the step
   callback) against the same run's own denoising time (`denoise_ms`, which includes them); median of the runs.
   The tiny models make a step far cheaper than SDXL's, so this share is an upper bound for the CPU.
2. SDXL sizes: `models.preview.latent_preview` alone on a 1024 x 1024 image's latents (1 x 4 x 128 x 128), float32 and
   float16, per call and per 30-step run (`preview_every`'s count of previews).
3. main process: a preview's upsampling to `api.PREVIEW_SIDE` and its PNG encoding (what Gradio does to a gallery
   image), per preview: off the denoising thread, beside it on a CPU-only server.

Goal: the previews cost at most 3 % of the denoising time. The GPU's figure comes from `python -m bench gpu`
(its `large` quality row with and without previews).
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL_SHARE = 0.03
ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "assets" / "astronaut.jpg"
STEPS = 20
SDXL_LATENTS = (1, 4, 128, 128)


def previews_in(steps: int) -> int:
    """How many previews a pass of `steps` shows (the engine's rule: every `preview_every`, never the last step)."""
    from instantid.models.preview import preview_every

    every = preview_every(steps)
    return sum(1 for step in range(1, steps) if step % every == 0)


def _median_ms(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def run(*, quick: bool = False, log: Any = print) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: the tiny cache only
    # Before torch loads OpenMP: spinning threads beside another OpenMP program made a tiny run 3-4x slower here.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    from instantid.engine import Engine
    from instantid.frontends.api import _preview_image
    from instantid.models import preview as projection
    from instantid.models.tiny import ensure_tiny_checkpoints
    from instantid.request.requests import Request
    from instantid.settings import Settings

    runs = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as cache:
        settings = Settings.from_env({"INSTANTID_PRESET": "tiny", "INSTANTID_TINY_CACHE": cache,
                                      "HF_HUB_OFFLINE": "1"})
        ensure_tiny_checkpoints(settings)
        engine = Engine(settings)
        engine.ensure_loaded()
        request = Request(face_images=[str(FACE)], prompt="a portrait", num_steps=STEPS, seed=1)

        projected: list[float] = []
        project = projection.latent_preview

        def timed(latents: Any) -> Any:
            t0 = time.perf_counter()
            out = project(latents)
            projected.append((time.perf_counter() - t0) * 1000)
            return out

        shares, rows = [], []
        projection.latent_preview = timed  # the render stage reads it from the module at each run
        try:
            engine.render(engine.prepare(request), preview=lambda rgb: None)  # warm-up
            for _ in range(runs):
                projected.clear()
                job = engine.prepare(request)
                shown: list[Any] = []
                rendered = engine.render(job, preview=shown.append)
                denoise = rendered.timings_ms["denoise_ms"]
                rows.append({"denoise_ms": round(denoise, 1), "previews": len(shown),
                             "previews_ms": round(sum(projected), 3)})
                shares.append(sum(projected) / denoise)
        finally:
            projection.latent_preview = project
        log(f"tiny preset, {STEPS} steps: {rows}")
        size = shown[0].shape

    latents = torch.randn(*SDXL_LATENTS, generator=torch.Generator().manual_seed(0))
    per_call = {dtype: _median_ms(lambda d=getattr(torch, dtype): projection.latent_preview(latents.to(d)), 50)
                for dtype in ("float32", "float16")}
    rgb = projection.latent_preview(latents)

    def page_image() -> None:
        buf = io.BytesIO()
        _preview_image(rgb).save(buf, format="PNG")

    main_ms = _median_ms(page_image, 20)
    share = statistics.median(shares)
    return {
        "benchmark": "preview",
        "tiny": {"steps": STEPS, "runs": rows, "preview_size": list(size), "share_of_denoising": round(share, 5)},
        "sdxl_projection_ms": per_call,
        "sdxl_previews_per_30_steps": previews_in(30),
        "sdxl_projection_ms_per_30_steps": round(per_call["float32"] * previews_in(30), 3),
        "main_process_ms_per_preview": main_ms,
        "preview_side": int(max(np.asarray(_preview_image(rgb)).shape[:2])),
        "goal_share": GOAL_SHARE,
        "goal_met": share <= GOAL_SHARE,
        "threads": torch.get_num_threads(),
    }
