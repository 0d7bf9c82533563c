#!/usr/bin/env bash
# The prepared run for a lent GPU machine (one call of the device tool): the GPU tests, then the GPU
# benchmark, recorded in BENCHMARKS.md. That machine has torch but no diffusers or insightface and no
# network: carry them as wheels in .whl/ (BENCHMARKS.md says how). Logs and the updated
# BENCHMARKS.md land in $OUT (or artifacts/gpu) so they come back with the call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-artifacts/gpu}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
export BENCH_GPU_BUDGET_S="${BENCH_GPU_BUDGET_S:-240}"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 -m pip list >"$OUT/pip-list.txt" 2>&1
timeout "${GPU_TEST_TIMEOUT_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
if [ "${GPU_CHECK_BENCH:-1}" = "1" ]; then  # GPU_CHECK_BENCH=0: the GPU tests alone (about a minute)
  timeout "${GPU_BENCH_TIMEOUT_S:-400}" python3 -m instantid bench gpu --record 2>&1 | tee "$OUT/bench_gpu.log"
  cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
fi
