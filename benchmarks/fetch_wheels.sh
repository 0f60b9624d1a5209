#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a GPU machine without network (Python 3.12, x86-64).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pyver=(--python-version 3.12 --implementation cp)
# The GPU image has torch, numpy, pandas and pyarrow; these are the versions this project pins or needs above
# what such an image tends to hold. wandb stays behind: the check logs to jsonl only.
for pkg in trl==1.16.0 transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
           huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 click==8.5.1 hf-xet==1.8.0 \
           tokenizers==0.23.3 safetensors==0.8.0 accelerate==1.15.0 peft==0.21.2 \
           fsspec==2026.9.0 hjson==3.1.0 py-cpuinfo==9.0.0 pydantic==2.14.4 pydantic_core==2.50.5 \
           annotated-types==0.8.0 typing-inspection==0.4.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: "${pyver[@]}" "${plat[@]}" -d .whl "$pkg"
done
# TRL 0.28.0 with the stack of its day (as benchmarks/setup_trl_baseline.sh pins it), for the throughput comparison:
# installed apart (--target /tmp/site-trl) and put first on the TRL run's path. The image's own requests, aiohttp,
# xxhash, pyarrow and pandas serve it too.
mkdir -p .whl/trl028
for pkg in trl==0.28.0 transformers==4.57.6 accelerate==1.12.0 datasets==4.5.0 huggingface_hub==0.36.2 \
           tokenizers==0.22.2 dill==0.4.0 multiprocess==0.70.18 fsspec==2025.10.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: "${pyver[@]}" "${plat[@]}" -d .whl/trl028 "$pkg"
done
# DeepSpeed is published as a source archive; build its (pure-Python, ops compiled on first use) wheel here.
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
ls -la .whl .whl/trl028
