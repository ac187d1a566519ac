"""Exact invariants of the attention swap on tiny models (float32, CPU): they pin the math of DESIGN.md §2/§3."""
from __future__ import annotations

import logging
import math

import pytest
import torch

pytestmark = pytest.mark.unit

SRC, TGT = "a photo of a cat", "a photo of a sks dog"


def _encode(ms, text):
    import nodes

    return nodes.CLIPTextEncode().encode(ms.clip, text)[0]


def _prompts(ms, same=False):
    from comfyui_photoswap.photoswap_core.prompts import build_prompt_pair

    if same:
        return build_prompt_pair(ms.clip, SRC, "cat", "cat", target_prompt=SRC)
    return build_prompt_pair(ms.clip, SRC, "cat", "sks dog")


def _trace(ms, steps=8, hw=(8, 6), method="direct", fraction=1.0, self_maps=True, seed=0):
    """A recorded trace of a real 'image' latent (direct or null_text inversion) or a synthetic source."""
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, invert
    from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule
    from comfyui_photoswap.photoswap_core.recorder import record_trace

    src, neg = _encode(ms, SRC), _encode(ms, "")
    schedule = ddim_schedule(ms.model.get_model_object("model_sampling"), steps)
    x0 = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        if method == "synthetic":
            return record_trace(ms.model, src, neg, schedule, 7.5, start_latent_vp=x0, method="synthetic",
                                fraction=fraction, record_self_maps=self_maps)
        inv = invert(ms.model, schedule, x0, src[0], neg[0],
                     InversionSettings(method=method, steps=steps, inner_iterations=2))
        return record_trace(ms.model, src, neg, schedule, 7.5, trajectory_vp=inv.trajectory,
                            null_embeddings=inv.null_embeddings, method=method, fraction=fraction,
                            record_self_maps=self_maps)


def _swap(ms, trace, prompts, windows, lockstep=False, target_text=TGT, cfg=7.5):
    from comfyui_photoswap.photoswap_core.swap_sampler import swap

    with torch.inference_mode():
        return swap(ms.model, trace, _encode(ms, target_text), _encode(ms, ""), prompts, windows, cfg,
                    lockstep=lockstep)


class SwapEvents(logging.Handler):
    """Collects which swap fired where, from the DEBUG records of the "photoswap.swaps" logger."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.events = []

    def emit(self, record):
        self.events.append(record.photoswap_swap)

    def __enter__(self):
        self.logger = logging.getLogger("photoswap.swaps")
        self.level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self.events

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


def _windows(*args, **kwargs):
    from comfyui_photoswap.photoswap_core.swap_rules import SwapWindows

    return SwapWindows(*args, **kwargs)


WINDOW_SETS = [(0.8, 0.0, 0.6), (0.5, 0.3, 0.4), (0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (0.2, 0.5, 0.9)]


@pytest.fixture(scope="module")
def sd15_trace(tiny_sd15):
    return _trace(tiny_sd15, method="direct")


@pytest.fixture(scope="module")
def family_traces(request):
    cache = {}

    def get(family):
        if family not in cache:
            ms = request.getfixturevalue(f"tiny_{family}")
            cache[family] = (ms, _trace(ms, steps=6, hw=(12, 8), method="null_text" if family == "sd15" else "direct"))
        return cache[family]
    return get


@pytest.mark.parametrize("family,blend", [("sd15", True), ("sd15", False), ("sd2v", True), ("sdxl", True)])
def test_identical_prompts_give_source_reconstruction(family_traces, family, blend):
    ms, trace = family_traces(family)
    for out, mp, cross in WINDOW_SETS[:2] if family != "sd15" else WINDOW_SETS[:3]:
        for lockstep in (False, True):
            target, source, _, mode, _ = _swap(ms, trace, _prompts(ms, same=True), _windows(out, mp, cross, blend),
                                            lockstep=lockstep, target_text=SRC)
            assert mode == ("lockstep" if lockstep else "target")
            err = float((target - source).abs().max())
            assert err <= 1e-5, (family, out, mp, cross, lockstep, err)
    # and the swap does change the image when the prompts differ
    target, source, _, _, _ = _swap(ms, trace, _prompts(ms), _windows(0.5, 0.0, 0.5, blend))
    assert float((target - source).abs().max()) > 1e-2


@pytest.mark.parametrize("windows", WINDOW_SETS)
def test_recorded_trace_equals_lockstep(tiny_sd15, sd15_trace, windows):
    w = _windows(*windows)
    a = _swap(tiny_sd15, sd15_trace, _prompts(tiny_sd15), w, lockstep=False)
    b = _swap(tiny_sd15, sd15_trace, _prompts(tiny_sd15), w, lockstep=True)
    assert (a[3], b[3]) == ("target", "lockstep")
    assert float((a[0] - b[0]).abs().max()) <= 1e-5
    if a[2] is not None:
        assert torch.equal(a[2], b[2])


def test_zero_windows_equal_plain_sampling(tiny_sd15):
    """All windows 0, no LocalBlend ⇒ the stock ComfyUI sampler from z_T with the target prompt and the null."""
    import comfy.sample
    import comfy.samplers

    ms = tiny_sd15
    trace = _trace(ms, steps=8, method="synthetic", fraction=0.0)
    target, _, _, mode, _ = _swap(ms, trace, _prompts(ms), _windows(0.0, 0.0, 0.0, local_blend=False))
    assert mode == "lockstep"
    sigmas = trace.schedule.sigmas
    scale = ms.model.model.latent_format.scale_factor
    z_t = trace.trajectory[0] * math.sqrt(1 + float(sigmas[0]) ** 2) / scale
    with torch.inference_mode():
        stock = comfy.sample.sample_custom(ms.model, torch.zeros_like(z_t), 7.5, comfy.samplers.sampler_object("euler"),
                                           sigmas.clone(), _encode(ms, TGT), _encode(ms, ""), z_t)
    # the stock sampler ends in k-space at σ_N (= σ(t=0) ≠ 0); our LATENT is the VP latent there
    stock_vp = stock / math.sqrt(1 + float(sigmas[-1]) ** 2)
    err = float((target - stock_vp).abs().max())
    assert err <= 1e-5 * max(1.0, float(stock_vp.abs().max())), err


def _expected_events(steps, windows, self_layers, map_layers, cross_layers):
    out, mp, cross = windows
    expected = set()
    for i in range(steps):
        if out > 0 and i <= int(out * steps):
            expected |= {(i, "self_output", layer, half) for layer in self_layers for half in (0, 1)}
        elif i < int((out + mp) * steps):
            expected |= {(i, "self_map", layer, 0) for layer in map_layers}
        if i < int(cross * (steps + 1)):
            expected |= {(i, "cross_map", layer, 0) for layer in cross_layers}
    return expected


@pytest.mark.parametrize("steps", [50, 37])
@pytest.mark.parametrize("windows", [(0.8, 0.0, 0.6), (0.3, 0.4, 0.5), (0.0, 0.5, 1.0)])
def test_window_edges(tiny_sd15, steps, windows):
    """The steps, layers and CFG halves where each swap acts are exactly DESIGN.md §2's rules."""
    from comfyui_photoswap.photoswap_core.arch import inspect_model

    ms = tiny_sd15
    trace = _trace(ms, steps=steps, hw=(16, 16), method="direct", fraction=1.0, self_maps=True)
    layers = inspect_model(ms.model).attention_layers(ms.model)
    assert len(layers) == 16
    # SD1.x at any size: level 0 = input 1,2 and output 9,10,11 (the reference's 64² layers at 512 px)
    map_layers = [layer for layer in layers if not ((layer[0] == "input" and layer[1] in (1, 2)) or
                                                    (layer[0] == "output" and layer[1] in (9, 10, 11)))]
    assert len(map_layers) == 11
    for lockstep in (False, True):
        with SwapEvents() as events:
            _swap(ms, trace, _prompts(ms), _windows(*windows), lockstep=lockstep)
        assert len(events) == len(set(events))
        assert set(events) == _expected_events(steps, windows, layers, map_layers, layers)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_blend_level_keeps_the_maps_local(request, family):
    """LocalBlend's maps are level 2 (the reference's 16×16 at 512 px) down to 256 px; on smaller latents the
    deepest attention level with ≥ 8 cells a side (at 2×2 cells the 3×3 dilation covered the whole image, an
    all-ones mask: LocalBlend silently did nothing). The attention levels come from ComfyUI's unet_config."""
    from comfyui_photoswap.photoswap_core.arch import inspect_model
    from comfyui_photoswap.photoswap_core.arch.sd_unet import _attention_levels

    arch = inspect_model(request.getfixturevalue(f"tiny_{family}").model)
    sd15 = {"transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2}
    sdxl = {"transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2]}
    assert _attention_levels(sd15) == (0, 1, 2) and _attention_levels(sdxl) == (1, 2)
    assert _attention_levels({}) == ()
    expected = {"sd15": {(128, 96): 2, (64, 64): 2, (32, 40): 2, (31, 64): 2, (24, 64): 1, (16, 16): 1, (8, 8): 0, (6, 8): 0},
                "sdxl": {(128, 128): 2, (64, 64): 2, (32, 32): 2, (16, 16): 1, (8, 8): 1, (6, 8): 1}}[family]
    assert arch.attention_levels == {"sd15": (0, 1, 2), "sdxl": (1, 2)}[family]
    assert {hw: arch.blend_level(hw) for hw in expected} == expected
    extra = {"original_shape": [1, 4, 8, 8], "block": ("output", 3)}
    blend_levels = {level for level in range(3) if arch.blend_layer(level, extra)}
    assert blend_levels == {expected[(8, 8)]}
    assert not arch.blend_layer(expected[(8, 8)], {**extra, "block": ("middle", 0)})


def test_fused_self_map_equals_explicit():
    from comfy.ldm.modules.attention import optimized_attention

    from comfyui_photoswap.photoswap_core.attention_patch import explicit_cross_maps, maps_times_values

    g = torch.Generator().manual_seed(0)
    heads, d, n = 4, 16, 96
    q_s, k_s, v_t = (torch.randn(1, n, heads * d, generator=g) for _ in range(3))
    fused = optimized_attention(q_s, k_s, v_t, heads)
    qh = q_s.reshape(1, n, heads, d).transpose(1, 2)
    kh = k_s.reshape(1, n, heads, d).transpose(1, 2)
    vh = v_t.reshape(1, n, heads, d).transpose(1, 2)
    explicit = torch.einsum("bhij,bhjd->bhid", torch.softmax(torch.einsum("bhid,bhjd->bhij", qh, kh) / d ** 0.5,
                                                               -1), vh).transpose(1, 2).reshape(1, n, heads * d)
    assert float((fused - explicit).abs().max()) <= 1e-5
    # our explicit helpers agree with the same formula (used for the cross maps)
    maps = explicit_cross_maps(q_s, k_s, heads)
    assert float((maps_times_values(maps, v_t, heads) - explicit).abs().max()) <= 1e-5


def test_cross_map_swap_equals_reference_formula(tiny_sd15):
    """The cross-map edit equals the official AttentionSwap.replace_cross_attention arithmetic on explicit maps."""
    from comfyui_photoswap.photoswap_core.attention_patch import explicit_cross_maps, maps_times_values

    prompts = _prompts(tiny_sd15)
    g = torch.Generator().manual_seed(1)
    heads, d, n = 2, 16, 48
    q_s, q_t, k_s, k_t, v_t = (torch.randn(1, x, heads * d, generator=g) for x in (n, n, 77, 77, 77))
    s_maps, t_maps = explicit_cross_maps(q_s, k_s, heads), explicit_cross_maps(q_t, k_t, heads)
    mapper, alphas = prompts.mapper_tensor(), prompts.alphas_tensor()
    ours = maps_times_values(s_maps[..., mapper] * alphas + t_maps * (1 - alphas), v_t, heads)
    # reference layout: attn [heads, Nq, 77]; attn_base[:, :, mapper] * alphas + att_replace * (1 - alphas)
    base, repl = s_maps[0], t_maps[0]
    edited = base[:, :, mapper] * alphas.reshape(1, 1, 77) + repl * (1 - alphas.reshape(1, 1, 77))
    vh = v_t.reshape(77, heads, d).transpose(0, 1)
    ref = torch.einsum("hij,hjd->hid", edited, vh).transpose(0, 1).reshape(1, n, heads * d)
    assert float((ours - ref).abs().max()) <= 1e-6
    assert alphas[list(prompts.target_subject_positions)].eq(0).all()


def test_concept_maps_act_only_inside_the_cross_map_window(tiny_sd15, sd15_trace):
    """concept_maps='subject' changes the alignment only: with no cross-map window the swap is bit-identical to
    the reference alignment's; inside one it changes the result."""
    from comfyui_photoswap.photoswap_core.prompts import build_prompt_pair

    tied = build_prompt_pair(tiny_sd15.clip, SRC, "cat", "sks dog", concept_maps="subject")
    own = _prompts(tiny_sd15)
    for blend in (True, False):
        a = _swap(tiny_sd15, sd15_trace, own, _windows(0.8, 0.0, 0.0, blend))
        b = _swap(tiny_sd15, sd15_trace, tied, _windows(0.8, 0.0, 0.0, blend))
        assert torch.equal(a[0], b[0]), blend
    a = _swap(tiny_sd15, sd15_trace, own, _windows(0.8, 0.0, 0.6))
    b = _swap(tiny_sd15, sd15_trace, tied, _windows(0.8, 0.0, 0.6))
    assert float((a[0] - b[0]).abs().max()) > 1e-3


def test_windows_beyond_recorded_fraction_refused(tiny_sd15):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    trace = _trace(tiny_sd15, steps=6, method="direct", fraction=0.5)
    with pytest.raises(PhotoswapInputError, match="record_fraction"):
        _swap(tiny_sd15, trace, _prompts(tiny_sd15), _windows(0.8, 0.0, 0.4))
    # lockstep needs no recorded tensors
    assert _swap(tiny_sd15, trace, _prompts(tiny_sd15), _windows(0.8, 0.0, 0.4), lockstep=True)[3] == "lockstep"


def test_input_model_is_not_modified(tiny_sd15, sd15_trace):
    """After the sampler runs, the input MODEL gives bit-identical plain KSampler output (no leaked patch)."""
    import nodes

    ms = tiny_sd15
    latent = {"samples": torch.zeros(1, 4, 8, 6)}

    def plain():
        with torch.inference_mode():
            return nodes.common_ksampler(ms.model, 3, 4, 7.5, "euler", "normal", _encode(ms, TGT), _encode(ms, ""),
                                         latent)[0]["samples"]

    options_before = repr(ms.model.model_options)
    before = plain()
    _swap(ms, sd15_trace, _prompts(ms), _windows())
    _swap(ms, sd15_trace, _prompts(ms), _windows(), lockstep=True)
    assert torch.equal(plain(), before)
    assert repr(ms.model.model_options) == options_before
