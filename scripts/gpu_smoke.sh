#!/usr/bin/env bash
# GPU smoke check of the cluster code route (under 10 minutes on one GPU); writes a JSON report.
#   bash scripts/gpu_smoke.sh                      # Qwen2.5-VL-3B architecture, random weights, bf16 on the GPU
#   bash scripts/gpu_smoke.sh --model /models/Qwen--Qwen2.5-VL-3B-Instruct/<rev>   # real weights
#   bash scripts/gpu_smoke.sh --tiny               # the tiny model on CPU (what CI runs)
# Options: --out FILE (default gpu_smoke.json), --prompts N, --pool K.  Exit 1 if a check failed.
# Inside the GPU image run `python -m lever.bench.gpu_smoke ...` (same options).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then bash scripts/install.sh; fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m lever.bench.gpu_smoke "$@"
