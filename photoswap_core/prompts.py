"""The Prompt Pair stage: the source and target prompts (and the negative) encoded like CLIP Text Encode, with the
token bookkeeping of alignment.py."""
from __future__ import annotations

from .alignment import PromptTokenizer, build_prompt_pair
from .errors import PhotoswapInputError


def _encode(clip, text: str):
    """Like core CLIPTextEncode."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _concept_words(concept, concept_words: str):
    """(concept words, class word or None) from a connected PHOTOSWAP_CONCEPT, else the typed words."""
    if concept is None:
        return concept_words, None
    words = getattr(concept, "words", None)
    if not isinstance(words, str):
        raise PhotoswapInputError("concept", "a PHOTOSWAP_CONCEPT from the Photoswap Concept Loader",
                                  f"connect the concept loader's CONCEPT output (got {type(concept).__name__})")
    if not words.strip():
        raise PhotoswapInputError("concept", "a concept whose words are set (e.g. 'sks dog')",
                                  "set the concept words in the Photoswap Concept Loader, or disconnect the "
                                  "concept and type concept_words")
    return words, getattr(concept, "class_word", "") or None  # empty: infer (see alignment's docstring)


def encode_prompt_pair(clip, source_prompt, subject_word, concept_words, target_prompt="", negative_prompt="",
                       concept=None):
    """(source CONDITIONING, target CONDITIONING, negative CONDITIONING, PromptPair)."""
    if clip is None:
        raise PhotoswapInputError("clip", "a CLIP model", "connect the CLIP output of a checkpoint loader or of "
                                  "the Photoswap Concept Loader (a checkpoint without a text encoder has none)")
    words, class_word = _concept_words(concept, concept_words)
    pair = build_prompt_pair(PromptTokenizer.from_clip(clip), source_prompt, subject_word, words,
                             target_prompt=target_prompt or None, class_word=class_word)
    source = _encode(clip, pair.source_prompt)
    target = _encode(clip, pair.target_prompt)
    negative = _encode(clip, negative_prompt or "")
    width = source[0][0].shape[1]
    if width != pair.max_len:
        raise PhotoswapInputError(
            "clip", f"a CLIP text encoder with a {pair.max_len}-token context (SD1.x, SD2.x, SDXL); this one "
            f"produced {width} tokens", "use an SD1.x, SD2.x or SDXL model: other model families are not "
            "supported by Photoswap yet")
    return source, target, negative, pair
