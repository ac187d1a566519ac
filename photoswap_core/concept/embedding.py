"""Source "embedding": a textual-inversion embedding from models/embeddings, used through ComfyUI's `embedding:`
prompt syntax.

The concept words become `embedding:<name>` (plus the class word, when one is given or found in the sidecar). The
name must exist (the error lists the available ones) and its vector width must fit the connected CLIP; the CLIP's
tokenizer is copied, never changed, when it does not yet look into models/embeddings.
"""
from __future__ import annotations

import copy
import logging
import os

from ..clip_tokens import EMBEDDING_PREFIX, sub_tokenizers
from ..errors import PhotoswapInputError
from .choices import NONE_CHOICE
from .model_folders import resolve_file, short_list
from .result import ConceptRequest, ConceptSource, LoadedConcept
from .words import find_word_metadata, make_concept

log = logging.getLogger(__name__)

_EMBED_EXT = (".safetensors", ".pt", ".bin")


def embedding_prompt_name(name: str) -> str:
    """The name to write after 'embedding:' — the file name without extension when ComfyUI resolves it to the same
    file, else the full file name."""
    import folder_paths

    stem, ext = os.path.splitext(name)
    if ext.lower() not in _EMBED_EXT:
        return name
    chosen = folder_paths.get_full_path("embeddings", name)
    for e in _EMBED_EXT:  # ComfyUI's load_embed tries these in order for a name without extension
        other = folder_paths.get_full_path("embeddings", stem + e)
        if other is not None:
            return stem if os.path.abspath(other) == os.path.abspath(chosen or "") else name
    return name


def _checked_prompt_name(name: str) -> str:
    import folder_paths

    if not name or name == NONE_CHOICE or folder_paths.get_full_path("embeddings", name) is None:
        raise PhotoswapInputError(
            "embedding_name", "a textual-inversion embedding that exists in models/embeddings",
            f"'{name}' does not exist; available: {short_list(folder_paths.get_filename_list('embeddings'))}. Put "
            "the .safetensors/.pt file into ComfyUI/models/embeddings")
    prompt_name = embedding_prompt_name(name)
    if any(c.isspace() for c in prompt_name) or "," in prompt_name:
        raise PhotoswapInputError("embedding_name", "an embedding file name without spaces or commas",
                                  f"rename '{name}' (ComfyUI's 'embedding:' syntax ends the name at a space/comma)")
    return prompt_name


def _vectors_per_encoder(subs: list, name: str, prompt_name: str, dirs: list) -> dict:
    """{sub-tokenizer attribute: number of vectors} for the encoders whose width the embedding fits."""
    import comfy.sd1_clip

    fits, clip_widths, file_widths = {}, {}, {}
    for attr, sdtok in subs:
        size = getattr(sdtok, "embedding_size", None)
        clip_widths[attr] = size
        emb = comfy.sd1_clip.load_embed(prompt_name, dirs, size, getattr(sdtok, "embedding_key", None))
        if emb is not None and emb.shape[-1] == size:
            fits[attr] = int(emb.reshape(-1, emb.shape[-1]).shape[0])
        elif emb is not None:
            file_widths[attr] = int(emb.shape[-1])
    if not fits:
        found = sorted(set(file_widths.values()))
        raise PhotoswapInputError(
            "embedding_name", f"an embedding trained for this CLIP (vector width {sorted(set(clip_widths.values()))})",
            f"'{name}' has vectors of width {found or 'unknown (unreadable file)'}; it was trained for another model "
            "family — pick an embedding for this base model or connect the model it was trained for")
    missing = [a for a, _s in subs if a not in fits]
    if missing:
        log.warning("Photoswap: embedding %s has no vectors for %s (only %s); those encoders ignore it", name,
                    missing, list(fits))
    return fits


def _as_list(value) -> list:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _clip_seeing(clip, subs: list, dirs: list):
    """`clip`, or a clone whose tokenizer copy also looks into `dirs` (the input CLIP is never changed)."""
    needs = [attr for attr, sdtok in subs
             if not sdtok.embedding_directory or not set(dirs) <= set(_as_list(sdtok.embedding_directory))]
    if not needs:
        return clip
    new = clip.clone()
    outer = copy.copy(clip.tokenizer)
    for attr in needs:
        sdtok = copy.copy(getattr(outer, attr))
        sdtok.embedding_directory = list(dict.fromkeys(_as_list(sdtok.embedding_directory) + list(dirs)))
        setattr(outer, attr, sdtok)
    new.tokenizer = outer
    return new


def prepare_embedding(clip, name: str):
    """(clip to use, prompt name, vectors per sub-encoder). Checks the embedding exists and fits this CLIP."""
    import folder_paths

    if clip is None:
        raise PhotoswapInputError("clip", "the base CLIP the embedding was trained for",
                                  "connect the CLIP output of a checkpoint loader to this node's clip input")
    prompt_name = _checked_prompt_name(name)
    dirs = folder_paths.get_folder_paths("embeddings")
    subs = sub_tokenizers(clip)
    if not subs:
        raise PhotoswapInputError("clip", "a CLIP with a CLIP tokenizer (SD1.x/SD2.x/SDXL)",
                                  f"connect an SD checkpoint's CLIP (got {type(getattr(clip, 'tokenizer', None))})")
    fits = _vectors_per_encoder(subs, name, prompt_name, dirs)
    return _clip_seeing(clip, subs, dirs), prompt_name, fits


def path_of(request: ConceptRequest) -> str:
    return resolve_file("embeddings", request.embedding_name, "embedding_name", "textual-inversion embedding")


def load(request: ConceptRequest) -> LoadedConcept:
    import folder_paths

    clip, prompt_name, _fits = prepare_embedding(request.clip, request.embedding_name)
    meta = find_word_metadata(folder_paths.get_full_path("embeddings", request.embedding_name)) \
        if request.prefer_metadata else None
    class_word = " ".join((request.class_word or "").split())
    if not class_word and meta is not None and meta.class_word:
        class_word = " ".join(meta.class_word.split())
    words = f"{EMBEDDING_PREFIX}{prompt_name}" + (f" {class_word}" if class_word else "")
    concept = make_concept(clip, words, class_word, kind="embedding", origin="the embedding name",
                           source=request.embedding_name, embedding_name=prompt_name)
    if not any(s.startswith(f"<{EMBEDDING_PREFIX}") for s in concept.token_strings):
        raise PhotoswapInputError("embedding_name", "an embedding ComfyUI's tokenizer can load",
                                  f"'{request.embedding_name}' produced no vectors in the prompt; re-export it as "
                                  ".safetensors")
    return LoadedConcept(model=request.model, clip=clip, vae=None, concept=concept)


SOURCE = ConceptSource(kind="embedding", path_of=path_of, load=load)
