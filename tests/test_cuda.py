"""CUDA-only behaviour (issue: performance / GPU): half-precision models, a trace kept on the GPU vs offloaded to
pinned CPU memory, and no host-device synchronisation inside the per-layer attention patch (tests/test_hot_path.py
checks the patterns visible on every device).

Run on a CUDA machine with ComfyUI on the GPU:  PHOTOSWAP_DEVICE=cuda bash scripts/test.sh -m cuda
Everywhere else (CI, CPU machines) every test here is skipped, saying why. Not yet run: no GPU has been lent to this
project so far.
"""
from __future__ import annotations

import pytest
import torch

from test_swap_invariants import SRC, TGT, _encode, _prompts, _swap, _trace, _windows

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cuda_device(comfy):
    import comfy.model_management as mm

    device = mm.get_torch_device()
    if device.type != "cuda":
        pytest.skip("needs ComfyUI on a CUDA device: PHOTOSWAP_DEVICE=cuda bash scripts/test.sh -m cuda")
    return device


def _tiny_in(dtype):
    from devtools.tiny_models import build_tiny

    ms = build_tiny("sd15", seed=0)
    unet = ms.model.model.diffusion_model
    unet.to(dtype)
    unet.dtype = dtype
    ms.model.model.manual_cast_dtype = None
    assert ms.model.model.get_dtype() == dtype
    return ms


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_identity_and_trace_equals_lockstep(cuda_device, dtype):
    """fp16/bf16 UNet on the GPU: identical prompts give the source reconstruction exactly, and recorded-trace mode
    equals lockstep (both run the same arithmetic per step)."""
    ms = _tiny_in(dtype)
    trace = _trace(ms, method="direct")
    assert trace.store.location.type == "cuda"
    same = _swap(ms, trace, _prompts(ms, same=True), _windows(0.8, 0.0, 0.6), target_text=SRC)
    assert torch.isfinite(same[0]).all()
    assert float((same[0] - same[1]).abs().max()) <= 1e-5 * max(1.0, float(same[1].abs().max()))
    a = _swap(ms, trace, _prompts(ms), _windows(0.5, 0.3, 0.6))
    b = _swap(ms, trace, _prompts(ms), _windows(0.5, 0.3, 0.6), lockstep=True)
    assert float((a[0] - b[0]).abs().max()) <= 1e-5 * max(1.0, float(a[0].abs().max()))


def test_offloaded_trace_equals_device_trace(cuda_device, monkeypatch):
    """storage 'cpu' keeps the trace in pinned host memory and prefetches each next step's tensors on a side stream:
    the swap is bit-identical to a trace kept on the GPU, the prefetch did run, and nothing stays staged on the GPU
    afterwards."""
    from comfyui_photoswap.photoswap_core.trace import AttentionStore

    staged_keys = []
    original_stage = AttentionStore.stage

    def stage(self, keys, device):
        if self.host_store_for(device):
            staged_keys.extend(keys)
        return original_stage(self, keys, device)

    monkeypatch.setattr(AttentionStore, "stage", stage)
    ms = _tiny_in(torch.float16)
    on_gpu = _trace(ms, method="direct")
    on_gpu_out = _swap(ms, on_gpu, _prompts(ms), _windows(0.5, 0.3, 0.6))
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, invert
    from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule
    from comfyui_photoswap.photoswap_core.recorder import record_trace

    src, neg = _encode(ms, SRC), _encode(ms, "")
    schedule = ddim_schedule(ms.model.get_model_object("model_sampling"), on_gpu.steps)
    x0 = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        inv = invert(ms.model, schedule, x0, src[0], neg[0], InversionSettings(method="direct", steps=on_gpu.steps))
        offloaded = record_trace(ms.model, src, neg, schedule, 7.5, trajectory_vp=inv.trajectory,
                                 null_embeddings=inv.null_embeddings, method="direct", fraction=1.0,
                                 record_self_maps=True, storage="cpu")
    assert offloaded.store.location.type == "cpu"
    assert all(t.is_pinned() for t in offloaded.store.tensors.values())
    out = _swap(ms, offloaded, _prompts(ms), _windows(0.5, 0.3, 0.6))
    assert torch.equal(out[0], on_gpu_out[0]) and torch.equal(out[1], on_gpu_out[1])
    assert staged_keys and offloaded.store._staged == {}


@pytest.mark.parametrize("case", ["trace", "lockstep", "offloaded_recording"])
def test_no_host_device_sync_in_the_attention_patch(cuda_device, monkeypatch, case):
    """Every call of the per-layer patch and the trace recorder (self and cross attention, all swaps and LocalBlend
    active) and of the per-step rules runs under torch.cuda.set_sync_debug_mode('error'): a .item(), a bool() of a
    tensor or a blocking copy there raises. Cases: recording on the GPU then swapping with the trace; lockstep;
    recording offloaded to pinned host memory (non-blocking copies) then swapping from it."""
    from comfyui_photoswap.photoswap_core import attention_patch, recorder

    ms = _tiny_in(torch.float16)
    calls = {"n": 0}

    def strict(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return wrapped

    for name in ("self_attention", "cross_attention", "end_step"):
        monkeypatch.setattr(attention_patch.SwapRun, name, strict(getattr(attention_patch.SwapRun, name)))
    for name in ("record_self", "record_cross"):
        monkeypatch.setattr(recorder.TraceRecorder, name, strict(getattr(recorder.TraceRecorder, name)))
    if case == "offloaded_recording":
        from comfyui_photoswap.photoswap_core.inversion import InversionSettings, invert
        from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule

        src, neg = _encode(ms, SRC), _encode(ms, "")
        schedule = ddim_schedule(ms.model.get_model_object("model_sampling"), 8)
        x0 = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            inv = invert(ms.model, schedule, x0, src[0], neg[0], InversionSettings(method="direct", steps=8))
            trace = recorder.record_trace(ms.model, src, neg, schedule, 7.5, trajectory_vp=inv.trajectory,
                                          null_embeddings=inv.null_embeddings, method="direct", fraction=1.0,
                                          record_self_maps=True, storage="cpu")
        assert trace.store.location.type == "cpu"
    else:
        trace = _trace(ms, method="direct")
    out = _swap(ms, trace, _prompts(ms), _windows(0.5, 0.3, 0.6, blend_start=0.0), target_text=TGT,
                lockstep=case == "lockstep")
    assert calls["n"] > 0 and torch.isfinite(out[0]).all() and out[2] is not None


def test_null_text_on_a_half_precision_model_optimises_in_float32(cuda_device):
    ms = _tiny_in(torch.float16)
    trace = _trace(ms, method="null_text", steps=4)
    assert trace.null_embeddings.dtype == torch.float32
    assert torch.isfinite(trace.null_embeddings).all()
