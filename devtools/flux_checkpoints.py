"""Random-weight Flux files in the layouts ComfyUI's loaders read, for loader/detection/plumbing tests (issue #17).

Why: trained Flux weights cannot be had here, and ComfyUI fixes Flux's width in detection (24 heads, RoPE axes
[16, 56, 56] => hidden 3072, T5 context 4096), so only the *depth* can shrink. Files (cache folder
`$PHOTOSWAP_CACHE/checkpoints/flux` or `<repo>/.cache/checkpoints/flux`), each built once, deterministic from a seed,
streamed tensor by tensor into a temp file that is renamed when complete:

- `random-flux-dev-d{D}s{S}.safetensors`  diffusion model, BFL key layout (UNETLoader), bf16, guidance_in (Flux-dev);
- `random-clip-l.safetensors`             full CLIP-L text model (12 layers), fp16 (the "clip_l" of DualCLIPLoader);
- `random-t5xxl-{N}layer.safetensors`     T5-XXL encoder cut to N blocks, fp16 (see load_flux_clip: no loader
                                          node builds fewer than 24 blocks; ComfyUI's own model_options can);
- `random-flux-ae.safetensors`            Flux VAE layout (AutoencodingEngine, 16 channels, no quant convs), bf16;
- `random-flux-redux.safetensors`         Redux style model (redux_up/redux_down), bf16 (StyleModelLoader);
- `random-siglip-384.safetensors`         SigLIP so400m/14 @384 vision tower, all 27 layers, fp16 (CLIPVisionLoader).

Shapes/keys come from ComfyUI's own modules built on the meta device, so they are what its loaders expect.
RANDOM WEIGHTS: they test keys, detection, widths and plumbing, never image quality.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
import time
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = "flux-1"
DEFAULT_SEED = 20250117
GB = 1e9
FLUX_DEV_CONFIG = {  # what comfy/model_detection.py infers from BFL's flux1-dev keys (depths replaced)
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 3072, "context_in_dim": 4096,
    "patch_size": 2, "vec_in_dim": 768, "guidance_embed": True,
}
FLUX_VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                     "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
_DTYPE_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int64": "I64"}


def cache_dir() -> Path:
    base = os.environ.get("PHOTOSWAP_CACHE")
    return (Path(base).expanduser() if base else REPO_ROOT / ".cache") / "checkpoints" / "flux"


def file_names(depth: int = 1, single: int = 1, t5_layers: int = 1) -> dict:
    return {"unet": f"random-flux-dev-d{depth}s{single}.safetensors", "clip_l": "random-clip-l.safetensors",
            "t5xxl": f"random-t5xxl-{t5_layers}layer.safetensors", "vae": "random-flux-ae.safetensors",
            "redux": "random-flux-redux.safetensors", "siglip": "random-siglip-384.safetensors"}


# ------------------------------------------------------------------------------ layouts from ComfyUI's own modules

def _meta_layout(component: str, depth: int, single: int, t5_layers: int):
    """(state dict of meta tensors in the file's key layout, torch dtype to write floats in)."""
    import torch

    from .comfy_env import bootstrap

    bootstrap()
    with torch.device("meta"):
        if component == "unet":
            import comfy.model_base as mb
            import comfy.supported_models as sm

            config = sm.Flux(dict(FLUX_DEV_CONFIG, depth=depth, depth_single_blocks=single))
            config.set_inference_dtype(torch.bfloat16, None)
            sd = mb.Flux(config, device="meta").diffusion_model.state_dict()
            return sd, torch.bfloat16
        if component == "clip_l":
            import comfy.sd1_clip

            return comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16).transformer.state_dict(), \
                torch.float16
        if component == "t5xxl":
            import comfy.text_encoders.sd3_clip as sd3

            options = {"t5xxl_model_config": {"num_layers": t5_layers, "num_decoder_layers": t5_layers}}
            model = sd3.T5XXLModel(device="meta", dtype=torch.float16, model_options=options)
            return model.transformer.state_dict(), torch.float16
        if component == "vae":
            from comfy.ldm.models.autoencoder import AutoencodingEngine

            cfg = dict(FLUX_VAE_DDCONFIG)
            ae = AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": cfg},
                decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": cfg})
            return ae.state_dict(), torch.bfloat16
        if component == "redux":
            from comfy.ldm.flux.redux import ReduxImageEncoder

            return ReduxImageEncoder(device="meta").state_dict(), torch.bfloat16
        if component == "siglip":
            import comfy.clip_model
            import comfy.ops

            with open(Path(comfy.clip_model.__file__).parent / "clip_vision_siglip_384.json") as fh:
                config = json.load(fh)
            model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.manual_cast)
            return model.state_dict(), torch.float16
    raise ValueError(f"unknown component {component!r}")


def _init_std(component: str, key: str, shape: tuple) -> float | None:
    """Std of the normal a tensor is drawn from; None = ones (norm scales). HF-T5-style init for T5 (q scaled by
    d_kv**-0.5, since T5 attention has no 1/sqrt(d) of its own); fan-in normals elsewhere."""
    leaf = key.rsplit(".", 1)[-1]
    if len(shape) >= 2:
        if component == "t5xxl":
            if key == "shared.weight":
                return 1.0
            if "relative_attention_bias" in key:
                return 0.1
            if key.endswith("SelfAttention.q.weight"):
                return 1.0 / math.sqrt(shape[1] * 64)
        if "token_embedding" in key:
            return 0.02
        if "position_embedding" in key:
            return 0.01
        return 1.0 / math.sqrt(math.prod(shape[1:]))
    if leaf == "bias":
        return 0.02
    return None


def _generate(component: str, key: str, shape: tuple, seed: int):
    import torch

    std = _init_std(component, key, shape)
    if std is None:
        return torch.ones(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{component}/{key}".encode())) % (2 ** 63))
    return torch.randn(shape, generator=gen) * std


# ------------------------------------------------------------------------------------------- writing, caching

def _tensor_bytes(values, dtype) -> bytes:
    import torch

    values = values.to(dtype).contiguous()
    if values.numel() == 0:
        return b""
    if dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().tobytes()
    return values.numpy().tobytes()


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


def is_complete(path: Path, component: str) -> bool:
    try:
        header, data_start = _read_header(path)
        meta = header.get("__metadata__", {})
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return (path.stat().st_size == data_start + end and meta.get("photoswap_generator") == GENERATOR_VERSION
                and meta.get("photoswap_component") == component)
    except (OSError, ValueError, KeyError, struct.error):
        return False


def write_component(component: str, path: Path, depth: int = 1, single: int = 1, t5_layers: int = 1,
                    seed: int = DEFAULT_SEED, log=print) -> Path:
    import torch

    t0 = time.perf_counter()
    sd, float_dtype = _meta_layout(component, depth, single, t5_layers)
    rows, offset = [], 0
    for key in sorted(sd):
        dtype = float_dtype if sd[key].is_floating_point() else sd[key].dtype
        nbytes = math.prod(sd[key].shape) * torch.empty((), dtype=dtype).element_size()
        rows.append((key, tuple(sd[key].shape), dtype, offset, offset + nbytes))
        offset += nbytes
    header = {"__metadata__": {"format": "pt", "photoswap_generator": GENERATOR_VERSION,
                               "photoswap_component": component, "photoswap_seed": str(seed),
                               "photoswap_note": "RANDOM WEIGHTS for testing; not a trained model"}}
    for key, shape, dtype, start, end in rows:
        header[key] = {"dtype": _DTYPE_CODES[str(dtype).replace("torch.", "")], "shape": list(shape),
                       "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            with torch.no_grad():
                for key, shape, dtype, start, end in rows:
                    data = _tensor_bytes(_generate(component, key, shape, seed), dtype)
                    assert len(data) == end - start, key
                    fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"[flux-checkpoints] wrote {path.name}: {path.stat().st_size / GB:.3f} GB, {len(rows)} tensors, "
        f"{time.perf_counter() - t0:.0f} s")
    return path


@contextlib.contextmanager
def _locked(folder: Path):
    import fcntl

    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_flux_files(folder: Path | None = None, depth: int = 1, single: int = 1, t5_layers: int = 1,
                      components=("unet", "clip_l", "t5xxl", "vae", "redux", "siglip"), seed: int = DEFAULT_SEED,
                      log=print) -> dict:
    """{component: path}, building whatever is missing or incomplete (idempotent; parallel callers serialise)."""
    from .checkpoints import check_disk_space

    folder = Path(folder or cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    names = file_names(depth, single, t5_layers)
    out = {}
    with _locked(folder):
        for component in components:
            path = folder / names[component]
            if not is_complete(path, component):
                check_disk_space(folder, int(2.2 * GB), f"{path.name} (random Flux {component})")
                for stale in folder.glob(f".{path.name}.tmp-*"):
                    stale.unlink(missing_ok=True)
                write_component(component, path, depth, single, t5_layers, seed, log)
            out[component] = path
    return out


# ------------------------------------------------------------------------------------------------ loading

def load_flux_clip(clip_l: Path, t5xxl: Path, t5_layers: int = 1, dual_clip_loader_options: bool = False):
    """The Flux CLIP through `comfy.sd.load_clip(..., clip_type=FLUX)` (what DualCLIPLoader calls). DualCLIPLoader
    passes no T5 config, so ComfyUI builds all 24 T5 blocks from t5_config_xxl.json and the missing ones stay
    uninitialised (torch.empty); here ComfyUI's own `t5xxl_model_config` override builds exactly `t5_layers` blocks.
    dual_clip_loader_options=True reproduces the node (only for inspection: ~9.5 GB of T5 weights)."""
    import comfy.sd

    options = {} if dual_clip_loader_options else {
        "t5xxl_model_config": {"num_layers": t5_layers, "num_decoder_layers": t5_layers}}
    return comfy.sd.load_clip(ckpt_paths=[str(clip_l), str(t5xxl)], clip_type=comfy.sd.CLIPType.FLUX,
                              model_options=options)


class KeyWarnings(logging.Handler):
    """Collects ComfyUI's warnings about missing/unexpected keys while a loader runs."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        text = record.getMessage()
        words = ("missing", "unexpected", "leftover", "not loaded")
        if any(w in text.lower() for w in words) and "torchaudio" not in text:
            self.messages.append(text[:300])

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)


def register_folder(folder: Path) -> None:
    """Point ComfyUI's model folders (this process only) at the cache, so the loader *nodes* find the files."""
    import folder_paths

    for kind in ("diffusion_models", "text_encoders", "vae", "style_models", "clip_vision"):
        folder_paths.add_model_folder_path(kind, str(folder))


# ------------------------------------------------------------------------------------------ verification + timing

def dual_clip_loader_t5_gap(t5: Path | dict) -> dict:
    """What DualCLIPLoader (type flux, no options) does with a T5 state dict (a file, or {key: shape}), measured on
    the meta device (no 9.5 GB allocation): the T5 blocks ComfyUI builds, their parameter count, the missing keys.
    Also routes the keys through FluxClipModel.load_sd, which picks CLIP-L vs T5 by one key."""
    import torch

    import comfy.text_encoders.flux as flux_te

    if not isinstance(t5, dict):
        header, _ = _read_header(Path(t5))
        t5 = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    meta_sd = {k: torch.empty(shape, device="meta") for k, shape in t5.items()}
    with torch.device("meta"):
        clip = flux_te.flux_clip()(device="meta", dtype=torch.float16)
    missing, unexpected = clip.load_sd(meta_sd)  # FluxClipModel.load_sd -> t5xxl unless CLIP-L layer-1 key present
    return {"t5_blocks_built": len(clip.t5xxl.transformer.encoder.block),
            "t5_params_built": sum(p.numel() for p in clip.t5xxl.parameters()),
            "missing_keys": len(missing), "unexpected_keys": len(unexpected),
            "missing_blocks": sorted({int(k.split(".")[2]) for k in missing if k.startswith("encoder.block.")})}


def verify_and_time(folder: Path | None = None, depth: int = 1, single: int = 1, t5_layers: int = 1,
                    size: int = 64, log=print) -> dict:
    """Load every file through ComfyUI's real loaders (the node classes where they take no extra options), check
    what ComfyUI detected, and time load + a 1-step Flux sample at `size` px. Frees each part before the next
    (peak RSS ~3.5 GB with the default depths)."""
    import gc

    import torch

    from .comfy_env import bootstrap

    bootstrap()
    import comfy.model_management as mm
    import nodes

    from .tiny_flux import encode_flux, sample_flux

    paths = ensure_flux_files(folder, depth, single, t5_layers, log=log)
    register_folder(paths["unet"].parent)
    report = {"sizes_gb": {k: round(p.stat().st_size / GB, 3) for k, p in paths.items()}}
    timer = time.perf_counter

    t = timer()
    with KeyWarnings() as warn:
        clip = load_flux_clip(paths["clip_l"], paths["t5xxl"], t5_layers)
    report["clip_load_s"], report["clip_key_warnings"] = round(timer() - t, 1), warn.messages
    report["t5_blocks"] = len(clip.cond_stage_model.t5xxl.transformer.encoder.block)
    t = timer()
    cond = encode_flux(clip, "a photo of a cat", guidance=3.5)
    report["encode_s"] = round(timer() - t, 1)
    report["cond_shape"], report["pooled_shape"] = list(cond[0][0].shape), list(cond[0][1]["pooled_output"].shape)
    report["cond_finite"] = bool(torch.isfinite(cond[0][0]).all() and torch.isfinite(cond[0][1]["pooled_output"]).all())
    del clip
    report["dual_clip_loader"] = dual_clip_loader_t5_gap(paths["t5xxl"])

    t = timer()
    with KeyWarnings() as warn:
        (vae,) = nodes.VAELoader().load_vae(paths["vae"].name)
    report["vae_load_s"], report["vae_key_warnings"] = round(timer() - t, 1), warn.messages
    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    latent = vae.encode(image)
    report["vae_latent_channels"], report["vae_latent_shape"] = vae.latent_channels, list(latent.shape)
    report["vae_type"] = type(vae.first_stage_model).__name__

    t = timer()
    with KeyWarnings() as warn:
        (model,) = nodes.UNETLoader().load_unet(paths["unet"].name, "default")
    report["unet_load_s"], report["unet_key_warnings"] = round(timer() - t, 1), warn.messages
    cfg = model.model.model_config
    report["detected"] = {"config_class": type(cfg).__name__, "model_type": model.model.model_type.name,
                          "dtype": str(model.model.get_dtype()),
                          **{k: cfg.unet_config.get(k) for k in ("depth", "depth_single_blocks", "hidden_size",
                                                                 "num_heads", "guidance_embed", "vec_in_dim",
                                                                 "context_in_dim", "axes_dim")}}
    t = timer()
    out = sample_flux(model, cond, torch.zeros(1, 16, size // 8, size // 8), steps=1, seed=0)
    report["sample_1step_s"] = round(timer() - t, 1)
    report["sample_finite"], report["sample_shape"] = bool(torch.isfinite(out).all()), list(out.shape)
    t = timer()
    report["decoded_shape"] = list(vae.decode(out).shape)
    report["vae_decode_s"] = round(timer() - t, 1)
    del model, vae
    mm.unload_all_models()
    gc.collect()

    t = timer()
    with KeyWarnings() as warn:
        (style,) = nodes.StyleModelLoader().load_style_model(paths["redux"].name)
        (vision,) = nodes.CLIPVisionLoader().load_clip(paths["siglip"].name)
    report["redux_siglip_load_s"], report["redux_siglip_key_warnings"] = round(timer() - t, 1), warn.messages
    report["style_model_type"] = type(style.model).__name__
    report["clip_vision_image_size"] = vision.image_size
    t = timer()
    (vision_out,) = nodes.CLIPVisionEncode().encode(vision, image, "center")
    (redux_cond,) = nodes.StyleModelApply().apply_stylemodel(cond, style, vision_out, 1.0, "multiply")
    report["redux_s"] = round(timer() - t, 1)
    report["siglip_last_hidden_state"] = list(vision_out["last_hidden_state"].shape)
    report["redux_cond_shape"] = list(redux_cond[0][0].shape)
    del style, vision, vision_out
    gc.collect()
    return report


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build (once) and verify the random Flux files.")
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--t5-layers", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--build-only", action="store_true")
    a = parser.parse_args()
    if a.build_only:
        print(ensure_flux_files(depth=a.depth, single=a.single, t5_layers=a.t5_layers))
    else:
        print(json.dumps(verify_and_time(None, a.depth, a.single, a.t5_layers, a.size), indent=1))
