#!/usr/bin/env bash
# The one prepared check for a GPU machine (<= 9 minutes), printing one JSON line (benchmarks/gpu_check.py):
#   --part throughput  both PPO throughput benchmarks (ours and TRL 0.28's PPOTrainer) on GPT-2 12x768 in bfloat16
#   --part zero        SFT, reward and PPO training under DeepSpeed ZeRO-3 and ZeRO-2 through accelerate
#   (default: both, throughput first)
#
# The GPU machine has torch, transformers, peft and accelerate but no network: the packages it lacks travel as
# wheels in .whl/, and TRL 0.28's own stack (transformers 4.57 ...) in .whl/trl028/ (make both with
# benchmarks/fetch_wheels.sh on a machine with network). Run from the repo root:
#   bash benchmarks/gpu_check.sh [--part all|throughput|zero]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
if compgen -G ".whl/trl028/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-trl \
    .whl/trl028/*.whl
  export TRL_SITE=/tmp/site-trl
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 540 python3 benchmarks/gpu_check.py "$@"
