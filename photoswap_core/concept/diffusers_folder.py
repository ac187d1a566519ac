"""Source "diffusers folder": a diffusers pipeline folder from models/diffusers (what the official Photoswap README
trains).

Layout: `model_index.json`, `unet/`, `text_encoder/`, `vae/`, `tokenizer/` (SDXL: also `text_encoder_2/`,
`tokenizer_2/`). Loaded like ComfyUI's own `comfy.diffusers_load.load_diffusers` (same file preference, same ComfyUI
loaders; sharded weights are merged) plus three additions:
- added tokens ("<sks>" in the tokenizer with a trained embedding row) are restored into the loaded CLIP
  (vocabulary);
- `scheduler/scheduler_config.json` `prediction_type`: when it says `v_prediction` (or `epsilon`) and ComfyUI's
  detection disagrees, the model's sampling is set accordingly (like ComfyUI's ModelSamplingDiscrete);
- an SD1/SD2-topology folder of widths ComfyUI's shape detection does not know is built from its own configs
  (diffusers_configs).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ..errors import PhotoswapInputError
from .diffusers_configs import load_from_configs
from .model_folders import resolve_diffusers_folder
from .result import ConceptRequest, ConceptSource, LoadedConcept
from .safe_files import load_merged, read_json_object
from .vocabulary import CLIP_VOCAB_SIZE, added_tokens_of, extend_clip_vocab, split_added_rows
from .words import choose_words, make_concept, unused_added_tokens_warning, with_warning

log = logging.getLogger(__name__)

UNET_FILES = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
              "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.bin")
TEXT_ENCODER_FILES = ("model.fp16.safetensors", "model.safetensors", "pytorch_model.fp16.bin", "pytorch_model.bin")
TE_EMBEDDING_KEY = "text_model.embeddings.token_embedding.weight"
LAYOUT = "a diffusers pipeline folder (model_index.json, unet/, text_encoder/, vae/, tokenizer/)"


def _weights_in(folder: str, names) -> list[str] | None:
    """The weight file(s) of a diffusers component folder, ComfyUI's preference order; shards via their index."""
    for n in names:
        p = os.path.join(folder, n)
        if os.path.isfile(p):
            return [p]
        index = p + ".index.json"
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (OSError, ValueError, KeyError):
                continue
            paths = [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
            if all(os.path.isfile(x) for x in paths):
                return paths
    return None


@dataclass
class DiffusersLayout:
    root: str
    unet: list
    vae: list
    text_encoders: list  # [(weight files, tokenizer dir or None)]
    index: dict


def _read_index(path: str, display_name: str) -> dict:
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise PhotoswapInputError("diffusers_folder", LAYOUT,
                                  f"'{display_name}' has no model_index.json; copy the whole output folder of the "
                                  "DreamBooth training script (or save the pipeline with save_pretrained)")
    try:
        return read_json_object(index_path)
    except (OSError, ValueError) as exc:
        raise PhotoswapInputError("diffusers_folder", LAYOUT,
                                  f"'{display_name}/model_index.json' is not valid JSON ({exc})") from exc


def _text_encoders(path: str, display_name: str, index: dict) -> list:
    encoders = []
    for te, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        te_dir = os.path.join(path, te)
        if te == "text_encoder_2" and not os.path.isdir(te_dir):
            if index.get("text_encoder_2") not in (None, [None, None]):
                raise PhotoswapInputError("diffusers_folder", LAYOUT,
                                          f"'{display_name}' lists text_encoder_2 in model_index.json but has no "
                                          "text_encoder_2/ subfolder; the copy is incomplete")
            continue
        files = _weights_in(te_dir, TEXT_ENCODER_FILES)
        if files is None:
            raise PhotoswapInputError("diffusers_folder", LAYOUT,
                                      f"'{display_name}/{te}/' holds no weights; the copy is incomplete")
        tok_dir = os.path.join(path, tok)
        encoders.append((files, tok_dir if os.path.isdir(tok_dir) else None))
    return encoders


def validate_diffusers_folder(path: str, display_name: str) -> DiffusersLayout:
    """The folder's component files; PhotoswapInputError naming what is missing."""
    if not os.path.isdir(path):
        raise PhotoswapInputError("diffusers_folder", LAYOUT, f"'{display_name}' is not a folder under models/diffusers")
    index = _read_index(path, display_name)
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(path, part)):
            raise PhotoswapInputError("diffusers_folder", LAYOUT,
                                      f"'{display_name}' has no {part}/ subfolder; copy the complete pipeline folder "
                                      "the trainer wrote (DreamBooth saves unet/, text_encoder/, vae/ and tokenizer/)")
    unet = _weights_in(os.path.join(path, "unet"), UNET_FILES)
    if unet is None:
        raise PhotoswapInputError("diffusers_folder", LAYOUT,
                                  f"'{display_name}/unet/' holds no weights ({', '.join(UNET_FILES)}); the copy is "
                                  "incomplete")
    vae = _weights_in(os.path.join(path, "vae"), UNET_FILES)
    if vae is None:
        raise PhotoswapInputError("diffusers_folder", LAYOUT,
                                  f"'{display_name}/vae/' holds no weights; the copy is incomplete")
    return DiffusersLayout(root=path, unet=unet, vae=vae, text_encoders=_text_encoders(path, display_name, index),
                           index=index)


def normalize_text_encoder_keys(sd: dict) -> dict:
    """transformers >= 5 saves CLIPTextModel weights without the "text_model." prefix ComfyUI expects (ComfyUI 0.3.75
    would silently leave such a text encoder uninitialised): put the prefix back."""
    if any(k.startswith("text_model.") for k in sd):
        return sd
    roots = ("embeddings.", "encoder.", "final_layer_norm.")
    if not any(k.startswith(roots) for k in sd):
        return sd
    return {("text_model." + k if k.startswith(roots) else k): v for k, v in sd.items()}


def apply_prediction_type(model, prediction_type: str | None, zsnr: bool = False):
    """A clone of `model` whose sampling matches a diffusers scheduler's prediction_type when ComfyUI's detection
    disagrees (epsilon / v_prediction); otherwise `model` itself."""
    import comfy.model_base
    import comfy.model_sampling

    wanted = {"epsilon": comfy.model_base.ModelType.EPS,
              "v_prediction": comfy.model_base.ModelType.V_PREDICTION}.get(prediction_type or "")
    if wanted is None:
        return model
    detected = model.model.model_type
    if detected == wanted and not zsnr:
        return model
    sampling_type = comfy.model_sampling.V_PREDICTION if wanted == comfy.model_base.ModelType.V_PREDICTION \
        else comfy.model_sampling.EPS

    class ModelSamplingFromScheduler(comfy.model_sampling.ModelSamplingDiscrete, sampling_type):
        pass

    m = model.clone()
    m.add_object_patch("model_sampling", ModelSamplingFromScheduler(model.model.model_config, zsnr=zsnr))
    log.info("Photoswap: scheduler_config.json says %s (zero-SNR %s); ComfyUI detected %s — using the scheduler's",
             prediction_type, zsnr, detected.name)
    return m


def _scheduler_config(path: str, display_name: str) -> dict:
    sched = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched):
        return {}
    try:
        return read_json_object(sched)
    except (OSError, ValueError) as exc:
        log.warning("Photoswap: %s: unreadable scheduler_config.json (%s); using ComfyUI's detection",
                    display_name, exc)
        return {}


def _text_encoder_parts(layout: DiffusersLayout, display_name: str) -> list:
    """[(state dict without added rows, added tokens [(string, id)], their rows or None)] per text encoder."""
    parts = []
    for files, tok_dir in layout.text_encoders:
        sd = normalize_text_encoder_keys(load_merged(files, "diffusers_folder"))
        rows = split_added_rows(sd, TE_EMBEDDING_KEY)
        tokens = added_tokens_of(tok_dir) if tok_dir is not None else []
        if tokens and rows is None:
            raise PhotoswapInputError(
                "diffusers_folder", "a text encoder with a trained embedding row for every added tokenizer token",
                f"'{display_name}': the tokenizer adds {[t for t, _ in tokens]} but the text encoder has no rows "
                "for them; save the text encoder after resize_token_embeddings (the training script does this)")
        if rows is not None and len(tokens) != rows.shape[0]:
            if len(tokens) < rows.shape[0] and [i for _t, i in tokens] == list(
                    range(CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE + len(tokens))):
                log.warning("Photoswap: %s: %d token-embedding rows have no tokenizer token; ignoring them",
                            display_name, rows.shape[0] - len(tokens))
                rows = rows[:len(tokens)]
            else:
                raise PhotoswapInputError(
                    "diffusers_folder", "a tokenizer whose added tokens match the text encoder's extra rows",
                    f"'{display_name}': tokenizer adds {len(tokens)} token(s) {tokens}, text encoder has "
                    f"{rows.shape[0]} extra row(s); save tokenizer and text encoder from the same training run")
        parts.append((sd, tokens, rows))
    return parts


def _load_components(layout: DiffusersLayout, te_parts: list, display_name: str, prediction_type,
                     embedding_directory):
    """(model, clip, vae) through ComfyUI's detection, or from the folder's configs when the detection does not know
    the UNet (a small-width SD1/SD2 model)."""
    import comfy.sd

    unet_sd = load_merged(layout.unet, "diffusers_folder")
    model = comfy.sd.load_diffusion_model_state_dict(unet_sd)
    if model is None:
        if len(te_parts) != 1:
            raise PhotoswapInputError(
                "diffusers_folder", "a diffusers pipeline ComfyUI recognises (SD1.x/SD2.x/SDXL), or an SD1/SD2-"
                "topology one (one text encoder) of other widths",
                f"'{display_name}': ComfyUI's shape detection does not know this UNet, and with {len(te_parts)} "
                "text encoders it is no SD1/SD2-topology model that could be built from its configs; use a "
                "full-size SDXL pipeline or an SD1/SD2-topology one")
        log.info("Photoswap: %s: ComfyUI's shape detection does not know this UNet; building it, the CLIP and the "
                 "VAE from the folder's own configs", display_name)
        return load_from_configs(layout.root, display_name, unet_sd, te_parts[0][0], layout.text_encoders[0][1],
                                 load_merged(layout.vae, "diffusers_folder"), prediction_type, embedding_directory)
    clip = comfy.sd.load_text_encoder_state_dicts([sd for sd, _t, _r in te_parts],
                                                  embedding_directory=embedding_directory)
    return model, clip, comfy.sd.VAE(sd=load_merged(layout.vae, "diffusers_folder"))


def load_diffusers_folder(path: str, display_name: str, embedding_directory):
    """(model, clip, vae, [added token strings]) of a diffusers pipeline folder."""
    layout = validate_diffusers_folder(path, display_name)
    te_parts = _text_encoder_parts(layout, display_name)
    scheduler = _scheduler_config(path, display_name)
    try:
        model, clip, vae = _load_components(layout, te_parts, display_name, scheduler.get("prediction_type"),
                                            embedding_directory)
    except PhotoswapInputError:
        raise
    except Exception as exc:
        raise PhotoswapInputError("diffusers_folder", "a Stable Diffusion (SD1.x/SD2.x/SDXL) diffusers pipeline",
                                  f"'{display_name}' failed to load ({type(exc).__name__}: {exc})") from exc
    added = []
    for _sd, tokens, rows in te_parts:
        if tokens:
            target = extend_clip_vocab(clip, rows.shape[1], tokens, rows)
            added.extend(t for t, _ in tokens)
            log.info("Photoswap: %s: added token(s) %s with their trained embeddings restored into %s",
                     display_name, [t for t, _ in tokens], target)
    if scheduler:
        model = apply_prediction_type(model, scheduler.get("prediction_type"),
                                      bool(scheduler.get("rescale_betas_zero_snr")))
    return model, clip, vae, added


def path_of(request: ConceptRequest) -> str:
    return resolve_diffusers_folder(request.diffusers_folder)


def load(request: ConceptRequest) -> LoadedConcept:
    import folder_paths

    path, display = path_of(request), request.diffusers_folder
    chosen = choose_words(path, display, request.concept_words, request.class_word, request.prefer_metadata)
    model, clip, vae, added_tokens = load_diffusers_folder(path, display, folder_paths.get_folder_paths("embeddings"))
    if request.clip is not None or request.model is not None:
        log.warning("Photoswap: source 'diffusers folder' loads its own MODEL and CLIP; the connected model/clip "
                    "inputs are ignored")
    concept = make_concept(clip, chosen.words, chosen.class_word, kind="diffusers", origin=chosen.origin,
                           source=display)
    warning = unused_added_tokens_warning(display, added_tokens, concept.token_ids, chosen.words)
    return LoadedConcept(model=model, clip=clip, vae=vae, concept=with_warning(concept, warning))


SOURCE = ConceptSource(kind="diffusers", path_of=path_of, load=load)
