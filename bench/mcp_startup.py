"""What serving MCP costs the app's start-up: `python app.py` (tiny preset) to its first served page, with
GRADIO_MCP_SERVER=0 and =1 taking turns, on the same machine in the same run.

    python -m bench.mcp_startup [--runs 5] [--cache DIR]

Prints one JSON object: each run's seconds per setting, their medians and the difference (on - off). The page
is polled every 50 ms; the models load in the background as on a Space (INSTANTID_PRELOAD's default), so the
figure is the time a visitor waits for the page, not for the first image.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.05
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_to_page(mcp: bool, cache: Path, temp: Path) -> float:
    """Seconds from starting `python app.py` to the first 200 on its page; the app is stopped afterwards."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSTANTID_", "GRADIO_"))}
    env.pop("SPACES_ZERO_GPU", None)
    env.update(INSTANTID_PRESET="tiny", INSTANTID_TINY_CACHE=str(cache), HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_TEMP_DIR=str(temp), GRADIO_MCP_SERVER="1" if mcp else "0")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with httpx.Client(timeout=2) as client:
            while time.perf_counter() - started < TIMEOUT_S:
                if proc.poll() is not None:
                    raise RuntimeError(f"app.py exited with {proc.returncode}")
                try:
                    if client.get(f"http://127.0.0.1:{port}/").status_code == 200:
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                time.sleep(POLL_S)
        raise RuntimeError(f"no page within {TIMEOUT_S} s")
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


# In a child process on the tiny preset: `import gradio` (which imports `mcp` whether MCP is served or not), the
# app's demo, then Gradio's MCP server object made for it, as `launch(mcp_server=True)` makes it.
CONSTRUCTION = """
import json, sys, time
started = time.perf_counter()
import gradio.mcp
imported = time.perf_counter()
import app
times = []
for _ in range(5):
    t = time.perf_counter()
    gradio.mcp.GradioMCPServer(app.demo)
    times.append(round((time.perf_counter() - t) * 1000, 1))
print(json.dumps({"import_gradio_s": round(imported - started, 2), "mcp_in_modules_after_import_gradio": True,
                  "mcp_server_object_ms": times}))
"""


def construction(cache: Path) -> dict:
    env = dict(os.environ, INSTANTID_PRESET="tiny", INSTANTID_TINY_CACHE=str(cache), HF_HUB_OFFLINE="1",
               INSTANTID_PRELOAD="0", GRADIO_ANALYTICS_ENABLED="False")
    check = "import sys, gradio; assert 'mcp' in sys.modules"
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", CONSTRUCTION], cwd=ROOT, env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mcp_startup", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per setting, taking turns (default 5)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "instantid" / "tiny-hub",
                   help="the tiny preset's cache (written on first use)")
    args = p.parse_args(argv)
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as temp:
        start_to_page(False, args.cache, Path(temp))  # warm-up: the tiny cache and the OS file cache
        for _ in range(args.runs):
            for name in ("off", "on"):
                seconds[name].append(round(start_to_page(name == "on", args.cache, Path(temp)), 2))
    medians = {name: round(statistics.median(values), 2) for name, values in seconds.items()}
    print(json.dumps({
        "benchmark": "mcp_startup", "runs": args.runs, "mcp_off_s": seconds["off"], "mcp_on_s": seconds["on"],
        "median_off_s": medians["off"], "median_on_s": medians["on"],
        "median_difference_s": round(medians["on"] - medians["off"], 2), **construction(args.cache),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
