"""A latent batch of F frames is one clip (photoswap_core/frames.py): exact invariants on the tiny SD1.5 (float32, CPU).

Each frame is its own image through the inversion, the source pass and the trace; only `frame_attention` couples the
target rows. Reference results are the single-image pipeline run on one frame.

CPU kernels are not batch-invariant: one UNet call gives a row values ~2e-6 apart in a batch of 3 and alone (even
identical rows of one batch differ), and CFG 7.5 amplifies that over the steps. Where a comparison changes the batch
composition it allows `BATCH_TOL` relative to the latent's size; where the batches are the same it is exact (or 1e-5).
"""
from __future__ import annotations

import pytest
import torch

from test_swap_invariants import SRC, TGT, _encode, _prompts, _windows

pytestmark = pytest.mark.unit

STEPS, HW = 6, (8, 6)
WINDOWS = (0.5, 0.0, 0.5)  # the frame attention acts after the self-output window, LocalBlend on
BATCH_TOL = 5e-5  # measured: ≤ 2e-5 of max |latent| for batches of 1–4 frames vs one


def _batch_close(a, b, tol=BATCH_TOL):
    err, scale = float((a - b).abs().max()), max(1.0, float(b.abs().max()))
    assert err <= tol * scale, (err, scale)


def _frames(count, identical=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if identical:
        return torch.randn(1, 4, *HW, generator=g).expand(count, -1, -1, -1).clone()
    return torch.randn(count, 4, *HW, generator=g)


def _clip_trace(ms, x0, method="direct", per_batch=0, fraction=1.0):
    """Inversion + source pass of model-space frames x0 [F, 4, h, w] (a clip, or one image when F = 1)."""
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion
    from comfyui_photoswap.photoswap_core.recorder import record_clip

    src, neg = _encode(ms, SRC), _encode(ms, "")
    samples = x0 / ms.model.model.latent_format.scale_factor
    with torch.inference_mode():
        inv = run_inversion(ms.model, samples, src, neg,
                            InversionSettings(method=method, steps=STEPS, inner_iterations=2),
                            frames_per_batch=per_batch)
        return record_clip(ms.model, src, neg, inv.schedule, 7.5, trajectory_vp=inv.trajectory,
                           null_embeddings=inv.null_embeddings, method=method, fraction=fraction,
                           record_self_maps=True, frames_per_batch=per_batch)


def _swap_clip(ms, trace, frame_attention="first", same=False, lockstep=False, per_batch=0, interval=2,
               windows=WINDOWS):
    from comfyui_photoswap.photoswap_core.swap_sampler import swap

    with torch.inference_mode():
        return swap(ms.model, trace, _encode(ms, SRC if same else TGT), _encode(ms, ""), _prompts(ms, same=same),
                    _windows(*windows, True), 7.5, lockstep=lockstep, frame_attention=frame_attention,
                    keyframe_interval=interval, frames_per_batch=per_batch)


@pytest.fixture(scope="module")
def clip3(tiny_sd15):
    x0 = _frames(3)
    return x0, _clip_trace(tiny_sd15, x0)


def test_identical_frames_with_first_frame_attention_equal_the_single_image_swap(tiny_sd15):
    x0 = _frames(3, identical=True)
    clip = _swap_clip(tiny_sd15, _clip_trace(tiny_sd15, x0), "first")
    single = _swap_clip(tiny_sd15, _clip_trace(tiny_sd15, x0[:1]), "first")
    assert clip.target.shape == (3, 4, *HW) and clip.mask.shape[0] == 3
    for f in range(3):
        _batch_close(clip.target[f], single.target[0])
    # the same through batches of one frame with its anchor (frame 0): 2 rows instead of 1
    per_frame = _swap_clip(tiny_sd15, _clip_trace(tiny_sd15, x0, per_batch=1), "first", per_batch=1)
    assert torch.equal(per_frame.target[0], single.target[0])  # frame 0's batch is the single image's
    for f in range(1, 3):
        _batch_close(per_frame.target[f], single.target[0])


def test_frame_attention_off_equals_each_frame_alone_null_text(tiny_sd15):
    x0 = _frames(2, seed=3)
    singles = [_swap_clip(tiny_sd15, _clip_trace(tiny_sd15, x0[f:f + 1], method="null_text"), "off")
               for f in range(2)]
    # one frame per batch: exactly the single-image pipeline, each frame its own per-step null embeddings
    trace = _clip_trace(tiny_sd15, x0, method="null_text", per_batch=1)
    assert trace.null_embeddings.shape[1] == 2
    assert not torch.equal(trace.null_embeddings[:, 0], trace.null_embeddings[:, 1])
    clip = _swap_clip(tiny_sd15, trace, "off", per_batch=1)
    for f in range(2):
        assert torch.equal(clip.target[f], singles[f].target[0]), f
    # all frames in one batch (the DDIM inversion batched): the same up to the kernels' batch variance, which the
    # optimisation (Adam steps, early stops) amplifies further (measured 1.1e-4 on an AMD EPYC, 6.2e-4 on an Intel
    # Xeon, both 2 threads)
    batched = _swap_clip(tiny_sd15, _clip_trace(tiny_sd15, x0, method="null_text"), "off")
    for f in range(2):
        _batch_close(batched.target[f], singles[f].target[0], tol=2e-3)


def test_frame_attention_changes_distinct_frames_but_never_the_first(tiny_sd15, clip3):
    _, trace = clip3
    off, first = _swap_clip(tiny_sd15, trace, "off"), _swap_clip(tiny_sd15, trace, "first")
    assert torch.equal(off.target[0], first.target[0])  # frame 0 has no anchor
    assert float((off.target[1:] - first.target[1:]).abs().max()) > 1e-3
    assert torch.equal(off.source, first.source)  # the source rows stay the per-frame reconstructions


def test_identical_prompts_give_every_frames_reconstruction(tiny_sd15, clip3):
    _, trace = clip3
    for lockstep in (False, True):
        out = _swap_clip(tiny_sd15, trace, "off", same=True, lockstep=lockstep)
        assert torch.equal(out.target, out.source), lockstep
    assert float((out.source - trace.trajectory[-1] / 0.18215).abs().max()) <= 1e-5


@pytest.mark.parametrize("mode", ["first", "first+previous", "keyframes"])
def test_clip_trace_equals_lockstep(tiny_sd15, clip3, mode):
    _, trace = clip3
    a = _swap_clip(tiny_sd15, trace, mode)
    b = _swap_clip(tiny_sd15, trace, mode, lockstep=True)
    assert (a.mode, b.mode) == ("target", "lockstep")
    assert float((a.target - b.target).abs().max()) <= 1e-5
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("mode,per_batch", [("first", 1), ("keyframes", 2), ("off", 2)])
def test_chunk_size_does_not_change_the_result(tiny_sd15, mode, per_batch):
    x0 = _frames(4, seed=5)
    whole = _swap_clip(tiny_sd15, _clip_trace(tiny_sd15, x0), mode)
    chunked_trace = _clip_trace(tiny_sd15, x0, per_batch=per_batch)
    chunked = _swap_clip(tiny_sd15, chunked_trace, mode, per_batch=per_batch)
    assert chunked.target.shape == whole.target.shape
    _batch_close(chunked.target, whole.target)
    assert chunked.mask.shape == whole.mask.shape == (4, 1, *HW)
    assert float((chunked.mask.float() - whole.mask.float()).abs().mean()) <= 0.05  # thresholded: a cell may flip
    assert chunked.pair_masks.shape == whole.pair_masks.shape == (4, 1, *HW)


def test_cross_frame_attention_equals_explicit_concatenated_softmax(tiny_sd15):
    """SwapRun's target self-attention with first+previous on 4 frames × 2 CFG halves equals, per row, softmax over
    the concatenation of its own and its anchor rows' keys (same half) times the concatenated values."""
    from comfyui_photoswap.photoswap_core.arch import inspect_model
    from comfyui_photoswap.photoswap_core.attention_patch import RunMode, SwapRun

    frames, heads, d, n = 4, 2, 8, 12
    run = SwapRun(inspect_model(tiny_sd15.model), RunMode.TARGET, 4, _windows(0.0, 0.0, 0.0, False),
                  frame_ids=tuple(range(frames)), frame_attention="first+previous")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2 * frames, n, heads * d, generator=g) for _ in range(3))
    out = run._target_self(None, q, k, v, {"n_heads": heads}, [1, 0])

    def split(x):
        return x.reshape(x.shape[0], -1, heads, d).transpose(1, 2)

    for half in range(2):
        for f in range(frames):
            anchor = [] if f == 0 else [0] if f == 1 else [0, f - 1]
            rows = [half * frames + r for r in [f] + anchor]
            keys, values = torch.cat([k[r] for r in rows])[None], torch.cat([v[r] for r in rows])[None]
            maps = torch.softmax(split(q[half * frames + f][None]) @ split(keys).transpose(-1, -2) / d ** 0.5, -1)
            expected = (maps @ split(values)).transpose(1, 2).reshape(n, heads * d)
            assert float((out[half * frames + f] - expected).abs().max()) <= 1e-5, (half, f)


def test_anchor_rules():
    from comfyui_photoswap.photoswap_core import frames

    assert [frames.anchors(f, "first") for f in range(3)] == [(), (0,), (0,)]
    assert [frames.anchors(f, "first+previous") for f in range(4)] == [(), (0,), (0, 1), (0, 2)]
    assert [frames.anchors(f, "keyframes", 2) for f in range(5)] == [(), (0,), (0,), (2,), (0,)]
    assert frames.closure((5,), "keyframes", 2) == (0, 4, 5)
    assert [c.frames for c in frames.chunks(5, 2, "first")] == [(0, 1), (0, 2, 3), (0, 4)]
    assert [c.outputs for c in frames.chunks(5, 2, "first")] == [(0, 1), (1, 2), (1,)]


def test_bad_clip_inputs_name_the_input_and_the_fix(tiny_sd15, clip3):
    from comfyui_photoswap.photoswap_core.arch import inspect_model
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError
    from comfyui_photoswap.photoswap_core.swap_sampler import swap

    _, trace = clip3
    with pytest.raises(PhotoswapInputError) as info:  # a chained mode cannot be split into batches
        _swap_clip(tiny_sd15, trace, "first+previous", per_batch=2)
    assert info.value.input_name == "frames_per_batch" and "first" in info.value.fix
    with pytest.raises(PhotoswapInputError) as info:  # a region mask batch of another frame count
        with torch.inference_mode():
            swap(tiny_sd15.model, trace, _encode(tiny_sd15, TGT), _encode(tiny_sd15, ""), _prompts(tiny_sd15),
                 _windows(*WINDOWS, True), 7.5, region_mask=torch.ones(2, 64, 48))
    assert info.value.input_name == "region_mask" and "batch of 2" in str(info.value) and "3" in info.value.fix
    with pytest.raises(PhotoswapInputError) as info:
        _swap_clip(tiny_sd15, trace, "sideways")
    assert info.value.input_name == "frame_attention"
    from comfy.nested_tensor import NestedTensor

    arch = inspect_model(tiny_sd15.model)
    with pytest.raises(PhotoswapInputError) as info:  # frames of two sizes in one LATENT (ComfyUI's NestedTensor)
        arch.check_latent(NestedTensor([torch.zeros(1, 4, 8, 6), torch.zeros(1, 4, 8, 8)]), "latent")
    assert info.value.input_name == "latent" and "one size" in info.value.expected
    with pytest.raises(PhotoswapInputError) as info:
        arch.check_latent(torch.zeros(1, 4, 3, 8, 6), "latent")
    assert "video-model latent" in info.value.expected


def test_a_chained_clip_over_the_memory_estimate_is_explained(tiny_sd15, monkeypatch):
    from comfyui_photoswap.photoswap_core import frames
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    # ComfyUI's own estimate on the real model (CPU: plenty of memory for a tiny model)
    assert frames.auto_frames_per_batch(tiny_sd15.model, (3, 4, *HW)) >= 3
    monkeypatch.setattr(frames, "auto_frames_per_batch", lambda *a, **k: 2)  # a device that holds 2 frames
    assert [c.frames for c in frames.plan(tiny_sd15.model, 3, (3, 4, *HW), 0, "first")] == [(0, 1), (0, 2)]
    with pytest.raises(PhotoswapInputError) as info:
        frames.plan(tiny_sd15.model, 3, (3, 4, *HW), 0, "first+previous")
    assert info.value.input_name == "frame_attention" and "about 2 of its 3 frames" in info.value.expected
