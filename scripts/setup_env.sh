#!/usr/bin/env bash
# Create .venv with the pinned dev/test stack and provision a ComfyUI with this pack linked in.
# Idempotent: a second run only checks stamps (no downloads). Prints nothing but progress on stderr.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PHOTOSWAP_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
REQ="$ROOT/requirements/dev.txt"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
STAMP="$VENV/.photoswap-stamp"

want_stamp="$(cat "$REQ" "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want_stamp" ]; then
  echo "[setup] installing the pinned dev/test stack (torch pinned by $CONSTRAINTS; never torchaudio)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" -r "$REQ" >&2
  if "$VENV/bin/python" -m pip show torchaudio >/dev/null 2>&1; then
    echo "[setup] removing torchaudio (its CUDA build breaks transformers imports here)" >&2
    "$VENV/bin/python" -m pip uninstall -y torchaudio >&2
  fi
  "$VENV/bin/python" - <<'PYEOF' >&2
import torch, torchvision
assert torch.__version__.startswith("2.15.0"), f"torch was swapped: {torch.__version__}"
assert torchvision.__version__.startswith("0.29.2"), f"torchvision was swapped: {torchvision.__version__}"
PYEOF
  echo "$want_stamp" > "$STAMP"
fi
"$VENV/bin/python" "$ROOT/scripts/provision_comfyui.py" | tail -n 1
