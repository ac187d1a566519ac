"""Import the provisioned ComfyUI in-process (CPU) and this pack as a package, for tests, benchmarks and the demo.

The pack is imported under the package name `comfyui_photoswap` (the folder can have any name; all internal imports
are relative), so node classes and `photoswap_core` are the same module objects everywhere in one process.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_PACKAGE = "comfyui_photoswap"
_state: dict = {}


def comfyui_path() -> Path:
    """The ComfyUI to use: $COMFYUI_PATH, else the provisioned one (provisioning it if needed)."""
    if "path" in _state:
        return _state["path"]
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "provision_comfyui.py")],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not provision ComfyUI:\n{result.stderr.strip()}")
    path = Path(result.stdout.strip().splitlines()[-1])
    _state["path"] = path
    return path


def bootstrap(fp32_text_enc: bool = True, cpu: bool | None = None):
    """Make ComfyUI importable and configure it like `main.py --cpu [--fp32-text-enc]` would. Idempotent.

    fp32 text encoding is used in-process so numeric tests can compare embeddings tightly (ComfyUI encodes text in
    fp16 by default even on CPU). `cpu` defaults to True unless PHOTOSWAP_DEVICE=cuda (benchmarks on a GPU).
    """
    if _state.get("booted"):
        return _state["path"]
    path = comfyui_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if cpu is None:
        cpu = os.environ.get("PHOTOSWAP_DEVICE", "cpu") == "cpu"
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = cpu
    args.fp32_text_enc = fp32_text_enc
    args.disable_all_custom_nodes = True
    # ComfyUI picks sub-quadratic attention on CPU, ~20x slower than PyTorch SDPA at 4096 tokens; tests and
    # benchmarks use SDPA, the kernel ComfyUI uses on CUDA (the server fixture passes --use-pytorch-cross-attention).
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (reads args at import time)
    import folder_paths  # noqa: F401

    import_pack()
    _state["booted"] = True
    return path


def import_pack():
    """Import this checkout as the package `comfyui_photoswap` (ComfyUI itself must be importable)."""
    if PACK_PACKAGE in sys.modules:
        return sys.modules[PACK_PACKAGE]
    spec = importlib.util.spec_from_file_location(PACK_PACKAGE, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_PACKAGE] = module
    spec.loader.exec_module(module)
    return module
