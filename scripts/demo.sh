#!/usr/bin/env bash
# The demo (README "Development"): set everything up like scripts/test.sh does, create the random SD1.5 checkpoint
# once, start the provisioned ComfyUI 0.3.75 headless with this pack, run the demo workflow (devtools/demo.py),
# print where the output went, stop the server.
#   bash scripts/demo.sh            run the demo workflow once
#   bash scripts/demo.sh --serve    start ComfyUI with the pack and leave it running (prints the URL; Ctrl-C stops it)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PHOTOSWAP_VENV:-$ROOT/.venv}"
cd "$ROOT"

bash scripts/setup_env.sh >/dev/null
"$VENV/bin/python" scripts/make_checkpoints.py >/dev/null
exec "$VENV/bin/python" scripts/run_demo.py "$@"
