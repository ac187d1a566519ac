"""The PHOTOSWAP_CONCEPT object: which words name a personalised concept and how they tokenize.

Produced by the concept loader (DreamBooth checkpoint / diffusers folder / LoRA / textual-inversion embedding) and read
by the prompt pair node, which puts `words` into the target prompt.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Concept:
    """A learned concept.

    words: what goes into the target prompt in place of the subject word, e.g. "sks dog" (DreamBooth) or
        "embedding:my_cat" (textual inversion).
    class_word: the generic class noun inside `words` ("dog"); empty when unknown (the prompt pair then infers it:
        the subject word if it is one of the words, else the last of several words). The remaining word(s) are the
        concept's identifier ("sks"), whose token positions LocalBlend uses in the target prompt.
    kind: how the concept was loaded: "checkpoint", "diffusers", "lora", "embedding" or "words" (typed only).
    token_ids: the CLIP token ids of `words` without BOS/EOS (empty for an embedding, whose vectors are not ids).
    embedding_name: the textual-inversion embedding name (without the "embedding:" prefix), or None.
    """

    words: str
    class_word: str
    kind: str
    token_ids: tuple
    embedding_name: str | None = None
