"""The Prompt Pair on Flux's T5 (issue #17): the alignment of the two prompts' T5 pieces, with the real T5
tokenizer inside ComfyUI's FluxTokenizer (devtools/tiny_flux.py): inserted words, multi-piece words, long prompts."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tf(comfy):
    from devtools.tiny_flux import build_tiny_flux

    return build_tiny_flux(seed=0)


def _pieces(tf, ids):
    return tf.clip.tokenizer.t5xxl.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def _pair(tf, source, subject, concept, target=""):
    from comfyui_photoswap.photoswap_core.prompts import encode_prompt_pair

    return encode_prompt_pair(tf.clip, source, subject, concept, target_prompt=target)


def test_t5_tokenizer_is_chosen_for_a_flux_clip_and_matches_comfyui(tf):
    from devtools.tiny_flux import t5_word_pieces

    from comfyui_photoswap.photoswap_core.alignment import T5PromptTokenizer, as_prompt_tokenizer

    tok = as_prompt_tokenizer(tf.clip)
    assert isinstance(tok, T5PromptTokenizer) and tok.bos_id is None
    text = "a photo of a (sks:1.2) dog, hedgehog"
    assert tok.encode(text) == [tid for tid, _, _ in t5_word_pieces(tf.clip, text)]  # ComfyUI's own stream
    assert tok.encode(text)[-1] == 1 and "(" not in "".join(_pieces(tf, tok.encode(text)))


def test_inserted_multi_piece_identifier_gets_alpha_zero_and_pads_map_to_pads(tf):
    source, target, negative, pair = _pair(tf, "a photo of a cat on a sofa", "cat", "sks dog")
    L = pair.max_len
    assert L == 256 and len(pair.mapper) == len(pair.alphas) == L
    assert source[0][0].shape[1] == target[0][0].shape[1] == negative[0][0].shape[1] == L
    tgt = _pieces(tf, pair.target_ids)
    ident = [tgt[p] for p in pair.target_subject_positions]
    assert "".join(ident).replace("\u2581", "") == "sks" and len(ident) > 1  # T5 splits "sks" into pieces
    assert [_pieces(tf, pair.source_ids)[p] for p in pair.source_subject_positions] == ["\u2581cat"]
    for j in pair.target_subject_positions:
        assert pair.alphas[j] == 0.0
    dog = tgt.index("\u2581dog")
    assert pair.alphas[dog] == 0.0  # a replaced word keeps its own column (the reference's gap/mismatch scores)
    # every other target piece reads the same piece of the source; padding columns map onto themselves
    for j, piece in enumerate(tgt):
        if pair.alphas[j] == 1.0:
            assert _pieces(tf, pair.source_ids)[pair.mapper[j]] == piece, (j, piece)
    n = len(pair.target_ids)
    assert pair.mapper[n:] == tuple(range(n, L)) and set(pair.alphas[n:]) == {1.0}
    # "sofa" after the inserted pieces is read from its source position (shifted), not its own index
    sofa = tgt.index("\u2581sofa")
    assert pair.mapper[sofa] == _pieces(tf, pair.source_ids).index("\u2581sofa") != sofa


def test_whole_word_occurrences_use_t5_word_starts(tf):
    from comfyui_photoswap.photoswap_core.alignment import as_prompt_tokenizer, word_token_positions
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    prompt = "a hedgehog and a cat near a catamaran"
    positions = word_token_positions(tf.clip, prompt, "hedgehog")
    pieces = _pieces(tf, as_prompt_tokenizer(tf.clip).encode(prompt))
    assert "".join(pieces[p] for p in positions).replace("\u2581", "") == "hedgehog"
    assert pieces[positions[0]].startswith("\u2581")
    cat = word_token_positions(tf.clip, prompt, "cat")
    assert [pieces[p] for p in cat] == ["\u2581cat"]  # not inside "catamaran"
    with pytest.raises(PhotoswapInputError, match="subject_word"):
        _pair(tf, "a photo of a catamaran", "cat", "sks dog")


def test_long_prompts_pad_both_rows_to_one_length(tf):
    """T5 is never truncated: a prompt over 256 pieces gives a longer context, and both rows are padded to the
    longer one so they line up column for column."""
    words = " ".join(["a", "very", "detailed", "photo"] * 70)
    source_text = f"{words} of a cat"
    source, target, negative, pair = _pair(tf, source_text, "cat", "sks dog")
    n_src, n_tgt = len(pair.source_ids), len(pair.target_ids)
    assert n_src > 256 and n_tgt > n_src
    assert pair.max_len == n_tgt == len(pair.mapper)
    assert source[0][0].shape[1] == target[0][0].shape[1] == negative[0][0].shape[1] == n_tgt
    assert pair.mapper[n_tgt - 1] == n_src - 1  # the end token reads the source's end token
    # without the pair's padding the source alone is shorter: the rows would not line up
    plain = tf.clip.encode_from_tokens_scheduled(tf.clip.tokenize(source_text))
    assert plain[0][0].shape[1] == n_src < n_tgt
    assert tf.clip.tokenizer_options == {}  # the padding lives on a clone: the input CLIP is unchanged
