"""Server fixtures: a real headless ComfyUI (provisioned, `--cpu`, loopback) with this pack and the random SD1.5
checkpoint, one per test module. Use from a test module with `from fixtures_server import comfy_server  # noqa: F401`
(or `pytest_plugins = ["fixtures_server"]` in the root conftest).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # append: the pack's nodes/ must not shadow ComfyUI's nodes.py


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    """A started `devtools.server.ComfyServer` (random-sd15.safetensors in its checkpoints folder).

    Stopped by PID when the module's tests are done, also when they fail. Its log: `comfy_server.log_path`."""
    from devtools.server import ComfyServer

    server = ComfyServer(workdir=tmp_path_factory.mktemp("comfy_server"), checkpoints=("sd15",))
    try:
        server.start()
        print(f"\n[comfy_server] {server.url} pid {server.pid} ready in {server.startup_seconds:.1f} s "
              f"(log {server.log_path})")
        yield server
    finally:
        server.stop()
