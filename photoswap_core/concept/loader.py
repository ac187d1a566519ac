"""Loading a concept: the one entry point the Concept Loader node calls, and the table of sources it dispatches to.

A new source is a module with `path_of(request)` and `load(request)` and one row in `SOURCES_BY_KIND`; see
`result.ConceptSource`.
"""
from __future__ import annotations

from ..errors import PhotoswapInputError
from . import checkpoint, diffusers_folder, embedding, lora
from .choices import NONE_CHOICE, SOURCE_TO_KIND, kind_of
from .result import ConceptRequest, ConceptSource, LoadedConcept
from .safe_files import fingerprint

SOURCES_BY_KIND: dict[str, ConceptSource] = {
    source.kind: source for source in (checkpoint.SOURCE, diffusers_folder.SOURCE, lora.SOURCE, embedding.SOURCE)}


def _source_for(source: str) -> ConceptSource:
    kind = kind_of(source)
    if kind is None:
        raise PhotoswapInputError("source", f"one of {sorted(set(SOURCE_TO_KIND))}", f"pick a source (got {source!r})")
    return SOURCES_BY_KIND[kind]


def load(request: ConceptRequest) -> LoadedConcept:
    """Load the concept a request describes; all validation happens here or in the source. Never mutates its
    inputs. A connected VAE always wins (many DreamBooth checkpoints ship a poor one)."""
    loaded = _source_for(request.source).load(request)
    if request.vae is not None:
        loaded.vae = request.vae
    return loaded


def load_concept(source: str, *, ckpt_name: str = NONE_CHOICE, diffusers_folder: str = NONE_CHOICE,
                 lora_name: str = NONE_CHOICE, embedding_name: str = NONE_CHOICE, concept_words: str = "",
                 class_word: str = "", prefer_metadata: bool = True, strength_model: float = 1.0,
                 strength_clip: float = 1.0, model=None, clip=None, vae=None) -> LoadedConcept:
    """Load a concept in one of its forms (the Concept Loader's inputs as keywords); see the package docstring."""
    return load(ConceptRequest(source=source, ckpt_name=ckpt_name, diffusers_folder=diffusers_folder,
                               lora_name=lora_name, embedding_name=embedding_name, concept_words=concept_words,
                               class_word=class_word, prefer_metadata=prefer_metadata, strength_model=strength_model,
                               strength_clip=strength_clip, model=model, clip=clip, vae=vae))


def source_path(source: str, ckpt_name: str = "", diffusers_folder: str = "", lora_name: str = "",
                embedding_name: str = "") -> str | None:
    """The file/folder a source points at (None when unresolvable) — for cache fingerprints."""
    request = ConceptRequest(source=source, ckpt_name=ckpt_name, diffusers_folder=diffusers_folder,
                             lora_name=lora_name, embedding_name=embedding_name)
    try:
        return _source_for(source).path_of(request)
    except Exception:
        return None


def source_fingerprint(source: str, ckpt_name: str = "", diffusers_folder: str = "", lora_name: str = "",
                       embedding_name: str = "") -> str:
    """Changes when what the inputs point at (or its concept metadata) changes on disk: the node's cache key."""
    return fingerprint(source_path(source, ckpt_name, diffusers_folder, lora_name, embedding_name))
