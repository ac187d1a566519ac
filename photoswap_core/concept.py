"""The PHOTOSWAP_CONCEPT object and the loading of a learned concept in every form it comes in.

Produced by the concept loader (DreamBooth checkpoint / diffusers folder / LoRA / textual-inversion embedding) and read
by the prompt pair node, which puts `words` into the target prompt.

Forms (`load_concept`, one per `source`):

* ``checkpoint`` — a single-file DreamBooth checkpoint from ``models/checkpoints``. ``.safetensors`` (``.sft``) is read
  directly; every other extension (``.ckpt``, ``.pt``, ...) only through ComfyUI's safe loader
  (``comfy.utils.load_torch_file(..., safe_load=True)``, i.e. ``torch.load(weights_only=True)``). A pickle that the
  safe loader refuses is a clear error: nothing here ever unpickles arbitrary objects.
* ``diffusers`` — a diffusers pipeline folder from ``models/diffusers`` (what the official Photoswap README trains):
  ``model_index.json``, ``unet/``, ``text_encoder/``, ``vae/``, ``tokenizer/`` (SDXL: also ``text_encoder_2/``,
  ``tokenizer_2/``). Loaded like ComfyUI's own ``comfy.diffusers_load.load_diffusers`` (same file preference, same
  ComfyUI loaders; sharded weights are merged) plus two additions:
  - *Added tokens* (textual inversion inside DreamBooth, e.g. ``<sks>`` added to the tokenizer with a trained row in
    the text encoder's token embedding). ComfyUI's CLIP uses its own tokenizer files and a 49408-row embedding, so the
    extra rows are cut off before ComfyUI loads the text encoder and then put back: the loaded CLIP gets a copy of
    ComfyUI's tokenizer with the same added tokens at the same ids, and its token-embedding matrix is extended by the
    trained rows. ``<sks>`` in any prompt encoded with that CLIP then tokenizes to its own id and embeds to its
    trained vector, exactly as in the diffusers pipeline. (Chosen over turning the rows into ``embedding:`` files
    because the prompt the concept was trained with works unchanged and the concept tokens stay integer ids.)
  - ``scheduler/scheduler_config.json`` ``prediction_type``: when it says ``v_prediction`` (or ``epsilon``) and
    ComfyUI's detection disagrees, the model's sampling is set accordingly (like ComfyUI's ModelSamplingDiscrete).
* ``lora`` — a DreamBooth-LoRA applied with ``comfy.sd.load_lora_for_models`` on a base MODEL/CLIP given as inputs.
  Key formats: kohya (``lora_unet_..._lora_down/up`` + ``alpha``, ``lora_te_...``), diffusers/PEFT
  (``unet.<module>.lora_A/lora_B``, ``text_encoder.<module>.lora_A/lora_B``; the alpha comes from the
  ``lora_adapter_metadata`` that diffusers writes into the safetensors header, else alpha = rank, PEFT's scale 1),
  old diffusers attention-processor keys and ComfyUI's own trained-LoRA keys. ComfyUI 0.3.75 does not map PEFT UNet
  keys for SD1.x/SDXL, so they are renamed to kohya-style names first. Before anything is applied every LoRA layer is
  matched against the base model: a layer whose shape does not fit, or no layer fitting at all, or more than 10 % of
  the UNet layers finding no counterpart, is a family mismatch (an SDXL LoRA on an SD1.5 base...) and an error.
* ``embedding`` — a textual-inversion embedding from ``models/embeddings``, used through ComfyUI's ``embedding:``
  prompt syntax. The concept words become ``embedding:<name>`` (plus the class word, when one is given). The name must
  exist (the error lists the available ones) and its vector width must fit the CLIP.

Concept words: from metadata when the source carries them (and ``prefer_metadata`` is on), else from the text widget.
Metadata, first found wins:
  1. a sidecar next to the file: ``<file stem>.json`` or ``<file stem>.txt``; for a diffusers folder
     ``concept.json`` / ``concept.txt`` inside it. JSON keys: ``concept_words`` (also accepted: ``instance_prompt``,
     ``trigger_words``, ``trainedWords``, ``activation text``), ``class_word``, ``added_tokens``; a .txt holds the
     concept words on its first non-empty line.
  2. safetensors header keys ``photoswap.concept_words``, ``photoswap.class_word``, ``photoswap.added_tokens``.
  3. what trainers write: ``modelspec.trigger_phrase``; kohya's ``ss_dataset_dirs`` / ``ss_tag_frequency`` folder
     names ``<repeats>_<words>`` ("10_sks dog" -> "sks dog"); the ``instance_prompt`` of the model card
     (``README.md``) that diffusers' DreamBooth scripts write into the output folder ("a photo of sks dog" ->
     "sks dog").
Validation: empty concept words are an error; the words are tokenized with the loaded CLIP and the result is
reported (log + `Concept.report`): e.g. "'sks' is one token (id 48136)". A warning is logged when the identifier (the
words without the class word) is a common word: a single whole-word token whose CLIP BPE rank is below
`COMMON_TOKEN_RANK` (CLIP's BPE merges are learned in frequency order, so a low id is a frequent caption word:
"dog" 1929, "man" 786; "sks" is 48136).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field

import torch

from .errors import PhotoswapInputError

log = logging.getLogger(__name__)

KINDS = ("checkpoint", "diffusers", "lora", "embedding")
CLIP_VOCAB_SIZE = 49408  # CLIP BPE vocabulary of every SD1.x/SD2.x/SDXL text encoder, BOS/EOS included
COMMON_TOKEN_RANK = 20000  # single whole-word tokens below this BPE rank count as common words
LORA_UNMATCHED_LIMIT = 0.10  # fraction of a LoRA's UNet layers allowed to find no counterpart in the base model
NONE_CHOICE = "(none)"
SAFETENSORS_EXT = (".safetensors", ".sft")
EMBEDDING_PREFIX = "embedding:"


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


@dataclass
class LoadedConcept:
    model: object  # comfy.model_patcher.ModelPatcher or None
    clip: object  # comfy.sd.CLIP or None
    vae: object  # comfy.sd.VAE or None
    concept: Concept
    notes: list = field(default_factory=list)


# ====================================================================================================================
# Concept words: metadata, validation, tokenization report
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


def safetensors_header(path: str) -> dict:
    """The `__metadata__` of a safetensors file, read without loading tensors ({} when absent/unreadable)."""
    if not path.lower().endswith(SAFETENSORS_EXT):
        return {}
    try:
        import safetensors

        with safetensors.safe_open(path, framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # a corrupt file is reported by the real load
        return {}


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


def _sub_tokenizers(clip) -> list[tuple[str, object]]:
    """[(attribute, SDTokenizer)] inside a ComfyUI CLIP's tokenizer, clip_l first."""
    outer = getattr(clip, "tokenizer", None)
    if outer is None:
        return []
    found = [(name, value) for name, value in vars(outer).items()
             if hasattr(value, "tokenizer") and hasattr(value, "tokenize_with_weights")]
    order = {"clip_l": 0, "clip_h": 1, "clip_g": 2}
    found.sort(key=lambda kv: order.get(kv[0], 3))
    return found


def _primary_key(clip) -> str:
    outer = clip.tokenizer
    subs = _sub_tokenizers(clip)
    attr = subs[0][0]
    if getattr(outer, "clip", None) == attr and getattr(outer, "clip_name", None) is not None:
        return outer.clip_name
    return attr[len("clip_"):] if attr.startswith("clip_") else attr


def _default_clip_tokenizer():
    """ComfyUI's CLIP-L tokenizer (same BPE vocabulary as every SD1.x/SD2.x/SDXL CLIP), for reports without a CLIP."""
    import comfy.sd1_clip

    class _Holder:
        pass

    holder = _Holder()
    holder.tokenizer = comfy.sd1_clip.SD1Tokenizer()
    holder.tokenize = lambda text, return_word_ids=False: holder.tokenizer.tokenize_with_weights(text, return_word_ids)
    return holder


def tokenize_words(clip, text: str) -> list:
    """Content tokens of `text` as the CLIP's primary tokenizer produces them: ints or embedding tensors."""
    key = _primary_key(clip)
    batches = clip.tokenize(text, return_word_ids=True)[key]
    return [tok for batch in batches for (tok, _weight, word_id) in batch if word_id != 0]


def _hf_of(clip):
    return _sub_tokenizers(clip)[0][1].tokenizer


def analyse_words(clip, words: str, class_word: str, *, kind: str, origin: str,
                  embedding_name: str | None = None) -> tuple[tuple, tuple, str]:
    """Tokenize the concept words with `clip` (or ComfyUI's CLIP-L tokenizer when None): (token ids, token strings,
    report). Logs the report, and a warning when the identifier is a common word."""
    tokenizer_note = ""
    if clip is None or not _sub_tokenizers(clip):
        clip = _default_clip_tokenizer()
        tokenizer_note = (" (no CLIP connected: tokenized with ComfyUI's CLIP-L tokenizer, the vocabulary of every "
                          "SD CLIP)")
    hf = _hf_of(clip)
    tokens = tokenize_words(clip, words)
    ids, strings = [], []
    emb_index = 0
    for tok in tokens:
        if isinstance(tok, torch.Tensor):
            strings.append(f"<{EMBEDDING_PREFIX}{embedding_name or '?'} #{emb_index}>")
            emb_index += 1
        else:
            ids.append(int(tok))
            strings.append(hf.convert_ids_to_tokens(int(tok)))
    lines = [f"Photoswap concept {words!r} ({kind}, words from {origin}){tokenizer_note}: "
             f"{len(tokens)} token(s): " + " ".join(f"{s}" + ("" if s.startswith("<embedding") else f"={i}")
                                                        for s, i in zip(strings, _ids_with_placeholders(tokens)))]
    warnings = []
    inferred_class = class_word or (words.split()[-1] if len(words.split()) > 1 else "")
    added = {int(i) for i in getattr(hf, "added_tokens_decoder", {}) if int(i) >= CLIP_VOCAB_SIZE}
    identifier_words = [w for w in words.split() if not w.lower().startswith(EMBEDDING_PREFIX)]
    if inferred_class:
        removed = False
        kept = []
        for w in reversed(identifier_words):
            if not removed and w.lower() == inferred_class.lower():
                removed = True
                continue
            kept.append(w)
        identifier_words = list(reversed(kept))
    if embedding_name is not None:
        lines.append(f"  embedding '{embedding_name}': {emb_index} vector(s) in the prompt"
                     + (f"; class word {inferred_class!r}" if inferred_class else ""))
    elif not identifier_words:
        warnings.append(f"Photoswap: concept words {words!r} hold no identifier besides the class word "
                        f"{inferred_class!r}: nothing tells the model which learned subject to draw; use the "
                        "identifier the concept was trained with (e.g. 'sks dog')")
    for word in identifier_words:
        word_ids = [int(t) for t in tokenize_words(clip, word) if not isinstance(t, torch.Tensor)]
        pieces = [hf.convert_ids_to_tokens(i) for i in word_ids]
        if len(word_ids) == 1 and word_ids[0] in added:
            lines.append(f"  identifier {word!r} is one token (id {word_ids[0]}), an added token with its own trained "
                         "embedding")
        elif len(word_ids) == 1:
            rank = word_ids[0]
            lines.append(f"  identifier {word!r} is one token (id {rank}, BPE rank {rank} of {CLIP_VOCAB_SIZE})")
            piece = pieces[0] or ""
            if rank < COMMON_TOKEN_RANK and piece.endswith("</w>") and piece[:-4].isalpha():
                warnings.append(
                    f"Photoswap: concept identifier {word!r} is a common word (CLIP BPE rank {rank} < "
                    f"{COMMON_TOKEN_RANK}): the model's prior meaning of it competes with the learned subject. "
                    "DreamBooth identifiers are rare tokens such as 'sks' (rank 48136) — make sure this is the word "
                    "the concept was trained with")
        elif word_ids:
            lines.append(f"  identifier {word!r} splits into {len(word_ids)} tokens ({' + '.join(pieces)}); all of "
                         "them are the concept's identifier tokens")
        else:
            warnings.append(f"Photoswap: concept identifier {word!r} produces no tokens")
    if inferred_class and embedding_name is None:
        lines.append(f"  class word {inferred_class!r}" + ("" if class_word else " (inferred: last word)"))
    report = "\n".join(lines)
    log.info(report)
    for w in warnings:
        log.warning(w)
    if warnings:
        report += "\n" + "\n".join("  WARNING: " + w[len("Photoswap: "):] for w in warnings)
    return tuple(ids), tuple(strings), report


def _ids_with_placeholders(tokens) -> list:
    return [None if isinstance(t, torch.Tensor) else int(t) for t in tokens]


# ====================================================================================================================
# Files
# ====================================================================================================================
def _refused_pickle(exc: Exception) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, pickle.UnpicklingError) or "weights_only" in text or "Weights only load failed" in text \
        or "Unsupported global" in text


def load_state_dict_safely(path: str, input_name: str) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) through ComfyUI's loader; pickles only through its safe loader."""
    import comfy.utils

    try:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as exc:
        name = os.path.basename(path)
        if not path.lower().endswith(SAFETENSORS_EXT) and _refused_pickle(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PhotoswapInputError(
                input_name, "a file ComfyUI's safe loader can read: .safetensors, or a .ckpt/.pt holding only tensors",
                f"'{name}' is a pickle with Python objects that the safe loader (torch.load weights_only=True) refuses "
                f"({first[:200]}). Convert it to .safetensors in an environment you trust (e.g. load it with "
                "torch.load(weights_only=False) only if you trust its origin, then safetensors.torch.save_file), or "
                "use the diffusers folder / safetensors file the trainer wrote") from exc
        raise PhotoswapInputError(input_name, "a readable model file",
                                  f"'{name}' could not be read ({type(exc).__name__}: {exc}); re-download or "
                                  "re-export it") from exc
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PhotoswapInputError(input_name, "a file holding model weights (a state dict of tensors)",
                                  f"'{os.path.basename(path)}' holds no tensors; pick the model file itself")
    return sd, metadata or {}


# ---- extra token rows (added tokens) -------------------------------------------------------------------------------
def _split_added_rows(sd: dict, key: str, base: int = CLIP_VOCAB_SIZE) -> torch.Tensor | None:
    """Cut the rows beyond the CLIP vocabulary off `sd[key]` (in place); return them (None when there are none)."""
    weight = sd.get(key)
    if weight is None or weight.dim() != 2 or weight.shape[0] <= base:
        return None
    sd[key] = weight[:base].clone()
    return weight[base:].clone()


def _clip_submodels(clip) -> dict:
    """{attribute: SDClipModel} of a ComfyUI CLIP ('clip_l', 'clip_g', 'clip_h')."""
    out = {}
    for name in ("clip_l", "clip_g", "clip_h"):
        sub = getattr(clip.cond_stage_model, name, None)
        if sub is not None and hasattr(sub, "transformer"):
            out[name] = sub
    return out


def extend_clip_vocab(clip, width: int, tokens: list[tuple[str, int]], rows: torch.Tensor) -> str:
    """Give the CLIP sub-encoder whose embedding width is `width` the added `tokens` [(string, id)], with `rows` as
    their embeddings (rows[i] belongs to id CLIP_VOCAB_SIZE + i). Mutates `clip`, which must be freshly loaded (its
    tokenizer object is replaced by a copy, never changed in place). Returns the sub-encoder name."""
    from transformers import AddedToken

    target = None
    for name, sub in _clip_submodels(clip).items():
        if sub.transformer.get_input_embeddings().weight.shape[1] == width:
            target = name
            break
    if target is None:
        raise ValueError(f"no text encoder of width {width} in this CLIP")
    sub = _clip_submodels(clip)[target]
    emb = sub.transformer.get_input_embeddings()
    base = emb.weight.shape[0]
    ordered = sorted(tokens, key=lambda t: t[1])
    if [i for _t, i in ordered] != list(range(base, base + len(ordered))) or rows.shape[0] != len(ordered):
        raise ValueError(f"added token ids {[i for _t, i in ordered]} do not follow the vocabulary ({base} rows) "
                         f"contiguously, or {rows.shape[0]} trained rows for {len(ordered)} tokens")
    outer = copy.copy(clip.tokenizer)
    sdtok = copy.copy(getattr(outer, target))
    hf = copy.deepcopy(sdtok.tokenizer)
    hf.add_tokens([AddedToken(t, special=False, normalized=True) for t, _i in ordered])
    for t, i in ordered:
        got = hf.convert_tokens_to_ids(t)
        if got != i:
            raise ValueError(f"added token {t!r} got id {got} in ComfyUI's tokenizer, expected {i}")
    sdtok.tokenizer = hf
    sdtok.inv_vocab = {**sdtok.inv_vocab, **{i: t for t, i in ordered}}
    setattr(outer, target, sdtok)
    clip.tokenizer = outer
    with torch.no_grad():
        weight = emb.weight
        new = torch.cat([weight.detach(), rows.to(device=weight.device, dtype=weight.dtype)], dim=0)
        emb.weight = torch.nn.Parameter(new, requires_grad=False)
        emb.num_embeddings = new.shape[0]
    return target


def _added_tokens_of(tokenizer_dir: str) -> list[tuple[str, int]]:
    """Tokens a (diffusers) tokenizer folder adds beyond the CLIP vocabulary: [(string, id)]."""
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(tokenizer_dir)
    return sorted(((t, int(i)) for t, i in hf.get_added_vocab().items() if int(i) >= CLIP_VOCAB_SIZE),
                  key=lambda t: t[1])


# ---- checkpoint ----------------------------------------------------------------------------------------------------
def _has_vae(sd: dict) -> bool:
    return any(k.startswith(("first_stage_model.", "vae.")) for k in sd)


def load_checkpoint(path: str, embedding_directory, added_tokens: list[str] | None = None):
    """(model, clip or None, vae or None) of a single-file checkpoint."""
    import comfy.sd

    name = os.path.basename(path)
    sd, metadata = load_state_dict_safely(path, "ckpt_name")
    extra = {}
    for key in list(sd.keys()):
        if key.endswith("token_embedding.weight") and not key.startswith("model.diffusion_model."):
            rows = _split_added_rows(sd, key)
            if rows is not None:
                extra[key] = rows
    has_vae = _has_vae(sd)
    try:
        out = comfy.sd.load_state_dict_guess_config(sd, output_vae=has_vae, output_clip=True,
                                                    embedding_directory=embedding_directory, metadata=metadata)
    except Exception as exc:
        raise PhotoswapInputError("ckpt_name", "a Stable Diffusion checkpoint ComfyUI can load",
                                  f"'{name}' failed to load ({type(exc).__name__}: {exc})") from exc
    if out is None or out[0] is None:
        raise PhotoswapInputError("ckpt_name", "a Stable Diffusion checkpoint (UNet + text encoder + VAE)",
                                  f"ComfyUI could not detect the model type of '{name}'; pick a full SD1.x/SD2.x/SDXL "
                                  "checkpoint (a LoRA goes with source 'lora', an embedding with 'embedding')")
    model, clip, vae = out[0], out[1], (out[2] if has_vae else None)
    for key, rows in extra.items():
        if clip is None:
            break
        if added_tokens and len(added_tokens) == rows.shape[0]:
            tokens = [(t, CLIP_VOCAB_SIZE + i) for i, t in enumerate(added_tokens)]
            target = extend_clip_vocab(clip, rows.shape[1], tokens, rows)
            log.info("Photoswap: %s: added tokens %s restored into %s from the metadata", name, added_tokens, target)
        else:
            log.warning("Photoswap: %s: the text encoder has %d token-embedding row(s) beyond the CLIP vocabulary "
                        "(%s) — tokens added at training time. Their strings are unknown, so they were dropped; "
                        "list them as \"added_tokens\" in %s.json (or load the diffusers folder) to use them.",
                        name, rows.shape[0], key, os.path.splitext(name)[0])
    return model, clip, vae


# ---- diffusers folder ----------------------------------------------------------------------------------------------
UNET_FILES = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
              "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.bin")
TEXT_ENCODER_FILES = ("model.fp16.safetensors", "model.safetensors", "pytorch_model.fp16.bin", "pytorch_model.bin")
TE_EMBEDDING_KEY = "text_model.embeddings.token_embedding.weight"


def _weights_in(folder: str, names) -> list[str] | None:
    """The weight file(s) of a diffusers component folder, ComfyUI's preference order; shards via their index."""
    for n in names:
        p = os.path.join(folder, n)
        if os.path.isfile(p):
            return [p]
        index = p + ".index.json"
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (OSError, ValueError, KeyError):
                continue
            files = sorted(set(weight_map.values()))
            paths = [os.path.join(folder, f) for f in files]
            if all(os.path.isfile(x) for x in paths):
                return paths
    return None


@dataclass
class DiffusersLayout:
    root: str
    unet: list
    vae: list
    text_encoders: list  # [(weight files, tokenizer dir or None)]
    index: dict


def validate_diffusers_folder(path: str, display_name: str) -> DiffusersLayout:
    def bad(expected, fix):
        return PhotoswapInputError("diffusers_folder", expected, fix)

    layout_txt = "a diffusers pipeline folder (model_index.json, unet/, text_encoder/, vae/, tokenizer/)"
    if not os.path.isdir(path):
        raise bad(layout_txt, f"'{display_name}' is not a folder under models/diffusers")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise bad(layout_txt, f"'{display_name}' has no model_index.json; copy the whole output folder of the "
                              "DreamBooth training script (or save the pipeline with save_pretrained)")
    try:
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise bad(layout_txt, f"'{display_name}/model_index.json' is not valid JSON ({exc})") from exc
    parts = {}
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(path, part)):
            raise bad(layout_txt, f"'{display_name}' has no {part}/ subfolder; copy the complete pipeline folder the "
                                  f"trainer wrote (DreamBooth saves unet/, text_encoder/, vae/ and tokenizer/)")
    unet = _weights_in(os.path.join(path, "unet"), UNET_FILES)
    if unet is None:
        raise bad(layout_txt, f"'{display_name}/unet/' holds no weights ({', '.join(UNET_FILES)}); the copy is "
                              "incomplete")
    vae = _weights_in(os.path.join(path, "vae"), UNET_FILES)
    if vae is None:
        raise bad(layout_txt, f"'{display_name}/vae/' holds no weights; the copy is incomplete")
    encoders = []
    for te, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        te_dir = os.path.join(path, te)
        if te == "text_encoder_2" and not os.path.isdir(te_dir):
            if index.get("text_encoder_2") not in (None, [None, None]):
                raise bad(layout_txt, f"'{display_name}' lists text_encoder_2 in model_index.json but has no "
                                      "text_encoder_2/ subfolder; the copy is incomplete")
            continue
        files = _weights_in(te_dir, TEXT_ENCODER_FILES)
        if files is None:
            raise bad(layout_txt, f"'{display_name}/{te}/' holds no weights; the copy is incomplete")
        tok_dir = os.path.join(path, tok)
        encoders.append((files, tok_dir if os.path.isdir(tok_dir) else None))
    parts.update(unet=unet, vae=vae)
    return DiffusersLayout(root=path, unet=unet, vae=vae, text_encoders=encoders, index=index)


def normalize_text_encoder_keys(sd: dict) -> dict:
    """transformers >= 5 saves CLIPTextModel weights without the "text_model." prefix ComfyUI expects (ComfyUI 0.3.75
    would silently leave such a text encoder uninitialised): put the prefix back."""
    if any(k.startswith("text_model.") for k in sd):
        return sd
    roots = ("embeddings.", "encoder.", "final_layer_norm.")
    if not any(k.startswith(roots) for k in sd):
        return sd
    return {("text_model." + k if k.startswith(roots) else k): v for k, v in sd.items()}


def _load_merged(files: list[str], input_name: str) -> dict:
    sd = {}
    for f in files:
        part, _meta = load_state_dict_safely(f, input_name)
        sd.update(part)
    return sd


def apply_prediction_type(model, prediction_type: str | None, zsnr: bool = False):
    """A clone of `model` whose sampling matches a diffusers scheduler's prediction_type when ComfyUI's detection
    disagrees (epsilon / v_prediction); otherwise `model` itself."""
    import comfy.model_base
    import comfy.model_sampling

    wanted = {"epsilon": comfy.model_base.ModelType.EPS,
              "v_prediction": comfy.model_base.ModelType.V_PREDICTION}.get(prediction_type or "")
    if wanted is None:
        return model
    detected = model.model.model_type
    if detected == wanted and not zsnr:
        return model
    sampling_type = comfy.model_sampling.V_PREDICTION if wanted == comfy.model_base.ModelType.V_PREDICTION \
        else comfy.model_sampling.EPS

    class ModelSamplingFromScheduler(comfy.model_sampling.ModelSamplingDiscrete, sampling_type):
        pass

    m = model.clone()
    m.add_object_patch("model_sampling", ModelSamplingFromScheduler(model.model.model_config, zsnr=zsnr))
    log.info("Photoswap: scheduler_config.json says %s (zero-SNR %s); ComfyUI detected %s — using the scheduler's",
             prediction_type, zsnr, detected.name)
    return m


def load_diffusers_folder(path: str, display_name: str, embedding_directory):
    """(model, clip, vae, [added token strings]) of a diffusers pipeline folder."""
    import comfy.sd

    layout = validate_diffusers_folder(path, display_name)
    te_sds, added = [], []
    for files, tok_dir in layout.text_encoders:
        sd = normalize_text_encoder_keys(_load_merged(files, "diffusers_folder"))
        rows = _split_added_rows(sd, TE_EMBEDDING_KEY)
        tokens = _added_tokens_of(tok_dir) if tok_dir is not None else []
        if tokens and rows is None:
            raise PhotoswapInputError(
                "diffusers_folder", "a text encoder with a trained embedding row for every added tokenizer token",
                f"'{display_name}': the tokenizer adds {[t for t, _ in tokens]} but the text encoder has no rows "
                "for them; save the text encoder after resize_token_embeddings (the training script does this)")
        if rows is not None and len(tokens) != rows.shape[0]:
            if len(tokens) < rows.shape[0] and [i for _t, i in tokens] == list(
                    range(CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE + len(tokens))):
                log.warning("Photoswap: %s: %d token-embedding rows have no tokenizer token; ignoring them",
                            display_name, rows.shape[0] - len(tokens))
                rows = rows[:len(tokens)]
            else:
                raise PhotoswapInputError(
                    "diffusers_folder", "a tokenizer whose added tokens match the text encoder's extra rows",
                    f"'{display_name}': tokenizer adds {len(tokens)} token(s) {tokens}, text encoder has "
                    f"{rows.shape[0]} extra row(s); save tokenizer and text encoder from the same training run")
        te_sds.append((sd, tokens, rows))
    try:
        unet_sd = _load_merged(layout.unet, "diffusers_folder")
        model = comfy.sd.load_diffusion_model_state_dict(unet_sd)
        if model is None:
            raise ValueError("ComfyUI could not detect the UNet type")
        clip = comfy.sd.load_text_encoder_state_dicts([sd for sd, _t, _r in te_sds],
                                                      embedding_directory=embedding_directory)
        vae = comfy.sd.VAE(sd=_load_merged(layout.vae, "diffusers_folder"))
    except PhotoswapInputError:
        raise
    except Exception as exc:
        raise PhotoswapInputError("diffusers_folder", "a Stable Diffusion (SD1.x/SD2.x/SDXL) diffusers pipeline",
                                  f"'{display_name}' failed to load ({type(exc).__name__}: {exc})") from exc
    for _sd, tokens, rows in te_sds:
        if tokens:
            target = extend_clip_vocab(clip, rows.shape[1], tokens, rows)
            added.extend(t for t, _ in tokens)
            log.info("Photoswap: %s: added token(s) %s with their trained embeddings restored into %s",
                     display_name, [t for t, _ in tokens], target)
    sched = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched):
        try:
            with open(sched, encoding="utf-8") as fh:
                cfg = json.load(fh)
            model = apply_prediction_type(model, cfg.get("prediction_type"), bool(cfg.get("rescale_betas_zero_snr")))
        except (OSError, ValueError) as exc:
            log.warning("Photoswap: %s: unreadable scheduler_config.json (%s); using ComfyUI's detection",
                        display_name, exc)
    return model, clip, vae, added


def list_diffusers_folders() -> list[str]:
    """Folders under models/diffusers that look like pipelines (hold model_index.json), relative names."""
    import folder_paths

    out = set()
    for base in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            if "model_index.json" in files:
                out.add(os.path.relpath(root, base).replace(os.sep, "/"))
                dirs[:] = []  # a pipeline's subfolders are its components
    return sorted(out)


def resolve_diffusers_folder(name: str) -> str:
    import folder_paths

    if not name or name == NONE_CHOICE:
        raise PhotoswapInputError("diffusers_folder", "a diffusers pipeline folder under models/diffusers",
                                  "pick the DreamBooth output folder in diffusers_folder (put it into "
                                  "ComfyUI/models/diffusers first)")
    for base in folder_paths.get_folder_paths("diffusers"):
        candidate = os.path.abspath(os.path.join(base, name))
        if os.path.commonpath([os.path.abspath(base), candidate]) != os.path.abspath(base):
            continue
        if os.path.isdir(candidate):
            return candidate
    raise PhotoswapInputError("diffusers_folder", "a folder under models/diffusers",
                              f"'{name}' was not found; available: {list_diffusers_folders() or 'none'}")


def resolve_file(folder: str, name: str, input_name: str, what: str) -> str:
    import folder_paths

    available = folder_paths.get_filename_list(folder)
    if not name or name == NONE_CHOICE:
        raise PhotoswapInputError(input_name, f"a {what} from models/{folder}",
                                  f"pick one in {input_name} (available: {_short_list(available)})")
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        raise PhotoswapInputError(input_name, f"a {what} that exists in models/{folder}",
                                  f"'{name}' was not found; available: {_short_list(available)}")
    return path


def _short_list(names, limit: int = 30) -> str:
    names = list(names)
    if not names:
        return "none"
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ---- LoRA ----------------------------------------------------------------------------------------------------------
_PEFT_SUFFIXES = ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"),
                  (".lora_A.default.weight", ".lora_down.weight"), (".lora_B.default.weight", ".lora_up.weight"),
                  (".lora.down.weight", ".lora_down.weight"), (".lora.up.weight", ".lora_up.weight"),
                  (".lora_linear_layer.down.weight", ".lora_down.weight"),
                  (".lora_linear_layer.up.weight", ".lora_up.weight"))
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.",
               "conv_norm_out.", "add_embedding.")


def _peft_alphas(metadata: dict) -> dict:
    """{component: (lora_alpha, r, use_rslora)} from diffusers' lora_adapter_metadata header."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for comp, cfg in data.items() if isinstance(data, dict) else ():
        if isinstance(cfg, dict) and cfg.get("lora_alpha") is not None:
            out[comp] = (float(cfg["lora_alpha"]), cfg.get("r"), bool(cfg.get("use_rslora", False)))
    return out


def normalize_lora(sd: dict, metadata: dict | None = None) -> tuple[dict, str]:
    """Rename diffusers/PEFT UNet keys to the kohya-style names ComfyUI maps, add PEFT alphas from the header.
    Returns (state dict, detected format)."""
    keys = list(sd.keys())
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        fmt = "kohya"
    elif any(".lora_A." in k or ".lora_B." in k for k in keys):
        fmt = "diffusers/PEFT"
    elif any("_lora.down." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        fmt = "diffusers (attention processors)"
    elif any(k.startswith("diffusion_model.") for k in keys):
        fmt = "ComfyUI"
    else:
        fmt = "unknown"
    if fmt not in ("diffusers/PEFT", "diffusers (attention processors)"):
        return sd, fmt
    alphas = _peft_alphas(metadata)
    out = {}
    for k, v in sd.items():
        new_key = k
        for src, dst in _PEFT_SUFFIXES:
            if k.endswith(src):
                module = k[:-len(src)]
                stripped = module
                for prefix in ("base_model.model.", "unet.base_model.model."):
                    if stripped.startswith(prefix):
                        stripped = "unet." + stripped[len(prefix):]
                if stripped.startswith("unet."):
                    unet_path = stripped[len("unet."):]
                elif stripped.startswith(_UNET_ROOTS):
                    unet_path = stripped
                else:
                    unet_path = None
                if unet_path is not None and ".processor." not in unet_path:
                    lora_module = "lora_unet_" + unet_path.replace(".", "_")
                    comp = "unet"
                else:
                    lora_module = module
                    comp = module.split(".", 1)[0]
                new_key = lora_module + dst
                if comp in alphas and dst == ".lora_down.weight" and f"{lora_module}.alpha" not in out:
                    lora_alpha, r, rslora = alphas[comp]
                    rank = v.shape[0]
                    alpha = lora_alpha * (rank ** 0.5) if rslora else lora_alpha
                    out[f"{lora_module}.alpha"] = torch.tensor(float(alpha))
                break
        out[new_key] = v
    return out, fmt


def _family_of_model(model) -> str:
    try:
        return type(model.model.model_config).__name__
    except AttributeError:
        return "unknown"


_CONTEXT_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner", 4096: "a DiT/T5 model"}


def _guess_lora_family(sd: dict) -> str:
    keys = list(sd.keys())
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "SDXL"
    if any(k.startswith(("transformer.", "lora_transformer_", "double_blocks", "single_blocks")) or
           "single_transformer_blocks" in k for k in keys):
        return "a DiT model (Flux/SD3/...)"
    for k, v in sd.items():
        if ("attn2" in k and ("to_k" in k or "to_v" in k)) and ("lora_down" in k or "lora_A" in k) and v.dim() >= 2:
            return _CONTEXT_FAMILY.get(int(v.shape[1]), f"a model with {int(v.shape[1])}-wide text context")
    return "another model family"


@dataclass
class LoraCheck:
    fmt: str
    patches: dict
    unet_applied: int
    clip_applied: int
    mismatched: list  # [(model key, lora shape text, model shape)]
    unmatched_unet: list
    unmatched_te: list
    unet_modules: int


def _lora_modules(keys) -> set:
    out = set()
    for k in keys:
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_mid.weight", ".dora_scale",
                       ".diff", ".diff_b", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1",
                       ".lokr_w2", ".lora_A.weight", ".lora_B.weight", "_lora.down.weight", "_lora.up.weight"):
            if k.endswith(suffix):
                out.add(k[:-len(suffix)])
                break
        else:
            out.add(k.rsplit(".", 1)[0])
    return out


def _is_te_key(k: str) -> bool:
    return k.startswith(("lora_te", "text_encoder", "text_encoders.", "te_", "lora_te1_", "lora_te2_"))


def check_lora(model, clip, sd: dict, fmt: str) -> LoraCheck:
    """Match every LoRA layer against the base model/CLIP (no patching)."""
    import comfy.lora
    import comfy.lora_convert

    sd = comfy.lora_convert.convert_lora(sd)
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    consumed = set()
    for adapter in patches.values():
        consumed.update(getattr(adapter, "loaded_keys", ()) or ())
    for x in key_map:
        for suffix in (".alpha", ".dora_scale", ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight",
                       ".reshape_weight"):
            if x + suffix in sd:
                consumed.add(x + suffix)
    unmatched = [k for k in sd if k not in consumed]
    unmatched_mods = sorted(_lora_modules(unmatched))
    unmatched_te = [m for m in unmatched_mods if _is_te_key(m)]
    unmatched_unet = [m for m in unmatched_mods if not _is_te_key(m)]

    shapes = {}
    if model is not None:
        shapes.update({k: tuple(v.shape) for k, v in model.model.state_dict().items()})
    if clip is not None:
        shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
    mismatched, unet_applied, clip_applied = [], 0, 0
    for key, adapter in patches.items():
        if isinstance(key, tuple):
            key = key[0]
        if key.startswith("diffusion_model."):
            unet_applied += 1
        else:
            clip_applied += 1
        wshape = shapes.get(key)
        if wshape is None:
            continue
        problem = _shape_problem(adapter, wshape)
        if problem:
            mismatched.append((key, problem, wshape))
    all_unet_modules = {m for m in _lora_modules(sd.keys()) if not _is_te_key(m)}
    return LoraCheck(fmt=fmt, patches=patches, unet_applied=unet_applied, clip_applied=clip_applied,
                     mismatched=mismatched, unmatched_unet=unmatched_unet, unmatched_te=unmatched_te,
                     unet_modules=len(all_unet_modules))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _shape_problem(adapter, wshape) -> str | None:
    """A description of the LoRA delta's shape when it cannot apply to a weight of `wshape`, else None."""
    weights = getattr(adapter, "weights", None)
    name = type(adapter).__name__
    if isinstance(adapter, tuple) and len(adapter) == 2 and adapter[0] == "diff":
        diff = adapter[1][0]
        return None if tuple(diff.shape) == tuple(wshape) else f"diff {tuple(diff.shape)}"
    if name != "LoRAAdapter" or not weights:
        return None
    up, down, _alpha, mid = weights[0], weights[1], weights[2], weights[3]
    reshape = weights[5] if len(weights) > 5 else None
    if reshape is not None:
        return None
    out_dim = int(up.shape[0])
    in_numel = _numel(down.shape[1:]) if mid is None else int(down.shape[1]) * _numel(mid.shape[2:])
    if len(wshape) < 2:
        return f"up {tuple(up.shape)} / down {tuple(down.shape)}"
    if out_dim != wshape[0] or in_numel != _numel(wshape[1:]):
        return f"up {tuple(up.shape)} @ down {tuple(down.shape)}"
    return None


def apply_lora(model, clip, path: str, display_name: str, strength_model: float, strength_clip: float):
    """(model, clip, LoraCheck) with the LoRA applied; family mismatches raise PhotoswapInputError."""
    import comfy.sd

    if model is None:
        raise PhotoswapInputError("model", "the base MODEL the LoRA was trained on",
                                  "connect the MODEL (and CLIP) output of a checkpoint loader for the LoRA's base "
                                  "model (e.g. Load Checkpoint with SD1.5) to this node's model/clip inputs")
    sd, metadata = load_state_dict_safely(path, "lora_name")
    sd, fmt = normalize_lora(sd, metadata)
    check = check_lora(model, clip, sd, fmt)
    base_family = _family_of_model(model)
    lora_family = _guess_lora_family(sd)
    if check.mismatched:
        key, lora_shape, wshape = check.mismatched[0]
        raise PhotoswapInputError(
            "lora_name", f"a LoRA trained for the base model's family ({base_family})",
            f"'{display_name}' looks like a LoRA for {lora_family}, not {base_family}: {len(check.mismatched)} of "
            f"{check.unet_applied + check.clip_applied} layers do not fit (e.g. {key}: LoRA {lora_shape}, base weight "
            f"{tuple(wshape)}). Connect the base model the LoRA was trained on, or pick a LoRA trained on "
            f"{base_family}")
    if check.unet_applied + check.clip_applied == 0:
        raise PhotoswapInputError(
            "lora_name", f"a LoRA with layers of the base model ({base_family})",
            f"none of the {len(sd)} tensors in '{display_name}' ({fmt} keys) matches a layer of the {base_family} "
            f"base model — it is a LoRA for {lora_family} (or not a LoRA at all). Connect the base model it was "
            "trained on, or pick a LoRA for this model")
    if check.unmatched_unet and check.unet_modules and \
            len(check.unmatched_unet) / check.unet_modules > LORA_UNMATCHED_LIMIT:
        raise PhotoswapInputError(
            "lora_name", f"a LoRA whose layers exist in the base model ({base_family})",
            f"{len(check.unmatched_unet)} of {check.unet_modules} UNet layers of '{display_name}' have no counterpart "
            f"in the {base_family} base model (e.g. {check.unmatched_unet[0]}); it looks like a LoRA for "
            f"{lora_family}. Connect the base model it was trained on")
    if check.unmatched_unet:
        log.warning("Photoswap: LoRA %s: %d layer(s) not found in the base model and skipped: %s", display_name,
                    len(check.unmatched_unet), ", ".join(check.unmatched_unet[:5]))
    if check.unmatched_te:
        if clip is None:
            log.warning("Photoswap: LoRA %s also trains the text encoder (%d layers) but no CLIP is connected: that "
                        "part is not applied; connect the base CLIP", display_name, len(check.unmatched_te))
        else:
            log.warning("Photoswap: LoRA %s: %d text-encoder layer(s) not found in the CLIP and skipped: %s",
                        display_name, len(check.unmatched_te), ", ".join(check.unmatched_te[:5]))
    log.info("Photoswap: LoRA %s (%s keys): %d UNet and %d text-encoder layers, strength %.3g / %.3g",
             display_name, fmt, check.unet_applied, check.clip_applied, strength_model, strength_clip)
    m_in = model if strength_model != 0 else None
    c_in = clip if (clip is not None and strength_clip != 0) else None
    if m_in is None and c_in is None:
        return model, clip, check
    new_model, new_clip = comfy.sd.load_lora_for_models(m_in, c_in, sd, strength_model, strength_clip)
    return (new_model if m_in is not None else model), (new_clip if c_in is not None else clip), check


# ---- embedding -----------------------------------------------------------------------------------------------------
_EMBED_EXT = (".safetensors", ".pt", ".bin")


def embedding_prompt_name(name: str) -> str:
    """The name to write after 'embedding:' — the file name without extension when ComfyUI resolves it to the same
    file, else the full file name."""
    import folder_paths

    stem, ext = os.path.splitext(name)
    if ext.lower() not in _EMBED_EXT:
        return name
    chosen = folder_paths.get_full_path("embeddings", name)
    for e in _EMBED_EXT:  # ComfyUI's load_embed tries these in order for a name without extension
        other = folder_paths.get_full_path("embeddings", stem + e)
        if other is not None:
            return stem if os.path.abspath(other) == os.path.abspath(chosen or "") else name
    return name


def prepare_embedding(clip, name: str):
    """(clip to use, prompt name, vectors per sub-encoder). Checks the embedding exists and fits this CLIP."""
    import comfy.sd1_clip
    import folder_paths

    if clip is None:
        raise PhotoswapInputError("clip", "the base CLIP the embedding was trained for",
                                  "connect the CLIP output of a checkpoint loader to this node's clip input")
    available = folder_paths.get_filename_list("embeddings")
    if not name or name == NONE_CHOICE or folder_paths.get_full_path("embeddings", name) is None:
        raise PhotoswapInputError(
            "embedding_name", "a textual-inversion embedding that exists in models/embeddings",
            f"'{name}' does not exist; available: {_short_list(available)}. Put the .safetensors/.pt file into "
            "ComfyUI/models/embeddings")
    prompt_name = embedding_prompt_name(name)
    if any(c.isspace() for c in prompt_name) or "," in prompt_name:
        raise PhotoswapInputError("embedding_name", "an embedding file name without spaces or commas",
                                  f"rename '{name}' (ComfyUI's 'embedding:' syntax ends the name at a space/comma)")
    dirs = folder_paths.get_folder_paths("embeddings")
    subs = _sub_tokenizers(clip)
    if not subs:
        raise PhotoswapInputError("clip", "a CLIP with a CLIP tokenizer (SD1.x/SD2.x/SDXL)",
                                  f"connect an SD checkpoint's CLIP (got {type(getattr(clip, 'tokenizer', None))})")
    fits, clip_widths, file_widths = {}, {}, {}
    for attr, sdtok in subs:
        size = getattr(sdtok, "embedding_size", None)
        clip_widths[attr] = size
        emb = comfy.sd1_clip.load_embed(prompt_name, dirs, size, getattr(sdtok, "embedding_key", None))
        if emb is not None and emb.shape[-1] == size:
            fits[attr] = int(emb.reshape(-1, emb.shape[-1]).shape[0])
        elif emb is not None:
            file_widths[attr] = int(emb.shape[-1])
    if not fits:
        found = sorted(set(file_widths.values()))
        raise PhotoswapInputError(
            "embedding_name", f"an embedding trained for this CLIP (vector width {sorted(set(clip_widths.values()))})",
            f"'{name}' has vectors of width {found or 'unknown (unreadable file)'}; it was trained for another model "
            "family — pick an embedding for this base model or connect the model it was trained for")
    missing = [a for a, _s in subs if a not in fits]
    if missing:
        log.warning("Photoswap: embedding %s has no vectors for %s (only %s); those encoders ignore it", name,
                    missing, list(fits))
    # the tokenizer must see models/embeddings: copy it (never change the input CLIP) when it does not
    needs = [attr for attr, sdtok in subs
             if not sdtok.embedding_directory or not set(dirs) <= set(_as_list(sdtok.embedding_directory))]
    if needs:
        new = clip.clone()
        outer = copy.copy(clip.tokenizer)
        for attr in needs:
            sdtok = copy.copy(getattr(outer, attr))
            sdtok.embedding_directory = list(dict.fromkeys(_as_list(sdtok.embedding_directory) + list(dirs)))
            setattr(outer, attr, sdtok)
        new.tokenizer = outer
        clip = new
    return clip, prompt_name, fits


def _as_list(value) -> list:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def unused_added_tokens_warning(display: str, added_tokens: list, ids, words: str) -> str | None:
    """A warning when a folder's tokenizer adds tokens (trained with the concept) that the concept words do not use."""
    if not added_tokens or any(int(i) >= CLIP_VOCAB_SIZE for i in ids):
        return None
    return (f"Photoswap: {display}'s tokenizer adds {added_tokens} (trained with the concept) but the concept words "
            f"{words!r} do not use them; the training prompt probably named the subject with {added_tokens[0]!r}")


# ====================================================================================================================
# The whole load
# ====================================================================================================================
SOURCE_TO_KIND = {"checkpoint": "checkpoint", "diffusers folder": "diffusers", "diffusers": "diffusers",
                  "lora": "lora", "embedding": "embedding"}


def source_path(source: str, ckpt_name: str = "", diffusers_folder: str = "", lora_name: str = "",
                embedding_name: str = "") -> str | None:
    """The file/folder a source points at (None when unresolvable) — for cache fingerprints."""
    import folder_paths

    kind = SOURCE_TO_KIND.get(source)
    try:
        if kind == "checkpoint":
            return folder_paths.get_full_path("checkpoints", ckpt_name)
        if kind == "lora":
            return folder_paths.get_full_path("loras", lora_name)
        if kind == "embedding":
            return folder_paths.get_full_path("embeddings", embedding_name)
        if kind == "diffusers":
            return resolve_diffusers_folder(diffusers_folder)
    except Exception:
        return None
    return None


def fingerprint(path: str | None) -> str:
    """Changes when the source (or its concept metadata) changes on disk."""
    if not path:
        return ""
    parts = []
    if os.path.isdir(path):
        candidates = [os.path.join(path, "model_index.json"), os.path.join(path, "concept.json"),
                      os.path.join(path, "concept.txt"), os.path.join(path, "README.md")]
        for sub in ("unet", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"):
            d = os.path.join(path, sub)
            if os.path.isdir(d):
                candidates += [os.path.join(d, f) for f in sorted(os.listdir(d))]
    else:
        stem = os.path.splitext(path)[0]
        candidates = [path, stem + ".json", stem + ".txt"]
    for c in candidates:
        try:
            st = os.stat(c)
            parts.append(f"{c}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            pass
    return "|".join(parts)


def load_concept(source: str, *, ckpt_name: str = NONE_CHOICE, diffusers_folder: str = NONE_CHOICE,
                 lora_name: str = NONE_CHOICE, embedding_name: str = NONE_CHOICE, concept_words: str = "",
                 class_word: str = "", prefer_metadata: bool = True, strength_model: float = 1.0,
                 strength_clip: float = 1.0, model=None, clip=None, vae=None) -> LoadedConcept:
    """Load a concept in one of its forms; see the module docstring. Never mutates its inputs."""
    import folder_paths

    kind = SOURCE_TO_KIND.get(source)
    if kind is None:
        raise PhotoswapInputError("source", f"one of {sorted(set(SOURCE_TO_KIND))}", f"pick a source (got {source!r})")
    embedding_dirs = folder_paths.get_folder_paths("embeddings")
    notes = []

    if kind == "embedding":
        clip2, prompt_name, fits = prepare_embedding(clip, embedding_name)
        meta = find_word_metadata(folder_paths.get_full_path("embeddings", embedding_name)) if prefer_metadata \
            else None
        cw = " ".join((class_word or "").split())
        if not cw and meta is not None and meta.class_word:
            cw = " ".join(meta.class_word.split())
        words = f"{EMBEDDING_PREFIX}{prompt_name}" + (f" {cw}" if cw else "")
        ids, strings, report = analyse_words(clip2, words, cw, kind=kind, origin="the embedding name",
                                             embedding_name=prompt_name)
        if not any(s.startswith(f"<{EMBEDDING_PREFIX}") for s in strings):
            raise PhotoswapInputError("embedding_name", "an embedding ComfyUI's tokenizer can load",
                                      f"'{embedding_name}' produced no vectors in the prompt; re-export it as "
                                      ".safetensors")
        concept = Concept(words=words, class_word=cw, kind=kind, token_ids=ids, embedding_name=prompt_name,
                          token_strings=strings, source=embedding_name, report=report)
        return LoadedConcept(model=model, clip=clip2, vae=vae, concept=concept, notes=notes)

    # words first: cheap errors before heavy loads
    if kind == "checkpoint":
        path = resolve_file("checkpoints", ckpt_name, "ckpt_name", "checkpoint file")
        display = ckpt_name
    elif kind == "diffusers":
        path = resolve_diffusers_folder(diffusers_folder)
        display = diffusers_folder
    else:
        path = resolve_file("loras", lora_name, "lora_name", "LoRA file")
        display = lora_name
    meta = find_word_metadata(path)
    words, cw, origin = resolve_words(concept_words, class_word, meta, prefer_metadata)
    require_words(words, f"'{display}'")
    check_class_word(words, cw)

    if kind == "checkpoint":
        added = meta.added_tokens if meta is not None else None
        out_model, out_clip, out_vae = load_checkpoint(path, embedding_dirs, added)
        if out_clip is None:
            if clip is None:
                raise PhotoswapInputError(
                    "clip", "a text encoder: the checkpoint holds none",
                    f"'{display}' has no text-encoder weights (a UNet-only file); connect the base model's CLIP to "
                    "the clip input")
            log.warning("Photoswap: %s has no text encoder; using the connected CLIP", display)
            out_clip = clip
        elif clip is not None or model is not None:
            log.warning("Photoswap: source 'checkpoint' loads its own MODEL and CLIP; the connected model/clip "
                        "inputs are ignored")
    elif kind == "diffusers":
        out_model, out_clip, out_vae, added_tokens = load_diffusers_folder(path, display, embedding_dirs)
        if clip is not None or model is not None:
            log.warning("Photoswap: source 'diffusers folder' loads its own MODEL and CLIP; the connected "
                        "model/clip inputs are ignored")
    else:
        out_model, out_clip, _check = apply_lora(model, clip, path, display, strength_model, strength_clip)
        out_vae = None
    if vae is not None:
        out_vae = vae  # a connected VAE always wins (many DreamBooth checkpoints ship a poor one)
    elif kind in ("checkpoint",) and out_vae is None:
        log.warning("Photoswap: %s holds no VAE; connect one to the vae input", display)

    ids, strings, report = analyse_words(out_clip, words, cw, kind=kind, origin=origin)
    if kind == "diffusers":
        msg = unused_added_tokens_warning(display, added_tokens, ids, words)
        if msg:
            log.warning(msg)
            report += "\n  WARNING: " + msg[len("Photoswap: "):]
    concept = Concept(words=words, class_word=cw, kind=kind, token_ids=ids, token_strings=strings,
                      source=display, report=report)
    return LoadedConcept(model=out_model, clip=out_clip, vae=out_vae, concept=concept, notes=notes)
