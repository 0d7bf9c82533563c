#!/usr/bin/env bash
# The README's test command: installs what the tests need, then lint + the whole offline suite.
#   bash scripts/test.sh            everything (browser and app-server tests included)
#   bash scripts/test.sh --quick    the in-process tests only (-m "not slow and not browser"): every module
#                                   of instantid/, no app server, no browser, no `python -m` generation
# Any other arguments go to pytest (e.g. a file, -k NAME, -x).
set -euo pipefail
selection=()
if [[ "${1:-}" == "--quick" ]]; then
  shift
  selection=(-m "not slow and not browser")
fi
cd "$(dirname "$0")/.."
# torch==2.13.0 is the CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" -r <(grep -v "^-r requirements.txt" requirements-dev.txt; grep -v "^torch==" requirements.txt)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # The browser test drives Debian's Chromium (never `playwright install`); it skips with a reason if absent.
  apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || echo "chromium not installed: the browser test will skip"
fi
ruff check .
# The slowest tests are listed at the end of every run, to keep the suite within its time (docs/testing.md).
python -m pytest -q --durations=15 ${selection[@]+"${selection[@]}"} "$@"
