"""The real app for tests: `python app.py` as a Space runs it, on the tiny preset, loopback only.

One place for starting and stopping it, shared by the app, browser, hardening and load tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class App:
    proc: subprocess.Popen
    url: str
    log: Path
    temp_dir: Path  # GRADIO_TEMP_DIR: where Gradio keeps uploads and results

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_app(tmp: Path, cache: Path, script: str = "app.py", **env: str) -> App:
    """Start the app and wait until it serves its page; `env` adds or overrides environment variables.

    `script` runs instead of app.py (a harness that sets the app up, then runs app.py as __main__).
    """
    port = free_port()
    temp_dir = tmp / "gradio-temp"
    full = {k: v for k, v in os.environ.items() if not k.startswith(("INSTANTID_", "GRADIO_"))}
    full.pop("SPACES_ZERO_GPU", None)  # never pretend to be on ZeroGPU
    full.update(
        INSTANTID_PRESET="tiny",
        HF_HUB_OFFLINE="1",
        INSTANTID_TINY_CACHE=str(cache),
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        GRADIO_TEMP_DIR=str(temp_dir),
        PYTHONUNBUFFERED="1",
    )
    full.update(env)
    log_path = tmp / "app.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, script], cwd=ROOT, env=full, stdout=log, stderr=subprocess.STDOUT)
    app = App(proc, f"http://127.0.0.1:{port}/", log_path, temp_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{script} exited with {proc.returncode}:\n{app.log_text()[-4000:]}")
        try:
            if httpx.get(app.url, timeout=2).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    app.stop()
    raise RuntimeError(f"{script} did not answer within {START_TIMEOUT_S} s:\n{app.log_text()[-4000:]}")
