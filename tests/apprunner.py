"""The real app for tests: `python app.py` as a Space runs it, on the tiny preset, loopback only.

One place for starting and stopping it, shared by the app, browser, hardening and load tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
# In the shared app's environment (conftest's tiny_app), as HF_TOKEN on a Space: it must never be shown.
SECRET_TOKEN = "hf_hardeningTestSecret0123456789abcdef"


def call_events(base: str, api_name: str, body: str, timeout: float = 120) -> tuple[str, Any]:
    """POST `body` (JSON text, sent as given) to `<base>gradio_api/call/<api_name>` as any HTTP client would, and
    read its event stream to the end: ("complete" | "error" | the last event seen, its data or None)."""
    url = f"{base.rstrip('/')}/gradio_api/call/{api_name}"
    answer = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    answer.raise_for_status()
    event = ""
    with httpx.stream("GET", f"{url}/{answer.json()['event_id']}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in ("complete", "error"):
                return event, json.loads(line[6:])
    return event, None


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
        """Stop the app and everything it started, and wait for them all.

        Terminating the app alone is not enough: under ZeroGPU `spaces` forks GPU workers that outlive it
        (six of them, 3.6 GB, stayed after a suite). The app runs in its own process group (its own session),
        so the group is signalled as a whole; the descendants are collected first because orphans leave the
        parent's tree but not its group.
        """
        stop_process_tree(self.proc)


def stop_process_tree(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM `proc`'s process group and every descendant, wait, then SIGKILL what is left, and reap `proc`."""
    family: list[psutil.Process] = []
    if proc.poll() is None:  # once reaped, its pid may belong to someone else: only its group is signalled
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the group (start_new_session made its id the app's pid)
        except (ProcessLookupError, PermissionError):
            pass
        for member in family:
            try:
                member.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        try:
            proc.wait(timeout=timeout)  # reaps our direct child (psutil cannot)
        except subprocess.TimeoutExpired:
            continue
        _, alive = psutil.wait_procs(family, timeout=timeout)
        family = alive
        if not alive:
            break
    else:
        proc.wait()


def start_app(tmp: Path, cache: Path, script: str = "app.py", command: list[str] | None = None, **env: str) -> App:
    """Start the app and wait until it serves its page; `env` adds or overrides environment variables.

    `script` runs instead of app.py (a harness that sets the app up, then runs app.py as __main__); `command`
    instead of `python script` (e.g. the README's `bash scripts/run.sh`).
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
        # Its own session: one process group holding the app and whatever it forks, stopped as one.
        proc = subprocess.Popen(command or [sys.executable, script], cwd=ROOT, env=full, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    app = App(proc, f"http://127.0.0.1:{port}/", log_path, temp_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            app.stop()  # whatever it forked before dying
            raise RuntimeError(f"{script} exited with {proc.returncode}:\n{app.log_text()[-4000:]}")
        try:
            if httpx.get(app.url, timeout=2).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    app.stop()
    raise RuntimeError(f"{script} did not answer within {START_TIMEOUT_S} s:\n{app.log_text()[-4000:]}")
