"""Prompt bookkeeping for Photoswap: the source/target prompt pair, their token alignment and the subject tokens.

Reference semantics (eric-ai-lab/photoswap `utils.py`, reproduced here in our own code):

* Alignment (`get_mapper`): a global (Needleman-Wunsch) alignment of the two token-id sequences as the HF tokenizer's
  `encode` gives them (BOS and EOS included, no padding), scores match +1, mismatch -1, gap 0. On ties a cell prefers
  "left" (a target token aligned to nothing), then "up" (a source token dropped), then the diagonal. Tracing back from
  the bottom-right corner yields one entry per target token: the source index it is aligned to, or -1. Those entries
  fill `mapper[:len(target)]`, with `alphas = 0.0` where the entry is -1 and 1.0 elsewhere; the tail
  `mapper[j] = j`, `alphas[j] = 1.0` for `j >= len(target)` (padding columns map onto themselves).
  The swap then uses, for every target column j: `alpha_j * source_map[..., mapper[j]] + (1 - alpha_j) * target_map`.
  A mapper entry of -1 indexes the last column in torch; its alpha is 0 so that column never contributes.
  Because a gap costs nothing and a mismatch costs 1, a replaced word ("cat" -> "dog") is never aligned to its
  counterpart: the new word gets alpha 0 and keeps its own attention column, exactly like an inserted word ("sks").

* Subject positions (LocalBlend words, reference `get_word_inds`): all token positions (indices into the 77-token
  sequence, BOS = 0) of every whole-word occurrence of a word. The reference splits the prompt on spaces and compares
  strings exactly; we match on token ids instead, which gives the same positions for the reference's prompts and is
  robust to punctuation ("a cat." / "cat's"), letter case (CLIP lower-cases anyway) and extra spaces. An occurrence is
  a run of the word's own tokens that starts at a word boundary (right after BOS or after a token that ends a word,
  i.e. whose BPE string ends in "</w>"); its end is a boundary by construction. "man" is thus found in "a man, walking"
  but not in "superman" or "woman".

* Target positions: the reference blends the target row on the concept's *identifier* ("sks"), not its class word.
  Rule (`clip_tokens.split_identifier`, shared with the concept report): the identifier is the concept words with
  the class word removed (its last whole-word occurrence). The class word is the given one (`class_word`, e.g. from
  a PHOTOSWAP_CONCEPT; an empty string means "no class word"); when it is not given (`None`, typed words): the
  subject word if it is one of the concept words (subject "man", concept "sks man" -> class "man"), else the last
  word when there are several words ("sks dog" -> "dog"), else none. With no class word, or nothing left after
  removing it, the identifier is all of the concept words. The target positions are the identifier's tokens inside
  every occurrence of the full concept words in the target prompt.

* Token ids through ComfyUI (`PromptTokenizer.from_clip`): what the model actually sees is ComfyUI's tokenization,
  which strips prompt-weight syntax ("(cat:1.2)" -> "cat" with weight 1.2) and replaces `embedding:name` by the
  embedding's vectors. Those sequences are used when the pair is built from a CLIP (the node does this): for plain
  prompts they equal the HF tokenizer's `encode` exactly; weight syntax is gone from them; each embedding vector
  becomes a negative sentinel id derived from its values (equal vectors -> equal ids, so an embedding aligns with
  itself), and an `embedding:name` word is one opaque word whose positions are those of its vectors.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .clip_tokens import CONTEXT_TOKENS, EMBEDDING_PREFIX, content_tokens, primary_tokenizer, split_identifier
from .clip_tokens import tokenizer_of  # noqa: F401  (part of this module's API: the prompt stage's tokenizer)
from .errors import PhotoswapInputError

MAX_TOKENS = CONTEXT_TOKENS  # the CLIP context, BOS and EOS included

MATCH, MISMATCH, GAP = 1, -1, 0
_LEFT, _UP, _DIAG = 1, 2, 3  # traceback moves, in the reference's tie preference order


# --------------------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------------------
def _embedding_sentinel(vector: torch.Tensor) -> int:
    """A stable negative id for one embedding vector (equal values -> equal id)."""
    data = vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return -1 - int.from_bytes(hashlib.blake2b(data, digest_size=6).digest(), "big")


class PromptTokenizer:
    """Prompt text -> the token-id sequence the text encoder sees (BOS ... EOS, unpadded), and word boundaries.

    Built from a HF CLIP tokenizer (`PromptTokenizer(hf)`, equal to `hf.encode`) or from a ComfyUI CLIP
    (`PromptTokenizer.from_clip(clip)`, ComfyUI's own tokenization: weight syntax stripped, `embedding:name` words as
    sentinel ids, see the module docstring).
    """

    def __init__(self, hf_tokenizer, comfy_tokenize: Callable[[str], list] | None = None):
        self.hf = hf_tokenizer
        self._comfy_tokenize = comfy_tokenize
        self.bos_id = hf_tokenizer.bos_token_id
        self.eos_id = hf_tokenizer.eos_token_id
        self._special = {i for i in (self.bos_id, self.eos_id, hf_tokenizer.pad_token_id) if i is not None}
        self._ends_word: dict[int, bool] = {}

    @classmethod
    def from_clip(cls, clip) -> "PromptTokenizer":
        primary = primary_tokenizer(clip)
        return cls(primary.hf, lambda text: content_tokens(clip, text, primary.key))

    @property
    def uses_comfy(self) -> bool:
        return self._comfy_tokenize is not None

    def content_ids(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS."""
        if self._comfy_tokenize is None:
            ids = list(self.hf.encode(text))
            return ids[1:-1]
        out = []
        for tok in self._comfy_tokenize(text):
            if isinstance(tok, torch.Tensor):
                out.append(_embedding_sentinel(tok))
            else:
                out.append(int(tok))
        return out

    def encode(self, text: str) -> list[int]:
        """BOS + content + EOS, unpadded (HF `encode` for plain prompts)."""
        return [self.bos_id] + self.content_ids(text) + [self.eos_id]

    def ends_word(self, token_id: int) -> bool:
        """True if a word boundary follows this token (BPE '</w>', special tokens, embedding vectors)."""
        if token_id < 0 or token_id in self._special:
            return True
        cached = self._ends_word.get(token_id)
        if cached is None:
            piece = self.hf.convert_ids_to_tokens(token_id)
            cached = piece is None or piece.endswith("</w>") or piece.startswith("<|")
            self._ends_word[token_id] = cached
        return cached

    def describe(self, ids: Sequence[int]) -> list[str]:
        """Readable token strings (for messages)."""
        return ["<embedding>" if i < 0 else str(self.hf.convert_ids_to_tokens(int(i))) for i in ids]


def _as_prompt_tokenizer(tokenizer) -> PromptTokenizer:
    if isinstance(tokenizer, PromptTokenizer):
        return tokenizer
    if hasattr(tokenizer, "tokenize") and hasattr(tokenizer, "encode_from_tokens_scheduled"):  # a ComfyUI CLIP
        return PromptTokenizer.from_clip(tokenizer)
    return PromptTokenizer(tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# Alignment (reference get_mapper / global_align / get_aligned_sequences)
# --------------------------------------------------------------------------------------------------------------------
def _global_alignment(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """For each token of y, the index of the x token it is aligned to, or -1 (reference scores and tie order)."""
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        score[0][j] = j * GAP
        move[0][j] = _LEFT
    for i in range(1, n + 1):
        score[i][0] = i * GAP
        move[i][0] = _UP
    for i in range(1, n + 1):
        xi = x[i - 1]
        row, prev = score[i], score[i - 1]
        for j in range(1, m + 1):
            left = row[j - 1] + GAP
            up = prev[j] + GAP
            diag = prev[j - 1] + (MATCH if xi == y[j - 1] else MISMATCH)
            best = max(left, up, diag)
            row[j] = best
            move[i][j] = _LEFT if best == left else (_UP if best == up else _DIAG)
    target_to_source = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        step = move[i][j]
        if step == _DIAG:
            i, j = i - 1, j - 1
            target_to_source[j] = i
        elif step == _LEFT:
            j -= 1
            target_to_source[j] = -1
        else:  # _UP: a source token with no target counterpart
            i -= 1
    return target_to_source


def align_prompts(tokenizer, source_ids: Sequence[int], target_ids: Sequence[int], max_len: int = MAX_TOKENS):
    """(mapper, alphas) as tuples of `max_len` ints/floats, per the reference `get_mapper` (see module docstring).

    `source_ids`/`target_ids`: full sequences with BOS/EOS, unpadded. `tokenizer` (HF, PromptTokenizer or None) is
    only used to show the tokens in the error for an over-long prompt.
    """
    for name, ids in (("source_prompt", source_ids), ("target_prompt", target_ids)):
        if len(ids) > max_len:
            raise _too_long_error(name, len(ids), max_len, tokenizer, ids)
    aligned = _global_alignment(list(source_ids), list(target_ids))
    m = len(aligned)
    mapper = tuple(aligned) + tuple(range(m, max_len))
    alphas = tuple(0.0 if k == -1 else 1.0 for k in aligned) + (1.0,) * (max_len - m)
    return mapper, alphas


def _too_long_error(name, count, limit, tokenizer, ids):
    shown = ""
    if tokenizer is not None:
        try:
            pieces = _as_prompt_tokenizer(tokenizer).describe(ids[limit - 1:limit + 5])
            shown = f" (the text from token {limit - 1} on starts: {' '.join(p.replace('</w>', '') for p in pieces)})"
        except Exception:  # noqa: BLE001 - the message is a courtesy
            shown = ""
    return PhotoswapInputError(
        name, f"at most {limit} CLIP tokens including the start and end tokens ({limit - 2} for the text); "
        f"it has {count}{shown}",
        f"shorten the prompt by at least {count - limit} token(s): Photoswap aligns the two prompts inside one "
        f"{limit}-token window, so longer prompts cannot be used")


# --------------------------------------------------------------------------------------------------------------------
# Words and positions
# --------------------------------------------------------------------------------------------------------------------
_LETTER = r"[^\W\d_]"


def _word_pattern(word: str) -> re.Pattern:
    """Whole-word, case-insensitive match of `word` in text, with boundaries where CLIP's pre-tokenizer has them."""
    words = word.split()
    body = r"\s+".join(re.escape(w) for w in words)
    before = rf"(?<!{_LETTER})" if re.match(_LETTER, words[0][0]) else ""
    after = rf"(?!{_LETTER})" if re.match(_LETTER, words[-1][-1]) else ""
    return re.compile(before + body + after, re.IGNORECASE)


def _occurrences(ids: Sequence[int], word_ids: Sequence[int], tok: PromptTokenizer) -> list[int]:
    """Start indices of whole-word occurrences of `word_ids` in `ids` (word boundary before the start)."""
    k = len(word_ids)
    if k == 0:
        return []
    starts = []
    for p in range(0, len(ids) - k + 1):
        if list(ids[p:p + k]) != list(word_ids):
            continue
        if p == 0 or tok.ends_word(ids[p - 1]):
            starts.append(p)
    return starts


def word_token_positions(tokenizer, prompt: str, word: str) -> tuple[int, ...]:
    """All token positions (BOS = 0) of every whole-word occurrence of `word` in `prompt` (reference get_word_inds,
    robust to punctuation and case; see module docstring). `tokenizer`: HF tokenizer, PromptTokenizer or CLIP."""
    tok = _as_prompt_tokenizer(tokenizer)
    ids = tok.encode(prompt)
    word_ids = tok.content_ids(word.strip())
    return tuple(p + d for p in _occurrences(ids, word_ids, tok) for d in range(len(word_ids)))


def _words_of(prompt: str, limit: int = 30) -> str:
    seen = []
    for w in re.findall(r"embedding:\S+|[\w'-]+", prompt):
        w = w.strip("'-")
        if w and w.lower() not in (s.lower() for s in seen):
            seen.append(w)
    shown = ", ".join(f"'{w}'" for w in seen[:limit])
    return shown + (", …" if len(seen) > limit else "") if seen else "(no words)"


def make_target_prompt(source_prompt: str, subject_word: str, concept_words: str) -> str:
    """The source prompt with every whole-word occurrence of the subject word replaced by the concept words
    ("A photo of a man", "man", "sks man" -> "A photo of a sks man"). Case-insensitive; punctuation and prompt-weight
    syntax around the word are kept ("a (man:1.2)." -> "a (sks man:1.2).")."""
    subject = subject_word.strip()
    if not subject:
        return source_prompt
    concept = " ".join(concept_words.split())
    return _word_pattern(subject).sub(lambda _m: concept, source_prompt)


# --------------------------------------------------------------------------------------------------------------------
# The pair
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptPair:
    """The PHOTOSWAP_PROMPTS object: both prompts, their token ids, the alignment and the subject token positions.

    `source_ids`/`target_ids`: BOS ... EOS, unpadded (HF `encode` for plain prompts; see module docstring).
    `mapper`/`alphas`: 77 entries each, reference `get_mapper` semantics.
    `source_subject_positions`: token positions of the subject word in the source prompt (all occurrences).
    `target_subject_positions`: token positions of the concept identifier ("sks") in the target prompt.
    """

    source_prompt: str
    target_prompt: str
    subject_word: str
    concept_words: str
    source_ids: tuple
    target_ids: tuple
    mapper: tuple
    alphas: tuple
    source_subject_positions: tuple
    target_subject_positions: tuple
    class_word: str = ""
    identifier_words: str = ""
    max_len: int = MAX_TOKENS

    def mapper_tensor(self, device=None) -> torch.Tensor:
        """mapper as int64 (max_len,); -1 entries are kept (their alpha is 0)."""
        return torch.tensor(self.mapper, dtype=torch.int64, device=device)

    def alphas_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """alphas as (max_len,) float."""
        return torch.tensor(self.alphas, dtype=dtype, device=device)

    def describe(self) -> str:
        return (f"source: {self.source_prompt!r} (subject '{self.subject_word}' at {list(self.source_subject_positions)})"
                f"\ntarget: {self.target_prompt!r} (concept '{self.identifier_words}' at "
                f"{list(self.target_subject_positions)})\nnew target tokens (alpha 0): "
                f"{[j for j, a in enumerate(self.alphas) if a == 0.0]}")


def build_prompt_pair(tokenizer, source_prompt: str, subject_word: str, concept_words: str,
                      target_prompt: str | None = None, class_word: str | None = None,
                      max_len: int = MAX_TOKENS) -> PromptPair:
    """Validate the inputs and build the PromptPair.

    tokenizer: a HF CLIP tokenizer, a PromptTokenizer, or a ComfyUI CLIP (then ComfyUI's own tokenization is used).
    target_prompt: None or blank -> `make_target_prompt(source_prompt, subject_word, concept_words)`.
    class_word: the class noun inside the concept words (None: inferred, "" : none) — decides the identifier tokens
    used as the target's LocalBlend word.
    Every failure raises PhotoswapInputError naming the input and the fix.
    """
    tok = _as_prompt_tokenizer(tokenizer)
    source_prompt, subject, concept = _required_words(source_prompt, subject_word, concept_words)
    source_ids = tok.encode(source_prompt)
    if len(source_ids) > max_len:
        raise _too_long_error("source_prompt", len(source_ids), max_len, tok, source_ids)
    subject_ids = tok.content_ids(subject)
    subject_starts = _occurrences(source_ids, subject_ids, tok)
    if not subject_starts:
        raise PhotoswapInputError(
            "subject_word", f"a word of the source prompt; '{subject}' does not occur in "
            f"{source_prompt.strip()!r} as a whole word",
            f"use one of its words: {_words_of(source_prompt)} (or add '{subject}' to the source prompt)")
    concept_ids = tok.content_ids(concept)
    _check_embeddings(tok, concept, concept_ids)
    target, target_ids, concept_starts = _target_side(tok, source_prompt, subject, len(subject_starts), concept,
                                                      concept_ids, target_prompt, max_len)
    identifier, cls, target_positions = _identifier_positions(tok, concept, concept_ids, concept_starts, subject,
                                                              class_word)
    source_positions = tuple(s + d for s in subject_starts for d in range(len(subject_ids)))
    mapper, alphas = align_prompts(tok, source_ids, target_ids, max_len)
    return PromptPair(
        source_prompt=source_prompt, target_prompt=target, subject_word=subject, concept_words=concept,
        source_ids=tuple(source_ids), target_ids=tuple(target_ids), mapper=mapper, alphas=alphas,
        source_subject_positions=source_positions, target_subject_positions=target_positions,
        class_word=cls, identifier_words=identifier, max_len=max_len)


def _required_words(source_prompt, subject_word, concept_words) -> tuple[str, str, str]:
    """(source prompt, subject word, concept words), each present; concept words with single spaces."""
    source_prompt = source_prompt if isinstance(source_prompt, str) else ""
    if not source_prompt.strip():
        raise PhotoswapInputError("source_prompt", "a prompt describing the source image (e.g. 'A photo of a cat')",
                                  "type the source prompt; it must contain the subject word")
    subject = (subject_word or "").strip()
    if not subject:
        raise PhotoswapInputError("subject_word", "the word of the source prompt that names the subject to swap",
                                  f"type one of the source prompt's words: {_words_of(source_prompt)}")
    concept = " ".join((concept_words or "").split())
    if not concept:
        raise PhotoswapInputError("concept_words", "the words that name the new concept (e.g. 'sks dog')",
                                  "type the concept words or connect a PHOTOSWAP_CONCEPT from the concept loader")
    return source_prompt, subject, concept


def _target_side(tok, source_prompt, subject, subject_count, concept, concept_ids, target_prompt, max_len):
    """(target prompt, its ids, start indices of the concept words in it): the explicit target prompt, or the source
    prompt with the subject word replaced by the concept words."""
    explicit = target_prompt is not None and bool(target_prompt.strip())
    if explicit:
        target = target_prompt
    else:
        if subject_count > 1:
            raise PhotoswapInputError(
                "target_prompt", f"an explicit target prompt, because the subject word '{subject}' occurs "
                f"{subject_count} times in the source prompt and the automatic replacement would be ambiguous",
                f"write the target prompt yourself with the concept words '{concept}' where the subject should change "
                f"(or make '{subject}' occur once in the source prompt)")
        target = make_target_prompt(source_prompt, subject, concept)
    target_ids = tok.encode(target)
    if len(target_ids) > max_len:
        name = "target_prompt" if explicit else "concept_words"
        fix_hint = "" if explicit else (" (the target prompt is the source prompt with the subject word replaced by "
                                        "the concept words)")
        err = _too_long_error("target_prompt", len(target_ids), max_len, tok, target_ids)
        raise PhotoswapInputError(name, err.expected + fix_hint, err.fix)
    concept_starts = _occurrences(target_ids, concept_ids, tok)
    if not concept_starts:
        if explicit:
            raise PhotoswapInputError(
                "target_prompt", f"a target prompt that contains the concept words '{concept}'; "
                f"{target.strip()!r} does not", f"add '{concept}' to the target prompt where the subject should be, "
                "or leave the target prompt empty to build it from the source prompt")
        raise PhotoswapInputError(  # cannot happen for plain words; guards odd tokenizations
            "concept_words", f"words that survive tokenization inside the target prompt {target!r}",
            "use plain words for the concept (letters and digits)")
    return target, target_ids, concept_starts


def _identifier_positions(tok, concept, concept_ids, concept_starts, subject, class_word):
    """(identifier words, class word, target token positions of the identifier in every concept occurrence)."""
    split = split_identifier(concept, class_word, subject_word=subject)
    identifier, cls = split.identifier or concept, split.class_word
    identifier_ids = tok.content_ids(identifier)
    offsets = _occurrences(concept_ids, identifier_ids, tok)
    offset = offsets[0] if offsets else 0
    if not offsets:  # tokenization of the identifier differs inside the concept words: use all concept tokens
        identifier, identifier_ids = concept, concept_ids
    positions = tuple(s + offset + d for s in concept_starts for d in range(len(identifier_ids)))
    return identifier, cls, positions


def _check_embeddings(tok: PromptTokenizer, concept: str, concept_ids: list[int]) -> None:
    """An `embedding:name` in the concept words that ComfyUI could not load vanishes from the tokens: say so."""
    for word in concept.split() if tok.uses_comfy else ():
        if word.lower().startswith(EMBEDDING_PREFIX):
            ids = tok.content_ids(word)
            if not ids:
                name = word[len(EMBEDDING_PREFIX):]
                raise PhotoswapInputError(
                    "concept_words", f"a textual-inversion embedding ComfyUI can load; '{name}' was not found",
                    "put the embedding file into ComfyUI's models/embeddings folder and write it as "
                    f"'embedding:<file name without extension>' (got '{word}')")
    if not concept_ids:
        raise PhotoswapInputError("concept_words", "words that produce at least one token",
                                  "type the concept words, e.g. 'sks dog'")
