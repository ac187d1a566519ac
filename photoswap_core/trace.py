"""SOURCE_TRACE: everything the target pass needs from the source pass.

Always: schedule, source trajectory (model-space latents), per-step null embeddings, the source conditioning and the
per-step source cross-attention maps at the LocalBlend level (tiny). Optionally, within a memory budget, the attention
tensors the swap windows need (DESIGN.md §3): per step and self-attention layer the source attention output (both CFG
halves) and, at self-map layers, the source q/k (cond half); per cross layer the source q (cond half) and k (once).
Tensors keep the model's compute dtype (fp16/bf16 on GPUs: half precision, lossless w.r.t. what was computed).
A clip of F frames (photoswap_core/frames.py) is one trace: every per-frame tensor has a leading frame dimension F
(the source prompt's cross keys, the same for every frame, are stored once).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch


class TensorKind(str, Enum):
    """What a recorded source tensor is."""
    SELF_OUT = "out"  # a self-attention layer's output, one CFG half (self-output swap)
    SELF_Q = "q"  # a self-attention layer's queries, cond half (self-map swap)
    SELF_K = "k"  # … and keys
    CROSS_Q = "cq"  # a cross-attention layer's queries, cond half (cross-map swap)
    CROSS_K = "ck"  # … and keys: the source prompt's, the same at every step (stored once; joint attention: per step)
    CROSS_LSE = "cl"  # joint attention: each image query row's log-sum-exp over all keys (cond half)


class TraceKey(NamedTuple):
    """The key of one recorded tensor: its kind, step (None for step-independent kinds), layer and CFG half."""
    kind: TensorKind
    step: int | None
    layer: tuple
    half: int | None = None

    @classmethod
    def self_out(cls, step, layer, half):
        return cls(TensorKind.SELF_OUT, step, layer, half)

    @classmethod
    def self_q(cls, step, layer):
        return cls(TensorKind.SELF_Q, step, layer)

    @classmethod
    def self_k(cls, step, layer):
        return cls(TensorKind.SELF_K, step, layer)

    @classmethod
    def cross_q(cls, step, layer):
        return cls(TensorKind.CROSS_Q, step, layer)

    @classmethod
    def cross_k(cls, layer):
        return cls(TensorKind.CROSS_K, None, layer)

    @classmethod
    def joint_text_k(cls, step, layer):
        """Joint attention: the text keys change with the step (the text stream is updated by every block)."""
        return cls(TensorKind.CROSS_K, step, layer)

    @classmethod
    def cross_lse(cls, step, layer):
        return cls(TensorKind.CROSS_LSE, step, layer)


class AttentionStore:
    """Recorded source attention tensors, on the compute device or offloaded to CPU (pinned on CUDA).

    An offloaded store is read on a CUDA device through `stage`: the next step's tensors are copied on a side stream
    while the current step computes (prefetch), and `get` hands them over without a copy on the compute stream.
    """

    def __init__(self, location: torch.device):
        self.location = location
        self.tensors: dict = {}
        self.nbytes = 0
        self._staged: dict = {}  # key -> (tensor on the compute device, event of its copy)
        self._copy_stream = None

    def put(self, key, tensor: torch.Tensor) -> None:
        stored = tensor.detach()
        if stored.device != self.location:
            if self.host_store_for(stored.device):
                # into pinned memory without blocking the host (a blocking copy here would synchronise at every
                # layer call); stream-ordered before any later use on the device, `wait_for_copies` before host use
                pinned = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=True)
                stored = pinned.copy_(stored, non_blocking=True)
            else:
                stored = stored.to(self.location)
        elif stored.untyped_storage().nbytes() > stored.numel() * stored.element_size():
            stored = stored.clone()  # a view (one CFG half, one row): don't keep the whole batch tensor alive
        old = self.tensors.get(key)
        if old is not None:
            self.nbytes -= old.numel() * old.element_size()
        self.tensors[key] = stored
        self.nbytes += stored.numel() * stored.element_size()

    def get(self, key, device) -> torch.Tensor:
        staged = self._staged.get(key)
        if staged is not None:
            tensor, event = staged
            stream = torch.cuda.current_stream(device)
            stream.wait_event(event)  # device-side wait for the side stream's copy; the host does not block
            tensor.record_stream(stream)  # the allocator must not reuse it before the compute stream is done
            if key.step is not None:
                del self._staged[key]
            return tensor
        try:
            tensor = self.tensors[key]
        except KeyError:
            raise KeyError(f"the trace holds no recorded tensor for {key}") from None
        return tensor.to(device, non_blocking=True) if tensor.device != device else tensor

    def host_store_for(self, device: torch.device) -> bool:
        """A store in (pinned) host memory serving a CUDA device: written with non-blocking copies (`put`, then
        `wait_for_copies`), read through `stage`."""
        return self.location.type == "cpu" and device.type == "cuda"

    def stage(self, keys, device: torch.device) -> None:
        """Start copying `keys` to `device` on a side stream (an offloaded store read on CUDA; elsewhere nothing to
        do), dropping staged tensors of earlier steps that were not read (windows narrower than the recording)."""
        if not self.host_store_for(device):
            return
        steps = [key.step for key in keys if key.step is not None]
        if steps:
            first = min(steps)
            for key in [k for k in self._staged if k.step is not None and k.step < first]:
                del self._staged[key]
        keys = [key for key in keys if key not in self._staged and key in self.tensors]
        if not keys:
            return
        if self._copy_stream is None or self._copy_stream.device != device:
            self._copy_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._copy_stream):
            copies = [(key, self.tensors[key].to(device, non_blocking=True)) for key in keys]
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        for key, tensor in copies:
            self._staged[key] = (tensor, event)

    def release_staged(self) -> None:
        """Free what `stage` put on the device (at the end of a swap: the store may stay cached between runs)."""
        self._staged.clear()

    def wait_for_copies(self, device: torch.device) -> None:
        """Block until the non-blocking device-to-host copies of `put` have landed (once, after a recording)."""
        if self.host_store_for(device):
            torch.cuda.synchronize(device)

    def has(self, key) -> bool:
        return key in self.tensors

    def select_frames(self, index: slice | list) -> "AttentionStore":
        """The store of some frames of a clip (outside the hot path: one indexing per tensor)."""
        out = AttentionStore(self.location)
        for key, tensor in self.tensors.items():
            out.put(key, tensor if key.kind is TensorKind.CROSS_K else tensor[index])
        return out

    @staticmethod
    def concat(stores: list) -> "AttentionStore":
        """The store of a clip from those of consecutive chunks of its frames."""
        out = AttentionStore(stores[0].location)
        for key, tensor in stores[0].tensors.items():
            out.put(key, tensor if key.kind is TensorKind.CROSS_K else torch.cat([s.tensors[key] for s in stores]))
        return out

    def move_to(self, location: torch.device) -> None:
        pin = location.type == "cpu" and torch.cuda.is_available()
        for key, tensor in self.tensors.items():
            moved = tensor.to(location)
            self.tensors[key] = moved.pin_memory() if pin and moved.device.type == "cpu" else moved
        self.location = location


@dataclass
class SourceTrace:
    schedule: object  # arch.Schedule
    arch: object  # arch.Architecture of the model it was recorded with
    latent_shape: tuple  # (F, 4, h, w): F frames (1 for an image)
    trajectory: list  # N+1 model-space latents [F, …] (CPU float32): index i enters step i; N = reconstruction
    null_embeddings: torch.Tensor  # [N, 1 or F, 77, C] float32 CPU (1: shared by every frame)
    source_conditioning: list  # CONDITIONING of the source prompt
    negative_conditioning: list  # CONDITIONING whose pooled output/ADM the uncond rows use
    cfg: float
    method: str  # inversion method, or "synthetic"
    record_fraction: float
    weights_fingerprint: str
    blend_maps: list = field(default_factory=list)  # per step: [tokens_b, 77] float32 source cond cross maps
    # (a clip: [F, tokens_b, 77])
    blend_grid: tuple | None = None  # (h_b, w_b) of the LocalBlend level
    store: AttentionStore | None = None
    source_steps_k: list | None = None  # per step: the source's own step result (sampler space); None: computed live
    self_maps_recorded: bool = False
    dropped_reason: str | None = None

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def has_attention(self) -> bool:
        return self.store is not None

    @property
    def frames(self) -> int:
        return int(self.latent_shape[0])

    def select_frames(self, frames: tuple) -> "SourceTrace":
        """The trace of some frames of this clip (itself when all)."""
        if tuple(frames) == tuple(range(self.frames)):
            return self
        index = slice(frames[0], frames[-1] + 1) if list(frames) == list(range(frames[0], frames[-1] + 1)) \
            else list(frames)
        nulls = self.null_embeddings if self.null_embeddings.shape[1] == 1 else self.null_embeddings[:, index]
        return dataclasses.replace(
            self, latent_shape=(len(frames), *self.latent_shape[1:]), trajectory=[t[index] for t in self.trajectory],
            null_embeddings=nulls, blend_maps=[self._frame_maps(m)[index] if m is not None else None
                                               for m in self.blend_maps],
            store=self.store.select_frames(index) if self.store is not None else None,
            source_steps_k=[s[index] for s in self.source_steps_k] if self.source_steps_k is not None else None)

    def _frame_maps(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(self.frames, *m.shape[-2:])

    @staticmethod
    def concat(traces: list) -> "SourceTrace":
        """The trace of a clip from those of consecutive chunks of its frames (recorded separately)."""
        if len(traces) == 1:
            return traces[0]
        first = traces[0]
        nulls = [t.null_embeddings for t in traces]
        shared = all(n.shape[1] == 1 and torch.equal(n, nulls[0]) for n in nulls)
        stores = [t.store for t in traces]
        kept = all(s is not None for s in stores)

        def cat(lists):
            return None if any(x is None for x in lists) else [
                None if any(m is None for m in ms) else torch.cat(ms) for ms in zip(*lists)]

        return dataclasses.replace(
            first, latent_shape=(sum(t.frames for t in traces), *first.latent_shape[1:]),
            trajectory=cat([t.trajectory for t in traces]),
            null_embeddings=nulls[0] if shared else torch.cat(nulls, dim=1),
            blend_maps=cat([[t._frame_maps(m) if m is not None else None for m in t.blend_maps] for t in traces]),
            store=AttentionStore.concat(stores) if kept else None,
            record_fraction=first.record_fraction if kept else 0.0,
            self_maps_recorded=first.self_maps_recorded and kept,
            dropped_reason=next((t.dropped_reason for t in traces if t.dropped_reason), None),
            source_steps_k=cat([t.source_steps_k for t in traces]))

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.trajectory)
        total += self.null_embeddings.numel() * self.null_embeddings.element_size()
        total += sum(t.numel() * t.element_size() for t in self.blend_maps)
        if self.store is not None:
            total += self.store.nbytes
        return total

    def __deepcopy__(self, memo):  # immutable once built; never duplicated by ComfyUI's graph machinery
        return self
