"""Flux groundwork (issue #17): the tiny Flux fixture, and the ComfyUI 0.3.75 facts docs/flux_notes.md states.

Each test pins one claim of the notes, so a ComfyUI that behaves differently fails here first. Nothing here touches
photoswap_core: these are the facts the Flux adapter will be built on.
"""
from __future__ import annotations

import math

import pytest
import torch

SIZE_H, SIZE_W = 64, 96  # latent 8 x 12 -> 4 x 6 = 24 image tokens after the 2x2 patchify
IMG_TOKENS = (SIZE_H // 16) * (SIZE_W // 16)
T5_PAD = 256
OVERRIDE_OPT_KEYS = {"block_index", "block_type", "callbacks", "cond_or_uncond", "optimized_attention_override",
                     "sample_sigmas", "sigmas", "total_blocks", "uuids", "wrappers"}


@pytest.fixture(scope="module")
def tf(comfy):
    from devtools.tiny_flux import build_tiny_flux

    return build_tiny_flux(seed=0)


@pytest.fixture(scope="module")
def cond(tf):
    from devtools.tiny_flux import encode_flux

    return encode_flux(tf.clip, "a photo of a cat", guidance=3.5)


def _latent(batch=1):
    return torch.zeros(batch, 16, SIZE_H // 8, SIZE_W // 8)


def _state(model):
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


@pytest.mark.unit
def test_tiny_flux_is_built_from_comfyui_flux_classes(tf):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_sampling
    import comfy.text_encoders.flux

    base = tf.model.model
    assert isinstance(base, comfy.model_base.Flux) and base.model_type == comfy.model_base.ModelType.FLUX
    sampling = tf.model.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingFlux)
    assert isinstance(sampling, comfy.model_sampling.CONST) and sampling.shift == pytest.approx(1.15)
    fmt = base.latent_format
    assert isinstance(fmt, comfy.latent_formats.Flux)
    assert (fmt.latent_channels, fmt.scale_factor, fmt.shift_factor) == (16, 0.3611, 0.1159)
    assert base.diffusion_model.params.guidance_embed and base.diffusion_model.patch_size == 2
    assert isinstance(tf.clip.cond_stage_model, comfy.text_encoders.flux.FluxClipModel)
    assert tf.clip.tokenizer.t5xxl.tokenizer.name_or_path.endswith("t5_tokenizer")
    image = torch.rand(1, SIZE_H, SIZE_W, 3, generator=torch.Generator().manual_seed(0))
    assert tuple(tf.vae.encode(image).shape) == (1, 16, SIZE_H // 8, SIZE_W // 8) and tf.vae.latent_channels == 16


@pytest.mark.unit
def test_tiny_flux_samples_deterministically(tf, cond):
    from devtools.tiny_flux import build_tiny_flux, encode_flux, sample_flux

    a = sample_flux(tf.model, cond, _latent(), steps=3, seed=3)
    assert torch.isfinite(a).all() and a.abs().mean() > 0.1
    assert torch.equal(a, sample_flux(tf.model, cond, _latent(), steps=3, seed=3))
    assert not torch.allclose(a, sample_flux(tf.model, cond, _latent(), steps=3, seed=4))
    again = build_tiny_flux(seed=0)  # same seed, fresh objects: same weights, same tokens, same sample
    assert torch.equal(a, sample_flux(again.model, encode_flux(again.clip, "a photo of a cat"), _latent(), 3, 3))


@pytest.mark.unit
def test_attention_override_call_structure(tf, cond):
    """One override call per block per model evaluation (double blocks, then single blocks), each over the joint
    [txt; img] sequence, q/k/v as [B, heads, L, head_dim] with skip_reshape, output [B, L, heads*head_dim]."""
    from devtools.tiny_flux import AttentionProbe, flux_sigmas, sample_flux, with_attention_override

    params = tf.model.model.diffusion_model.params
    probe = AttentionProbe()
    steps = 2
    sample_flux(with_attention_override(tf.model, probe), cond, _latent(), steps=steps, seed=1)
    per_eval = params.depth + params.depth_single_blocks
    assert len(probe.calls) == steps * per_eval
    order = [(c["block_type"], c["block_index"], c["total_blocks"]) for c in probe.calls[:per_eval]]
    assert order == ([("double", i, params.depth) for i in range(params.depth)]
                     + [("single", i, params.depth_single_blocks) for i in range(params.depth_single_blocks)])
    length, head_dim = T5_PAD + IMG_TOKENS, params.hidden_size // params.num_heads
    sigmas = flux_sigmas(tf.model, steps)
    for n, call in enumerate(probe.calls):
        assert call["q"] == call["k"] == call["v"] == (1, params.num_heads, length, head_dim)
        assert call["out"] == (1, length, params.hidden_size)
        assert call["n_args"] == 4 and call["heads"] == params.num_heads and call["skip_reshape"] is True
        assert call["mask"] is None and call["func"] == "attention_pytorch"
        assert call["kwargs"] == ["_inside_attn_wrapper", "mask", "skip_reshape", "transformer_options"]
        assert set(call["opt_keys"]) == OVERRIDE_OPT_KEYS  # no txt/img lengths: the adapter must supply them
        assert call["cond_or_uncond"] == [0]  # cfg 1: the uncond is never evaluated
        assert call["sigmas"].tolist() == pytest.approx([float(sigmas[n // per_eval])])


@pytest.mark.unit
def test_cfg_rows_and_batch(tf, cond):
    from devtools.tiny_flux import AttentionProbe, encode_flux, sample_flux, with_attention_override

    probe = AttentionProbe()
    negative = encode_flux(tf.clip, "")
    sample_flux(with_attention_override(tf.model, probe), cond, _latent(2), steps=1, seed=1, cfg=2.0,
                negative=negative)
    assert {c["q"][0] for c in probe.calls} == {4} and probe.calls[0]["cond_or_uncond"] == [1, 0]
    assert probe.calls[0]["sigmas"].shape == (2,)  # per latent row, not per model row


@pytest.mark.unit
def test_override_sees_qk_after_rope_and_computes_plain_softmax_attention(tf, cond):
    """The override's inputs are the final q/k (RoPE applied, text positions unrotated): an explicit softmax over
    them reproduces the fused result to float precision."""
    from devtools.tiny_flux import sample_flux, with_attention_override

    errors = []

    def explicit(func, q, k, v, heads, **kwargs):
        fused = func(q, k, v, heads, **kwargs)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        mine = (weights @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        errors.append(float((mine - fused).abs().max()))
        return fused

    sample_flux(with_attention_override(tf.model, explicit), cond, _latent(), steps=1, seed=2)
    assert len(errors) == 5 and max(errors) < 1e-5


@pytest.mark.unit
def test_txt_first_and_lengths_from_a_diffusion_model_wrapper(tf, cond):
    """Text tokens come first in the joint sequence (their RoPE is the identity: txt_ids are zeros); the adapter can
    learn both lengths in a DIFFUSION_MODEL wrapper and pass them to the override through transformer_options."""
    import comfy.patcher_extension as ext
    from devtools.tiny_flux import sample_flux

    seen, pes = [], []

    def wrapper(executor, x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kw):
        transformer_options["photoswap_lengths"] = (context.shape[1], math.ceil(x.shape[-2] / 2) * math.ceil(
            x.shape[-1] / 2))
        seen.append((tuple(x.shape), float(timestep[0]), tuple(context.shape), tuple(y.shape), guidance.tolist()))
        return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kw)

    def override(func, *args, **kwargs):
        seen.append(kwargs["transformer_options"]["photoswap_lengths"])
        return func(*args, **kwargs)

    def pe_block(args, extra):
        pes.append(args["pe"].clone())
        return extra["original_block"](args)

    m = tf.model.clone()
    m.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "probe", wrapper)
    m.model_options["transformer_options"]["optimized_attention_override"] = override
    m.set_model_patch_replace(pe_block, "dit", "double_block", 0)
    sample_flux(m, cond, _latent(), steps=1, seed=1)
    assert seen[0] == ((1, 16, SIZE_H // 8, SIZE_W // 8), 1.0, (1, T5_PAD, 32), (1, 32), [3.5])
    assert seen[1] == (T5_PAD, IMG_TOKENS)
    pe = pes[0]  # [B, 1, L, head_dim/2, 2, 2] rotation matrices
    assert pe.shape == (1, 1, T5_PAD + IMG_TOKENS, 8, 2, 2)
    identity = torch.eye(2).expand(T5_PAD, 8, 2, 2)
    assert torch.equal(pe[0, 0, :T5_PAD], identity) and not torch.allclose(pe[0, 0, T5_PAD + 1:], identity[:1])


@pytest.mark.unit
def test_identity_override_is_bit_identical_and_leaves_the_input_model_alone(tf, cond):
    from devtools.tiny_flux import sample_flux, with_attention_override

    before_state, before_options = _state(tf.model), repr(tf.model.model_options)
    baseline = sample_flux(tf.model, cond, _latent(), steps=3, seed=5)
    calls = []

    def passthrough(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)

    patched = with_attention_override(tf.model, passthrough)
    assert torch.equal(sample_flux(patched, cond, _latent(), steps=3, seed=5), baseline) and len(calls) == 15
    assert repr(tf.model.model_options) == before_options
    assert "optimized_attention_override" not in tf.model.model_options.get("transformer_options", {})
    assert all(torch.equal(v, before_state[k]) for k, v in _state(tf.model).items())
    assert torch.equal(sample_flux(tf.model, cond, _latent(), steps=3, seed=5), baseline)


@pytest.mark.unit
def test_dit_block_replace_contract(tf, cond):
    from devtools.tiny_flux import BlockProbe, sample_flux, with_block_probes

    probe = BlockProbe()
    baseline = sample_flux(tf.model, cond, _latent(), steps=1, seed=1)
    patched = with_block_probes(tf.model, probe, double=[0, 1], single=[0, 1, 2])
    assert torch.equal(sample_flux(patched, cond, _latent(), steps=1, seed=1), baseline)
    double, single = probe.calls[:2], probe.calls[2:]
    assert [c["block_index"] for c in probe.calls] == [0, 1, 0, 1, 2]
    for c in double:
        assert c["keys"] == ["attn_mask", "img", "pe", "transformer_options", "txt", "vec"]
        assert c["extra"] == ["original_block"] and c["out"] == ["img", "txt"] and c["block_type"] == "double"
        assert c["shapes"]["img"] == (1, IMG_TOKENS, 64) and c["shapes"]["txt"] == (1, T5_PAD, 64)
    for c in single:
        assert c["keys"] == ["attn_mask", "img", "pe", "transformer_options", "vec"] and c["out"] == ["img"]
        assert c["shapes"]["img"] == (1, T5_PAD + IMG_TOKENS, 64) and c["block_type"] == "single"

    mutated = []

    def check_inplace(args, extra):
        ref, before = args["img"], args["img"].clone()
        out = extra["original_block"](args)
        mutated.append((not torch.equal(ref, before), out["img"].data_ptr() == ref.data_ptr()))
        return out

    m = tf.model.clone()
    m.set_model_patch_replace(check_inplace, "dit", "double_block", 0)
    m.set_model_patch_replace(check_inplace, "dit", "single_block", 0)
    sample_flux(m, cond, _latent(), steps=1, seed=1)
    assert mutated == [(True, True), (True, True)]  # blocks update img in place: clone before stashing inputs


@pytest.mark.unit
def test_flux_sampling_conventions(tf, cond):
    import comfy.model_management as mm
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux
    from devtools.tiny_flux import flux_sigmas, sample_flux

    ms = tf.model.get_model_object("model_sampling")
    simple = flux_sigmas(tf.model, 4, "simple")
    assert float(simple[0]) == 1.0 and float(simple[-1]) == 0.0 and float(ms.sigma_max) == 1.0
    assert torch.allclose(simple[:-1], torch.tensor([ms.sigma(torch.tensor(t)) for t in (1.0, 0.75, 0.5, 0.25)]))
    beta = comfy.samplers.calculate_sigmas(ms, "beta", 4)
    assert float(beta[0]) == 1.0 and float(beta[-1]) == 0.0 and not torch.allclose(beta, simple)
    assert [round(ms.percent_to_sigma(p), 4) for p in (0.0, 0.5, 1.0)] == [1.0, round(float(simple[2]), 4), 0.0]
    assert float(ms.timestep(torch.tensor(0.37))) == pytest.approx(0.37)  # the model's timestep IS sigma
    noise, x0 = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    assert torch.allclose(ms.noise_scaling(torch.tensor(0.3), noise, x0), 0.3 * noise + 0.7 * x0)
    assert torch.allclose(ms.inverse_noise_scaling(torch.tensor(0.25), x0), x0 / 0.75)

    mm.load_models_gpu([tf.model])
    base, ctx, pooled = tf.model.model, cond[0][0], cond[0][1]["pooled_output"]
    x, g = torch.randn(1, 16, 8, 12), torch.tensor([3.5])
    with torch.no_grad():
        assert torch.equal(base.apply_model(x, torch.tensor([0.0]), c_crossattn=ctx, y=pooled, guidance=g), x)
        v = base.diffusion_model(x, torch.tensor([0.6]), ctx, y=pooled, guidance=g)
        denoised = base.apply_model(x, torch.tensor([0.6]), c_crossattn=ctx, y=pooled, guidance=g)
    assert torch.allclose(denoised, x - 0.6 * v, atol=1e-6)  # CONST: x0 = x - sigma * velocity

    z = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(9))
    wiped = sample_flux(tf.model, cond, torch.randn(1, 16, 8, 12), steps=2, add_noise=False)
    assert torch.equal(wiped, sample_flux(tf.model, cond, _latent(), steps=2, add_noise=False))  # (1-1)*latent
    from_z = sample_flux(tf.model, cond, torch.randn(1, 16, 8, 12), steps=2, noise=z)
    assert torch.equal(from_z, sample_flux(tf.model, cond, _latent(), steps=2, noise=z))  # start = the noise

    (patched,) = ModelSamplingFlux().patch(tf.model, 1.15, 0.5, SIZE_W, SIZE_H)
    expected = (SIZE_W * SIZE_H / 256) * (0.65 / 3840) + 0.5 - (0.65 / 3840) * 256
    assert patched.get_model_object("model_sampling").shift == pytest.approx(expected)
    assert not torch.allclose(flux_sigmas(patched, 4), simple) and ms.shift == pytest.approx(1.15)


@pytest.mark.unit
def test_guidance_is_a_model_input(tf):
    import node_helpers
    from devtools.tiny_flux import encode_flux, sample_flux

    text = "a photo of a cat"
    default = sample_flux(tf.model, encode_flux(tf.clip, text, guidance=None), _latent(), steps=1, seed=1)
    assert torch.equal(default, sample_flux(tf.model, encode_flux(tf.clip, text, 3.5), _latent(), steps=1, seed=1))
    assert not torch.equal(default, sample_flux(tf.model, encode_flux(tf.clip, text, 1.0), _latent(), 1, 1))
    disabled = node_helpers.conditioning_set_values(encode_flux(tf.clip, text), {"guidance": None})  # FluxDisable…
    assert not torch.equal(default, sample_flux(tf.model, disabled, _latent(), steps=1, seed=1))


@pytest.mark.unit
def test_plain_euler_flow_inversion_is_not_exact(tf, cond):
    """Euler inversion over ComfyUI's Flux sigmas (velocity at the destination sigma, as the reference DDIM inversion
    evaluates at the destination timestep), then ComfyUI's own Euler from the inverted noise: first-order error that
    shrinks with N but never vanishes. Exact reconstruction needs the source row pinned to the trajectory."""
    import comfy.model_management as mm
    from devtools.tiny_flux import flux_sigmas, sample_flux

    mm.load_models_gpu([tf.model])
    base, ctx, pooled, g = tf.model.model, cond[0][0], cond[0][1]["pooled_output"], torch.tensor([3.5])
    latent = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(3))
    errors = []
    for steps in (8, 32):
        sigmas = flux_sigmas(tf.model, steps)
        up = sigmas.flip(0).tolist()  # 0 -> 1
        x = base.process_latent_in(latent)  # model space == sampler space for CONST (no k-space factor)
        with torch.no_grad():
            for low, high in zip(up[:-1], up[1:]):
                denoised = base.apply_model(x, torch.tensor([high]), c_crossattn=ctx, y=pooled, guidance=g)
                x = x + (high - low) * (x - denoised) / high
        back = sample_flux(tf.model, cond, torch.zeros_like(latent), sigmas=sigmas, noise=x)
        errors.append(float((back - latent).norm() / latent.norm()))
    assert 1e-3 < errors[1] < errors[0]


@pytest.mark.unit
def test_t5_tokens_padding_and_word_pieces(tf):
    from devtools.tiny_flux import t5_word_pieces

    clip = tf.clip
    t5 = clip.tokenize("a photo of a man", return_word_ids=True)["t5xxl"]
    assert len(t5) == 1 and len(t5[0]) == T5_PAD  # padded to min_length 256 with pad id 0, no start token
    assert [e[0] for e in t5[0][7:10]] == [1, 0, 0] and t5[0][7][2] == 0
    long = clip.tokenize("word " * 300)["t5xxl"]
    assert len(long) == 1 and len(long[0]) == 301  # never truncated: context length follows the prompt
    assert [(p, w) for _, w, p in t5_word_pieces(clip, "A photo of a sks man")] == [
        ("▁A", 1), ("▁photo", 1), ("▁of", 1), ("▁", 1), ("a", 1), ("▁", 1), ("s", 1), ("k", 1), ("s", 1),
        ("▁man", 1), ("</s>", 0)]  # word_id = weighted segment, not word: words come from "▁" pieces
    assert [w for _, w, _ in t5_word_pieces(clip, "a (sks:1.2) dog")] == [1, 1, 2, 2, 2, 2, 3, 0]
    short = clip.clone()
    short.set_tokenizer_option("t5xxl_min_length", 1)  # how both prompts of a pair get one padded length
    assert len(short.tokenize("a photo of a man")["t5xxl"][0]) == 8 and len(clip.tokenize("a")["t5xxl"][0]) == T5_PAD
    clip_l = clip.tokenize("a photo of a man")["l"]
    assert len(clip_l[0]) == 77 and clip_l[0][0][0] == 49406


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_flux_lora_formats_map_and_patch_a_clone(tf, cond, fmt):
    import comfy.lora
    import comfy.sd
    from devtools.flux_checkpoints import KeyWarnings
    from devtools.tiny_flux import FLUX_LORA_TARGETS, flux_lora_state_dict, sample_flux

    key_map = comfy.lora.model_lora_keys_unet(tf.model.model, {})
    for name in ("lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv",
                 "transformer.transformer_blocks.0.attn.to_q", "lora_transformer_transformer_blocks_0_attn_to_q",
                 "lycoris_transformer_blocks_0_attn_to_q", "transformer.single_transformer_blocks.0.proj_mlp"):
        assert name in key_map, name
    assert key_map["transformer.transformer_blocks.0.attn.to_k"] == (
        "diffusion_model.double_blocks.0.img_attn.qkv.weight", (0, 64, 64))
    baseline = sample_flux(tf.model, cond, _latent(), steps=1, seed=1)
    with KeyWarnings() as warn:
        patched, _ = comfy.sd.load_lora_for_models(tf.model, None, flux_lora_state_dict(tf.model, fmt), 1.0, 0.0)
    assert not warn.messages and {f"diffusion_model.{t}" for _, t, _ in FLUX_LORA_TARGETS[fmt]} <= set(
        patched.patches)
    assert not torch.allclose(sample_flux(patched, cond, _latent(), steps=1, seed=1), baseline)
    assert not tf.model.patches and torch.equal(sample_flux(tf.model, cond, _latent(), steps=1, seed=1), baseline)


@pytest.mark.unit
def test_redux_appends_image_tokens_to_the_t5_context(tf, cond):
    import comfy.clip_vision
    import comfy.sd
    import nodes
    from comfy.ldm.flux.redux import ReduxImageEncoder
    from devtools.tiny_flux import T5_WIDTH, AttentionProbe, randomize_flux_, sample_flux, with_attention_override

    encoder = ReduxImageEncoder(redux_dim=8, txt_in_features=T5_WIDTH)
    randomize_flux_(encoder, seed=7)
    vision_out = comfy.clip_vision.Output()
    vision_out["last_hidden_state"] = torch.randn(1, 9, 8, generator=torch.Generator().manual_seed(1))
    style = comfy.sd.StyleModel(encoder)
    (mult,) = nodes.StyleModelApply().apply_stylemodel(cond, style, vision_out, 0.5, "multiply")
    tokens = mult[0][0]
    assert tokens.shape == (1, T5_PAD + 9, T5_WIDTH) and torch.equal(tokens[:, :T5_PAD], cond[0][0])
    with torch.no_grad():
        assert torch.allclose(tokens[:, T5_PAD:], 0.5 * encoder(vision_out["last_hidden_state"]))
    assert "attention_mask" not in mult[0][1]
    (bias,) = nodes.StyleModelApply().apply_stylemodel(cond, style, vision_out, 0.5, "attn_bias")
    assert bias[0][1]["attention_mask"].shape == (1, T5_PAD + 9 + 1, T5_PAD + 9 + 1)
    assert bias[0][1]["attention_mask_img_shape"] == (1, 1)
    probe = AttentionProbe()
    sample_flux(with_attention_override(tf.model, probe), mult, _latent(), steps=1, seed=1)
    assert probe.calls[0]["q"][2] == T5_PAD + 9 + IMG_TOKENS  # Redux tokens sit between T5 and image tokens


@pytest.mark.unit
def test_detection_of_full_width_reduced_depth_flux_from_keys(comfy):
    """Depth is counted from the keys; width is not free (24 heads and RoPE axes [16, 56, 56] are fixed)."""
    import comfy.model_detection
    from devtools.flux_checkpoints import _meta_layout, dual_clip_loader_t5_gap

    sd, _ = _meta_layout("unet", 2, 3, 1)
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(config).__name__ == "Flux"
    assert {k: config.unet_config[k] for k in ("depth", "depth_single_blocks", "hidden_size", "num_heads",
                                                "guidance_embed", "vec_in_dim", "context_in_dim")} == {
        "depth": 2, "depth_single_blocks": 3, "hidden_size": 3072, "num_heads": 24, "guidance_embed": True,
        "vec_in_dim": 768, "context_in_dim": 4096}
    schnell = {k: v for k, v in sd.items() if not k.startswith("guidance_in.")}
    assert type(comfy.model_detection.model_config_from_unet(schnell, "")).__name__ == "FluxSchnell"
    narrow = dict(sd, **{"img_in.weight": torch.empty(96, 64, device="meta"),
                         "txt_in.weight": torch.empty(96, 4096, device="meta")})
    narrow_config = comfy.model_detection.detect_unet_config(narrow, "")
    assert narrow_config["hidden_size"] == 96 and narrow_config["num_heads"] == 24
    with pytest.raises(ValueError, match="positional dim"):
        with torch.device("meta"):
            comfy.model_detection.model_config_from_unet(narrow, "").get_model(narrow)

    t5_sd, _ = _meta_layout("t5xxl", 1, 1, 2)
    gap = dual_clip_loader_t5_gap({k: tuple(v.shape) for k, v in t5_sd.items()})
    assert gap["t5_blocks_built"] == 24 and gap["missing_blocks"] == list(range(2, 24))
    assert gap["t5_params_built"] > 4.7e9 and gap["unexpected_keys"] == 0
    clip_one_layer = {k: tuple(v.shape) for k, v in _meta_layout("clip_l", 1, 1, 1)[0].items()
                      if ".layers." not in k or ".layers.0." in k}
    assert dual_clip_loader_t5_gap(clip_one_layer)["unexpected_keys"] > 0  # a 1-layer CLIP-L is routed to T5


@pytest.mark.slow
def test_full_width_flux_files_load_through_comfyui_loaders(comfy):
    from devtools.flux_checkpoints import verify_and_time

    r = verify_and_time(log=lambda *_: None)
    assert r["detected"]["config_class"] == "Flux" and r["detected"]["model_type"] == "FLUX"
    assert (r["detected"]["depth"], r["detected"]["depth_single_blocks"], r["detected"]["hidden_size"]) == (1, 1, 3072)
    assert not (r["clip_key_warnings"] or r["vae_key_warnings"] or r["unet_key_warnings"]
                or r["redux_siglip_key_warnings"])
    assert r["cond_shape"] == [1, 256, 4096] and r["pooled_shape"] == [1, 768] and r["cond_finite"]
    assert r["vae_latent_channels"] == 16 and r["vae_latent_shape"] == [1, 16, 8, 8]
    assert r["sample_finite"] and r["decoded_shape"] == [1, 64, 64, 3]
    assert r["style_model_type"] == "ReduxImageEncoder" and r["clip_vision_image_size"] == 384
    assert r["siglip_last_hidden_state"] == [1, 729, 1152] and r["redux_cond_shape"] == [1, 256 + 729, 4096]
    assert r["dual_clip_loader"]["t5_blocks_built"] == 24 and r["dual_clip_loader"]["missing_blocks"][0] == 1
