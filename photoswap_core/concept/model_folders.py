"""Which file or folder in ComfyUI's model folders an input names, and what the node's file combos offer.

Checkpoints come from models/checkpoints, diffusers pipelines from models/diffusers, LoRAs from models/loras and
textual-inversion embeddings from models/embeddings (ComfyUI's `folder_paths`, extra_model_paths.yaml included).
"""
from __future__ import annotations

import os

from ..errors import PhotoswapInputError
from .choices import NONE_CHOICE


def short_list(names, limit: int = 30) -> str:
    """Names for an error message: the first `limit`, then how many more."""
    names = list(names)
    if not names:
        return "none"
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def file_choices(folder: str) -> list[str]:
    """The node's combo for a model folder: NONE_CHOICE, then the files ComfyUI lists there."""
    import folder_paths

    return [NONE_CHOICE] + folder_paths.get_filename_list(folder)


def resolve_file(folder: str, name: str, input_name: str, what: str) -> str:
    """The full path of `name` in models/<folder>; PhotoswapInputError (listing what exists) when it is not there."""
    import folder_paths

    available = folder_paths.get_filename_list(folder)
    if not name or name == NONE_CHOICE:
        raise PhotoswapInputError(input_name, f"a {what} from models/{folder}",
                                  f"pick one in {input_name} (available: {short_list(available)})")
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        raise PhotoswapInputError(input_name, f"a {what} that exists in models/{folder}",
                                  f"'{name}' was not found; available: {short_list(available)}")
    return path


def list_diffusers_folders() -> list[str]:
    """Folders under models/diffusers that look like pipelines (hold model_index.json), relative names."""
    import folder_paths

    out = set()
    for base in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            if "model_index.json" in files:
                out.add(os.path.relpath(root, base).replace(os.sep, "/"))
                dirs[:] = []  # a pipeline's subfolders are its components
    return sorted(out)


def diffusers_folder_choices() -> list[str]:
    """The node's diffusers_folder combo: NONE_CHOICE, then the pipeline folders."""
    return [NONE_CHOICE] + list_diffusers_folders()


def resolve_diffusers_folder(name: str) -> str:
    """The full path of a pipeline folder under models/diffusers (never outside it)."""
    import folder_paths

    if not name or name == NONE_CHOICE:
        raise PhotoswapInputError("diffusers_folder", "a diffusers pipeline folder under models/diffusers",
                                  "pick the DreamBooth output folder in diffusers_folder (put it into "
                                  "ComfyUI/models/diffusers first)")
    for base in folder_paths.get_folder_paths("diffusers"):
        candidate = os.path.abspath(os.path.join(base, name))
        if os.path.commonpath([os.path.abspath(base), candidate]) != os.path.abspath(base):
            continue
        if os.path.isdir(candidate):
            return candidate
    raise PhotoswapInputError("diffusers_folder", "a folder under models/diffusers",
                              f"'{name}' was not found; available: {list_diffusers_folders() or 'none'}")
