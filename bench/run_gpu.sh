#!/usr/bin/env bash
# The whole GPU benchmark run (issue: "keep the GPU run as one documented command"), for a CUDA machine with the
# dev setup available (scripts/setup_env.sh needs PyPI for the pinned torch CUDA build):
#   bash bench/run_gpu.sh
# 1. venv + ComfyUI 0.3.75 (scripts/setup_env.sh), the random SD1.5 and SDXL checkpoints (2.1 + 6.9 GB, once);
# 2. the suite at SD1.5 512 px (ComfyUI's default dtype, fp16 on most GPUs) with CUDA sync counting, at SD1.5 512 px
#    in bf16, and at SDXL 1024 px; each writes bench/results/<family>-<size>-cuda[...].json;
# 3. BENCHMARKS.md and the README's Performance block re-rendered from all results.
# Commit bench/results/*.json, BENCHMARKS.md and README.md afterwards. Extra arguments go to every run_bench.py call.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PHOTOSWAP_VENV:-$ROOT/.venv}"
cd "$ROOT"

bash scripts/setup_env.sh >/dev/null
"$VENV/bin/python" scripts/make_checkpoints.py --sdxl >/dev/null
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"

run() { "$VENV/bin/python" bench/run_bench.py --device cuda --steps 50 "$@"; }
run --family sd15 --size 512 --sync-debug "$@"
run --family sd15 --size 512 --dtype bf16 --json bench/results/sd15-512-cuda-bf16.json "$@"
run --family sdxl --size 1024 "$@"
"$VENV/bin/python" bench/render_benchmarks.py
