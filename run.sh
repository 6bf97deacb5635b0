#!/usr/bin/env bash
# Sets up .venv on a fresh machine (CPU torch 2.13.0 + requirements.txt), then runs the removal:
#   bash run.sh VIDEO MASK OUTPUT --models /path/to/ComfyUI/models [options]   (real weights)
#   bash run.sh --demo DIR     (tiny random weights + a synthetic clip: proves the install end to end)
# On a CUDA machine install the matching CUDA torch into .venv first; this script keeps an existing torch.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet torch==2.13.0
fi
python -m pip install --quiet -r requirements.txt
if [ "${1:-}" = "--demo" ]; then
  shift
  exec python -m diffueraser_core demo "${1:-demo_out}"
fi
exec python -m diffueraser_core remove "$@"
