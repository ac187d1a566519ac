"""Loading a concept: the one entry point the Concept Loader node calls, and the table of sources it dispatches to.

A new source is a module with `path_of(request)` and `load(request)` and one row in `SOURCES_BY_KIND`; see
`result.ConceptSource`.
"""
from __future__ import annotations

from ..errors import PhotoswapInputError
from . import checkpoint, diffusers_folder, embedding, lora
from .choices import NONE_CHOICE, SOURCE_TO_KIND, kind_of
from .result import ConceptChain, ConceptRequest, ConceptSource, LoadedConcept, concepts_of
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
    _check_chain(request)
    loaded = _source_for(request.source).load(request)
    if request.vae is not None:
        loaded.vae = request.vae
    if request.previous is not None:
        loaded.concept = ConceptChain(concepts_of(request.previous) + (loaded.concept,))
    return loaded


WHOLE_MODEL_KINDS = ("checkpoint", "diffusers")  # sources that bring their own MODEL and CLIP


def _check_chain(request: ConceptRequest) -> None:
    """After a concept that lives in the MODEL/CLIP (a LoRA, a checkpoint), a source that replaces them would drop
    it: such chains are refused (an embedding lives in its file and survives)."""
    if request.previous is None or kind_of(request.source) not in WHOLE_MODEL_KINDS:
        return
    kept = [c for c in concepts_of(request.previous) if getattr(c, "kind", "") != "embedding"]
    if kept:
        raise PhotoswapInputError(
            "previous", f"earlier concepts that survive a new {request.source} (this source replaces the MODEL "
                        f"and CLIP that carry '{kept[0].words}')",
            "load the checkpoint or diffusers folder first, then chain the LoRA and embedding concepts after it")


def load_concept(source: str, *, ckpt_name: str = NONE_CHOICE, diffusers_folder: str = NONE_CHOICE,
                 lora_name: str = NONE_CHOICE, embedding_name: str = NONE_CHOICE, concept_words: str = "",
                 class_word: str = "", prefer_metadata: bool = True, strength_model: float = 1.0,
                 strength_clip: float = 1.0, model=None, clip=None, vae=None, previous=None) -> LoadedConcept:
    """Load a concept in one of its forms (the Concept Loader's inputs as keywords); see the package docstring."""
    return load(ConceptRequest(source=source, ckpt_name=ckpt_name, diffusers_folder=diffusers_folder,
                               lora_name=lora_name, embedding_name=embedding_name, concept_words=concept_words,
                               class_word=class_word, prefer_metadata=prefer_metadata, strength_model=strength_model,
                               strength_clip=strength_clip, model=model, clip=clip, vae=vae, previous=previous))


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
