"""Concept words: where they come from (widget or metadata), their validation, and the tokenization report.

Concept words come from metadata when the source carries them (and `prefer_metadata` is on), else from the text
widget. Metadata, first found wins:
  1. a sidecar next to the file: `<file stem>.json` or `<file stem>.txt`; for a diffusers folder `concept.json` /
     `concept.txt` inside it. JSON keys: `concept_words` (also accepted: `instance_prompt`, `trigger_words`,
     `trainedWords`, `activation text`), `class_word`, `added_tokens`; a .txt holds the concept words on its first
     non-empty line.
  2. safetensors header keys `photoswap.concept_words`, `photoswap.class_word`, `photoswap.added_tokens`.
  3. what trainers write: `modelspec.trigger_phrase`; kohya's `ss_dataset_dirs` / `ss_tag_frequency` folder names
     `<repeats>_<words>` ("10_sks dog" -> "sks dog"); the `instance_prompt` of the model card (`README.md`) that
     diffusers' DreamBooth scripts write into the output folder ("a photo of sks dog" -> "sks dog").
Validation: empty concept words are an error; the words are tokenized with the loaded CLIP and the result is reported
(log + `Concept.report`): e.g. "'sks' is one token (id 48136)". The identifier is split off the class word by the
rule shared with the prompt pair (`clip_tokens.split_identifier`). A warning is logged when the identifier is a common
word: a single whole-word token whose CLIP BPE rank is below `COMMON_TOKEN_RANK` (CLIP's BPE merges are learned in
frequency order, so a low id is a frequent caption word: "dog" 1929, "man" 786; "sks" is 48136).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, replace

import torch

from ..clip_tokens import EMBEDDING_PREFIX, content_tokens, default_clip_tokenizer, primary_tokenizer, \
    split_identifier, sub_tokenizers
from ..errors import PhotoswapInputError
from .result import Concept
from .safe_files import safetensors_header
from .vocabulary import CLIP_VOCAB_SIZE

log = logging.getLogger(__name__)

COMMON_TOKEN_RANK = 20000  # single whole-word tokens below this BPE rank count as common words


# ====================================================================================================================
# Metadata
# ====================================================================================================================
@dataclass
class WordMetadata:
    words: str | None = None
    class_word: str | None = None
    added_tokens: list | None = None
    origin: str = ""


_INSTANCE_PREFIX = re.compile(r"^\s*(?:(?:a|an|the)\s+)?(?:photo|picture|image|portrait|painting|rendering)\s+of\s+"
                              r"(?:(?:a|an|the)\s+)?", re.IGNORECASE)


def words_from_instance_prompt(prompt: str) -> str | None:
    """"a photo of sks dog" -> "sks dog"; None when what remains does not look like concept words (> 4 words)."""
    text = _INSTANCE_PREFIX.sub("", " ".join(str(prompt).split())).strip(" .,;")
    if not text or len(text.split()) > 4:
        return None
    return text


def _first_str(value) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)):
        for item in value:
            s = _first_str(item)
            if s:
                return s
    return None


def _from_json_dict(data: dict, origin: str) -> WordMetadata | None:
    if not isinstance(data, dict):
        return None
    meta = WordMetadata(origin=origin)
    for key in ("concept_words", "trigger_words", "trainedWords", "activation text"):
        if key in data and _first_str(data[key]):
            meta.words = _first_str(data[key])
            break
    if meta.words is None and _first_str(data.get("instance_prompt")):
        meta.words = words_from_instance_prompt(_first_str(data["instance_prompt"]))
    if isinstance(data.get("class_word"), str):
        meta.class_word = data["class_word"].strip()
    tokens = data.get("added_tokens")
    if isinstance(tokens, str):
        tokens = [tokens]
    if isinstance(tokens, (list, tuple)) and all(isinstance(t, str) for t in tokens) and tokens:
        meta.added_tokens = list(tokens)
    return meta if (meta.words or meta.class_word is not None or meta.added_tokens) else None


def _read_sidecar(base: str) -> WordMetadata | None:
    """`<base>.json` then `<base>.txt`."""
    json_path, txt_path = base + ".json", base + ".txt"
    if os.path.isfile(json_path):
        try:
            with open(json_path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            log.warning("Photoswap: ignoring unreadable concept metadata %s (%s)", json_path, exc)
        else:
            meta = _from_json_dict(data, os.path.basename(json_path))
            if meta is not None:
                return meta
    if os.path.isfile(txt_path):
        try:
            with open(txt_path, encoding="utf-8") as fh:
                lines = [line.strip() for line in fh.read().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("Photoswap: ignoring unreadable concept metadata %s (%s)", txt_path, exc)
        else:
            if lines:
                return WordMetadata(words=lines[0], origin=os.path.basename(txt_path))
    return None


def _kohya_words(header: dict) -> str | None:
    for key in ("ss_dataset_dirs", "ss_tag_frequency"):
        raw = header.get(key)
        if not raw:
            continue
        try:
            dirs = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if not isinstance(dirs, dict):
            continue
        for name in dirs:
            match = re.match(r"^\s*\d+_(.+)$", str(name))
            if match and match.group(1).strip():
                return " ".join(match.group(1).split())
    return None


def _from_safetensors_header(header: dict, origin: str) -> tuple[WordMetadata | None, WordMetadata | None]:
    """(our own photoswap.* keys, what trainers write) from a safetensors header."""
    ours = None
    if any(k.startswith("photoswap.") for k in header):
        data = {"concept_words": header.get("photoswap.concept_words"),
                "class_word": header.get("photoswap.class_word")}
        if header.get("photoswap.added_tokens"):
            try:
                data["added_tokens"] = json.loads(header["photoswap.added_tokens"])
            except ValueError:
                data["added_tokens"] = [t for t in header["photoswap.added_tokens"].split(",") if t.strip()]
        ours = _from_json_dict(data, f"{origin} (photoswap.* metadata)")
    theirs = None
    trigger = _first_str(header.get("modelspec.trigger_phrase"))
    if trigger:
        theirs = WordMetadata(words=trigger, origin=f"{origin} (modelspec.trigger_phrase)")
    else:
        kohya = _kohya_words(header)
        if kohya:
            theirs = WordMetadata(words=kohya, origin=f"{origin} (kohya dataset folder name)")
    return ours, theirs


def _readme_words(folder: str) -> WordMetadata | None:
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(65536)
    except (OSError, UnicodeDecodeError):
        return None
    match = re.search(r"^instance_prompt:\s*(.+?)\s*$", text, re.MULTILINE)
    if not match:
        return None
    words = words_from_instance_prompt(match.group(1).strip().strip("'\""))
    return WordMetadata(words=words, origin="README.md (instance_prompt)") if words else None


def find_word_metadata(path: str, header: dict | None = None) -> WordMetadata | None:
    """Concept-word metadata for a model file or a diffusers folder (see the module docstring for the order)."""
    if os.path.isdir(path):
        meta = _read_sidecar(os.path.join(path, "concept"))
        return meta or _readme_words(path)
    meta = _read_sidecar(os.path.splitext(path)[0])
    if meta is not None:
        return meta
    header = safetensors_header(path) if header is None else header
    ours, theirs = _from_safetensors_header(header, os.path.basename(path))
    return ours or theirs


# ====================================================================================================================
# Choosing and validating the words
# ====================================================================================================================
@dataclass(frozen=True)
class ChosenWords:
    """The concept words a source will use, with where they came from and the metadata found (if any)."""

    words: str
    class_word: str
    origin: str
    meta: WordMetadata | None


def resolve_words(widget_words: str, widget_class: str, meta: WordMetadata | None,
                  prefer_metadata: bool) -> tuple[str, str, str]:
    """(concept words, class word, where they came from)."""
    words = " ".join((widget_words or "").split())
    class_word = " ".join((widget_class or "").split())
    origin = "concept_words widget"
    if prefer_metadata and meta is not None and meta.words:
        meta_words = " ".join(meta.words.split())
        if words and words != meta_words:
            log.info("Photoswap: concept words %r from %s replace the widget's %r (turn prefer_metadata off to use "
                     "the widget)", meta_words, meta.origin, words)
        words, origin = meta_words, meta.origin
        if not class_word and meta.class_word is not None:
            class_word = " ".join(meta.class_word.split())
    elif prefer_metadata and meta is not None and meta.class_word is not None and not class_word:
        class_word = " ".join(meta.class_word.split())
    return words, class_word, origin


def require_words(words: str, source_desc: str) -> None:
    if not words.strip():
        raise PhotoswapInputError(
            "concept_words", "the words that name the learned subject, e.g. 'sks dog' (identifier + class word)",
            f"type the identifier the concept was trained with into concept_words ({source_desc} carries no concept "
            "words in its metadata); see docs/getting_a_concept.md")


def check_class_word(words: str, class_word: str) -> None:
    if not class_word:
        return
    if not re.search(r"(?<!\S)" + re.escape(class_word) + r"(?!\S)", words, re.IGNORECASE):
        raise PhotoswapInputError(
            "class_word", f"the class noun that is part of the concept words {words!r} (e.g. 'dog' in 'sks dog')",
            f"make class_word one of the concept words, or leave it empty to let the prompt pair infer it "
            f"(got {class_word!r})")


def choose_words(path: str, display: str, concept_words: str, class_word: str, prefer_metadata: bool) -> ChosenWords:
    """The words for a file/folder source, validated before anything heavy is loaded (cheap errors first)."""
    meta = find_word_metadata(path)
    words, cw, origin = resolve_words(concept_words, class_word, meta, prefer_metadata)
    require_words(words, f"'{display}'")
    check_class_word(words, cw)
    return ChosenWords(words=words, class_word=cw, origin=origin, meta=meta)


# ====================================================================================================================
# Tokenization report
# ====================================================================================================================
def _token_strings(tokens: list, hf, embedding_name: str | None) -> tuple[list, list, list]:
    """(ids, readable strings, ids with None for embedding vectors) of content tokens."""
    ids, strings, placeholders = [], [], []
    emb_index = 0
    for tok in tokens:
        if isinstance(tok, torch.Tensor):
            strings.append(f"<{EMBEDDING_PREFIX}{embedding_name or '?'} #{emb_index}>")
            placeholders.append(None)
            emb_index += 1
        else:
            ids.append(int(tok))
            strings.append(hf.convert_ids_to_tokens(int(tok)))
            placeholders.append(int(tok))
    return ids, strings, placeholders


def _identifier_line(clip, hf, word: str, added: set) -> tuple[str | None, str | None]:
    """(report line, warning) for one identifier word."""
    word_ids = [int(t) for t in content_tokens(clip, word) if not isinstance(t, torch.Tensor)]
    pieces = [hf.convert_ids_to_tokens(i) for i in word_ids]
    if len(word_ids) == 1 and word_ids[0] in added:
        return (f"  identifier {word!r} is one token (id {word_ids[0]}), an added token with its own trained "
                "embedding"), None
    if len(word_ids) == 1:
        rank = word_ids[0]
        line = f"  identifier {word!r} is one token (id {rank}, BPE rank {rank} of {CLIP_VOCAB_SIZE})"
        piece = pieces[0] or ""
        if rank < COMMON_TOKEN_RANK and piece.endswith("</w>") and piece[:-4].isalpha():
            return line, (f"Photoswap: concept identifier {word!r} is a common word (CLIP BPE rank {rank} < "
                          f"{COMMON_TOKEN_RANK}): the model's prior meaning of it competes with the learned subject. "
                          "DreamBooth identifiers are rare tokens such as 'sks' (rank 48136) — make sure this is the "
                          "word the concept was trained with")
        return line, None
    if word_ids:
        return (f"  identifier {word!r} splits into {len(word_ids)} tokens ({' + '.join(pieces)}); all of them are "
                "the concept's identifier tokens"), None
    return None, f"Photoswap: concept identifier {word!r} produces no tokens"


def analyse_words(clip, words: str, class_word: str, *, kind: str, origin: str,
                  embedding_name: str | None = None) -> tuple[tuple, tuple, str]:
    """Tokenize the concept words with `clip` (or ComfyUI's CLIP-L tokenizer when None): (token ids, token strings,
    report). Logs the report, and a warning when the identifier is a common word."""
    tokenizer_note = ""
    if not sub_tokenizers(clip):
        clip = default_clip_tokenizer()
        tokenizer_note = (" (no CLIP connected: tokenized with ComfyUI's CLIP-L tokenizer, the vocabulary of every "
                          "SD CLIP)")
    hf = primary_tokenizer(clip).hf
    tokens = content_tokens(clip, words)
    ids, strings, placeholders = _token_strings(tokens, hf, embedding_name)
    lines = [f"Photoswap concept {words!r} ({kind}, words from {origin}){tokenizer_note}: "
             f"{len(tokens)} token(s): " + " ".join(f"{s}" + ("" if s.startswith("<embedding") else f"={i}")
                                                    for s, i in zip(strings, placeholders))]
    warnings = []
    split = split_identifier(words, class_word or None)  # "" = unknown here: infer it
    identifier_words = [w for w in split.identifier.split() if not w.lower().startswith(EMBEDDING_PREFIX)]
    if embedding_name is not None:
        lines.append(f"  embedding '{embedding_name}': {len(tokens) - len(ids)} vector(s) in the prompt"
                     + (f"; class word {split.class_word!r}" if split.class_word else ""))
    elif not identifier_words:
        warnings.append(f"Photoswap: concept words {words!r} hold no identifier besides the class word "
                        f"{split.class_word!r}: nothing tells the model which learned subject to draw; use the "
                        "identifier the concept was trained with (e.g. 'sks dog')")
    added = {int(i) for i in getattr(hf, "added_tokens_decoder", {}) if int(i) >= CLIP_VOCAB_SIZE}
    for word in identifier_words:
        line, warning = _identifier_line(clip, hf, word, added)
        lines += [line] if line else []
        warnings += [warning] if warning else []
    if split.class_word and embedding_name is None:
        lines.append(f"  class word {split.class_word!r}"
                     + (f" (inferred: {split.inferred_from})" if split.inferred_from else ""))
    report = "\n".join(lines)
    log.info(report)
    for w in warnings:
        log.warning(w)
    return tuple(ids), tuple(strings), report + "".join("\n  WARNING: " + w[len("Photoswap: "):] for w in warnings)


def unused_added_tokens_warning(display: str, added_tokens: list, ids, words: str) -> str | None:
    """A warning when a folder's tokenizer adds tokens (trained with the concept) that the concept words do not use."""
    if not added_tokens or any(int(i) >= CLIP_VOCAB_SIZE for i in ids):
        return None
    return (f"Photoswap: {display}'s tokenizer adds {added_tokens} (trained with the concept) but the concept words "
            f"{words!r} do not use them; the training prompt probably named the subject with {added_tokens[0]!r}")


def make_concept(clip, words: str, class_word: str, *, kind: str, origin: str, source: str,
                 embedding_name: str | None = None) -> Concept:
    """The PHOTOSWAP_CONCEPT for `words` as `clip` tokenizes them, with its tokenization report."""
    ids, strings, report = analyse_words(clip, words, class_word, kind=kind, origin=origin,
                                         embedding_name=embedding_name)
    return Concept(words=words, class_word=class_word, kind=kind, token_ids=ids, embedding_name=embedding_name,
                   token_strings=strings, source=source, report=report)


def with_warning(concept: Concept, warning: str | None) -> Concept:
    """`concept` with a source's warning logged and appended to its report (unchanged for None)."""
    if not warning:
        return concept
    log.warning(warning)
    return replace(concept, report=concept.report + "\n  WARNING: " + warning[len("Photoswap: "):])
