"""Token bookkeeping for Photoswap: the prompts' token ids, their alignment, and where a word's tokens are.

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

* Target positions (`prompts.build_prompt_pair`): the reference blends the target row on the concept's *identifier* ("sks"), not its class word.
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

from .clip_tokens import CONTEXT_TOKENS, content_tokens, primary_tokenizer
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

    def boundary_before(self, ids: Sequence[int], p: int) -> bool:
        """A word starts at position p (CLIP BPE: the previous token ends a word)."""
        return p == 0 or self.ends_word(ids[p - 1])


class T5PromptTokenizer(PromptTokenizer):
    """Flux's T5 (SentencePiece) pieces as ComfyUI feeds them: no start token, `</s>` appended (padding to the
    encoder's min length is not part of `encode`); a word starts at a piece beginning with "▁" (T5 may split a word
    into "▁" plus pieces: "sks" → ▁ s k s). `from_clip` reads ComfyUI's own `t5xxl` tokenization (weights stripped)."""

    KEY = "t5xxl"
    WORD_START = "\u2581"

    def __init__(self, hf_tokenizer, comfy_tokenize=None):
        super().__init__(hf_tokenizer, comfy_tokenize)
        self.bos_id = None
        self._starts: dict[int, bool] = {}

    @classmethod
    def from_clip(cls, clip) -> "T5PromptTokenizer":
        sd_tokenizer = getattr(getattr(clip, "tokenizer", clip), cls.KEY)
        return cls(sd_tokenizer.tokenizer, lambda text: content_tokens(clip, text, cls.KEY))

    def encode(self, text: str) -> list[int]:
        return self.content_ids(text) + [self.eos_id]

    def content_ids(self, text: str) -> list[int]:
        if self._comfy_tokenize is None:
            return [i for i in self.hf.encode(text) if i not in self._special]
        return super().content_ids(text)

    def starts_word(self, token_id: int) -> bool:
        if token_id < 0 or token_id in self._special:
            return True
        cached = self._starts.get(token_id)
        if cached is None:
            piece = self.hf.convert_ids_to_tokens(int(token_id))
            cached = piece is None or piece.startswith(self.WORD_START)
            self._starts[token_id] = cached
        return cached

    def boundary_before(self, ids: Sequence[int], p: int) -> bool:
        return p == 0 or self.starts_word(ids[p]) or ids[p - 1] < 0 or ids[p - 1] in self._special


def has_t5(clip) -> bool:
    """The CLIP holds ComfyUI's T5 tokenizer (Flux's DualCLIPLoader)."""
    return getattr(getattr(clip, "tokenizer", None), T5PromptTokenizer.KEY, None) is not None


def as_prompt_tokenizer(tokenizer) -> PromptTokenizer:
    if isinstance(tokenizer, PromptTokenizer):
        return tokenizer
    if hasattr(tokenizer, "tokenize") and hasattr(tokenizer, "encode_from_tokens_scheduled"):  # a ComfyUI CLIP
        return T5PromptTokenizer.from_clip(tokenizer) if has_t5(tokenizer) else PromptTokenizer.from_clip(tokenizer)
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
            raise too_long_error(name, len(ids), max_len, tokenizer, ids)
    aligned = _global_alignment(list(source_ids), list(target_ids))
    m = len(aligned)
    mapper = tuple(aligned) + tuple(range(m, max_len))
    alphas = tuple(0.0 if k == -1 else 1.0 for k in aligned) + (1.0,) * (max_len - m)
    return mapper, alphas


def too_long_error(name, count, limit, tokenizer, ids):
    shown = ""
    if tokenizer is not None:
        try:
            pieces = as_prompt_tokenizer(tokenizer).describe(ids[limit - 1:limit + 5])
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


def word_pattern(word: str) -> re.Pattern:
    """Whole-word, case-insensitive match of `word` in text, with boundaries where CLIP's pre-tokenizer has them."""
    words = word.split()
    body = r"\s+".join(re.escape(w) for w in words)
    before = rf"(?<!{_LETTER})" if re.match(_LETTER, words[0][0]) else ""
    after = rf"(?!{_LETTER})" if re.match(_LETTER, words[-1][-1]) else ""
    return re.compile(before + body + after, re.IGNORECASE)


def occurrences(ids: Sequence[int], word_ids: Sequence[int], tok: PromptTokenizer) -> list[int]:
    """Start indices of whole-word occurrences of `word_ids` in `ids` (word boundary before the start)."""
    k = len(word_ids)
    if k == 0:
        return []
    starts = []
    for p in range(0, len(ids) - k + 1):
        if list(ids[p:p + k]) != list(word_ids):
            continue
        if tok.boundary_before(ids, p):
            starts.append(p)
    return starts


def word_token_positions(tokenizer, prompt: str, word: str) -> tuple[int, ...]:
    """All token positions (BOS = 0) of every whole-word occurrence of `word` in `prompt` (reference get_word_inds,
    robust to punctuation and case; see module docstring). `tokenizer`: HF tokenizer, PromptTokenizer or CLIP."""
    tok = as_prompt_tokenizer(tokenizer)
    ids = tok.encode(prompt)
    word_ids = tok.content_ids(word.strip())
    return tuple(p + d for p in occurrences(ids, word_ids, tok) for d in range(len(word_ids)))


def words_of(prompt: str, limit: int = 30) -> str:
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
    return word_pattern(subject).sub(lambda _m: concept, source_prompt)
