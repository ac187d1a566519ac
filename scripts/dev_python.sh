#!/usr/bin/env bash
# Print the Python that runs the tests, benchmarks and scripts: $PHOTOSWAP_PYTHON when set (an interpreter that already
# holds the stack: the offline GPU machines, see scripts/device_env.sh), else the dev venv, set up first
# (scripts/setup_env.sh: a no-op when done before; its progress goes to stderr).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PHOTOSWAP_PYTHON:-}" ]; then
  echo "$PHOTOSWAP_PYTHON"
  exit 0
fi
bash "$ROOT/scripts/setup_env.sh" >/dev/null
echo "${PHOTOSWAP_VENV:-$ROOT/.venv}/bin/python"
