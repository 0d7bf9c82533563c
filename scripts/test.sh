#!/usr/bin/env bash
# The README's test command: installs what the tests need, then lint + the whole offline suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch==2.13.0 is the CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" -r <(grep -v "^-r requirements.txt" requirements-dev.txt; grep -v "^torch==" requirements.txt)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # The browser test drives Debian's Chromium (never `playwright install`); it skips with a reason if absent.
  apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || echo "chromium not installed: the browser test will skip"
fi
ruff check .
python -m pytest -q "$@"
