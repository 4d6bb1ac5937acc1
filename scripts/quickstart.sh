#!/usr/bin/env bash
# One command from a fresh clone: set up, then fine-tune SmolLM2-135M-Instruct on the bundled
# instruction data on CPU, offline. Extra arguments override recipe fields, e.g. --max_steps 4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/accelerate launch --config_file accelerate_configs/cpu.yaml \
    recipes/sft.py --config recipes/configs/sft_smollm2.yaml "$@"
