"""Photoswap on Flux (issue #17): the adapter (photoswap_core/arch/flux.py) and the joint-attention swaps
(photoswap_core/joint_attention.py) on the tiny Flux of devtools/tiny_flux.py (ComfyUI's own classes, float32, CPU).

The exact invariants of tests/test_swap_invariants.py, for the second architecture.
"""
from __future__ import annotations

import pytest
import torch
from test_swap_invariants import SwapEvents  # the photoswap.swaps DEBUG-log collector

pytestmark = pytest.mark.unit

SRC, TGT = "a photo of a cat on a sofa", "a photo of a sks dog on a sofa"
LATENT_HW = (8, 12)  # 64 x 96 px -> 4 x 6 image tokens
STEPS = 6
EVERY = (0.3, 0.5, 0.6)  # self-output, self-map, cross-map fractions: every swap fires somewhere


@pytest.fixture(scope="module")
def tf(comfy):
    from devtools.tiny_flux import build_tiny_flux

    return build_tiny_flux(seed=0)


def _encode(tf, text, guidance=3.5):
    from devtools.tiny_flux import encode_flux

    return encode_flux(tf.clip, text, guidance=guidance)


def _pair(tf, same=False):
    from comfyui_photoswap.photoswap_core.prompts import encode_prompt_pair

    if same:
        return encode_prompt_pair(tf.clip, SRC, "cat", "cat", target_prompt=SRC)
    return encode_prompt_pair(tf.clip, SRC, "cat", "sks dog")


def _image_latent(seed=0):
    return torch.randn(1, 16, *LATENT_HW, generator=torch.Generator().manual_seed(seed)) * 0.8


def _windows(out=0.8, mp=0.0, cross=0.6, blend=True, **kw):
    from comfyui_photoswap.photoswap_core.swap_rules import SwapWindows

    return SwapWindows(self_output=out, self_map=mp, cross_map=cross, local_blend=blend, **kw)


def _invert(tf, source, negative, steps=STEPS):
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion

    with torch.inference_mode():
        return run_inversion(tf.model, _image_latent(), source, negative,
                             InversionSettings(method="direct", steps=steps, cfg=1.0))


@pytest.fixture(scope="module")
def pair(tf):
    return _pair(tf)


@pytest.fixture(scope="module")
def inversion(tf, pair):
    source, _, negative, _ = pair
    return _invert(tf, source, negative)


@pytest.fixture(scope="module")
def trace(tf, pair, inversion):
    from comfyui_photoswap.photoswap_core.recorder import record_source

    source, _, negative, _ = pair
    with torch.inference_mode():
        return record_source(tf.model, source, negative, inversion=inversion, record_self_maps=True)[0]


def _swap(tf, trace, pair, windows, lockstep=False, cfg=1.0):
    from comfyui_photoswap.photoswap_core.swap_sampler import swap

    _, target, negative, prompts = pair
    with torch.inference_mode():
        return swap(tf.model, trace, target, negative, prompts, windows, cfg, lockstep=lockstep)




# ---------------------------------------------------------------------------------------------------- the adapter

def test_flux_is_the_adapters_second_architecture(tf):
    from comfyui_photoswap.photoswap_core.arch import inspect_model
    from comfyui_photoswap.photoswap_core.arch.flux import FluxDiT

    arch = inspect_model(tf.model)
    assert isinstance(arch, FluxDiT) and arch.family == "flux" and arch.prediction == "flow"
    assert (arch.latent.channels, arch.latent.scale, arch.latent.shift) == (16, 0.3611, 0.1159)
    assert (arch.text.tokenizer, arch.text.width, arch.depth) == ("t5", 32, (2, 3))
    x = _image_latent()
    fmt = tf.model.model.latent_format
    assert torch.equal(arch.to_model_space(x), fmt.process_in(x))
    assert torch.equal(arch.to_latent(arch.to_model_space(x)), fmt.process_out(fmt.process_in(x)))
    assert arch.attention_layers(tf.model) == [("double", 0), ("double", 1), ("single", 0), ("single", 1),
                                               ("single", 2)]


def _shifted(tf, shift):
    """A clone with another Flux shift, as the ModelSamplingFlux node patches it (an object patch)."""
    import comfy.model_sampling

    class Shifted(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        pass

    sampling = Shifted(tf.model.model.model_config)
    sampling.set_parameters(shift=shift)
    model = tf.model.clone()
    model.add_object_patch("model_sampling", sampling)
    return model


def test_schedule_is_comfyuis_flux_sigmas_with_its_shift(tf):
    import comfy.samplers

    from comfyui_photoswap.photoswap_core.arch import inspect_model

    arch = inspect_model(tf.model)
    for model in (tf.model, _shifted(tf, 1.9)):
        expected = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 8)
        schedule = arch.schedule(model, 8)
        assert schedule.timesteps == () and torch.equal(schedule.sigmas, expected.float().cpu())
        assert float(schedule.sigmas[0]) == 1.0 and float(schedule.sigmas[-1]) == 0.0
    assert not torch.equal(arch.schedule(tf.model, 8).sigmas, arch.schedule(_shifted(tf, 1.9), 8).sigmas)


def test_inversion_reconstructs_the_input_latent(tf, pair, inversion):
    """`direct` on Flux: the flow ODE inverted with Euler, the source row pinned to that trajectory, so the
    reconstruction is the input latent to float precision (the LATENT round trip through scale/shift)."""
    from comfyui_photoswap.photoswap_core.recorder import record_source

    arch = inversion.arch
    x0 = _image_latent()
    assert torch.equal(inversion.trajectory[-1], arch.to_model_space(x0))
    assert len(inversion.trajectory) == STEPS + 1 and not torch.equal(inversion.trajectory[0],
                                                                     inversion.trajectory[-1])
    source, _, negative, _ = pair
    with torch.inference_mode():
        _, out = record_source(tf.model, source, negative, inversion=inversion, fraction=0.0)
    assert float((out["samples"] - x0).abs().max()) <= 1e-6


@pytest.mark.parametrize("windows", [(0.8, 0.0, 0.6), EVERY, (1.0, 0.0, 1.0)])
@pytest.mark.parametrize("blend", [True, False])
def test_identical_prompts_give_the_source_reconstruction_bit_for_bit(tf, windows, blend):
    from comfyui_photoswap.photoswap_core.recorder import record_source

    same = _pair(tf, same=True)
    source, _, negative, _ = same
    inv = _invert(tf, source, negative)
    with torch.inference_mode():
        trace = record_source(tf.model, source, negative, inversion=inv, record_self_maps=True)[0]
    for lockstep in (False, True):
        with SwapEvents() as events:
            target, src, _, mode, _ = _swap(tf, trace, same, _windows(*windows, blend), lockstep=lockstep)
        assert mode == ("lockstep" if lockstep else "target")
        assert torch.equal(target, src), (windows, blend, lockstep, float((target - src).abs().max()))
        kinds = {e[1] for e in events}
        assert kinds == ({"self_output", "self_map", "cross_map"} if windows == EVERY else
                         {"self_output", "cross_map"}), kinds


def test_the_swap_changes_the_target_when_the_prompts_differ(tf, trace, pair):
    target, source, mask, _, _ = _swap(tf, trace, pair, _windows(*EVERY))
    assert float((target - source).abs().max()) > 1e-2
    assert mask is not None and mask.shape[-2:] == LATENT_HW


@pytest.mark.parametrize("windows", [(0.8, 0.0, 0.6), EVERY, (0.0, 0.0, 0.0), (0.2, 0.5, 0.9)])
def test_recorded_trace_equals_lockstep(tf, trace, pair, windows):
    a = _swap(tf, trace, pair, _windows(*windows), lockstep=False)
    b = _swap(tf, trace, pair, _windows(*windows), lockstep=True)
    assert (a[3], b[3]) == ("target", "lockstep")
    assert torch.equal(a[0], b[0]), float((a[0] - b[0]).abs().max())
    if a[2] is not None:
        assert torch.equal(a[2], b[2])


def test_zero_windows_equal_plain_flux_sampling(tf, pair):
    """All windows 0, no LocalBlend ⇒ ComfyUI's own euler from the same noise with the target prompt (a synthetic
    source: with a real photo the target row also gets the source's per-step correction, the `direct` rule)."""
    from devtools.tiny_flux import sample_flux

    from comfyui_photoswap.photoswap_core.recorder import record_source

    source, target_cond, negative, _ = pair
    latent = {"samples": torch.zeros(1, 16, *LATENT_HW)}
    with torch.inference_mode():
        trace = record_source(tf.model, source, negative, latent=latent, seed=5, steps=STEPS, cfg=1.0,
                              fraction=0.0)[0]
    target = _swap(tf, trace, pair, _windows(0.0, 0.0, 0.0, False))[0]
    arch = trace.arch
    with torch.inference_mode():
        stock = sample_flux(tf.model, target_cond, latent["samples"], sigmas=trace.schedule.sigmas.clone(),
                            noise=trace.trajectory[0].clone(), negative=negative)
    err = float((target - stock).abs().max())
    assert err <= 1e-5 * max(1.0, float(stock.abs().max())), err
    assert float((target - arch.to_latent(trace.trajectory[-1])).abs().max()) > 1e-3  # not the source


def test_input_model_is_unchanged(tf, trace, pair):
    from devtools.tiny_flux import sample_flux

    cond = pair[1]
    options_before = repr(tf.model.model_options)

    def plain():
        with torch.inference_mode():
            return sample_flux(tf.model, cond, torch.zeros(1, 16, *LATENT_HW), steps=3, seed=2)

    before = plain()
    _swap(tf, trace, pair, _windows(*EVERY))
    _swap(tf, trace, pair, _windows(*EVERY), lockstep=True)
    assert torch.equal(plain(), before)
    assert repr(tf.model.model_options) == options_before


# ------------------------------------------------------------------------- fused forms = explicit joint attention

def _explicit_joint(q, k, v, logits=None):
    """softmax(q kᵀ/√d) v over the whole joint sequence, per head: [B, H, L, D] → [B, L, H·D] (or given logits)."""
    d = q.shape[-1]
    if logits is None:
        logits = torch.einsum("bhid,bhjd->bhij", q, k) / d ** 0.5
    out = torch.einsum("bhij,bhjd->bhid", torch.softmax(logits, -1), v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _qkv(seed, l_txt=7, l_img=12, heads=4, d=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, l_txt + l_img, d, generator=g) * 1.5 for _ in range(3)]


def test_fused_self_map_equals_explicit_joint_attention():
    from comfyui_photoswap.photoswap_core.joint_attention import self_map_rows

    l_txt, img = 7, slice(7, 19)
    q_t, k_t, v_t = _qkv(0)
    q_s, k_s, _ = _qkv(1)
    fused = self_map_rows(q_t[:, :, img], k_t, v_t, q_s[:, :, img], k_s[:, :, img], l_txt)
    d = q_t.shape[-1]
    logits = torch.cat([torch.einsum("bhid,bhjd->bhij", q_t[:, :, img], k_t[:, :, :l_txt]),
                        torch.einsum("bhid,bhjd->bhij", q_s[:, :, img], k_s[:, :, img])], -1) / d ** 0.5
    explicit = _explicit_joint(q_t[:, :, img], None, v_t, logits)
    assert float((fused - explicit).abs().max()) <= 1e-5
    # with the source's own q/k the form is plain joint attention
    same = self_map_rows(q_t[:, :, img], k_t, v_t, q_t[:, :, img], k_t[:, :, img], l_txt)
    assert float((same - _explicit_joint(q_t, k_t, v_t)[:, img]).abs().max()) <= 1e-5


def test_fused_cross_map_equals_explicit_joint_attention(tf, pair):
    """Target column j of the image→text block := α_j·source column mapper_j + (1 − α_j)·target column j (whole-row
    normalised maps, no renormalisation), image→image block unchanged, target values."""
    from comfyui_photoswap.photoswap_core.joint_attention import _heads_out, row_lse, text_block

    prompts = pair[3]
    l_txt, l_img = prompts.max_len, 12
    img = slice(l_txt, l_txt + l_img)
    q_t, k_t, v_t = _qkv(2, l_txt=l_txt, l_img=l_img)
    q_s, k_s, _ = _qkv(3, l_txt=l_txt, l_img=l_img)
    mapper, alphas = prompts.mapper_tensor(), prompts.alphas_tensor()
    assert alphas.eq(0).any() and not torch.equal(mapper, torch.arange(l_txt))
    d = q_t.shape[-1]
    p_t = torch.softmax(torch.einsum("bhid,bhjd->bhij", q_t[:, :, img], k_t) / d ** 0.5, -1)
    p_s = torch.softmax(torch.einsum("bhid,bhjd->bhij", q_s[:, :, img], k_s) / d ** 0.5, -1)
    edited = p_t.clone()
    edited[..., :l_txt] = p_s[..., :l_txt][..., mapper] * alphas + p_t[..., :l_txt] * (1 - alphas)
    explicit = _heads_out(torch.einsum("bhij,bhjd->bhid", edited, v_t))
    # ours: plain output + (edited block − target block)·v_text, the blocks from the row log-sum-exp
    plain = _explicit_joint(q_t, k_t, v_t)[:, img]
    blk_t = text_block(q_t[:, :, img], k_t[:, :, :l_txt], row_lse(q_t[:, :, img], k_t))
    blk_s = text_block(q_s[:, :, img], k_s[:, :, :l_txt], row_lse(q_s[:, :, img], k_s))
    assert float((blk_t - p_t[..., :l_txt]).abs().max()) <= 1e-6
    swapped = blk_s[..., mapper] * alphas + blk_t * (1 - alphas)
    ours = plain + _heads_out(torch.matmul(swapped - blk_t, v_t[:, :, :l_txt]))
    assert float((ours - explicit).abs().max()) <= 1e-5


def test_override_sees_the_joint_sequence_text_first(tf, pair):
    """The installed override reaches every block once per call with the token counts of the wrapper, and with no
    Photoswap run it is plain attention, bit for bit."""
    from devtools.tiny_flux import sample_flux

    from comfyui_photoswap.photoswap_core.arch import inspect_model
    from comfyui_photoswap.photoswap_core.arch.flux import LENGTHS_KEY

    arch = inspect_model(tf.model)
    seen = []

    def make_patch(role, layer, prior):
        def patch(q, k, v, extra):
            seen.append((role, layer, extra[LENGTHS_KEY], q.shape[2]))
            return arch.attention(q, k, v, extra)
        return patch

    patched = tf.model.clone()
    arch.install_attention_patches(patched, make_patch)
    cond = pair[1]
    with torch.inference_mode():
        a = sample_flux(patched, cond, torch.zeros(1, 16, *LATENT_HW), steps=2, seed=1)
        b = sample_flux(tf.model, cond, torch.zeros(1, 16, *LATENT_HW), steps=2, seed=1)
    assert torch.equal(a, b)
    l_txt = cond[0][0].shape[1]
    assert seen[:5] == [("joint", layer, (l_txt, 4, 6), l_txt + 24) for layer in arch.attention_layers(tf.model)]
    assert len(seen) == 10


# ------------------------------------------------------------------------------------------------------ bad input

def _sd_encode(ms, text):
    return ms.clip.encode_from_tokens_scheduled(ms.clip.tokenize(text))  # core CLIPTextEncode's arithmetic


def _sd_trace(ms, steps=4):
    from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, invert
    from comfyui_photoswap.photoswap_core.recorder import record_trace

    src, neg = (_sd_encode(ms, t) for t in ("a photo of a cat", ""))
    schedule = ddim_schedule(ms.model.get_model_object("model_sampling"), steps)
    x0 = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        inv = invert(ms.model, schedule, x0, src[0], neg[0], InversionSettings(method="direct", steps=steps))
        return record_trace(ms.model, src, neg, schedule, 7.5, trajectory_vp=inv.trajectory,
                            null_embeddings=inv.null_embeddings, method="direct")


def test_a_flux_trace_with_an_sd_sampler_and_the_reverse_are_refused(tf, trace, pair, tiny_sd15):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError
    from comfyui_photoswap.photoswap_core.prompts import build_prompt_pair
    from comfyui_photoswap.photoswap_core.swap_sampler import swap

    ms = tiny_sd15
    sd_cond, sd_neg = (_sd_encode(ms, t) for t in ("a photo of a sks dog", ""))
    sd_prompts = build_prompt_pair(ms.clip, "a photo of a cat", "cat", "sks dog")
    with pytest.raises(PhotoswapInputError, match=r"input 'trace'.*Flux.*sd1") as err:
        swap(ms.model, trace, sd_cond, sd_neg, sd_prompts, _windows(), 7.5)
    assert "same MODEL" in err.value.fix
    with pytest.raises(PhotoswapInputError, match=r"input 'trace'.*sd1.*Flux"):
        swap(tf.model, _sd_trace(ms), pair[1], pair[2], pair[3], _windows(), 1.0)


def test_guidance_the_method_cannot_honour_is_refused(tf, trace, pair):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion
    from comfyui_photoswap.photoswap_core.recorder import record_source

    source, _, negative, _ = pair
    for method in ("null_text", "negative_prompt", "ddim"):
        with pytest.raises(PhotoswapInputError, match=r"input 'method'.*'direct' inversion on Flux") as err:
            run_inversion(tf.model, _image_latent(), source, negative, InversionSettings(method=method, steps=4))
        assert "direct" in err.value.fix
    with pytest.raises(PhotoswapInputError, match=r"input 'cfg'.*cfg 1 on Flux \(got 7.5\)") as err:
        run_inversion(tf.model, _image_latent(), source, negative, InversionSettings(method="direct", cfg=7.5))
    assert "FluxGuidance" in err.value.fix
    with pytest.raises(PhotoswapInputError, match=r"input 'cfg'.*cfg 1 on Flux"):
        _swap(tf, trace, pair, _windows(), cfg=3.5)
    with pytest.raises(PhotoswapInputError, match=r"input 'cfg'.*cfg 1 on Flux"):
        record_source(tf.model, source, negative, latent={"samples": torch.zeros(1, 16, *LATENT_HW)}, cfg=2.0)
    with pytest.raises(PhotoswapInputError, match=r"input 'latent'.*Flux LATENT \[1, 16"):
        run_inversion(tf.model, torch.zeros(1, 4, 8, 8), source, negative,
                      InversionSettings(method="direct", cfg=1.0))


# ------------------------------------------------------------------------------------- Redux tokens, cancel

def _with_image_tokens(cond, n=9, seed=4):
    """The target conditioning as core Apply Style Model ("multiply" mode) builds it: image tokens appended after
    the T5 tokens (random stand-ins for Redux's [1, 729·k, 4096] output, at the tiny width)."""
    tokens = torch.randn(1, n, cond[0][0].shape[-1], generator=torch.Generator().manual_seed(seed))
    return [[torch.cat([cond[0][0], tokens], dim=1), dict(cond[0][1])]]


def test_redux_tokens_on_the_target_only(tf, trace, pair):
    """Zero-shot concept: the target's context is longer (image tokens after the prompt); the source row keeps its
    own prompt, the cross-map edit covers the prompt's columns and the image tokens keep the target's own."""
    from comfyui_photoswap.photoswap_core.swap_sampler import swap

    _, target, negative, prompts = pair
    redux = _with_image_tokens(target)
    with torch.inference_mode():
        a = swap(tf.model, trace, redux, negative, prompts, _windows(*EVERY), 1.0)
        b = swap(tf.model, trace, redux, negative, prompts, _windows(*EVERY), 1.0, lockstep=True)
        plain = swap(tf.model, trace, target, negative, prompts, _windows(*EVERY), 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], plain[1])
    assert float((a[0] - plain[0]).abs().max()) > 1e-4


def test_input_model_is_unchanged_after_a_cancel(tf, trace, pair):
    import comfy.model_management as mm
    from devtools.tiny_flux import sample_flux

    from comfyui_photoswap.photoswap_core.swap_sampler import swap

    cond = pair[1]

    def plain():
        with torch.inference_mode():
            return sample_flux(tf.model, cond, torch.zeros(1, 16, *LATENT_HW), steps=3, seed=2)

    before, options_before = plain(), repr(tf.model.model_options)
    steps = []

    def cancel(*_args):
        steps.append(1)
        if len(steps) == 2:
            mm.interrupt_current_processing(True)

    for lockstep in (False, True):
        steps.clear()
        with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
            swap(tf.model, trace, pair[1], pair[2], pair[3], _windows(*EVERY), 1.0, lockstep=lockstep,
                 callback=cancel)
        mm.interrupt_current_processing(False)
        assert len(steps) == 2
    assert torch.equal(plain(), before)
    assert repr(tf.model.model_options) == options_before


# ------------------------------------------------------------------------------------------------- Flux LoRAs

@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_flux_lora_formats_patch_a_clone_and_an_sd_lora_is_refused(tf, tmp_path, fmt):
    """The Concept Loader's LoRA stage on a Flux MODEL: kohya / diffusers keys map through ComfyUI's own key maps
    onto a clone (the input MODEL keeps no patches); a LoRA of another family is refused on 'lora_name'."""
    import safetensors.torch

    from devtools.tiny_flux import flux_lora_state_dict

    from comfyui_photoswap.photoswap_core.concept.lora import apply_lora
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    path = tmp_path / f"flux_{fmt}.safetensors"
    safetensors.torch.save_file(flux_lora_state_dict(tf.model, fmt), str(path))
    patches_before = len(tf.model.patches)
    model, _clip, check = apply_lora(tf.model, tf.clip, str(path), path.name, 1.0, 1.0)
    assert check.unet_applied == 2 and not check.unmatched_unet and not check.mismatched
    assert len(model.patches) == 2 and len(tf.model.patches) == patches_before
    sd_lora = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
               torch.zeros(4, 768),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
               torch.zeros(320, 4)}
    bad = tmp_path / "sd15.safetensors"
    safetensors.torch.save_file(sd_lora, str(bad))
    with pytest.raises(PhotoswapInputError, match=r"input 'lora_name'.*Flux") as err:
        apply_lora(tf.model, tf.clip, str(bad), bad.name, 1.0, 1.0)
    assert "SD1.x" in str(err.value)


def test_flux_inversion_file_round_trip(tf, pair, inversion, tmp_path):
    """Save / Load Inversion on Flux: the loaded inversion has the Flux adapter and reproduces the same source."""
    from comfyui_photoswap.photoswap_core.inversion_io import check_model, load_inversion, save_inversion
    from comfyui_photoswap.photoswap_core.recorder import record_source

    path = save_inversion(inversion, tmp_path / "flux_inversion.safetensors")
    loaded, _meta = load_inversion(path)
    assert loaded.arch == inversion.arch and loaded.arch.latent.shift == 0.1159
    assert loaded.schedule.timesteps == () and torch.equal(loaded.schedule.sigmas, inversion.schedule.sigmas)
    check_model(loaded, tf.model)
    source, _, negative, _ = pair
    with torch.inference_mode():
        a = record_source(tf.model, source, negative, inversion=inversion, fraction=0.0)[1]["samples"]
        b = record_source(tf.model, loaded.source_conditioning, negative, inversion=loaded, fraction=0.0)[1]
    assert torch.equal(a, b["samples"])
    options, saved = inversion.source_conditioning[0][1], loaded.source_conditioning[0][1]
    assert set(saved) == set(options) and torch.equal(saved["pooled_output"], options["pooled_output"])


# ------------------------------------------------------------------- the inversion records the source pass

def _calls(tf):
    """A forward pre-hook counting the diffusion model's calls (closed by the caller)."""
    class Count:
        n = 0

    count = Count()

    def hook(module, args, kwargs):
        count.n += 1

    count.handle = tf.model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    return count


def _full_pass(tf, pair, inversion, **options):
    """The Recorder's own whole source pass over `inversion` (its recording withheld)."""
    import dataclasses

    from comfyui_photoswap.photoswap_core.recorder import record_source

    source, _, negative, _ = pair
    with torch.inference_mode():
        return record_source(tf.model, source, negative, inversion=dataclasses.replace(inversion, recording=None),
                             **options)[0]


def _assert_same_trace(a, b):
    assert a.store is not None and b.store is not None
    assert set(a.store.tensors) == set(b.store.tensors) and a.store.nbytes == b.store.nbytes
    for key, tensor in a.store.tensors.items():
        assert torch.equal(tensor, b.store.tensors[key]), key
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a.blend_maps, b.blend_maps))
    assert a.blend_grid == b.blend_grid and a.record_fraction == b.record_fraction
    assert all(torch.equal(x, y) for x, y in zip(a.source_steps_k, b.source_steps_k))
    assert len(a.source_steps_k) == len(b.source_steps_k) == a.steps


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_the_inversions_recording_completed_by_the_recorder_equals_a_whole_source_pass(tf, pair, inversion,
                                                                                      fraction):
    """Euler evaluates v at the current point, so the inversion's calls 1 … N−1 are the source pass's steps N−1 … 1:
    recorded on the way, the Recorder only adds step 0 (one call) and the trace is bit for bit the whole pass's,
    cut to narrower windows where the Recorder records less."""
    from comfyui_photoswap.photoswap_core.recorder import record_source

    source, _, negative, _ = pair
    count = _calls(tf)
    try:
        with torch.inference_mode():
            reused = record_source(tf.model, source, negative, inversion=inversion, fraction=fraction)[0]
        calls = count.n
    finally:
        count.handle.remove()
    assert calls == 1
    _assert_same_trace(reused, _full_pass(tf, pair, inversion, fraction=fraction))
    windows = _windows(*EVERY) if fraction == 1.0 else _windows(0.2, 0.3, 0.5)
    full = _full_pass(tf, pair, inversion, fraction=fraction)
    for lockstep in (False, True):
        a = _swap(tf, reused, pair, windows, lockstep=lockstep)
        b = _swap(tf, full, pair, windows, lockstep=lockstep)
        assert torch.equal(a[0], b[0])


def test_the_recording_is_reused_only_where_it_is_the_same_pass(tf, pair, inversion):
    """Another MODEL object (a clone may carry other patches), another source prompt, self maps (never recorded
    on the way) or fraction 0 (lockstep) ⇒ the Recorder runs its own pass."""
    from comfyui_photoswap.photoswap_core.recorder import reusable_recording

    source, _, negative, _ = pair
    assert reusable_recording(inversion, tf.model, source, 1.0, False) is inversion.recording
    assert reusable_recording(inversion, tf.model.clone(), source, 1.0, False) is None
    other = _encode(tf, "a photo of a dog on a sofa")
    assert reusable_recording(inversion, tf.model, other, 1.0, False) is None
    assert reusable_recording(inversion, tf.model, source, 1.0, True) is None
    assert reusable_recording(inversion, tf.model, source, 0.0, False) is None
    same_values = [[source[0][0].clone(), dict(source[0][1])]]
    assert reusable_recording(inversion, tf.model, same_values, 1.0, False) is inversion.recording
    count = _calls(tf)
    try:
        from comfyui_photoswap.photoswap_core.recorder import record_source

        with torch.inference_mode():
            record_source(tf.model, source, negative, inversion=inversion, record_self_maps=True)
        assert count.n == STEPS
    finally:
        count.handle.remove()


def _ode_sample(tf, z_t, source, sigmas, solver):
    """The flow ODE from z_T to σ = 0 without any pinning (Euler, or the midpoint step), written here."""
    from comfyui_photoswap.photoswap_core.evaluator import DirectEvaluator

    ev = DirectEvaluator(tf.model, z_t.shape)
    kw = ev.model_kwargs(ev.arch.prompt_entry(tf.model, source, "s"))
    v = lambda x, s: ev.eps(x, s, kw["c_crossattn"], kw.get("y"), guidance=kw["guidance"])  # noqa: E731
    x = z_t.clone()
    for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        if solver == "euler":
            x = x + (b - a) * v(x, a)
        else:
            m = 0.5 * (a + b)
            x = x + (b - a) * v(x + (m - a) * v(x, a), m)
    return x


def test_midpoint_inversion_is_second_order(tf, pair):
    """Unpinned round trip (inversion, then the same solver back to σ = 0) against the photo: the midpoint step's
    error falls faster per doubling of the steps (measured 3.2×, Euler 1.9×, 8 → 16 steps), and midpoint is the
    closer at equal steps; it costs two calls per step."""
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion

    source, _, negative, _ = pair
    x0 = _image_latent()
    errors, calls = {}, {}
    for solver in ("euler", "midpoint"):
        for steps in (8, 16):
            count = _calls(tf)
            try:
                with torch.inference_mode():
                    inv = run_inversion(tf.model, x0, source, negative,
                                        InversionSettings(method="direct", steps=steps, cfg=1.0, solver=solver))
                    back = _ode_sample(tf, inv.z_t, source, inv.schedule.sigmas, solver)
            finally:
                count.handle.remove()
            calls[solver, steps] = count.n
            errors[solver, steps] = float((back - inv.trajectory[-1]).abs().max())
    assert calls[("euler", 8)] - 8 == 8 and calls[("midpoint", 8)] - 16 == 16  # inversion + the test's sampling
    assert errors["midpoint", 8] < 0.5 * errors["euler", 8], errors
    assert errors["euler", 8] / errors["euler", 16] < 2.5, errors
    assert errors["midpoint", 8] / errors["midpoint", 16] > 2.7, errors


def test_a_solver_the_family_does_not_have_is_refused(tf, pair, tiny_sd15):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion

    source, _, negative, _ = pair
    with pytest.raises(PhotoswapInputError, match="'solver'.*pick a listed solver"):
        run_inversion(tf.model, _image_latent(), source, negative,
                      InversionSettings(method="direct", steps=4, cfg=1.0, solver="rk4"))
    src, neg = (_sd_encode(tiny_sd15, t) for t in ("a photo of a cat", ""))
    with pytest.raises(PhotoswapInputError, match="set solver to 'euler'"):
        run_inversion(tiny_sd15.model, torch.zeros(1, 4, 8, 8), src, neg,
                      InversionSettings(method="direct", steps=4, cfg=7.5, solver="midpoint"))
