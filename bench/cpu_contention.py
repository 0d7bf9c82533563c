"""A command-line generation beside another one: what OpenMP's wait policy costs on a shared CPU.

The tiny preset's `python -m instantid generate` is timed while a second generation runs in a loop next to it
(another visitor, the app server, another user of a small machine). Variants, each for BOTH processes:
- `defaults`: the environment without OMP_WAIT_POLICY, i.e. what the product does by itself;
- `passive_by_hand`: OMP_WAIT_POLICY=PASSIVE set by hand (the reference: the goal is defaults <= 1.5x it);
- `active_by_hand`: OMP_WAIT_POLICY=ACTIVE, a what-if of spinning threads (what a user who sets it gets).
Variants take turns over the rounds so that a change in the machine's load hits them alike.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "astronaut.jpg"
VARIANTS: dict[str, str | None] = {"defaults": None, "passive_by_hand": "PASSIVE", "active_by_hand": "ACTIVE"}
GOAL_RATIO = 1.5


def _env(cache: Path, policy: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(INSTANTID_PRESET="tiny", INSTANTID_TINY_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False")
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    return env


def _generate(out: Path, seed: int) -> list[str]:
    # The product's defaults: speed, steps, size and profile are the ones a user gets without flags.
    return [sys.executable, "-m", "instantid", "generate", "--face", str(PHOTO), "--prompt", "a portrait",
            "--seed", str(seed), "--out", str(out)]


def _loop_command(out: Path) -> list[str]:
    """A shell loop of generations: the neighbour, running until it is stopped."""
    one = " ".join(f"'{part}'" for part in _generate(out, 7))
    return ["bash", "-c", f"while true; do {one} >/dev/null 2>&1; done"]


def _timed(env: dict[str, str], out: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(_generate(out, 1), cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"generation failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def run(quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    from instantid.models.tiny import ensure_tiny_checkpoints
    from instantid.settings import Settings

    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        work = Path(tmp)
        cache = work / "tiny-hub"
        ensure_tiny_checkpoints(Settings.from_env({"INSTANTID_PRESET": "tiny", "INSTANTID_TINY_CACHE": str(cache)}))
        loadavg_start = os.getloadavg()[0]
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        quiet = _timed(_env(cache, None), work / "quiet.png")
        log(f"quiet machine, defaults: {quiet:.1f} s")
        for r in range(rounds):
            for name, policy in VARIANTS.items():
                env = _env(cache, policy)
                neighbour = subprocess.Popen(_loop_command(work / "neighbour.png"), cwd=ROOT, env=env,
                                             start_new_session=True)
                try:
                    time.sleep(3.0)  # the neighbour is past its imports and generating
                    seconds[name].append(_timed(env, work / f"{name}.png"))
                finally:
                    os.killpg(neighbour.pid, 15)
                    neighbour.wait()
                log(f"round {r + 1}: {name} {seconds[name][-1]:.1f} s")
    medians = {name: round(statistics.median(v), 2) for name, v in seconds.items()}
    ratio = round(medians["defaults"] / medians["passive_by_hand"], 3)
    return {
        "benchmark": "cpu-contention",
        "rounds": rounds,
        "quiet_defaults_s": round(quiet, 2),
        "median_s": medians,
        "all_s": {name: [round(x, 2) for x in v] for name, v in seconds.items()},
        "defaults_vs_passive": ratio,
        "active_vs_passive": round(medians["active_by_hand"] / medians["passive_by_hand"], 3),
        "goal": f"defaults <= {GOAL_RATIO}x passive_by_hand",
        "goal_met": ratio <= GOAL_RATIO,
        "loadavg": [round(loadavg_start, 2), round(os.getloadavg()[0], 2)],
    }
