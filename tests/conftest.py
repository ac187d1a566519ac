"""Shared fixtures: an in-process real ComfyUI (CPU, fp32 text encoders), this pack, tiny model sets, parity data.

The repo root is appended (not prepended) to sys.path so that ComfyUI's top-level `nodes` module is never shadowed by
this pack's `nodes/` package.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from devtools.comfy_env import bootstrap  # noqa: E402

# Import ComfyUI before collection: pytest imports the pack's root __init__.py (which imports comfy_api) while
# collecting, because the repo root is itself a package.
bootstrap()

SHARED_PARITY = REPO_ROOT.parent / "shared" / "parity"


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process like `main.py --cpu --fp32-text-enc`; returns its path."""
    return bootstrap()


@pytest.fixture(scope="session")
def pack(comfy):
    return sys.modules["comfyui_photoswap"]


def _tiny(family):
    from devtools.tiny_models import build_tiny

    return build_tiny(family, seed=0)


@pytest.fixture(scope="session")
def tiny_sd15(comfy):
    return _tiny("sd15")


@pytest.fixture(scope="session")
def tiny_sd2v(comfy):
    return _tiny("sd2v")


@pytest.fixture(scope="session")
def tiny_sdxl(comfy):
    return _tiny("sdxl")


@pytest.fixture(scope="session")
def parity_dir():
    """../shared/parity: required in CI (CI=true), skipped with a reason elsewhere when absent."""
    if not (SHARED_PARITY / "manifest.json").exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"parity data missing at {SHARED_PARITY}: CI must run with ../shared beside the checkout")
        pytest.skip(f"parity data not found at {SHARED_PARITY} (place ../shared beside the checkout)")
    return SHARED_PARITY
