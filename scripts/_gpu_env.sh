# Sourced by the device scripts (gpu_train.sh, gpu_followup.sh): where the repo, the output folder
# and Python are, and an offline, unbuffered environment. Sets REPO, OUT, PY.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:?set OUT to the folder that should receive the results}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
