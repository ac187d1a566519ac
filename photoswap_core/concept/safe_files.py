"""Reading model files without ever unpickling arbitrary objects, and noticing when they change on disk.

`.safetensors` (`.sft`) is read directly; every other extension (`.ckpt`, `.pt`, `.bin`) only through ComfyUI's safe
loader (`comfy.utils.load_torch_file(..., safe_load=True)`, i.e. `torch.load(weights_only=True)`). A pickle that the
safe loader refuses is a PhotoswapInputError that says how to convert it, never a fallback to a full unpickle.
"""
from __future__ import annotations

import json
import os
import pickle

import torch

from ..errors import PhotoswapInputError

SAFETENSORS_EXT = (".safetensors", ".sft")


def safetensors_header(path: str) -> dict:
    """The `__metadata__` of a safetensors file, read without loading tensors ({} when absent/unreadable)."""
    if not path.lower().endswith(SAFETENSORS_EXT):
        return {}
    try:
        import safetensors

        with safetensors.safe_open(path, framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # a corrupt file is reported by the real load
        return {}


def _refused_pickle(exc: Exception) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, pickle.UnpicklingError) or "weights_only" in text or "Weights only load failed" in text \
        or "Unsupported global" in text


def load_state_dict_safely(path: str, input_name: str) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) through ComfyUI's loader; pickles only through its safe loader."""
    import comfy.utils

    try:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as exc:
        name = os.path.basename(path)
        if not path.lower().endswith(SAFETENSORS_EXT) and _refused_pickle(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PhotoswapInputError(
                input_name, "a file ComfyUI's safe loader can read: .safetensors, or a .ckpt/.pt holding only tensors",
                f"'{name}' is a pickle with Python objects that the safe loader (torch.load weights_only=True) refuses "
                f"({first[:200]}). Convert it to .safetensors in an environment you trust (e.g. load it with "
                "torch.load(weights_only=False) only if you trust its origin, then safetensors.torch.save_file), or "
                "use the diffusers folder / safetensors file the trainer wrote") from exc
        raise PhotoswapInputError(input_name, "a readable model file",
                                  f"'{name}' could not be read ({type(exc).__name__}: {exc}); re-download or "
                                  "re-export it") from exc
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PhotoswapInputError(input_name, "a file holding model weights (a state dict of tensors)",
                                  f"'{os.path.basename(path)}' holds no tensors; pick the model file itself")
    return sd, metadata or {}


def read_json_object(path: str) -> dict:
    """A JSON file holding an object (OSError/ValueError otherwise: the caller says which input is wrong)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def load_merged(files: list[str], input_name: str) -> dict:
    """One state dict from the (sharded) weight files of one model component."""
    sd = {}
    for f in files:
        part, _meta = load_state_dict_safely(f, input_name)
        sd.update(part)
    return sd


_FOLDER_FILES = ("model_index.json", "concept.json", "concept.txt", "README.md")
_FOLDER_PARTS = ("unet", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2")


def fingerprint(path: str | None) -> str:
    """Changes when the source (or its concept metadata) changes on disk: path, mtime and size of the file and its
    sidecars, or of a diffusers folder's index, metadata and component files. "" for no path."""
    if not path:
        return ""
    if os.path.isdir(path):
        candidates = [os.path.join(path, f) for f in _FOLDER_FILES]
        for sub in _FOLDER_PARTS:
            d = os.path.join(path, sub)
            if os.path.isdir(d):
                candidates += [os.path.join(d, f) for f in sorted(os.listdir(d))]
    else:
        stem = os.path.splitext(path)[0]
        candidates = [path, stem + ".json", stem + ".txt"]
    parts = []
    for c in candidates:
        try:
            st = os.stat(c)
            parts.append(f"{c}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            pass
    return "|".join(parts)
