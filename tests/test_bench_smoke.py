"""The benchmark suite runs end to end on the tiny SD1.x model (a smoke test: ratios are printed, never asserted).

`bench/run_bench.py --family tiny --size 64 --steps 4 --inner-iterations 2` in a subprocess (its own ComfyUI import,
as a user runs it); the JSON must hold every stage with a positive time, a ratio to the plain pass, UNet work and a
memory peak, plus the trace's size. Run with `pytest -s -m integration tests/test_bench_smoke.py` to see the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest



REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = ["plain", "plain_custom", "inversion_ddim", "inversion_negative_prompt", "inversion_direct",
          "inversion_null_text", "record", "swap_trace", "swap_lockstep", "e2e_direct", "e2e_direct_lockstep",
          "e2e_null_text", "e2e_null_text_lockstep"]


@pytest.mark.integration
def test_bench_suite_tiny(tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "run_bench.py"), "--family", "tiny", "--size", "64",
           "--steps", "4", "--inner-iterations", "2", "--threads", "1", "--clip-frames", "2", "--json", str(out)]
    env = dict(os.environ, PHOTOSWAP_DEVICE="cpu")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"run_bench.py failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    print("\n" + proc.stdout)
    result = json.loads(out.read_text())
    stages = result["stages"]
    missing = [s for s in STAGES if s not in stages]
    assert not missing, f"stages missing from the JSON: {missing}"
    for name in STAGES:
        stage = stages[name]
        assert "error" not in stage, f"{name} failed: {stage['error']}"
        assert stage["seconds"] > 0 and stage["ratio"] > 0, (name, stage)
        assert stage["peak_bytes"] > 0, (name, stage)
    assert stages["plain"]["ratio"] == 1.0
    assert stages["plain"]["unet_calls"] == 4  # N steps, one batched cond+uncond call each
    assert stages["swap_lockstep"]["unet_calls"] == 2 * stages["swap_trace"]["unet_calls"]
    for name in ("swap_trace", "swap_lockstep", "inversion_direct", "inversion_null_text"):
        assert stages[name]["target_ratio"] > 0
    trace = result["trace"]
    assert trace["trace_nbytes"] > trace["trace_store_nbytes"] > 0
    meta = result["meta"]
    for key in ("device_name", "dtype", "torch", "comfyui", "size", "steps", "memory_method"):
        assert meta.get(key), key
    clips = result["clips"]  # --clip-frames: the clip report on the same models, in the same process
    assert set(clips["modes"]) == {"off", "first", "keyframes"} and clips["frames"] == 2, clips
    for mode, entry in clips["modes"].items():
        assert entry["seconds_per_frame"] > 0 and entry["ratio_to_single"] > 0, (mode, entry)
    print("ratios: " + ", ".join(f"{name} {stages[name]['ratio']:.2f}x" for name in STAGES))


@pytest.mark.unit
def test_benchmark_documents_match_the_results():
    """BENCHMARKS.md and the README's Performance block are exactly what bench/render_benchmarks.py makes of
    bench/results/*.json: no figure in them was typed by hand or left stale."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "render_benchmarks.py"), "--check"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.integration
def test_flux_bench_tiny(tmp_path):
    """bench/bench_flux.py on the tiny Flux: every stage runs, and the counted work is what the design says (the
    inversion and a trace swap are one pass each, one model row per step; the Recorder completes the inversion's
    recording with one call; lockstep is two rows per step; the midpoint inversion two calls per step and a closer
    unpinned round trip)."""
    out = tmp_path / "flux.json"
    steps = 3
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "bench_flux.py"), "--steps", str(steps), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, PHOTOSWAP_DEVICE="cpu"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"bench_flux.py failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    print("\n" + proc.stdout)
    stages = json.loads(out.read_text())["stages"]
    assert stages["plain"]["unet_calls"] == steps and stages["plain"]["unet_rows"] == steps  # cfg 1: no uncond row
    for name in ("inversion_direct", "swap_trace"):
        assert stages[name]["unet_rows"] == steps, (name, stages[name])
    assert stages["record"]["unet_rows"] == 1, stages["record"]
    assert stages["inversion_midpoint"]["unet_rows"] == 2 * steps, stages["inversion_midpoint"]
    assert stages["inversion_midpoint"]["round_trip_error"] < stages["inversion_direct"]["round_trip_error"]
    assert stages["swap_lockstep"]["unet_rows"] == 2 * steps, stages["swap_lockstep"]
    assert stages["e2e"]["unet_rows"] == 2 * steps + 1, stages["e2e"]
    for name, stage in stages.items():
        assert stage["seconds"] > 0 and stage["ratio"] > 0, (name, stage)
