"""The PHOTOSWAP_CONCEPT object and the loading of a learned concept in every form it comes in.

Produced by the Concept Loader (DreamBooth checkpoint / diffusers folder / LoRA / textual-inversion embedding) and read
by the prompt pair node, which puts `words` into the target prompt. `load_concept` dispatches on the `source` choice
through `loader.SOURCES_BY_KIND`, one module per source:

* `checkpoint` — a single-file DreamBooth checkpoint from models/checkpoints;
* `diffusers_folder` — a diffusers pipeline folder from models/diffusers (added tokens such as "<sks>" restored;
  small-width SD1/SD2-topology folders built from their own configs by `diffusers_configs`);
* `lora` — a DreamBooth-LoRA applied on the connected base MODEL/CLIP, family mismatches refused;
* `embedding` — a textual-inversion embedding used through ComfyUI's `embedding:` syntax.

Shared by the sources: `words` (concept words from widget or metadata, validation, the tokenization report),
`safe_files` (reading files without unpickling objects, fingerprints), `vocabulary` (added tokens),
`model_folders` (names in ComfyUI's model folders), `choices` (the node's choice lists), `result` (the objects).
"""
from __future__ import annotations

from .choices import KINDS, NONE_CHOICE, SOURCE_TO_KIND, SOURCES
from .diffusers_folder import apply_prediction_type
from .loader import SOURCES_BY_KIND, load, load_concept, source_fingerprint, source_path
from .model_folders import diffusers_folder_choices, file_choices, list_diffusers_folders
from .result import Concept, ConceptChain, ConceptRequest, LoadedConcept, concepts_of
from .safe_files import fingerprint
from .words import WordMetadata, analyse_words, find_word_metadata, resolve_words, unused_added_tokens_warning, \
    words_from_instance_prompt

__all__ = [
    "KINDS", "NONE_CHOICE", "SOURCES", "SOURCE_TO_KIND", "SOURCES_BY_KIND", "Concept", "ConceptChain",
    "ConceptRequest", "concepts_of",
    "LoadedConcept", "WordMetadata", "analyse_words", "apply_prediction_type", "diffusers_folder_choices",
    "file_choices", "find_word_metadata", "fingerprint", "list_diffusers_folders", "load", "load_concept",
    "resolve_words", "source_fingerprint", "source_path", "unused_added_tokens_warning", "words_from_instance_prompt",
]
