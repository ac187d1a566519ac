"""Save / load a PHOTOSWAP_INVERSION (`inversion.InversionResult`) as one safetensors file with a JSON header.

File layout (format "photoswap-inversion", version 1). Tensors:
- `trajectory` [N+1, F, C, h, w], `inversion_latents` [N+1, F, C, h, w], `null_embeddings` [N, 1 or F, T, C]
  (F = 1 for an image; a clip's F frames, its null-text embeddings per frame);
- `schedule.sigmas` [N+1] float32, `schedule.timesteps` [N] int64;
- `source.cond` / `negative.cond` (the CONDITIONING tensors, dtype as given) and every tensor in their options dicts
  as `source.options.<key>` / `negative.options.<key>` (SDXL's `pooled_output`, …).
Metadata (`__metadata__`, strings only): one key, `photoswap_inversion`, a JSON object (one key because safetensors
writes its metadata map in hash order; with one key the bytes are deterministic) with `format`, `format_version`, the
method, every setting, steps, cfg, model family / prediction / config name / latent scale, latent shape, the weights
and latent fingerprints, the pack version, inner iterations per step, the JSON-representable conditioning options
(ints, floats, strings, …) and a sha256 of all tensor bytes (so bit rot or a partial overwrite is detected).
Conditioning options that are neither tensors nor JSON values (ControlNet objects, hooks) cannot be stored: they are
dropped with a warning (the inversion never uses them: it evaluates the UNet with the prompt embedding and, for SDXL,
the ADM vector only). The metadata holds no timestamp, so saving a loaded inversion again writes the same bytes.

Never pickle: the file is read with `safetensors.safe_open`; every field is validated and any problem (missing,
truncated or corrupt file, not an inversion file, newer format version, inconsistent shapes) is a PhotoswapInputError
that says what to do. The round trip is bit-identical (tensors keep dtype and bytes; floats go through JSON `repr`).

Compatibility checks (used by the Load node and by stages that consume an inversion):
- `check_model`: model family and prediction type must match (error); the weights fingerprint must match (error:
  an inversion is only exact for the weights it was made with — "load the same checkpoint/LoRAs, or re-run the
  inversion"). The fingerprint covers the diffusion weights as loaded plus the LoRA patch list.
- `check_latent_matches`: the latent size must match (error); a different latent fingerprint at the same size only warns (the
  same image re-encoded on another device differs in the last bits).
- `check_steps`: the step count must match (error).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os

import torch

from .errors import PhotoswapInputError

log = logging.getLogger("photoswap")

FORMAT = "photoswap-inversion"
FORMAT_VERSION = 1
META_KEY = "photoswap_inversion"
ROLES = ("source", "negative")


def pack_version() -> str:
    """The pack's `__version__` (imported lazily: the pack root imports ComfyUI's API)."""
    import importlib
    import sys

    package = __name__.rsplit(".", 2)[0]
    try:
        module = sys.modules.get(package) or importlib.import_module(package)
        return str(getattr(module, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 — the version is informational
        return "unknown"


# ------------------------------------------------------------------------------------------------------------ save

def _is_json_value(value) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_json_value(v) for v in value)
    return False


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU, contiguous, non-inference copy that shares memory with nothing (safetensors refuses shared storage)."""
    with torch.inference_mode(False):
        return tensor.detach().to("cpu").contiguous().clone()


def _conditioning_parts(conditioning, role: str, tensors: dict, dropped: list) -> dict:
    if not isinstance(conditioning, list) or len(conditioning) != 1:
        raise PhotoswapInputError("inversion", f"an inversion with one {role} conditioning entry",
                                  "re-run the inversion with a single encoded prompt")
    cond, options = conditioning[0]
    tensors[f"{role}.cond"] = _plain(cond)
    json_options = {}
    for key, value in sorted(options.items()):
        if isinstance(value, torch.Tensor):
            tensors[f"{role}.options.{key}"] = _plain(value)
            json_options[key] = {"tensor": True}
        elif _is_json_value(value):
            json_options[key] = {"value": value, "tuple": isinstance(value, tuple)}
        else:
            dropped.append(f"{role}.{key}")
    return json_options


def tensor_digest(tensors: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes of all tensors (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def to_file_parts(result) -> tuple[dict, dict]:
    """(tensors, metadata) for `safetensors.torch.save_file`."""
    tensors = {
        "trajectory": _plain(torch.stack([t for t in result.trajectory])),
        "inversion_latents": _plain(torch.stack([t for t in result.inversion_latents])),
        "null_embeddings": _plain(result.null_embeddings),
        "schedule.sigmas": _plain(result.schedule.sigmas),
        "schedule.timesteps": torch.tensor(list(result.schedule.timesteps), dtype=torch.int64),
    }
    dropped: list = []
    options = {role: _conditioning_parts(cond, role, tensors, dropped)
               for role, cond in zip(ROLES, (result.source_conditioning, result.negative_conditioning))}
    if dropped:
        log.warning("Photoswap: saving the inversion without conditioning options that cannot be stored: %s "
                    "(they are not part of the inversion; reconnect them downstream if needed)", ", ".join(dropped))
    settings = dataclasses.asdict(result.settings)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pack_version": pack_version(),
        "method": settings["method"],
        "steps": result.schedule.steps,
        "cfg": settings["cfg"],
        "settings": settings,
        "model": dataclasses.asdict(result.arch.info),
        "latent_shape": list(result.latent_shape),
        "weights_fingerprint": result.weights_fingerprint,
        "latent_fingerprint": result.latent_fingerprint,
        "inner_iterations": [int(k) for k in result.inner_iterations],
        "conditioning_options": options,
        "tensor_sha256": tensor_digest(tensors),
    }
    metadata = {META_KEY: json.dumps(meta, sort_keys=True)}
    return tensors, metadata


def save_inversion(result, path) -> str:
    """Write `result` to `path` (a .safetensors file), atomically (temp file + rename). Returns the path."""
    from safetensors.torch import save_file

    tensors, metadata = to_file_parts(result)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_to_output(result, filename_prefix: str) -> str:
    """Save Inversion's stage: write to output/photoswap/<prefix>_NNNNN.safetensors; the path relative to output."""
    import folder_paths

    from .inversion_files import save_path

    path = save_inversion(result, save_path(filename_prefix))
    log.info("Photoswap: saved the inversion to %s", path)
    return os.path.relpath(path, folder_paths.get_output_directory())


# ------------------------------------------------------------------------------------------------------------ load

_FIX_RESAVE = "re-run the Photoswap Null-Text DDIM Inversion and save it again (Photoswap Save Inversion)"


def _corrupt(path, what: str) -> PhotoswapInputError:
    return PhotoswapInputError("inversion_file", f"a complete Photoswap inversion file ({os.path.basename(path)}: "
                                                 f"{what})", _FIX_RESAVE)


def read_file(path) -> tuple[dict, dict]:
    """(tensors, metadata JSON) of an inversion file; raises PhotoswapInputError for anything unreadable."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PhotoswapInputError("inversion_file", f"an existing inversion file (not found: {path})",
                                  "pick a file listed by the node (saved by Photoswap Save Inversion into "
                                  "output/photoswap, or copied into the input folder), or refresh the node list")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types for truncation/garbage
        raise _corrupt(path, f"unreadable, truncated or not a safetensors file: {exc}") from exc
    not_ours = PhotoswapInputError(
        "inversion_file", f"a Photoswap inversion file ({os.path.basename(path)} is a safetensors file without "
                          "Photoswap inversion metadata, e.g. a checkpoint or LoRA)",
        "pick a file saved by Photoswap Save Inversion")
    if META_KEY not in header:
        raise not_ours
    try:
        meta = json.loads(header[META_KEY])
    except ValueError as exc:
        raise _corrupt(path, f"its metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise _corrupt(path, "its metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise not_ours
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise PhotoswapInputError(
            "inversion_file", f"inversion file format version {FORMAT_VERSION} (this file has version {version!r}"
                              f"{', written by a newer comfyui-photoswap' if newer else ''})",
            "update comfyui-photoswap" if newer else _FIX_RESAVE)
    if tensor_digest(tensors) != meta.get("tensor_sha256"):
        raise _corrupt(path, "the tensor data does not match its checksum (the file was modified or damaged)")
    return tensors, meta


def _rebuild_conditioning(role: str, tensors: dict, meta: dict, path) -> list:
    options = {}
    spec = meta["conditioning_options"][role]
    for key, entry in spec.items():
        if entry.get("tensor"):
            options[key] = tensors[f"{role}.options.{key}"]
        else:
            value = entry.get("value")
            options[key] = tuple(value) if entry.get("tuple") and isinstance(value, list) else value
    return [[tensors[f"{role}.cond"], options]]


def from_file_parts(tensors: dict, meta: dict, path="<memory>"):
    """Rebuild an InversionResult, checking that every part is present and consistent."""
    from .inversion import METHODS, InversionResult, InversionSettings
    from .arch import ModelInfo, Schedule, from_info

    try:
        settings_fields = {f.name for f in dataclasses.fields(InversionSettings)}
        settings = InversionSettings(**{k: v for k, v in meta["settings"].items() if k in settings_fields})
        model_fields = {f.name for f in dataclasses.fields(ModelInfo)}
        info = ModelInfo(**{k: v for k, v in meta["model"].items() if k in model_fields})
        arch = from_info(info)
        latent_shape = tuple(int(v) for v in meta["latent_shape"])
        trajectory = tensors["trajectory"]
        inversion_latents = tensors["inversion_latents"]
        nulls = tensors["null_embeddings"]
        sigmas = tensors["schedule.sigmas"]
        timesteps = tuple(int(t) for t in tensors["schedule.timesteps"].tolist())
        source = _rebuild_conditioning("source", tensors, meta, path)
        negative = _rebuild_conditioning("negative", tensors, meta, path)
        weights_fp, latent_fp = str(meta["weights_fingerprint"]), str(meta["latent_fingerprint"])
        inner = [int(k) for k in meta.get("inner_iterations", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(path, f"missing or malformed entry {exc}") from exc
    n = len(timesteps) if timesteps else int(sigmas.shape[0]) - 1  # continuous-time schedules (Flux) have none
    problems = []
    if settings.method not in METHODS:
        problems.append(f"unknown method {settings.method!r}")
    if n < (2 if timesteps else 1) or settings.steps != n or int(meta.get("steps", -1)) != n:
        problems.append(f"step count {meta.get('steps')} vs {n} timesteps")
    if tuple(sigmas.shape) != (n + 1,):
        problems.append(f"sigmas of shape {tuple(sigmas.shape)} for {n} steps")
    if len(latent_shape) != 4:
        problems.append(f"latent shape {latent_shape}")
    for name, stack in (("trajectory", trajectory), ("inversion_latents", inversion_latents)):
        if tuple(stack.shape) != (n + 1, *latent_shape):
            problems.append(f"{name} of shape {tuple(stack.shape)} (expected {(n + 1, *latent_shape)})")
        elif not torch.isfinite(stack).all():
            problems.append(f"non-finite values in {name}")
    if nulls.dim() != 4 or nulls.shape[0] != n:
        problems.append(f"null embeddings of shape {tuple(nulls.shape)} for {n} steps")
    if problems:
        raise _corrupt(path, "; ".join(problems))
    return InversionResult(
        schedule=Schedule(timesteps=timesteps, sigmas=sigmas), arch=arch, settings=settings,
        latent_shape=latent_shape, trajectory=list(trajectory.unbind(0)),
        inversion_latents=list(inversion_latents.unbind(0)), null_embeddings=nulls, source_conditioning=source,
        negative_conditioning=negative, weights_fingerprint=weights_fp, latent_fingerprint=latent_fp,
        inner_iterations=inner)


def load_inversion(path):
    """Read and validate an inversion file → (InversionResult, metadata JSON dict)."""
    tensors, meta = read_file(path)
    return from_file_parts(tensors, meta, path), meta


# ------------------------------------------------------------------------------------------------ compatibility

def check_model(result, model, input_name: str = "model") -> None:
    """The connected MODEL must be the model the inversion was made with (family, prediction, weights)."""
    from .arch import inspect_model

    inspect_model(model).check_same_model(model, result.arch, result.weights_fingerprint, input_name,
                                          "the inversion", "load the same checkpoint/LoRAs, or re-run the inversion")


def check_latent_matches(result, latent_samples: torch.Tensor, input_name: str = "latent") -> None:
    """The latent's size must be the inverted latent's; a different image of the same size only warns."""
    from .inversion import latent_fingerprint

    shape = tuple(latent_samples.shape)
    if shape[-2:] != tuple(result.latent_shape[-2:]):
        h, w = result.latent_shape[-2:]
        ph, pw = result.arch.latent.pixels((h, w))
        gh, gw = result.arch.latent.pixels(shape[-2:])
        raise PhotoswapInputError(
            input_name, f"a latent of {h}×{w} (= {pw}×{ph} px), the size of the inverted image (got "
                        f"{shape[-2]}×{shape[-1]} = {gw}×{gh} px)",
            "use the image the inversion was made from (same size), or re-run the inversion for this image")
    if shape[0] != result.latent_shape[0]:
        raise PhotoswapInputError(
            input_name, f"a latent of {result.latent_shape[0]} frame(s), the inverted clip's (got {shape[0]})",
            "connect the frames the inversion was made from (the same clip, same frame count), or re-run the "
            "inversion for these frames")
    if latent_fingerprint(latent_samples) != result.latent_fingerprint:
        log.warning("Photoswap: this latent differs from the one that was inverted (same size, other values); the "
                    "inversion reconstructs the original image, not this one")


def load_and_check(path, model, latent=None):
    """The Load Inversion node's stage: read `path`, check it against the MODEL (and the latent's size)."""
    result, meta = load_inversion(path)
    check_model(result, model)
    if latent is not None:
        check_latent_matches(result, latent["samples"])
    return result, meta


def check_steps(result, steps: int, input_name: str = "steps") -> None:
    if int(steps) != result.schedule.steps:
        raise PhotoswapInputError(
            input_name, f"{result.schedule.steps} steps, the inversion's step count (got {steps})",
            f"set steps to {result.schedule.steps}, or re-run the inversion with {steps} steps")
