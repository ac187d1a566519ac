#!/usr/bin/env bash
# The test command (README "Development", and .ci/run): set up (venv + pinned stack + provisioned ComfyUI 0.3.75;
# a no-op when done before), create the random SD1.5 checkpoint once per cache, then run every test tier but `slow`.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh -k foundation`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="$(bash scripts/dev_python.sh)"
"$PY" scripts/make_checkpoints.py >/dev/null

set +e
"$PY" -m pytest -m "not slow" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests (exit 5) - treated as a failure" >&2
fi
exit "$rc"
