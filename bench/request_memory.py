"""request-memory: host RAM before, during and after the largest request a profile allows.

`python -m bench.request_memory` (defaults: the tiny preset on the cpu profile, a group of 4 people x 4 images
(the profile caps them) at 1280x1280; `--people`, `--images`, `--side`, `--repeat` change it). One fresh process:
the engine loads, a small group request warms every lazy part (face models, schedulers), then the large request
runs `--repeat` times, each in a new thread as a server's worker would run it, while another thread samples
the resident set every 10 ms. Prints one JSON object as the last stdout line: RSS before, peak and after
(MB) for each run, and the most any run left held (`held_mb`: after minus before).

The tiny models keep the weights small, so what stays is what a request leaves behind, not the model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [ROOT / "assets" / "astronaut.jpg", ROOT / "assets" / "grace_hopper.jpg"]


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _photos(folder: Path, count: int) -> list[str]:
    """`count` face photos: the two shipped ones, then the same mirrored (a different photo to the engine)."""
    from PIL import Image, ImageOps

    out = []
    for k in range(count):
        path = folder / f"person{k + 1}.png"
        with Image.open(PHOTOS[k % 2]) as im:
            (ImageOps.mirror(im) if k >= 2 else im.convert("RGB")).save(path)
        out.append(str(path))
    return out


def in_thread(fn: Any) -> tuple[Any, float]:
    """`fn()` in a new thread (as a server's worker runs a request), with the peak RSS seen while it ran."""
    box: dict[str, Any] = {}
    done = threading.Event()
    peak = [rss_mb()]

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_mb())

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    done.set()
    sampler.join()
    if "error" in box:
        raise box["error"]
    return box["result"], max(peak[0], rss_mb())


def measure(people: int = 4, images: int = 4, side: int = 1280, repeat: int = 2, steps: int = 2,
            cache: Path | None = None) -> dict[str, Any]:
    from instantid.engine import Engine
    from instantid.models.tiny import ensure_tiny_checkpoints
    from instantid.request.requests import Request
    from instantid.settings import Settings

    cache = cache or Path.home() / ".cache" / "instantid" / "tiny-hub"
    settings = Settings.from_env({"INSTANTID_PRESET": "tiny", "INSTANTID_TINY_CACHE": str(cache),
                                  "HF_HUB_OFFLINE": "1", "INSTANTID_MEMORY_PROFILE": "cpu"})
    ensure_tiny_checkpoints(settings)
    engine = Engine(settings)
    engine.ensure_loaded()
    with tempfile.TemporaryDirectory() as tmp:
        photos = _photos(Path(tmp), people)
        warm = Request(mode="group", people=[[p] for p in photos[:2]], prompt="two friends", num_steps=steps,
                       width=256, height=256, seed=1)
        in_thread(lambda: engine.run(warm))
        large = Request(mode="group", people=[[p] for p in photos], prompt="friends", num_steps=steps,
                        num_images=images, width=side, height=side, seed=2)
        runs = []
        for _ in range(repeat):
            gc.collect()
            before = rss_mb()
            t0 = time.perf_counter()
            result, peak = in_thread(lambda: engine.run(large))
            seconds = time.perf_counter() - t0
            made = len(result.images)
            del result
            gc.collect()
            after = rss_mb()
            runs.append({"rss_before_mb": round(before), "rss_peak_mb": round(peak), "rss_after_mb": round(after),
                         "held_mb": round(after - before), "seconds": round(seconds, 1), "images_made": made})
    return {
        "benchmark": "request-memory",
        "request": {"preset": "tiny", "profile": engine.profile.name, "mode": "group", "people": people,
                    "images": images, "size": f"{side}x{side}", "steps": steps},
        "runs": runs,
        "held_mb": max(r["held_mb"] for r in runs),
        "goal_mb": 150,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.request_memory", description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=4)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--side", type=int, default=1280)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cache", type=Path, help="the tiny preset's cache (default ~/.cache/instantid/tiny-hub)")
    args = p.parse_args(argv)
    result = measure(args.people, args.images, args.side, args.repeat, args.steps, args.cache)
    result["command"] = "python -m bench.request_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
