"""Source "lora": a DreamBooth-LoRA from models/loras, applied with `comfy.sd.load_lora_for_models` on the base
MODEL/CLIP given as inputs.

Key formats: kohya (`lora_unet_..._lora_down/up` + `alpha`, `lora_te_...`), diffusers/PEFT
(`unet.<module>.lora_A/lora_B`, `text_encoder.<module>.lora_A/lora_B`; the alpha comes from the
`lora_adapter_metadata` that diffusers writes into the safetensors header, else alpha = rank, PEFT's scale 1), old
diffusers attention-processor keys and ComfyUI's own trained-LoRA keys. ComfyUI 0.3.75 does not map PEFT UNet keys for
SD1.x/SDXL, so they are renamed to kohya-style names first. Before anything is applied every LoRA layer is matched
against the base model: a layer whose shape does not fit, or no layer fitting at all, or more than
`LORA_UNMATCHED_LIMIT` of the UNet layers finding no counterpart, is a family mismatch (an SDXL LoRA on an SD1.5
base...) and an error.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

from ..errors import PhotoswapInputError
from .model_folders import resolve_file
from .result import ConceptRequest, ConceptSource, LoadedConcept
from .safe_files import load_state_dict_safely
from .words import choose_words, make_concept

log = logging.getLogger(__name__)

LORA_UNMATCHED_LIMIT = 0.10  # fraction of a LoRA's UNet layers allowed to find no counterpart in the base model
_PEFT_SUFFIXES = ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"),
                  (".lora_A.default.weight", ".lora_down.weight"), (".lora_B.default.weight", ".lora_up.weight"),
                  (".lora.down.weight", ".lora_down.weight"), (".lora.up.weight", ".lora_up.weight"),
                  (".lora_linear_layer.down.weight", ".lora_down.weight"),
                  (".lora_linear_layer.up.weight", ".lora_up.weight"))
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.",
               "conv_norm_out.", "add_embedding.")


def _peft_alphas(metadata: dict) -> dict:
    """{component: (lora_alpha, r, use_rslora)} from diffusers' lora_adapter_metadata header."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for comp, cfg in data.items() if isinstance(data, dict) else ():
        if isinstance(cfg, dict) and cfg.get("lora_alpha") is not None:
            out[comp] = (float(cfg["lora_alpha"]), cfg.get("r"), bool(cfg.get("use_rslora", False)))
    return out


def normalize_lora(sd: dict, metadata: dict | None = None) -> tuple[dict, str]:
    """Rename diffusers/PEFT UNet keys to the kohya-style names ComfyUI maps, add PEFT alphas from the header.
    Returns (state dict, detected format)."""
    keys = list(sd.keys())
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        fmt = "kohya"
    elif any(".lora_A." in k or ".lora_B." in k for k in keys):
        fmt = "diffusers/PEFT"
    elif any("_lora.down." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        fmt = "diffusers (attention processors)"
    elif any(k.startswith("diffusion_model.") for k in keys):
        fmt = "ComfyUI"
    else:
        fmt = "unknown"
    if fmt not in ("diffusers/PEFT", "diffusers (attention processors)"):
        return sd, fmt
    alphas = _peft_alphas(metadata)
    out = {}
    for k, v in sd.items():
        new_key = k
        for src, dst in _PEFT_SUFFIXES:
            if k.endswith(src):
                module = k[:-len(src)]
                stripped = module
                for prefix in ("base_model.model.", "unet.base_model.model."):
                    if stripped.startswith(prefix):
                        stripped = "unet." + stripped[len(prefix):]
                if stripped.startswith("unet."):
                    unet_path = stripped[len("unet."):]
                elif stripped.startswith(_UNET_ROOTS):
                    unet_path = stripped
                else:
                    unet_path = None
                if unet_path is not None and ".processor." not in unet_path:
                    lora_module = "lora_unet_" + unet_path.replace(".", "_")
                    comp = "unet"
                else:
                    lora_module = module
                    comp = module.split(".", 1)[0]
                new_key = lora_module + dst
                if comp in alphas and dst == ".lora_down.weight" and f"{lora_module}.alpha" not in out:
                    lora_alpha, r, rslora = alphas[comp]
                    rank = v.shape[0]
                    alpha = lora_alpha * (rank ** 0.5) if rslora else lora_alpha
                    out[f"{lora_module}.alpha"] = torch.tensor(float(alpha))
                break
        out[new_key] = v
    return out, fmt


def _family_of_model(model) -> str:
    try:
        return type(model.model.model_config).__name__
    except AttributeError:
        return "unknown"


_CONTEXT_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner", 4096: "a DiT/T5 model"}


def _guess_lora_family(sd: dict) -> str:
    keys = list(sd.keys())
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "SDXL"
    if any(k.startswith(("transformer.", "lora_transformer_", "double_blocks", "single_blocks")) or
           "single_transformer_blocks" in k for k in keys):
        return "a DiT model (Flux/SD3/...)"
    for k, v in sd.items():
        if ("attn2" in k and ("to_k" in k or "to_v" in k)) and ("lora_down" in k or "lora_A" in k) and v.dim() >= 2:
            return _CONTEXT_FAMILY.get(int(v.shape[1]), f"a model with {int(v.shape[1])}-wide text context")
    return "another model family"


@dataclass
class LoraCheck:
    fmt: str
    patches: dict
    unet_applied: int
    clip_applied: int
    mismatched: list  # [(model key, lora shape text, model shape)]
    unmatched_unet: list
    unmatched_te: list
    unet_modules: int


def _lora_modules(keys) -> set:
    out = set()
    for k in keys:
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_mid.weight", ".dora_scale",
                       ".diff", ".diff_b", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1",
                       ".lokr_w2", ".lora_A.weight", ".lora_B.weight", "_lora.down.weight", "_lora.up.weight"):
            if k.endswith(suffix):
                out.add(k[:-len(suffix)])
                break
        else:
            out.add(k.rsplit(".", 1)[0])
    return out


def _is_te_key(k: str) -> bool:
    return k.startswith(("lora_te", "text_encoder", "text_encoders.", "te_", "lora_te1_", "lora_te2_"))


def check_lora(model, clip, sd: dict, fmt: str) -> LoraCheck:
    """Match every LoRA layer against the base model/CLIP (no patching)."""
    import comfy.lora
    import comfy.lora_convert

    sd = comfy.lora_convert.convert_lora(sd)
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    consumed = set()
    for adapter in patches.values():
        consumed.update(getattr(adapter, "loaded_keys", ()) or ())
    for x in key_map:
        for suffix in (".alpha", ".dora_scale", ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight",
                       ".reshape_weight"):
            if x + suffix in sd:
                consumed.add(x + suffix)
    unmatched = [k for k in sd if k not in consumed]
    unmatched_mods = sorted(_lora_modules(unmatched))
    unmatched_te = [m for m in unmatched_mods if _is_te_key(m)]
    unmatched_unet = [m for m in unmatched_mods if not _is_te_key(m)]

    shapes = {}
    if model is not None:
        shapes.update({k: tuple(v.shape) for k, v in model.model.state_dict().items()})
    if clip is not None:
        shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
    mismatched, unet_applied, clip_applied = [], 0, 0
    for key, adapter in patches.items():
        offset = None
        if isinstance(key, tuple):
            key, offset = key[0], (key[1] if len(key) > 1 else None)
        if key.startswith("diffusion_model."):
            unet_applied += 1
        else:
            clip_applied += 1
        wshape = shapes.get(key)
        if wshape is not None and offset is not None:  # a slice of a fused weight (diffusers to_q on Flux's qkv)
            wshape = tuple(offset[2] if d == offset[0] else s for d, s in enumerate(wshape))
        if wshape is None:
            continue
        problem = _shape_problem(adapter, wshape)
        if problem:
            mismatched.append((key, problem, wshape))
    all_unet_modules = {m for m in _lora_modules(sd.keys()) if not _is_te_key(m)}
    return LoraCheck(fmt=fmt, patches=patches, unet_applied=unet_applied, clip_applied=clip_applied,
                     mismatched=mismatched, unmatched_unet=unmatched_unet, unmatched_te=unmatched_te,
                     unet_modules=len(all_unet_modules))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _shape_problem(adapter, wshape) -> str | None:
    """A description of the LoRA delta's shape when it cannot apply to a weight of `wshape`, else None."""
    weights = getattr(adapter, "weights", None)
    name = type(adapter).__name__
    if isinstance(adapter, tuple) and len(adapter) == 2 and adapter[0] == "diff":
        diff = adapter[1][0]
        return None if tuple(diff.shape) == tuple(wshape) else f"diff {tuple(diff.shape)}"
    if name != "LoRAAdapter" or not weights:
        return None
    up, down, _alpha, mid = weights[0], weights[1], weights[2], weights[3]
    reshape = weights[5] if len(weights) > 5 else None
    if reshape is not None:
        return None
    out_dim = int(up.shape[0])
    in_numel = _numel(down.shape[1:]) if mid is None else int(down.shape[1]) * _numel(mid.shape[2:])
    if len(wshape) < 2:
        return f"up {tuple(up.shape)} / down {tuple(down.shape)}"
    if out_dim != wshape[0] or in_numel != _numel(wshape[1:]):
        return f"up {tuple(up.shape)} @ down {tuple(down.shape)}"
    return None


def _refuse_family_mismatch(model, sd: dict, check: LoraCheck, display_name: str) -> None:
    """PhotoswapInputError on lora_name when the LoRA does not belong to the base model's family."""
    base_family = _family_of_model(model)
    lora_family = _guess_lora_family(sd)
    if check.mismatched:
        key, lora_shape, wshape = check.mismatched[0]
        raise PhotoswapInputError(
            "lora_name", f"a LoRA trained for the base model's family ({base_family})",
            f"'{display_name}' looks like a LoRA for {lora_family}, not {base_family}: {len(check.mismatched)} of "
            f"{check.unet_applied + check.clip_applied} layers do not fit (e.g. {key}: LoRA {lora_shape}, base weight "
            f"{tuple(wshape)}). Connect the base model the LoRA was trained on, or pick a LoRA trained on "
            f"{base_family}")
    if check.unet_applied + check.clip_applied == 0:
        raise PhotoswapInputError(
            "lora_name", f"a LoRA with layers of the base model ({base_family})",
            f"none of the {len(sd)} tensors in '{display_name}' ({check.fmt} keys) matches a layer of the "
            f"{base_family} base model — it is a LoRA for {lora_family} (or not a LoRA at all). Connect the base "
            "model it was trained on, or pick a LoRA for this model")
    if check.unmatched_unet and check.unet_modules and \
            len(check.unmatched_unet) / check.unet_modules > LORA_UNMATCHED_LIMIT:
        raise PhotoswapInputError(
            "lora_name", f"a LoRA whose layers exist in the base model ({base_family})",
            f"{len(check.unmatched_unet)} of {check.unet_modules} UNet layers of '{display_name}' have no counterpart "
            f"in the {base_family} base model (e.g. {check.unmatched_unet[0]}); it looks like a LoRA for "
            f"{lora_family}. Connect the base model it was trained on")


def _log_skipped_layers(check: LoraCheck, clip, display_name: str) -> None:
    if check.unmatched_unet:
        log.warning("Photoswap: LoRA %s: %d layer(s) not found in the base model and skipped: %s", display_name,
                    len(check.unmatched_unet), ", ".join(check.unmatched_unet[:5]))
    if check.unmatched_te:
        if clip is None:
            log.warning("Photoswap: LoRA %s also trains the text encoder (%d layers) but no CLIP is connected: that "
                        "part is not applied; connect the base CLIP", display_name, len(check.unmatched_te))
        else:
            log.warning("Photoswap: LoRA %s: %d text-encoder layer(s) not found in the CLIP and skipped: %s",
                        display_name, len(check.unmatched_te), ", ".join(check.unmatched_te[:5]))


def apply_lora(model, clip, path: str, display_name: str, strength_model: float, strength_clip: float):
    """(model, clip, LoraCheck) with the LoRA applied; family mismatches raise PhotoswapInputError."""
    import comfy.sd

    if model is None:
        raise PhotoswapInputError("model", "the base MODEL the LoRA was trained on",
                                  "connect the MODEL (and CLIP) output of a checkpoint loader for the LoRA's base "
                                  "model (e.g. Load Checkpoint with SD1.5) to this node's model/clip inputs")
    sd, metadata = load_state_dict_safely(path, "lora_name")
    sd, fmt = normalize_lora(sd, metadata)
    check = check_lora(model, clip, sd, fmt)
    _refuse_family_mismatch(model, sd, check, display_name)
    _log_skipped_layers(check, clip, display_name)
    log.info("Photoswap: LoRA %s (%s keys): %d UNet and %d text-encoder layers, strength %.3g / %.3g",
             display_name, fmt, check.unet_applied, check.clip_applied, strength_model, strength_clip)
    m_in = model if strength_model != 0 else None
    c_in = clip if (clip is not None and strength_clip != 0) else None
    if m_in is None and c_in is None:
        return model, clip, check
    new_model, new_clip = comfy.sd.load_lora_for_models(m_in, c_in, sd, strength_model, strength_clip)
    return (new_model if m_in is not None else model), (new_clip if c_in is not None else clip), check


def path_of(request: ConceptRequest) -> str:
    return resolve_file("loras", request.lora_name, "lora_name", "LoRA file")


def load(request: ConceptRequest) -> LoadedConcept:
    path, display = path_of(request), request.lora_name
    chosen = choose_words(path, display, request.concept_words, request.class_word, request.prefer_metadata)
    model, clip, _check = apply_lora(request.model, request.clip, path, display, request.strength_model,
                                     request.strength_clip)
    concept = make_concept(clip, chosen.words, chosen.class_word, kind="lora", origin=chosen.origin, source=display)
    return LoadedConcept(model=model, clip=clip, vae=None, concept=concept)


SOURCE = ConceptSource(kind="lora", path_of=path_of, load=load)
