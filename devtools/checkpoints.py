"""Full-architecture checkpoints with random weights, created once per cache, for tests, demo and benchmarks.

ComfyUI detects model families from key names and shapes, so "small" stand-ins do not exist: these are real-size
single-file `.safetensors` checkpoints (fp16 on disk) in exactly the layout ComfyUI itself writes
(`BaseModel.state_dict_for_saving`, i.e. what `CheckpointSave` produces), with deterministic random weights:

- `random-sd15.safetensors`          SD1.5 (ε), about 2.1 GB — the default;
- `random-sd21-768-v.safetensors`    SD2.1-768 (v-prediction), about 2.6 GB;
- `random-sdxl.safetensors`          SDXL base (ε), about 6.9 GB.

How: ComfyUI's own model classes (UNet from `comfy.supported_models.*`, the family's CLIP text encoder class, the SD
VAE) are instantiated on the `meta` device (no memory), ComfyUI's saving logic turns their state-dict keys into the
checkpoint layout, and every tensor is then generated on its own (seeded from the key name) and streamed to a temp
file that is renamed into place once complete. Peak memory stays at one tensor (< 0.5 GB), even for SDXL.

Weights: fan-in scaled normals (std 1/sqrt(fan_in)), norm scales at 1, small biases — samples at 64-128 px stay
finite in fp16/fp32. For SD2.1-v the bias ComfyUI inspects to decide v-prediction
(`output_blocks.11.1.transformer_blocks.0.norm1.bias`, std > 0.09) gets std 0.2, and ComfyUI's `v_pred` marker key is
written too. Random weights produce noise images: they test plumbing (keys, layers, shapes, conditioning paths), not
quality.

Cache folder: `$PHOTOSWAP_CACHE/checkpoints` if PHOTOSWAP_CACHE is set, else `<repo>/.cache/checkpoints`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = "1"  # bump when the recipe changes: cached files with another version are rebuilt
DEFAULT_SEED = 20231108
GB = 1e9
DISK_MARGIN_BYTES = int(0.5 * GB)


class CheckpointCacheError(RuntimeError):
    """A problem with the checkpoint cache the user must fix (disk space, permissions); the message says how."""


@dataclass(frozen=True)
class Family:
    key: str
    filename: str
    config_class: str  # comfy.supported_models class name, also what detection must return
    model_type: str  # comfy.model_base.ModelType member name
    size_gb: float  # upper bound of the file size, used for the disk-space check before building
    latent_channels: int = 4


FAMILIES = {
    "sd15": Family("sd15", "random-sd15.safetensors", "SD15", "EPS", 2.14),
    "sd21-v": Family("sd21-v", "random-sd21-768-v.safetensors", "SD20", "V_PREDICTION", 2.61),
    "sdxl": Family("sdxl", "random-sdxl.safetensors", "SDXL", "EPS", 6.95),
}
ALIASES = {"sd1.5": "sd15", "sd21v": "sd21-v", "sd2v": "sd21-v", "sd21-768-v": "sd21-v", "sd2.1-v": "sd21-v"}

# Full UNet configs as ComfyUI's model_detection writes them for these families (comfy/model_detection.py).
_UNET_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
                "use_temporal_resblock": False}
UNET_CONFIGS = {
    "sd15": dict(_UNET_COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "sd21-v": dict(_UNET_COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2],
                   transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                   use_linear_in_transformer=True, context_dim=1024, num_head_channels=64,
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "sdxl": dict(_UNET_COMMON, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
                 use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
}
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
V_PRED_PROBE_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def family(name: str) -> Family:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in FAMILIES:
        raise ValueError(f"unknown checkpoint family {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


def cache_dir() -> Path:
    base = os.environ.get("PHOTOSWAP_CACHE")
    return (Path(base).expanduser() if base else REPO_ROOT / ".cache") / "checkpoints"


def checkpoint_path(name: str = "sd15", folder: Path | None = None) -> Path:
    return Path(folder or cache_dir()) / family(name).filename


# ----------------------------------------------------------------------------------------------- disk space, locking

def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Raise CheckpointCacheError naming the folder, the GB needed and PHOTOSWAP_CACHE when space is short."""
    free = shutil.disk_usage(_existing_parent(folder)).free
    needed = needed_bytes + DISK_MARGIN_BYTES
    if free < needed:
        raise CheckpointCacheError(
            f"not enough free disk space in {folder} for {what}: needs about {needed / GB:.1f} GB, "
            f"only {free / GB:.1f} GB free. Free some space there, or set PHOTOSWAP_CACHE to a folder on a disk with "
            f"room (checkpoints then go to $PHOTOSWAP_CACHE/checkpoints).")


@contextlib.contextmanager
def _locked(folder: Path):
    """Serialize builders of one cache folder (parallel test processes), via an advisory lock file."""
    import fcntl

    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------------------- state-dict layout

def _meta_state_dict(fam: Family) -> dict:
    """The checkpoint's keys → tensors on the meta device (or small real ones, e.g. position ids), built by ComfyUI's
    own classes and saving logic."""
    import torch

    from .comfy_env import bootstrap

    bootstrap()
    import comfy.model_base as model_base
    import comfy.supported_models as sm
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = getattr(sm, fam.config_class)(dict(UNET_CONFIGS[fam.key]))
    config.set_inference_dtype(torch.float16, None)
    model_type = getattr(model_base.ModelType, fam.model_type)
    with torch.device("meta"):
        model_class = model_base.SDXL if fam.key == "sdxl" else model_base.BaseModel
        model = model_class(config, model_type=model_type)
        clip_model = config.clip_target().clip(dtype=torch.float16, device="meta")
        vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    sd = model.state_dict_for_saving(clip_model.state_dict(), vae.state_dict())
    if fam.model_type == "V_PREDICTION":
        sd.setdefault("v_pred", torch.tensor([]))
    return sd


def _init_std(key: str, shape: tuple, fam: Family) -> float | None:
    """Std of the normal a float tensor is drawn from; None = constant (see _generate)."""
    if len(shape) >= 2:
        if "token_embedding" in key:
            return 0.02
        if "positional_embedding" in key or "position_embedding" in key:
            return 0.01
        fan_in = math.prod(shape[1:])
        return 1.0 / math.sqrt(fan_in)
    if key == V_PRED_PROBE_KEY and fam.model_type == "V_PREDICTION":
        return 0.2  # ComfyUI's SD2 v-prediction probe: std > 0.09
    if key.endswith("bias"):
        return 0.02
    return None


def _generate(key: str, shape: tuple, fam: Family, seed: int):
    import torch

    std = _init_std(key, shape, fam)
    if std is None:
        if key.endswith("logit_scale"):
            return torch.full(shape, math.log(100.0))
        return torch.ones(shape)  # norm scales (GroupNorm/LayerNorm weights) and other 1-D/0-D weights
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))
    values = torch.randn(shape, generator=gen)
    values *= std
    return values


_SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32", "int64": "I64", "int32": "I32", "bfloat16": "BF16"}


def _layout(sd: dict) -> tuple[list, int]:
    """[(key, shape, torch dtype to write, start, end)], total data bytes."""
    import torch

    rows, offset = [], 0
    for key in sorted(sd):
        tensor = sd[key]
        dtype = torch.float16 if tensor.is_floating_point() else tensor.dtype
        nbytes = math.prod(tensor.shape) * torch.empty((), dtype=dtype).element_size()
        rows.append((key, tuple(tensor.shape), dtype, offset, offset + nbytes))
        offset += nbytes
    return rows, offset


def _header_bytes(rows: list, metadata: dict) -> bytes:
    header = {"__metadata__": metadata}
    for key, shape, dtype, start, end in rows:
        header[key] = {"dtype": _SAFETENSORS_DTYPES[str(dtype).replace("torch.", "")], "shape": list(shape),
                       "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
    return struct.pack("<Q", len(raw)) + raw


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


def is_complete(path: Path, fam: Family | None = None) -> bool:
    """Cheap check that a cached file is a whole checkpoint made by this recipe (header, size, version, family)."""
    try:
        header, data_start = _read_header(path)
        meta = header.get("__metadata__", {})
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        ok = path.stat().st_size == data_start + end and meta.get("photoswap_generator") == GENERATOR_VERSION
        return ok and (fam is None or meta.get("photoswap_family") == fam.key)
    except (OSError, ValueError, KeyError, struct.error):
        return False


def write_checkpoint(name: str, path: Path, seed: int = DEFAULT_SEED, log=print) -> Path:
    """Build the family's random checkpoint at `path` (temp file + rename). No disk-space check; see ensure_checkpoint."""
    import torch

    fam = family(name)
    t0 = time.perf_counter()
    sd = _meta_state_dict(fam)
    rows, data_bytes = _layout(sd)
    metadata = {"format": "pt", "photoswap_generator": GENERATOR_VERSION, "photoswap_family": fam.key,
                "photoswap_seed": str(seed), "photoswap_note": "RANDOM WEIGHTS for testing; not a trained model",
                "modelspec.title": f"photoswap random {fam.key}"}
    header = _header_bytes(rows, metadata)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            with torch.no_grad():
                for key, shape, dtype, start, end in rows:
                    src = sd[key]
                    if src.is_meta:
                        values = _generate(key, shape, fam, seed).to(dtype)
                    else:
                        values = src.detach().to("cpu", dtype).contiguous()
                    data = values.numpy().tobytes() if values.numel() else b""
                    assert len(data) == end - start, key
                    fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"[checkpoints] wrote {path} ({(len(header) + data_bytes) / GB:.2f} GB, {len(rows)} tensors, "
        f"{time.perf_counter() - t0:.0f} s; random weights, seed {seed})")
    return path


def ensure_checkpoint(name: str = "sd15", folder: Path | None = None, force: bool = False, seed: int = DEFAULT_SEED,
                      log=print) -> Path:
    """Return the cached checkpoint of a family, creating it first if it is missing or incomplete."""
    fam = family(name)
    folder = Path(folder or cache_dir())
    path = folder / fam.filename
    if not force and is_complete(path, fam):
        return path
    check_disk_space(folder, int(fam.size_gb * GB), f"{fam.filename} (random {fam.key} checkpoint)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointCacheError(f"cannot create the checkpoint cache {folder}: {exc}. Set PHOTOSWAP_CACHE to a "
                                   "writable folder.") from exc
    with _locked(folder):
        if not force and is_complete(path, fam):  # another process built it while we waited
            return path
        for stale in folder.glob(f".{fam.filename}.tmp-*"):
            stale.unlink(missing_ok=True)
        log(f"[checkpoints] creating {path} (random {fam.key} weights, about {fam.size_gb:.1f} GB, once per cache)")
        return write_checkpoint(fam.key, path, seed=seed, log=log)


# ------------------------------------------------------------------------------------------------- verification

def detect(path: Path, fp16: bool = True):
    """Load the checkpoint with ComfyUI's `load_checkpoint_guess_config` (what CheckpointLoaderSimple uses).

    Returns (model_config class name, ModelType name, (model, clip, vae)). fp16 keeps SDXL's UNet at ~5 GB in RAM.
    """
    import torch

    from .comfy_env import bootstrap

    bootstrap()
    import comfy.sd

    options = {"dtype": torch.float16} if fp16 else {}
    handler = _KeyWarnings()
    logging.getLogger().addHandler(handler)
    try:
        out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True, model_options=options)
    finally:
        logging.getLogger().removeHandler(handler)
    if handler.messages:
        raise AssertionError(f"{path}: ComfyUI reported key problems while loading: {handler.messages}")
    model, clip, vae = out[:3]
    return type(model.model.model_config).__name__, model.model.model_type.name, (model, clip, vae)


class _KeyWarnings(logging.Handler):
    """Collects ComfyUI's warnings about missing/unexpected/left-over keys (a wrong layout would trigger them)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        text = record.getMessage()
        if any(word in text.lower() for word in ("missing", "unexpected", "left over")) and "torchaudio" not in text:
            self.messages.append(text[:500])


def verify(name: str, path: Path | None = None) -> str:
    """Assert ComfyUI detects the cached checkpoint as the family it was built as; returns a one-line summary."""
    fam = family(name)
    path = Path(path or checkpoint_path(fam.key))
    cls, model_type, objects = detect(path)
    del objects
    if (cls, model_type) != (fam.config_class, fam.model_type):
        raise AssertionError(f"{path}: ComfyUI detected {cls}/{model_type}, expected {fam.config_class}/{fam.model_type}")
    return f"{path.name}: detected by ComfyUI as {cls} ({model_type})"
