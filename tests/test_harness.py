"""The test harness itself: what a test starts is stopped with everything it forked, and strays are found."""

from __future__ import annotations

import subprocess
import sys

import psutil

from tests import apprunner, conftest

# A parent that forks a child and dies on SIGTERM: the child is orphaned, as `spaces`' GPU workers were.
PARENT = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "time.sleep(120)\n"
)


def _started_with_a_child() -> tuple[subprocess.Popen, psutil.Process]:
    proc = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    parent = psutil.Process(proc.pid)
    for _ in range(200):
        children = parent.children()
        if children:
            return proc, children[0]
        psutil.wait_procs([parent], timeout=0.05)
    raise AssertionError("the child never started")


def test_stopping_an_app_stops_what_it_forked() -> None:
    proc, child = _started_with_a_child()
    assert child.pid in {p.pid for p in conftest.left_behind()}, "spawned processes carry the session mark"
    apprunner.stop_process_tree(proc)
    assert proc.returncode is not None
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert child.pid not in {p.pid for p in conftest.left_behind()}


def test_an_orphan_is_still_stopped_through_its_group() -> None:
    """The parent died first (its children reparented away from it): its process group still reaches them."""
    proc, child = _started_with_a_child()
    psutil.Process(proc.pid).kill()
    proc.wait()
    assert child.is_running()
    apprunner.stop_process_tree(proc)
    psutil.wait_procs([child], timeout=15)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
