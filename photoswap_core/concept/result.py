"""What loading a concept produces (the PHOTOSWAP_CONCEPT object and the node's outputs) and what a source gets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .choices import NONE_CHOICE


@dataclass(frozen=True)
class Concept:
    """A learned concept.

    words: what goes into the target prompt in place of the subject word, e.g. "sks dog" (DreamBooth) or
        "embedding:my_cat" (textual inversion).
    class_word: the generic class noun inside `words` ("dog"); empty when unknown (the prompt pair then infers it:
        the subject word if it is one of the words, else the last of several words). The remaining word(s) are the
        concept's identifier ("sks"), whose token positions LocalBlend uses in the target prompt.
    kind: how the concept was loaded: "checkpoint", "diffusers", "lora", "embedding" or "words" (typed only).
    token_ids: the CLIP token ids of `words` without BOS/EOS, as the loaded CLIP tokenizes them. An embedding's
        vectors are not ids and are left out (for "embedding:my_cat" alone this is empty; for "embedding:my_cat cat"
        it holds the ids of "cat").
    embedding_name: the textual-inversion embedding name (without the "embedding:" prefix), or None.
    token_strings: readable tokens of `words` in order ("sks</w>", "dog</w>"; an embedding as "<embedding:name #i>").
    source: the file or folder the concept came from.
    report: the human-readable tokenization report (also logged).
    """

    words: str
    class_word: str
    kind: str
    token_ids: tuple
    embedding_name: str | None = None
    token_strings: tuple = ()
    source: str = ""
    report: str = ""


@dataclass(frozen=True)
class ConceptChain:
    """Several concepts for one swap, in the order of the prompt pair's subject words: what chained Concept Loaders
    output (the second loader's `previous` input takes the first one's CONCEPT; MODEL and CLIP flow through it, so
    LoRAs stack and embeddings add tokens)."""

    concepts: tuple  # of Concept

    @property
    def report(self) -> str:
        return "\n\n".join(f"concept {i + 1}: {c.report}" for i, c in enumerate(self.concepts))


def concepts_of(value) -> tuple:
    """The concepts a PHOTOSWAP_CONCEPT value holds: a Concept is a chain of one."""
    return tuple(getattr(value, "concepts", None) or (value,))


@dataclass
class LoadedConcept:
    model: object  # comfy.model_patcher.ModelPatcher or None
    clip: object  # comfy.sd.CLIP or None
    vae: object  # comfy.sd.VAE or None
    concept: Concept
    notes: list = field(default_factory=list)


@dataclass(frozen=True)
class ConceptRequest:
    """The Concept Loader's inputs in one object: what every source's loader receives."""

    source: str
    ckpt_name: str = NONE_CHOICE
    diffusers_folder: str = NONE_CHOICE
    lora_name: str = NONE_CHOICE
    embedding_name: str = NONE_CHOICE
    concept_words: str = ""
    class_word: str = ""
    prefer_metadata: bool = True
    strength_model: float = 1.0
    strength_clip: float = 1.0
    model: object = None
    clip: object = None
    vae: object = None
    previous: object = None  # a Concept or ConceptChain from an earlier loader, or None


@dataclass(frozen=True)
class ConceptSource:
    """One form a concept comes in. `path_of` names the file/folder a request points at (PhotoswapInputError when it
    cannot); `load` turns the request into a LoadedConcept (all validation included)."""

    kind: str
    path_of: Callable[[ConceptRequest], str]
    load: Callable[[ConceptRequest], LoadedConcept]
