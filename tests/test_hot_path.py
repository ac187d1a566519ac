"""No host-device synchronisation in the per-layer attention patch and the per-step swap rules, checked on any device.

On a GPU each of these stalls the host until the device has caught up: a tensor made from host data inside the patch
(`torch.tensor(...)`, indexing with a Python list: a blocking host-to-device copy), a scalar read (`.item()`,
`float()`, `bool()` of a tensor), a data-dependent shape (`nonzero`, boolean-mask selection) and a blocking copy
between devices. tests/test_cuda.py checks the real thing with `torch.cuda.set_sync_debug_mode("error")` where a GPU is
available; this test catches the same patterns on every device by watching the operators the patch dispatches.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_swap_invariants import _prompts, _swap, _trace, _windows

pytestmark = pytest.mark.unit

aten = torch.ops.aten
# operators that read device data on the host (or copy host data to the device) whatever their arguments
SYNCING = {aten.lift_fresh, aten.lift_fresh_copy, aten._local_scalar_dense, aten.nonzero, aten.is_nonzero,
           aten.masked_select, aten.unique_consecutive, aten._unique2, aten.equal}


def _device(value):
    return value.device if isinstance(value, torch.Tensor) else None


class SyncWatch(TorchDispatchMode):
    """Records every dispatched operator that would synchronise the host with a GPU."""

    def __init__(self, where: str, found: list):
        super().__init__()
        self.where, self.found = where, found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNCING:
            self.found.append((self.where, str(func)))
        elif packet is aten._to_copy and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]) != _device(args[0]) or kwargs.get("pin_memory"):
                self.found.append((self.where, f"{func} to {kwargs['device']}"))
        elif packet is aten.copy_ and _device(args[0]) != _device(args[1]) and not (len(args) > 2 and args[2]):
            self.found.append((self.where, f"blocking {func} {_device(args[1])} -> {_device(args[0])}"))
        return func(*args, **kwargs)


@pytest.fixture
def watched(monkeypatch):
    """Runs every per-layer / per-step method of SwapRun and the trace recorder under a SyncWatch."""
    from comfyui_photoswap.photoswap_core.attention_patch import SwapRun
    from comfyui_photoswap.photoswap_core.recorder import TraceRecorder

    found, calls = [], {}

    def watch(cls, name):
        original = getattr(cls, name)

        def wrapped(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            with SyncWatch(name, found):
                return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapped)

    for name in ("self_attention", "cross_attention", "end_step", "rewrite_inputs", "begin_step"):
        watch(SwapRun, name)
    for name in ("record_self", "record_cross"):
        watch(TraceRecorder, name)
    return found, calls


def test_the_watch_sees_what_would_synchronise():
    """The detector itself: list indexing, a scalar read and torch.tensor() are caught; device-side work is not."""
    found = []
    x = torch.randn(2, 3, 5)
    with SyncWatch("probe", found):
        _ = x[..., torch.arange(2)] * 2 + x.softmax(-1)[..., :2]
    assert found == []
    with SyncWatch("probe", found):
        _ = x[..., [1, 2]]
        _ = float(x.sum())
        _ = torch.tensor([1.0])
    assert len(found) == 3, found


@pytest.mark.parametrize("lockstep", [False, True], ids=["recorded_trace", "lockstep"])
def test_no_host_device_sync_in_the_patch_and_the_step_rules(tiny_sd15, watched, lockstep):
    """Recording (self and cross tensors, LocalBlend maps) and swapping with every swap and LocalBlend active: the
    patch and the between-step rules dispatch nothing that reads device data on the host."""
    found, calls = watched
    trace = _trace(tiny_sd15, method="direct")
    out = _swap(tiny_sd15, trace, _prompts(tiny_sd15), _windows(0.5, 0.3, 0.6, blend_start=0.0), lockstep=lockstep)
    assert torch.isfinite(out[0]).all() and out[2] is not None  # the blend mask was made
    for name in ("self_attention", "cross_attention", "end_step", "rewrite_inputs", "record_self", "record_cross"):
        assert calls.get(name, 0) > 0, f"{name} never ran: the test would prove nothing"
    assert found == [], found


@pytest.mark.parametrize("windows", [(0.5, 0.3, 0.6), (0.8, 0.0, 0.6), (0.2, 0.5, 0.9), (0.0, 0.0, 0.0)])
def test_prefetch_plan_is_exactly_what_the_patch_reads(tiny_sd15, monkeypatch, windows):
    """A trace offloaded to host memory is copied to a CUDA device a step ahead, per `SwapRun.keys_read_at`. That plan
    must name exactly the keys the patch reads at each step: a key missed would be copied on the compute stream when
    read, a key too many would waste bandwidth and device memory. Checked here on a recorded-trace swap by comparing
    the plan with every `AttentionStore.get` per step (the staging itself needs CUDA: tests/test_cuda.py)."""
    from comfyui_photoswap.photoswap_core.attention_patch import SwapRun
    from comfyui_photoswap.photoswap_core.trace import AttentionStore

    plans, reads, current = {}, {}, {}
    original_prefetch, original_get = SwapRun.prefetch, AttentionStore.get

    def prefetch(self, step, device):
        plans[step] = set(self.keys_read_at(step))
        current["step"] = step
        return original_prefetch(self, step, device)

    def get(self, key, device):
        reads.setdefault(current["step"], set()).add(key)
        return original_get(self, key, device)

    monkeypatch.setattr(SwapRun, "prefetch", prefetch)
    monkeypatch.setattr(AttentionStore, "get", get)
    trace = _trace(tiny_sd15, method="direct")
    _swap(tiny_sd15, trace, _prompts(tiny_sd15), _windows(*windows))
    assert sorted(plans) == list(range(trace.steps))
    for step in range(trace.steps):
        assert reads.get(step, set()) == plans[step], f"step {step}"
    assert any(plans.values()) == (windows != (0.0, 0.0, 0.0))


@pytest.mark.parametrize("lockstep", [False, True], ids=["recorded_trace", "lockstep"])
def test_no_host_device_sync_with_two_pairs_regions_and_a_mask(tiny_sd15, watched, lockstep):
    """The same with two subject pairs, a region word (composition's column mask, the region lerps) and an explicit
    region mask: the per-step regions and their per-layer resizes stay on the device."""
    from comfyui_photoswap.photoswap_core.prompts import build_prompt_pair
    from comfyui_photoswap.photoswap_core.swap_sampler import swap
    from test_swap_invariants import _encode

    found, calls = watched
    trace = _trace(tiny_sd15, method="direct")
    prompts = build_prompt_pair(tiny_sd15.clip, "a photo of a cat", "cat; photo", "sks dog; zwx painting",
                                region_words="cat; ")
    mask = torch.zeros(1, 64, 48)
    mask[:, :40] = 1.0
    with torch.inference_mode():
        out = swap(tiny_sd15.model, trace, _encode(tiny_sd15, prompts.target_prompt), _encode(tiny_sd15, ""),
                   prompts, _windows(0.5, 0.3, 0.6, blend_start=0.0), 7.5, lockstep=lockstep, region_mask=mask)
    assert torch.isfinite(out.target).all() and out.pair_masks.shape[0] == 2
    assert calls.get("begin_step", 0) > 0 and calls.get("end_step", 0) > 0
    assert found == [], found


@pytest.mark.parametrize("mode", ["first+previous", "keyframes"])
def test_no_host_device_sync_in_a_clip_with_frame_attention(tiny_sd15, watched, mode):
    """A clip of 3 frames (per-frame null embeddings would be indexed by row; anchors by frame): the cross-frame
    self-attention, the per-frame masks and the row bookkeeping dispatch nothing that syncs."""
    from test_clips import _clip_trace, _frames, _swap_clip

    found, calls = watched
    out = _swap_clip(tiny_sd15, _clip_trace(tiny_sd15, _frames(3)), mode, windows=(0.3, 0.2, 0.6))
    assert out.target.shape[0] == 3 and out.mask.shape[0] == 3
    assert calls.get("self_attention", 0) > 0 and calls.get("end_step", 0) > 0
    assert found == [], found
