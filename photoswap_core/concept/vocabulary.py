"""Vocabulary surgery: tokens added at training time (textual inversion inside DreamBooth, e.g. "<sks>").

A trained text encoder that knows added tokens has token-embedding rows beyond the CLIP vocabulary. ComfyUI's CLIP
uses its own tokenizer files and a 49408-row embedding, so the extra rows are cut off before ComfyUI loads the text
encoder and then put back: the loaded CLIP gets a copy of ComfyUI's tokenizer with the same added tokens at the same
ids, and its token-embedding matrix is extended by the trained rows. "<sks>" in any prompt encoded with that CLIP then
tokenizes to its own id and embeds to its trained vector, exactly as in the diffusers pipeline. (Chosen over turning
the rows into `embedding:` files because the prompt the concept was trained with works unchanged and the concept
tokens stay integer ids.)
"""
from __future__ import annotations

import copy

import torch

CLIP_VOCAB_SIZE = 49408  # CLIP BPE vocabulary of every SD1.x/SD2.x/SDXL text encoder, BOS/EOS included


def split_added_rows(sd: dict, key: str, base: int = CLIP_VOCAB_SIZE) -> torch.Tensor | None:
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


def _encoder_of_width(clip, width: int) -> str:
    for name, sub in _clip_submodels(clip).items():
        if sub.transformer.get_input_embeddings().weight.shape[1] == width:
            return name
    raise ValueError(f"no text encoder of width {width} in this CLIP")


def _tokenizer_with(clip, target: str, ordered: list[tuple[str, int]]):
    """A copy of the CLIP's outer tokenizer whose `target` sub-tokenizer knows the added tokens at their ids."""
    from transformers import AddedToken

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
    return outer


def extend_clip_vocab(clip, width: int, tokens: list[tuple[str, int]], rows: torch.Tensor) -> str:
    """Give the CLIP sub-encoder whose embedding width is `width` the added `tokens` [(string, id)], with `rows` as
    their embeddings (rows[i] belongs to id CLIP_VOCAB_SIZE + i). Mutates `clip`, which must be freshly loaded (its
    tokenizer object is replaced by a copy, never changed in place). Returns the sub-encoder name."""
    target = _encoder_of_width(clip, width)
    emb = _clip_submodels(clip)[target].transformer.get_input_embeddings()
    base = emb.weight.shape[0]
    ordered = sorted(tokens, key=lambda t: t[1])
    if [i for _t, i in ordered] != list(range(base, base + len(ordered))) or rows.shape[0] != len(ordered):
        raise ValueError(f"added token ids {[i for _t, i in ordered]} do not follow the vocabulary ({base} rows) "
                         f"contiguously, or {rows.shape[0]} trained rows for {len(ordered)} tokens")
    clip.tokenizer = _tokenizer_with(clip, target, ordered)
    with torch.no_grad():
        weight = emb.weight
        new = torch.cat([weight.detach(), rows.to(device=weight.device, dtype=weight.dtype)], dim=0)
        emb.weight = torch.nn.Parameter(new, requires_grad=False)
        emb.num_embeddings = new.shape[0]
    return target


def added_tokens_of(tokenizer_dir: str) -> list[tuple[str, int]]:
    """Tokens a (diffusers) tokenizer folder adds beyond the CLIP vocabulary: [(string, id)]."""
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(tokenizer_dir)
    return sorted(((t, int(i)) for t, i in hf.get_added_vocab().items() if int(i) >= CLIP_VOCAB_SIZE),
                  key=lambda t: t[1])
