"""The README's first Development command ends by running example workflow 1 on a headless ComfyUI
(`scripts/demo.sh` → `scripts/run_demo.py`): here at 64 px and 2 steps, in a subprocess, as a user runs it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_demo_runs_workflow_1_and_reports_its_outputs():
    from PIL import Image

    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "run_demo.py"), "--size", "64", "--steps", "2",
           "--inner-iterations", "1", "--timeout", "900"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200, env=dict(os.environ))
    assert proc.returncode == 0, f"demo failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    out = proc.stdout
    assert "RANDOM WEIGHTS were used" in out
    assert "pack import:" in proc.stderr and "NOT FOUND" not in proc.stderr
    paths = {}
    for role in ("swapped image", "source reconstruction", "attention previews"):
        found = re.findall(rf"^  {re.escape(role)}[^:]*: (.+)$", out, flags=re.M)
        assert found, f"the demo did not report its {role}:\n{out}"
        assert all(Path(p).is_file() for p in found), found
        paths[role] = found
    for role in ("swapped image", "source reconstruction"):
        with Image.open(paths[role][0]) as image:
            assert image.size == (64, 64), (role, image.size)
