#!/usr/bin/env bash
# The one prepared check for a GPU machine (<= 9 minutes): SFT and reward training under DeepSpeed ZeRO-2 and
# ZeRO-3 through accelerate, on randomly initialised models, printing one JSON line.
#
# The GPU machine has torch, transformers, peft and accelerate but no network: the packages it lacks travel as
# wheels in .whl/ (make them with benchmarks/fetch_wheels.sh on a machine with network). Run from the repo root:
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 540 python3 benchmarks/gpu_check.py "$@"
