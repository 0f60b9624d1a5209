#!/usr/bin/env bash
# Create <repo>/.venv-trl for benchmarks/trl_baseline.py: TRL 0.28.0 with the library versions it was released
# against, separate from the project's own virtualenv (which has TRL 1.x and transformers 5.x).
#
#     bash benchmarks/setup_trl_baseline.sh        # PYTHON=python3.11 to choose the interpreter
#
# Does nothing when the virtualenv already has every pinned version.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv-trl"
py="$venv/bin/python"

# The same torch as the project's own benchmark, so that the comparison is between trainers and not between kernels.
# Installed first and alone: here it is the CPU wheel on local disk; left to resolve with TRL, pip could fetch a
# multi-GB CUDA build.
torch_pin="torch==2.13.0"

# The stack of TRL 0.28.0's release (2026-02-10): the newest release of each library from before that day that
# TRL 0.28.0 accepts.
# - transformers 4.57.6 (2026-01-16): TRL 0.28.0 requires >=4.56.2 and its PPOTrainer still carries code for the 4.x
#   line (non-reentrant checkpointing default, the generation-config override for transformers#42762). It also runs
#   on transformers 5.24 (tried: same losses and rewards), but only through 5.x deprecation shims
#   (`gradient_checkpointing` -> `activation_checkpointing`, `generation_config` passed with generation kwargs), and
#   5.24 is nine months newer than this TRL: not the TRL 0.28.0 that users ran.
# - huggingface_hub 0.36.2 and tokenizers 0.22.2: the newest releases transformers 4.57.6 accepts (it needs
#   huggingface_hub < 1.0 and tokenizers < 0.23).
# - accelerate 1.12.0 (1.13.0 came out after TRL 0.28.0) and datasets 4.5.0: current on TRL 0.28.0's release day.
pins=(
  trl==0.28.0
  transformers==4.57.6
  accelerate==1.12.0
  datasets==4.5.0
  huggingface_hub==0.36.2
  tokenizers==0.22.2
)

installed() {
  # Exit 0 when the virtualenv has exactly the versions given as NAME==VERSION arguments.
  [[ -x "$py" ]] && "$py" - "$@" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version

for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if have.split("+")[0] != wanted:
        sys.exit(1)
EOF
}

if installed "$torch_pin" "${pins[@]}"; then
  echo "$venv already has ${pins[*]} and $torch_pin" >&2
  exit 0
fi

"${PYTHON:-python3}" -m venv "$venv"
"$py" -m pip install --quiet "$torch_pin"
"$py" -m pip install --quiet "${pins[@]}"
"$py" -m pip check
installed "$torch_pin" "${pins[@]}"
echo "$venv: $("$py" -c 'import torch, transformers, trl; print("torch", torch.__version__, "transformers",
  transformers.__version__, "trl", trl.__version__)')" >&2
