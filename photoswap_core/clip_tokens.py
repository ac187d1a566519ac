"""CLIP tokens and concept words, shared by the concept loader's words report and the prompt pair's alignment.

Why one module: both need the HF tokenizer and the `tokenize()` output key inside a ComfyUI CLIP, and both need to
split concept words into identifier and class word. Two copies of either drift apart (they did: only one preferred the
subject word), and then the report describes other tokens than the ones LocalBlend uses.

A ComfyUI CLIP holds an outer tokenizer (`SD1Tokenizer`, `SD2Tokenizer`, `SDXLTokenizer`, ...) whose attributes
`clip_l` / `clip_h` / `clip_g` are `SDTokenizer`s, each wrapping a HF `CLIPTokenizer` (`.tokenizer`). All of them use
the same CLIP BPE vocabulary; the *primary* one is clip_l (SD1.x, SDXL), else clip_h (SD2.x), else clip_g, else any
other. `clip.tokenize(text, return_word_ids=True)` returns a dict keyed by the outer tokenizer's `clip_name` ("l",
"h") for single-encoder wrappers, else by the attribute name without "clip_" ("l", "g").
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import PhotoswapInputError

EMBEDDING_PREFIX = "embedding:"  # ComfyUI's prompt syntax for a textual-inversion embedding
CONTEXT_TOKENS = 77  # the CLIP text encoders' context length, start and end tokens included
_PRIMARY_ORDER = {"clip_l": 0, "clip_h": 1, "clip_g": 2}


@dataclass(frozen=True)
class PrimaryTokenizer:
    """The primary CLIP tokenizer of a ComfyUI CLIP: its attribute, its `tokenize()` key, the SDTokenizer, the HF
    tokenizer."""

    attr: str
    key: str
    sd_tokenizer: object
    hf: object


def _outer_tokenizer(clip):
    return getattr(clip, "tokenizer", clip)


def sub_tokenizers(clip) -> list[tuple[str, object]]:
    """[(attribute, SDTokenizer)] inside a ComfyUI CLIP (or its outer tokenizer), primary first; [] when there is no
    CLIP-BPE tokenizer (or `clip` is None)."""
    if clip is None:
        return []
    found = []
    for attr, value in getattr(_outer_tokenizer(clip), "__dict__", {}).items():
        hf = getattr(value, "tokenizer", None)
        if hasattr(value, "tokenize_with_weights") and hasattr(hf, "encode") and hasattr(hf, "convert_ids_to_tokens"):
            found.append((attr, value))
    found.sort(key=lambda kv: _PRIMARY_ORDER.get(kv[0], len(_PRIMARY_ORDER)))
    return found


def primary_tokenizer(clip) -> PrimaryTokenizer:
    """The primary tokenizer (see the module docstring); PhotoswapInputError on the `clip` input when there is none."""
    subs = sub_tokenizers(clip)
    outer = _outer_tokenizer(clip)
    if not subs:
        raise PhotoswapInputError(
            "clip", "a CLIP with a CLIP-BPE tokenizer (SD1.x, SD2.x or SDXL)",
            f"connect the CLIP output of an SD1.x/SD2.x/SDXL checkpoint loader (got {type(outer).__name__}, whose "
            "text encoder is not supported yet)")
    attr, sd_tokenizer = subs[0]
    key = attr[len("clip_"):] if attr.startswith("clip_") else attr
    if getattr(outer, "clip_name", None) is not None and getattr(outer, "clip", None) == attr:
        key = outer.clip_name  # SD1Tokenizer-style wrapper: tokenize() is keyed by clip_name ("l", "h", ...)
    return PrimaryTokenizer(attr=attr, key=key, sd_tokenizer=sd_tokenizer, hf=sd_tokenizer.tokenizer)


def tokenizer_of(clip):
    """The HF tokenizer inside a ComfyUI CLIP (clip_l for SD1/SDXL, clip_h for SD2)."""
    return primary_tokenizer(clip).hf


def content_tokens(clip, text: str, key: str | None = None) -> list:
    """The content tokens of `text` as the CLIP's primary tokenizer produces them (ints, or the vectors of an
    `embedding:` word), without BOS/EOS/padding. `key`: the tokenize() key when the caller already knows it."""
    key = primary_tokenizer(clip).key if key is None else key
    batches = clip.tokenize(text, return_word_ids=True)[key]
    # word id 0 marks BOS/EOS/padding; every content token (ids or embedding vectors) has a word id >= 1
    return [tok for batch in batches for (tok, _weight, word_id) in batch if word_id != 0]


class _TokenizerOnlyClip:
    """Just enough of a ComfyUI CLIP to tokenize: ComfyUI's own CLIP-L tokenizer, no text encoder."""

    def __init__(self):
        import comfy.sd1_clip

        self.tokenizer = comfy.sd1_clip.SD1Tokenizer()

    def tokenize(self, text, return_word_ids=False):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids)


def default_clip_tokenizer():
    """ComfyUI's CLIP-L tokenizer (same BPE vocabulary as every SD1.x/SD2.x/SDXL CLIP), for reports without a CLIP."""
    return _TokenizerOnlyClip()


# --------------------------------------------------------------------------------------------------------------------
# Identifier and class word
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WordSplit:
    """Concept words split into the identifier ("sks") and the class word ("dog"); see `split_identifier`."""

    identifier: str  # "" when the class word is all of the concept words
    class_word: str  # "" for none
    inferred_from: str  # "" (given or none), "subject word" or "last word"


def split_identifier(concept_words: str, class_word: str | None = None, subject_word: str = "") -> WordSplit:
    """The one rule for identifier and class word, used by the concept report and the prompt pair (LocalBlend's
    target words).

    Class word: the given one when `class_word` is not None ("" means no class word). When it is None (unknown):
    the subject word if there are several concept words and it is one of them (subject "man", concept "sks man" ->
    "man"; only the prompt pair knows a subject word), else the last word when there are several ("sks dog" -> "dog"),
    else none. Words compare case-insensitively; a class word of several words matches as a run.
    Identifier: the concept words without the last whole-word occurrence of the class word; all of the concept words
    when there is no class word or it does not occur; "" when the class word is all of the concept words (the prompt
    pair then uses all the words, the concept report warns that nothing names the learned subject).
    """
    words = concept_words.split()
    lowered = [w.lower() for w in words]
    inferred_from = ""
    if class_word is None:
        subject = subject_word.strip()
        if len(words) > 1 and subject and subject.lower() in lowered:
            class_word, inferred_from = subject, "subject word"
        elif len(words) > 1:
            class_word, inferred_from = words[-1], "last word"
        else:
            class_word = ""
    cls_words = class_word.split()
    identifier = words
    if cls_words:
        n = len(cls_words)
        target = [w.lower() for w in cls_words]
        for start in range(len(words) - n, -1, -1):
            if lowered[start:start + n] == target:
                identifier = words[:start] + words[start + n:]
                break
    return WordSplit(identifier=" ".join(identifier), class_word=" ".join(cls_words), inferred_from=inferred_from)
