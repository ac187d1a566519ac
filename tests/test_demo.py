"""The README's first Development command ends by running example workflow 1 on a headless ComfyUI
(`scripts/demo.sh` → `scripts/run_demo.py`), in a subprocess, as a user runs it: on the toy world (the default: the
trained toy model, scored against the photo's ground truth) and on the random SD1.5 checkpoint (64 px, 2 steps)."""
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

    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "run_demo.py"), "--random-sd15", "--size", "64", "--steps",
           "2", "--inner-iterations", "1", "--timeout", "900"]
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


@pytest.mark.e2e
def test_demo_on_the_toy_world_scores_a_real_swap():
    """The default demo: the toy model through the Concept Loader's diffusers-folder source, progress printed while it
    runs, the swapped image scored (the swap's quality floors are tests/test_toyworld.py's; here: it ran and scored)."""
    from toyworld import model_io as M

    if not M.trained():
        pytest.skip(M.NOT_TRAINED)
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "run_demo.py"), "--steps", "10", "--inner-iterations", "2",
           "--timeout", "900"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200, env=dict(os.environ))
    assert proc.returncode == 0, f"demo failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "RANDOM WEIGHTS" not in proc.stdout and "toy world" in proc.stdout
    assert re.search(r"^\[demo\]   10/10$", proc.stderr, flags=re.M), proc.stderr[-3000:]  # sampler progress
    scores = re.search(r"concept found (True|False), in place (True|False).*background PSNR outside the subjects "
                       r"([0-9.]+) dB.*reconstruction PSNR ([0-9.]+) dB", proc.stdout)
    assert scores, proc.stdout
    figure = re.findall(r"^  photo \| reconstruction \| swapped: (.+)$", proc.stdout, flags=re.M)
    assert figure and Path(figure[0]).is_file()
