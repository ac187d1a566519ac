"""Source "checkpoint": a single-file DreamBooth checkpoint from models/checkpoints.

Loaded with ComfyUI's `load_state_dict_guess_config` after a safe read (safe_files). Token-embedding rows beyond the
CLIP vocabulary (tokens added at training time) are restored when the metadata names the tokens ("added_tokens" in
the sidecar or header; a single file carries no tokenizer), else dropped with a warning.
"""
from __future__ import annotations

import logging
import os

from ..errors import PhotoswapInputError
from .model_folders import resolve_file
from .result import ConceptRequest, ConceptSource, LoadedConcept
from .safe_files import load_state_dict_safely
from .vocabulary import CLIP_VOCAB_SIZE, extend_clip_vocab, split_added_rows
from .words import choose_words, make_concept

log = logging.getLogger(__name__)


def _has_vae(sd: dict) -> bool:
    return any(k.startswith(("first_stage_model.", "vae.")) for k in sd)


def _split_text_encoder_rows(sd: dict) -> dict:
    """{token-embedding key: rows beyond the CLIP vocabulary}, cut off `sd` so ComfyUI can load it."""
    extra = {}
    for key in list(sd.keys()):
        if key.endswith("token_embedding.weight") and not key.startswith("model.diffusion_model."):
            rows = split_added_rows(sd, key)
            if rows is not None:
                extra[key] = rows
    return extra


def _restore_added_tokens(clip, name: str, extra: dict, added_tokens: list[str] | None) -> None:
    for key, rows in extra.items():
        if added_tokens and len(added_tokens) == rows.shape[0]:
            tokens = [(t, CLIP_VOCAB_SIZE + i) for i, t in enumerate(added_tokens)]
            target = extend_clip_vocab(clip, rows.shape[1], tokens, rows)
            log.info("Photoswap: %s: added tokens %s restored into %s from the metadata", name, added_tokens, target)
        else:
            log.warning("Photoswap: %s: the text encoder has %d token-embedding row(s) beyond the CLIP vocabulary "
                        "(%s) — tokens added at training time. Their strings are unknown, so they were dropped; "
                        "list them as \"added_tokens\" in %s.json (or load the diffusers folder) to use them.",
                        name, rows.shape[0], key, os.path.splitext(name)[0])


def load_checkpoint(path: str, embedding_directory, added_tokens: list[str] | None = None):
    """(model, clip or None, vae or None) of a single-file checkpoint."""
    import comfy.sd

    name = os.path.basename(path)
    sd, metadata = load_state_dict_safely(path, "ckpt_name")
    extra = _split_text_encoder_rows(sd)
    has_vae = _has_vae(sd)
    try:
        out = comfy.sd.load_state_dict_guess_config(sd, output_vae=has_vae, output_clip=True,
                                                    embedding_directory=embedding_directory, metadata=metadata)
    except Exception as exc:
        raise PhotoswapInputError("ckpt_name", "a Stable Diffusion checkpoint ComfyUI can load",
                                  f"'{name}' failed to load ({type(exc).__name__}: {exc})") from exc
    if out is None or out[0] is None:
        raise PhotoswapInputError("ckpt_name", "a Stable Diffusion checkpoint (UNet + text encoder + VAE)",
                                  f"ComfyUI could not detect the model type of '{name}'; pick a full SD1.x/SD2.x/SDXL "
                                  "checkpoint (a LoRA goes with source 'lora', an embedding with 'embedding')")
    model, clip, vae = out[0], out[1], (out[2] if has_vae else None)
    if clip is not None:
        _restore_added_tokens(clip, name, extra, added_tokens)
    return model, clip, vae


def path_of(request: ConceptRequest) -> str:
    return resolve_file("checkpoints", request.ckpt_name, "ckpt_name", "checkpoint file")


def load(request: ConceptRequest) -> LoadedConcept:
    import folder_paths

    path, display = path_of(request), request.ckpt_name
    chosen = choose_words(path, display, request.concept_words, request.class_word, request.prefer_metadata)
    added = chosen.meta.added_tokens if chosen.meta is not None else None
    model, clip, vae = load_checkpoint(path, folder_paths.get_folder_paths("embeddings"), added)
    if clip is None:
        if request.clip is None:
            raise PhotoswapInputError(
                "clip", "a text encoder: the checkpoint holds none",
                f"'{display}' has no text-encoder weights (a UNet-only file); connect the base model's CLIP to the "
                "clip input")
        log.warning("Photoswap: %s has no text encoder; using the connected CLIP", display)
        clip = request.clip
    elif request.clip is not None or request.model is not None:
        log.warning("Photoswap: source 'checkpoint' loads its own MODEL and CLIP; the connected model/clip inputs "
                    "are ignored")
    if vae is None and request.vae is None:
        log.warning("Photoswap: %s holds no VAE; connect one to the vae input", display)
    concept = make_concept(clip, chosen.words, chosen.class_word, kind="checkpoint", origin=chosen.origin,
                           source=display)
    return LoadedConcept(model=model, clip=clip, vae=vae, concept=concept)


SOURCE = ConceptSource(kind="checkpoint", path_of=path_of, load=load)
