#!/usr/bin/env bash
# The GPU check of the memory and speed levers, on one H100/H200 with no network, in a few minutes:
# installs what the machine lacks from wheels carried in .whl/ (e.g. datasets, deepspeed, gguf), checks the
# levers' exactness in bf16 on CUDA and FSDP2 (accelerate_configs/fsdp2.yaml on every GPU, resumed from a
# checkpoint) against the unsharded run, and measures tokens/s, MFU and peak memory of 0.5B- and 1.5B-shaped
# models (random init) with packing, the chunked loss, activation checkpointing and compilation; then the
# QLoRA rows (LoRA fp32/bf16, QLoRA nf4, 8-bit AdamW: peak memory next to the plan's estimate; carry the
# bitsandbytes and peft wheels where the image lacks them) and a GRPO row (sampling and step time).
#   bash bench/gpu_check.sh H200-SXM          # writes bench/results/h200-sxm.json
#   bash bench/gpu_check.sh --dry-run         # the same steps on tiny shapes on this machine's CPU
# Needs the default model's tokenizer in .cache/models (`recipes prepare`), carried with the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--dry-run" ]; then
    exec "$PYTHON" -m bench.gpu_check --dry-run --out "${2:-/tmp/gpu_check_dry_run.json}"
fi
GPU=${1:?name the GPU as recipes plan --gpu does, e.g. H200-SXM}
exec "$PYTHON" -m bench.gpu_check --gpu "$GPU" --out "bench/results/$(echo "$GPU" | tr '[:upper:]' '[:lower:]').json"
