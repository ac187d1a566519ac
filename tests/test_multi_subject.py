"""Several subjects, parts of subjects and explicit regions (issue #16) on the tiny models (float32, CPU).

The invariants pin the rules of photoswap_core/blend.py and prompts.py: an all-zero region gives the source
reconstruction bit for bit, an all-one region without LocalBlend the unrestricted swap bit for bit, a second pair
that maps a word to itself changes nothing, region-restricted cross-attention equals an explicit masked softmax, and
outside a region the result is the source exactly.
"""
from __future__ import annotations

import pytest
import torch

from test_swap_invariants import _encode, _trace, _windows

pytestmark = pytest.mark.unit

SRC = "a photo of a cat on a sofa"


def _pair(ms, source=SRC, subject="cat", concept="sks dog", **kwargs):
    from comfyui_photoswap.photoswap_core.prompts import build_prompt_pair

    return build_prompt_pair(ms.clip, source, subject, concept, **kwargs)


def _swap(ms, trace, prompts, windows, lockstep=False, region_mask=None):
    from comfyui_photoswap.photoswap_core.swap_sampler import swap

    with torch.inference_mode():
        return swap(ms.model, trace, _encode(ms, prompts.target_prompt), _encode(ms, ""), prompts, windows, 7.5,
                    lockstep=lockstep, region_mask=region_mask)


@pytest.fixture(scope="module")
def trace(tiny_sd15):
    from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, invert
    from comfyui_photoswap.photoswap_core.recorder import record_trace

    ms = tiny_sd15
    src, neg = _encode(ms, SRC), _encode(ms, "")
    schedule = ddim_schedule(ms.model.get_model_object("model_sampling"), 8)
    x0 = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        inv = invert(ms.model, schedule, x0, src[0], neg[0], InversionSettings(method="direct", steps=8))
        return record_trace(ms.model, src, neg, schedule, 7.5, trajectory_vp=inv.trajectory,
                            null_embeddings=inv.null_embeddings, method="direct", record_self_maps=True)


# ------------------------------------------------------------------------------------------------ the prompt pair

def test_two_pairs_build_one_target_prompt_with_each_pairs_positions(tiny_sd15):
    pair = _pair(tiny_sd15, subject="cat; sofa", concept="sks dog; zwx chair")
    assert pair.target_prompt == "a photo of a sks dog on a zwx chair"
    assert [s.subject_word for s in pair.subjects] == ["cat", "sofa"]
    assert [s.identifier_words for s in pair.subjects] == ["sks", "zwx"]
    cat, sofa = pair.subjects
    tok = tiny_sd15.clip.tokenizer.clip_l.tokenizer
    assert cat.source_positions == (5,) and sofa.source_positions == (8,)  # BOS a photo of a cat on a sofa
    assert [pair.target_ids[p] for p in cat.target_positions] == tok.encode("sks")[1:-1]
    assert [pair.target_ids[p] for p in sofa.target_positions] == tok.encode("zwx")[1:-1]
    assert set(sofa.target_positions) < set(sofa.concept_positions)
    assert [pair.target_ids[p] for p in sofa.concept_positions] == tok.encode("zwx chair")[1:-1]
    assert pair.source_subject_positions == (5, 8)
    # one global alignment: both concepts' identifiers are new target tokens (alpha 0)
    assert all(pair.alphas[p] == 0.0 for p in cat.target_positions + sofa.target_positions)


def test_one_pair_is_the_single_subject_pair(tiny_sd15):
    one = _pair(tiny_sd15)
    assert len(one.subjects) == 1 and one.subjects[0].source_positions == one.source_subject_positions
    assert one.subject_word == "cat" and one.identifier_words == "sks" and not one.has_regions


def test_identity_pair_beside_another_is_dropped(tiny_sd15):
    two = _pair(tiny_sd15, subject="cat; sofa", concept="sks dog; sofa")
    one = _pair(tiny_sd15)
    assert two.subjects == one.subjects and two.target_prompt == one.target_prompt
    assert (two.mapper, two.alphas) == (one.mapper, one.alphas)


def test_composition_pairs_share_the_subject_with_two_regions(tiny_sd15):
    pair = _pair(tiny_sd15, "a photo of a cat with a big head on a sofa", "cat; cat", "sks dog; zwx bear",
                 region_words="head; sofa")
    assert pair.target_prompt == "a photo of a sks dog zwx bear with a big head on a sofa"
    assert [s.region_word for s in pair.subjects] == ["head", "sofa"]
    assert all(s.region_positions for s in pair.subjects) and pair.has_regions


@pytest.mark.parametrize("kwargs,input_name,fragment", [
    (dict(subject="cat; cat", concept="sks dog; zwx bear"), "subject_word", "both name 'cat'"),
    (dict(subject="cat; cat", concept="sks dog; zwx bear", region_words="sofa; sofa"), "subject_word", "both name"),
    (dict(subject="cat; dog", concept="sks dog; zwx bear"), "subject_word", "'dog' does not occur"),
    (dict(subject="cat; sofa", concept="sks dog"), "concept_words", "one concept per subject word"),
    (dict(subject="cat", concept="sks dog", region_words="head"), "region_words", "'head' does not occur"),
    (dict(subject="cat; sofa", concept="sks dog; zwx chair", region_words="sofa"), "region_words", "one region"),
    (dict(subject="cat; ", concept="sks dog; zwx"), "subject_word", "none empty"),
    (dict(subject="cat; sofa", concept="sks dog; " + " ".join(["zwx"] * 70)), "concept_words", "at most 77"),
])
def test_bad_pairs_are_refused_clearly(tiny_sd15, kwargs, input_name, fragment):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    with pytest.raises(PhotoswapInputError) as info:
        _pair(tiny_sd15, **kwargs)
    assert info.value.input_name == input_name and fragment in str(info.value) and "Fix:" in str(info.value)


# ------------------------------------------------------------------------------------------------------ the swap

@pytest.mark.parametrize("blend", [True, False])
def test_all_zero_region_gives_the_source_bit_for_bit(tiny_sd15, trace, blend):
    prompts = _pair(tiny_sd15)
    for lockstep in (False, True):
        out = _swap(tiny_sd15, trace, prompts, _windows(0.5, 0.25, 0.6, blend, blend_start=0.0), lockstep,
                    region_mask=torch.zeros(1, 64, 96))
        assert torch.equal(out.target, out.source)


def test_all_one_region_without_blend_is_the_unrestricted_swap(tiny_sd15, trace):
    prompts = _pair(tiny_sd15)
    windows = _windows(0.5, 0.25, 0.6, False)
    plain = _swap(tiny_sd15, trace, prompts, windows)
    assert not torch.equal(plain.target, plain.source)
    for lockstep in (False, True):
        assert torch.equal(_swap(tiny_sd15, trace, prompts, windows, lockstep, torch.ones(1, 64, 96)).target,
                           plain.target)


def test_second_pair_mapping_a_word_to_itself_equals_the_one_pair_swap(tiny_sd15, trace):
    windows = _windows(0.5, 0.25, 0.6, True, blend_start=0.0)
    one = _swap(tiny_sd15, trace, _pair(tiny_sd15), windows)
    two = _swap(tiny_sd15, trace, _pair(tiny_sd15, subject="cat; sofa", concept="sks dog; sofa"), windows)
    assert torch.equal(one.target, two.target) and torch.equal(one.mask, two.mask)


def test_outside_a_region_the_result_is_the_source(tiny_sd15, trace):
    """A left-half MASK at image size (resized to the latent): the right half of the latent is the source exactly, the
    left half is swapped; trace ≡ lockstep."""
    mask = torch.zeros(1, 64, 96)
    mask[..., :48] = 1.0
    prompts = _pair(tiny_sd15)
    windows = _windows(0.5, 0.25, 0.6, False)
    out = _swap(tiny_sd15, trace, prompts, windows, region_mask=mask)
    assert torch.equal(out.target[..., 6:], out.source[..., 6:])
    assert not torch.equal(out.target[..., :6], out.source[..., :6])
    lock = _swap(tiny_sd15, trace, prompts, windows, lockstep=True, region_mask=mask)
    assert float((lock.target - out.target).abs().max()) <= 1e-5 * max(1.0, float(out.target.abs().max()))


def test_region_words_and_two_pairs_trace_equals_lockstep(tiny_sd15, trace):
    prompts = _pair(tiny_sd15, subject="cat; sofa", concept="sks dog; zwx chair", region_words="cat; ")
    windows = _windows(0.5, 0.25, 0.6, True, blend_start=0.0)
    a = _swap(tiny_sd15, trace, prompts, windows)
    b = _swap(tiny_sd15, trace, prompts, windows, lockstep=True)
    assert float((a.target - b.target).abs().max()) <= 1e-5 * max(1.0, float(a.target.abs().max()))
    assert a.pair_masks.shape == (2, 1, 8, 12) and torch.equal(a.pair_masks, b.pair_masks)
    assert torch.equal(a.mask.float(), a.pair_masks.amax(0, keepdim=True))  # the union of the pairs' masks


def test_region_restricted_cross_attention_equals_explicit_masked_attention(tiny_sd15):
    """SwapRun.cross_attention on a target cond row, in the cross-map window, with a composition of two pairs whose
    regions split the token grid: equals masked softmax → column mix → lerp by the region → maps·v, written here."""
    from comfyui_photoswap.photoswap_core.arch import inspect_model
    from comfyui_photoswap.photoswap_core.attention_patch import RunMode, SwapRun
    from comfyui_photoswap.photoswap_core.trace import AttentionStore, TraceKey

    prompts = _pair(tiny_sd15, "a photo of a cat with a big head on a sofa", "cat; cat", "sks dog; zwx bear",
                    region_words="head; sofa")
    g = torch.Generator().manual_seed(1)
    heads, d, h, w, t = 2, 16, 4, 6, 77
    q, k, v = (torch.randn(1, n, heads * d, generator=g) for n in (h * w, t, t))
    q_s, k_s = torch.randn(h * w, heads * d, generator=g), torch.randn(t, heads * d, generator=g)
    layer = ("input", 4, 0)
    store = AttentionStore(torch.device("cpu"))
    store.put(TraceKey.cross_q(0, layer), q_s)
    store.put(TraceKey.cross_k(layer), k_s)
    run = SwapRun(inspect_model(tiny_sd15.model), RunMode.TARGET, 4, _windows(0.0, 0.0, 1.0, False),
                  source_store=store, prompts=prompts, device=torch.device("cpu"))
    left = torch.zeros(1, 1, h, w)
    left[..., : w // 2] = 1.0
    run.masks.regions = [left, 1.0 - left]  # this step's regions (begin_step computes them from the maps)
    extra = {"n_heads": heads, "cond_or_uncond": [0], "activations_shape": [1, heads * d, h, w],
             "original_shape": [1, 4, h * 2, w * 2], "block": layer[:2]}
    out = run.cross_attention(layer, q, k, v, extra, None)

    def split(x):
        return x.reshape(1, -1, heads, d).transpose(1, 2)

    inside = [left.reshape(-1, 1) >= 0.5, left.reshape(-1, 1) < 0.5]
    allowed = torch.ones(h * w, t, dtype=torch.bool)
    for subject, region in zip(prompts.subjects, inside):
        cols = torch.zeros(t, dtype=torch.bool)
        cols[list(subject.concept_positions)] = True
        allowed &= region | ~cols
    logits = split(q) @ split(k).transpose(-1, -2) / d ** 0.5
    target_maps = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    source_maps = torch.softmax(split(q_s[None]) @ split(k_s[None]).transpose(-1, -2) / d ** 0.5, -1)
    mapper, alphas = torch.tensor(prompts.mapper), torch.tensor(prompts.alphas)
    swapped = alphas * source_maps[..., mapper] + (1 - alphas) * target_maps
    union = torch.ones(h * w, 1)  # the two regions cover the grid
    maps = union * swapped + (1 - union) * target_maps
    expected = (maps @ split(v)).transpose(1, 2).reshape(1, h * w, heads * d)
    assert float((out - expected).abs().max()) <= 1e-5
    # and the column mask acts: a query in the left region attends to no token of the right region's concept
    assert float(target_maps[0, :, 0, list(prompts.subjects[1].concept_positions)].abs().max()) == 0.0


def test_region_mask_of_another_batch_is_refused(tiny_sd15, trace):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    with pytest.raises(PhotoswapInputError) as info:
        _swap(tiny_sd15, trace, _pair(tiny_sd15), _windows(), region_mask=torch.ones(2, 64, 96))
    assert info.value.input_name == "region_mask" and "batch of 2" in str(info.value)


# --------------------------------------------------------------------------------- several concepts (the nodes)

def write_tiny_lora(path, ms, seed: int, rank: int = 2) -> list[str]:
    """A kohya-format LoRA for the tiny set: two UNet attention layers and one text-encoder layer, random factors.
    Returns the model keys it patches."""
    import comfy.lora
    import safetensors.torch

    key_map = comfy.lora.model_lora_keys_unet(ms.model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(ms.clip.cond_stage_model, key_map)
    wanted = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
              "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    weights = {**ms.model.model.state_dict(), **ms.clip.cond_stage_model.state_dict()}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name in wanted:
        out_dim, in_dim = weights[key_map[name]].shape[:2]
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.5
        sd[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.5
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    safetensors.torch.save_file(sd, str(path))
    return [key_map[name] for name in wanted]


@pytest.fixture(scope="module")
def model_dirs(comfy, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("multi_concept_models")
    out = {}
    for name in ("loras", "embeddings"):
        (root / name).mkdir()
        folder_paths.add_model_folder_path(name, str(root / name))
        out[name] = root / name
    yield out
    for name, folder in out.items():
        folder_paths.folder_names_and_paths[name][0].remove(str(folder))
        folder_paths.filename_list_cache.pop(name, None)


def _run(node, **kwargs):
    from test_regression_digests import run_node

    return run_node(node, **kwargs)[0]


def _multi_concept_swap(pack, ms, first, second):
    """Two chained Concept Loaders → Prompt Pair ('cat; sofa') → recorder (synthetic) → sampler."""
    import importlib

    concept = importlib.import_module(f"{pack.__name__}.nodes.concept_nodes").PhotoswapConceptLoader
    prompt = importlib.import_module(f"{pack.__name__}.nodes.prompt_nodes").PhotoswapPromptPair
    swap = importlib.import_module(f"{pack.__name__}.nodes.swap_nodes")
    m1, c1, _, k1 = _run(concept, model=ms.model, clip=ms.clip, **first)
    m2, c2, _, k2 = _run(concept, model=m1, clip=c1, previous=k1, **second)
    src, tgt, neg, prompts = _run(prompt, clip=c2, source_prompt=SRC, subject_word="cat; sofa",
                                  concept_words="ignored", concept=k2)
    trace, _ = _run(swap.PhotoswapAttentionRecorder, model=m2, source_positive=src, negative=neg,
                    latent={"samples": torch.zeros(1, 4, 8, 12)}, seed=3, steps=3, record_self_maps=True)
    swapped, source, mask, pair_masks = _run(swap.PhotoswapAttentionSwapSampler, model=m2, trace=trace,
                                             target_positive=tgt, negative=neg, prompts=prompts, blend_start=0.0)
    return m2, k2, prompts, swapped["samples"], source["samples"], mask, pair_masks


@pytest.mark.integration
def test_two_loras_stack_and_swap_two_subjects(pack, tiny_sd15, model_dirs):
    import folder_paths

    keys_a = write_tiny_lora(model_dirs["loras"] / "tiny_dog.safetensors", tiny_sd15, seed=1)
    keys_b = write_tiny_lora(model_dirs["loras"] / "tiny_chair.safetensors", tiny_sd15, seed=2)
    folder_paths.filename_list_cache.pop("loras", None)
    model, chain, prompts, swapped, source, mask, pair_masks = _multi_concept_swap(
        pack, tiny_sd15,
        dict(source="lora", lora_name="tiny_dog.safetensors", concept_words="sks dog", class_word="dog"),
        dict(source="lora", lora_name="tiny_chair.safetensors", concept_words="zwx chair", class_word="chair"))
    assert [c.words for c in chain.concepts] == ["sks dog", "zwx chair"]
    assert prompts.target_prompt == "a photo of a sks dog on a zwx chair"
    unet_key = keys_a[0]
    assert unet_key == keys_b[0] and len(model.patches[unet_key]) == 2  # both LoRAs patch the layer: stacked
    assert pair_masks.shape == (2, 64, 96) and mask.shape == (1, 64, 96)
    assert torch.isfinite(swapped).all() and not torch.equal(swapped, source)
    assert tiny_sd15.model.patches == {}  # the input MODEL never changes


@pytest.mark.integration
def test_lora_and_embedding_swap_two_subjects(pack, tiny_sd15, model_dirs):
    import folder_paths
    import safetensors.torch

    write_tiny_lora(model_dirs["loras"] / "tiny_dog2.safetensors", tiny_sd15, seed=3)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    safetensors.torch.save_file({"emb_params": vectors}, str(model_dirs["embeddings"] / "tiny_chair.safetensors"))
    for name in ("loras", "embeddings"):
        folder_paths.filename_list_cache.pop(name, None)
    _, chain, prompts, swapped, source, _, pair_masks = _multi_concept_swap(
        pack, tiny_sd15,
        dict(source="lora", lora_name="tiny_dog2.safetensors", concept_words="sks dog", class_word="dog"),
        dict(source="embedding", embedding_name="tiny_chair.safetensors", class_word="chair"))
    assert [c.kind for c in chain.concepts] == ["lora", "embedding"]
    assert prompts.target_prompt == "a photo of a sks dog on a embedding:tiny_chair chair"
    emb = prompts.subjects[1]
    assert emb.identifier_words == "embedding:tiny_chair" and all(prompts.target_ids[p] < 0
                                                                  for p in emb.target_positions)
    assert pair_masks.shape[0] == 2 and torch.isfinite(swapped).all() and not torch.equal(swapped, source)


@pytest.mark.integration
def test_a_checkpoint_after_a_lora_concept_is_refused(pack, tiny_sd15, model_dirs):
    import importlib

    import folder_paths

    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    write_tiny_lora(model_dirs["loras"] / "tiny_dog3.safetensors", tiny_sd15, seed=5)
    folder_paths.filename_list_cache.pop("loras", None)
    concept = importlib.import_module(f"{pack.__name__}.nodes.concept_nodes").PhotoswapConceptLoader
    _, _, _, first = _run(concept, model=tiny_sd15.model, clip=tiny_sd15.clip, source="lora",
                          lora_name="tiny_dog3.safetensors", concept_words="sks dog")
    with pytest.raises(PhotoswapInputError) as info:
        _run(concept, source="checkpoint", ckpt_name="any.safetensors", previous=first)
    assert info.value.input_name == "previous" and "first" in str(info.value)
