"""The Prompt Pair: the source and target prompts, their token bookkeeping, and the stage that encodes them.

One or several subject → concept pairs ("cat → sks dog; mug → zwx cup"). Each pair may be restricted to a region
named by a word of the source prompt ("head"): its swap and its blend act only where that word's cross-attention is.
Two pairs may name the same subject word when each has its own region (composition by parts: the head of one
concept on the body of another). A pair that maps a word to itself changes nothing: beside other pairs it is dropped.
Token rules (alignment, whole-word occurrences, identifier vs class word) are in alignment.py and clip_tokens.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .alignment import (MAX_TOKENS, PromptTokenizer, T5PromptTokenizer, align_prompts, as_prompt_tokenizer,
                        make_target_prompt, occurrences, too_long_error, word_pattern, words_of)
from .clip_tokens import EMBEDDING_PREFIX, split_identifier
from .concept.result import concepts_of
from .errors import PhotoswapInputError

LIST_SEPARATOR = ";"  # between the pairs in subject_word / concept_words / region_words
# Whose cross-attention maps the concept's tokens take inside the cross-map window (the Prompt Pair's concept_maps):
# "own" -- the reference alignment: a replaced word is never aligned to the word it replaces (a gap is free, a
#   mismatch costs 1), so the concept keeps its own maps and only the self-attention swaps carry the subject's place;
# "subject" -- the concept's tokens take the subject's maps (prompt-to-prompt's word swap), so the concept is drawn
#   where the subject's word attends. Measured in the toy world (docs/quality.md), not in the paper.
CONCEPT_MAPS = ("own", "subject")
T5_MAX_TOKENS = 4096  # T5 is never truncated; the pair is cut to the encoded length (`_t5_padded`)
T5_MIN_LENGTH = 256  # ComfyUI pads T5 prompts to this many tokens


@dataclass(frozen=True)
class SubjectSwap:
    """One subject → concept pair of a PromptPair, with its token positions.

    `source_positions`: the subject word's tokens in the source prompt (its LocalBlend columns, source side).
    `target_positions`: the concept identifier's tokens in the target prompt (LocalBlend columns, target side).
    `concept_positions`: every token of the concept words in the target prompt (what its region may attend to).
    `region_word`/`region_positions`: the source word whose cross-attention names the pair's region ("" / ()).
    """

    subject_word: str
    concept_words: str
    class_word: str
    identifier_words: str
    source_positions: tuple
    target_positions: tuple
    concept_positions: tuple
    region_word: str = ""
    region_positions: tuple = ()


@dataclass(frozen=True)
class PromptPair:
    """The PHOTOSWAP_PROMPTS object: both prompts, their token ids, the alignment and the subject token positions.

    `source_ids`/`target_ids`: BOS ... EOS, unpadded (HF `encode` for plain prompts; see alignment.py).
    `mapper`/`alphas`: `max_len` entries each, reference `get_mapper` semantics.
    `source_subject_positions` / `target_subject_positions`: every pair's subject / identifier tokens together.
    `subjects`: the pairs, each with its own positions (one entry for a one-subject swap).
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
    subjects: tuple = ()
    concept_maps: str = CONCEPT_MAPS[0]

    @property
    def has_regions(self) -> bool:
        return any(s.region_word for s in self.subjects)

    def mapper_tensor(self, device=None) -> torch.Tensor:
        """mapper as int64 (max_len,); -1 entries are kept (their alpha is 0)."""
        return torch.tensor(self.mapper, dtype=torch.int64, device=device)

    def alphas_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """alphas as (max_len,) float."""
        return torch.tensor(self.alphas, dtype=dtype, device=device)

    def describe(self) -> str:
        lines = [f"source: {self.source_prompt!r}", f"target: {self.target_prompt!r}"]
        for s in self.subjects:
            region = f", region '{s.region_word}' at {list(s.region_positions)}" if s.region_word else ""
            lines.append(f"'{s.subject_word}' at {list(s.source_positions)} → '{s.identifier_words}' at "
                         f"{list(s.target_positions)}{region}")
        lines.append(f"new target tokens (alpha 0): {[j for j, a in enumerate(self.alphas) if a == 0.0]}")
        if self.concept_maps != CONCEPT_MAPS[0]:
            lines.append(f"concept tokens take the {self.concept_maps}'s cross-attention maps")
        return "\n".join(lines)


def split_list(text) -> list[str]:
    """'cat; mug' → ['cat', 'mug'] (whitespace trimmed; one item for text without a separator)."""
    return [item.strip() for item in (text or "").split(LIST_SEPARATOR)]


def build_prompt_pair(tokenizer, source_prompt: str, subject_word: str, concept_words: str,
                      target_prompt: str | None = None, class_word=None, max_len: int = MAX_TOKENS,
                      region_words: str = "", concept_maps: str = CONCEPT_MAPS[0]) -> PromptPair:
    """Validate the inputs and build the PromptPair.

    tokenizer: a HF CLIP tokenizer, a PromptTokenizer, or a ComfyUI CLIP (then ComfyUI's own tokenization is used).
    subject_word / concept_words / region_words: one item each, or several separated by ';' (one per pair; regions
    may be empty).
    target_prompt: None or blank -> the source prompt with each subject word replaced by its concept words.
    class_word: the class noun inside the concept words (None: inferred, "": none), or one per pair — decides the
    identifier tokens used as the target's LocalBlend word.
    concept_maps: one of CONCEPT_MAPS — whether the concept's tokens keep their own cross-attention maps (the
    reference) or take their subject's (`tie_concepts_to_subjects`).
    Every failure raises PhotoswapInputError naming the input and the fix.
    """
    if concept_maps not in CONCEPT_MAPS:
        raise PhotoswapInputError("concept_maps", f"one of {', '.join(CONCEPT_MAPS)} (got {concept_maps!r})",
                                  "choose 'own' (the reference Photoswap) or 'subject' (the concept drawn where the "
                                  "subject word attends)")
    tok = as_prompt_tokenizer(tokenizer)
    source_prompt, subjects, concepts, regions = _required_words(source_prompt, subject_word, concept_words,
                                                                 region_words)
    classes = _class_words(class_word, len(subjects))
    source_ids = tok.encode(source_prompt)
    if len(source_ids) > max_len:
        raise too_long_error("source_prompt", len(source_ids), max_len, tok, source_ids)
    found = [_subject_tokens(tok, source_prompt, source_ids, subject) for subject in subjects]
    concept_ids = [tok.content_ids(concept) for concept in concepts]
    for concept, ids in zip(concepts, concept_ids):
        _check_embeddings(tok, concept, ids)
    keep = _pairs_that_change(subjects, concepts, regions)
    _check_distinct(subjects, regions, keep)
    target, target_ids = _target_prompt(tok, source_prompt, [subjects[k] for k in keep],
                                        [concepts[k] for k in keep], [len(found[k][1]) for k in keep],
                                        target_prompt, max_len)
    pairs = tuple(_subject_swap(tok, source_prompt, source_ids, target, target_ids, subjects[k], concepts[k],
                                concept_ids[k], classes[k], regions[k], found[k], target_prompt)
                  for k in keep)
    mapper, alphas = align_prompts(tok, source_ids, target_ids, max_len)
    if concept_maps == "subject":
        mapper, alphas = tie_concepts_to_subjects(mapper, alphas, pairs)
    return PromptPair(
        source_prompt=source_prompt, target_prompt=target, subject_word=_joined(s.subject_word for s in pairs),
        concept_words=_joined(s.concept_words for s in pairs), source_ids=tuple(source_ids),
        target_ids=tuple(target_ids), mapper=mapper, alphas=alphas,
        source_subject_positions=_union(s.source_positions for s in pairs),
        target_subject_positions=_union(s.target_positions for s in pairs),
        class_word=_joined(s.class_word for s in pairs), identifier_words=_joined(s.identifier_words for s in pairs),
        max_len=max_len, subjects=pairs, concept_maps=concept_maps)


def tie_concepts_to_subjects(mapper: tuple, alphas: tuple, pairs) -> tuple[tuple, tuple]:
    """Each pair's concept tokens (every occurrence in the target) aligned to its subject's tokens in the source,
    spread in order when the counts differ (prompt-to-prompt's word-swap mapper), alpha 1: inside the cross-map
    window the concept attends where the subject did. Every other column keeps the reference alignment."""
    mapper, alphas = list(mapper), list(alphas)
    for pair in pairs:
        src, tgt = pair.source_positions, pair.concept_positions
        for k, j in enumerate(tgt):
            mapper[j], alphas[j] = src[k * len(src) // len(tgt)], 1.0
    return tuple(mapper), tuple(alphas)


def _joined(items) -> str:
    return f"{LIST_SEPARATOR} ".join(items)


def _union(position_lists) -> tuple:
    lists = list(position_lists)
    return lists[0] if len(lists) == 1 else tuple(sorted({p for positions in lists for p in positions}))


def _required_words(source_prompt, subject_word, concept_words, region_words):
    """(source prompt, subject words, concept words, region words): present, one concept (and region) per subject."""
    source_prompt = source_prompt if isinstance(source_prompt, str) else ""
    if not source_prompt.strip():
        raise PhotoswapInputError("source_prompt", "a prompt describing the source image (e.g. 'A photo of a cat')",
                                  "type the source prompt; it must contain the subject word")
    subjects = split_list(subject_word)
    if not all(subjects):
        raise PhotoswapInputError("subject_word", "the word of the source prompt that names the subject to swap "
                                                  "(several: separated by ';', none empty)",
                                  f"type one of the source prompt's words: {words_of(source_prompt)}")
    concepts = [" ".join(c.split()) for c in split_list(concept_words)]
    if not all(concepts):
        raise PhotoswapInputError("concept_words", "the words that name the new concept (e.g. 'sks dog'; several: "
                                                   "separated by ';', none empty)",
                                  "type the concept words or connect a PHOTOSWAP_CONCEPT from the concept loader")
    if len(concepts) != len(subjects):
        raise PhotoswapInputError(
            "concept_words", f"one concept per subject word ({len(subjects)} subject words, {len(concepts)} "
                             "concepts)",
            "give as many concepts (';'-separated, or chained Concept Loaders) as subject words, in the same order")
    regions = split_list(region_words) if (region_words or "").strip() else [""] * len(subjects)
    if len(regions) != len(subjects):
        raise PhotoswapInputError(
            "region_words", f"one region word (or an empty item) per subject word ({len(subjects)} subject words, "
                            f"{len(regions)} region items)",
            "separate the region words with ';' in the order of the subject words, e.g. 'head; '")
    return source_prompt, subjects, concepts, regions


def _class_words(class_word, count: int) -> list:
    if isinstance(class_word, (list, tuple)):
        if len(class_word) != count:
            raise PhotoswapInputError("concept", f"one class word per pair ({count} pairs, {len(class_word)} class "
                                                 "words)", "connect one concept per subject word")
        return list(class_word)
    return [class_word] * count


def _subject_tokens(tok, source_prompt, source_ids, subject) -> tuple[list, list]:
    """(the subject's token ids, start indices of its whole-word occurrences in the source)."""
    subject_ids = tok.content_ids(subject)
    starts = occurrences(source_ids, subject_ids, tok)
    if not starts:
        raise PhotoswapInputError(
            "subject_word", f"a word of the source prompt; '{subject}' does not occur in "
            f"{source_prompt.strip()!r} as a whole word",
            f"use one of its words: {words_of(source_prompt)} (or add '{subject}' to the source prompt)")
    return subject_ids, starts


def _pairs_that_change(subjects, concepts, regions) -> list[int]:
    """Indices of the pairs to keep: beside other pairs, one that maps a word to itself (no region) changes nothing."""
    changing = [k for k in range(len(subjects))
                if regions[k] or subjects[k].lower() != concepts[k].lower()]
    return changing if changing and len(subjects) > 1 else list(range(len(subjects)))


def _check_distinct(subjects, regions, keep) -> None:
    """Two pairs may name the same subject word only with two different regions (composition by parts)."""
    seen: dict = {}
    for k in keep:
        key = subjects[k].lower()
        if key in seen:
            other = seen[key]
            if not (regions[k] and regions[other]) or regions[k].lower() == regions[other].lower():
                raise PhotoswapInputError(
                    "subject_word", f"each subject word once (pairs {other + 1} and {k + 1} both name "
                                    f"'{subjects[k]}')",
                    "remove the repeated pair, or give both pairs different region words (e.g. 'head; body') to "
                    "compose the subject from two concepts")
        seen.setdefault(key, k)


def _target_prompt(tok, source_prompt, subjects, concepts, counts, target_prompt, max_len):
    """(target prompt, its ids): the explicit one, or the source prompt with each subject word replaced by its
    concept words (the concepts of one word's pairs, joined by a space)."""
    explicit = target_prompt is not None and bool(target_prompt.strip())
    if explicit:
        target = target_prompt
    else:
        for subject, count in zip(subjects, counts):
            if count > 1:
                concept = concepts[subjects.index(subject)]
                raise PhotoswapInputError(
                    "target_prompt", f"an explicit target prompt, because the subject word '{subject}' occurs "
                    f"{count} times in the source prompt and the automatic replacement would be ambiguous",
                    f"write the target prompt yourself with the concept words '{concept}' where the subject should "
                    f"change (or make '{subject}' occur once in the source prompt)")
        target = _replace_subjects(source_prompt, subjects, concepts)
    target_ids = tok.encode(target)
    if len(target_ids) > max_len:
        name = "target_prompt" if explicit else "concept_words"
        fix_hint = "" if explicit else (" (the target prompt is the source prompt with the subject word replaced by "
                                        "the concept words)")
        err = too_long_error("target_prompt", len(target_ids), max_len, tok, target_ids)
        raise PhotoswapInputError(name, err.expected + fix_hint, err.fix)
    return target, target_ids


def _replace_subjects(source_prompt, subjects, concepts) -> str:
    if len(subjects) == 1:
        return make_target_prompt(source_prompt, subjects[0], concepts[0])
    by_word: dict = {}
    for subject, concept in zip(subjects, concepts):
        by_word.setdefault(subject.lower(), []).append(concept)
    pattern = "|".join(f"(?:{word_pattern(s).pattern})" for s in dict.fromkeys(subjects))
    return re.sub(pattern, lambda m: " ".join(by_word[" ".join(m.group(0).split()).lower()]), source_prompt,
                  flags=re.IGNORECASE)


def _subject_swap(tok, source_prompt, source_ids, target, target_ids, subject, concept, concept_ids, class_word,
                  region, found, target_prompt) -> SubjectSwap:
    subject_ids, subject_starts = found
    concept_starts = occurrences(target_ids, concept_ids, tok)
    if not concept_starts:
        if target_prompt is not None and target_prompt.strip():
            raise PhotoswapInputError(
                "target_prompt", f"a target prompt that contains the concept words '{concept}'; "
                f"{target.strip()!r} does not", f"add '{concept}' to the target prompt where the subject should be, "
                "or leave the target prompt empty to build it from the source prompt")
        raise PhotoswapInputError(  # cannot happen for plain words; guards odd tokenizations
            "concept_words", f"words that survive tokenization inside the target prompt {target!r}",
            "use plain words for the concept (letters and digits)")
    identifier, cls, target_positions = _identifier_positions(tok, concept, concept_ids, concept_starts, subject,
                                                              class_word)
    region_positions = ()
    if region:
        region_positions = tuple(p + d for p in occurrences(source_ids, tok.content_ids(region), tok)
                                 for d in range(len(tok.content_ids(region))))
        if not region_positions:
            raise PhotoswapInputError(
                "region_words", f"a word of the source prompt; the region word '{region}' does not occur in "
                                f"{source_prompt.strip()!r} as a whole word",
                f"use one of its words: {words_of(source_prompt)}, or connect a MASK to the sampler's region_mask")
    return SubjectSwap(
        subject_word=subject, concept_words=concept, class_word=cls, identifier_words=identifier,
        source_positions=tuple(s + d for s in subject_starts for d in range(len(subject_ids))),
        target_positions=target_positions,
        concept_positions=tuple(s + d for s in concept_starts for d in range(len(concept_ids))),
        region_word=region, region_positions=region_positions)


def _identifier_positions(tok, concept, concept_ids, concept_starts, subject, class_word):
    """(identifier words, class word, target token positions of the identifier in every concept occurrence)."""
    split = split_identifier(concept, class_word, subject_word=subject)
    identifier, cls = split.identifier or concept, split.class_word
    identifier_ids = tok.content_ids(identifier)
    offsets = occurrences(concept_ids, identifier_ids, tok)
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


# ------------------------------------------------------------------------------------------------------- the stage

def _encode(clip, text: str):
    """Like core CLIPTextEncode."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _concept_words(concept, concept_words: str):
    """(concept words, class word(s) or None) from a connected PHOTOSWAP_CONCEPT (one, or a chain of several), else
    the typed words."""
    if concept is None:
        return concept_words, None
    concepts = concepts_of(concept)
    for item in concepts:
        words = getattr(item, "words", None)
        if not isinstance(words, str):
            raise PhotoswapInputError("concept", "a PHOTOSWAP_CONCEPT from the Photoswap Concept Loader",
                                      f"connect the concept loader's CONCEPT output (got {type(item).__name__})")
        if not words.strip():
            raise PhotoswapInputError("concept", "a concept whose words are set (e.g. 'sks dog')",
                                      "set the concept words in the Photoswap Concept Loader, or disconnect the "
                                      "concept and type concept_words")
    classes = [getattr(item, "class_word", "") or None for item in concepts]  # empty: infer (clip_tokens)
    words = _joined(item.words for item in concepts)
    return words, classes[0] if len(classes) == 1 else classes


def _t5_padded(clip, pair: PromptPair):
    """T5 contexts of both prompts with one length L (a clone of the CLIP pads both to L, so the source and target
    rows line up token for token and the mapper covers every column; pads map onto pads), and the pair cut to L."""
    base = getattr(getattr(clip.tokenizer, T5PromptTokenizer.KEY, None), "min_length", None) or T5_MIN_LENGTH
    length = max(int(base), len(pair.source_ids), len(pair.target_ids))
    clip = clip.clone()
    clip.set_tokenizer_option(f"{T5PromptTokenizer.KEY}_min_length", length)
    return clip, replace(pair, mapper=pair.mapper[:length], alphas=pair.alphas[:length], max_len=length)


def encode_prompt_pair(clip, source_prompt, subject_word, concept_words, target_prompt="", negative_prompt="",
                       concept=None, region_words="", concept_maps=CONCEPT_MAPS[0]):
    """(source CONDITIONING, target CONDITIONING, negative CONDITIONING, PromptPair)."""
    if clip is None:
        raise PhotoswapInputError("clip", "a CLIP model", "connect the CLIP output of a checkpoint loader or of "
                                  "the Photoswap Concept Loader (a checkpoint without a text encoder has none)")
    words, class_word = _concept_words(concept, concept_words)
    tok = as_prompt_tokenizer(clip)
    t5 = isinstance(tok, T5PromptTokenizer)
    pair = build_prompt_pair(tok, source_prompt, subject_word, words, target_prompt=target_prompt or None,
                             class_word=class_word, region_words=region_words,
                             max_len=T5_MAX_TOKENS if t5 else MAX_TOKENS, concept_maps=concept_maps)
    if t5:
        clip, pair = _t5_padded(clip, pair)
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
