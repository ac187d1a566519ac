"""Where saved inversions live: output/photoswap (what Save Inversion writes) and ComfyUI's input folder (what
Load Inversion lists), with paths confined to those folders."""
from __future__ import annotations

import os

import folder_paths

from .errors import PhotoswapInputError

SAVE_SUBFOLDER = "photoswap"
NO_FILES = "(no saved inversions)"


def save_path(filename_prefix: str) -> str:
    """output/photoswap/<prefix>_NNNNN.safetensors with the next free counter (never outside output/photoswap)."""
    import re

    root = os.path.join(os.path.abspath(folder_paths.get_output_directory()), SAVE_SUBFOLDER)
    os.makedirs(root, exist_ok=True)
    prefix = (filename_prefix or "inversion").strip() or "inversion"
    try:
        folder, filename, _, _, _ = folder_paths.get_save_image_path(prefix, root)
    except Exception as exc:  # noqa: BLE001 — ComfyUI raises a bare Exception for paths outside the folder
        raise PhotoswapInputError("filename_prefix", f"a file name inside output/{SAVE_SUBFOLDER} (got {prefix!r})",
                                  "remove '..' and absolute paths from the prefix") from exc
    os.makedirs(folder, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(filename)}_(\d+)\.safetensors$")
    used = [int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m]
    counter = max(used, default=0) + 1
    return os.path.join(folder, f"{filename}_{counter:05d}.safetensors")


def saved_inversion_files() -> list[str]:
    """Combo entries: output/photoswap/** as 'photoswap/… [output]' (newest first), then input/** .safetensors."""
    entries = []
    out_dir = os.path.abspath(folder_paths.get_output_directory())
    root = os.path.join(out_dir, SAVE_SUBFOLDER)
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".safetensors"):
                full = os.path.join(dirpath, name)
                try:
                    found.append((-os.path.getmtime(full), os.path.relpath(full, out_dir)))
                except OSError:
                    continue
    entries += [f"{rel.replace(os.sep, '/')} [output]" for _, rel in sorted(found)]
    in_dir = os.path.abspath(folder_paths.get_input_directory())
    inputs = []
    for dirpath, dirs, files in os.walk(in_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        inputs += [os.path.relpath(os.path.join(dirpath, n), in_dir).replace(os.sep, "/")
                   for n in files if n.endswith(".safetensors")]
    entries += sorted(inputs)
    return entries or [NO_FILES]


def resolve_inversion_file(name: str) -> str:
    """Absolute path of a combo entry, refusing anything outside output/photoswap and the input folder."""
    if not name or name == NO_FILES:
        raise PhotoswapInputError("inversion_file", "a saved inversion (none found in output/photoswap or input)",
                                  "run Photoswap Null-Text DDIM Inversion → Photoswap Save Inversion first, or copy a "
                                  ".safetensors inversion into ComfyUI's input folder, then refresh")
    path = os.path.abspath(folder_paths.get_annotated_filepath(name))
    allowed = (os.path.join(os.path.abspath(folder_paths.get_output_directory()), SAVE_SUBFOLDER),
               os.path.abspath(folder_paths.get_input_directory()))
    if not any(os.path.commonpath((root, path)) == root for root in allowed):
        raise PhotoswapInputError("inversion_file", f"a file in output/{SAVE_SUBFOLDER} or the input folder "
                                                    f"(got {name!r})", "pick a file from the list")
    return path
