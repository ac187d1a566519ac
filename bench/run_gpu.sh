#!/usr/bin/env bash
# The whole GPU benchmark run (issue: "keep the GPU run as one documented command"), for a CUDA machine with the
# dev setup available (scripts/setup_env.sh needs PyPI for the pinned torch CUDA build):
#   bash bench/run_gpu.sh
# 1. venv + ComfyUI 0.3.75 (scripts/setup_env.sh), the random SD1.5 and SDXL checkpoints (2.1 + 6.9 GB, once);
# 2. the suite at SD1.5 512 px (ComfyUI's default dtype, fp16 on most GPUs) with CUDA sync counting, at SD1.5 512 px
#    in bf16, and at SDXL 1024 px; each writes bench/results/<family>-<size>-cuda[...].json;
# 3. BENCHMARKS.md and the README's Performance block re-rendered from all results.
# Commit bench/results/*.json, BENCHMARKS.md and README.md afterwards. Extra arguments go to every run_bench.py call.
# PHOTOSWAP_GPU_RUNS picks runs (default "sd15 sd15-bf16 sdxl"; split them over calls where one call's time is short);
# "flux" is Flux at 1024 px, 28 steps (bench/bench_flux.py: Flux-dev's 19 double + 38 single blocks, random bf16
# weights as UNETLoader loads them, built once by devtools/flux_checkpoints.py: ~24 GB of disk and a few minutes).
# On the workplace's lent GPU machine (no registries): `source scripts/device_env.sh` first (bench/README.md); it sets
# PHOTOSWAP_PYTHON, and then no venv is made.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${PHOTOSWAP_GPU_RUNS:-sd15 sd15-bf16 sdxl}"
cd "$ROOT"

PY="$(bash scripts/dev_python.sh)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
case " $RUNS " in *" sdxl "*) "$PY" scripts/make_checkpoints.py --sdxl >/dev/null ;;
                  *) "$PY" scripts/make_checkpoints.py >/dev/null ;; esac

run() { "$PY" bench/run_bench.py --device cuda --steps 50 "$@"; }
for name in $RUNS; do
  case "$name" in
    sd15) run --family sd15 --size 512 --sync-debug --null-text-caps 1,2,5 "$@" ;;
    sd15-bf16) run --family sd15 --size 512 --dtype bf16 --json bench/results/sd15-512-cuda-bf16.json "$@" ;;
    sdxl) run --family sdxl --size 1024 "$@" ;;
    flux) "$PY" bench/bench_flux.py --family flux-d19s38 --size 1024 --steps 28 --device cuda \
            --json bench/results/flux/flux-d19s38-1024-cuda.json ;;
    *) echo "run_gpu: unknown run '$name' in PHOTOSWAP_GPU_RUNS (sd15, sd15-bf16, sdxl, flux)" >&2; exit 2 ;;
  esac
done
"$PY" bench/render_benchmarks.py
