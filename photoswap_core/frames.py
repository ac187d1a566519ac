"""The frame axis: a LATENT batch of F frames is one clip (docs/swap.md "Clips").

One rule for every stage: frame f is an independent image for the inversion, the source pass and the trace (each
its own trajectory and null embeddings; tensors carry a leading frame dimension); only the target pass couples
frames, through `frame_attention` (the target rows' self-attention also attends to the keys/values of anchor
frames). Frames are processed in chunks of `frames_per_batch`; a chunk of the target pass runs together with the
anchor frames it needs (its closure), recomputed, so the result does not depend on the chunk size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .errors import PhotoswapInputError

FRAME_ATTENTION = ("off", "first", "first+previous", "keyframes")  # the Swap Sampler's choice list
DEFAULT_FRAME_ATTENTION = "first"
DEFAULT_KEYFRAME_INTERVAL = 4


@dataclass(frozen=True)
class FrameOptions:
    """PHOTOSWAP_FRAME_OPTIONS (the Frame Options node): how a clip is swapped. Without one, the defaults."""
    frame_attention: str = DEFAULT_FRAME_ATTENTION
    keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL
    frames_per_batch: int = 0  # 0 = as many frames per model call as fit in memory

    def check(self) -> "FrameOptions":
        check_mode(self.frame_attention, self.keyframe_interval)
        if self.frames_per_batch < 0:
            raise PhotoswapInputError("frames_per_batch", f"0 (auto) or a frame count (got {self.frames_per_batch})",
                                      "use 0")
        return self


def check_mode(mode: str, interval: int) -> None:
    if mode not in FRAME_ATTENTION:
        raise PhotoswapInputError("frame_attention", f"one of {', '.join(FRAME_ATTENTION)} (got {mode!r})",
                                  "pick a listed choice")
    if mode == "keyframes" and interval < 1:
        raise PhotoswapInputError("keyframe_interval", f"an interval of at least 1 frame (got {interval})",
                                  "use 4 (every 4th frame is a keyframe)")


def anchors(frame: int, mode: str, interval: int = DEFAULT_KEYFRAME_INTERVAL) -> tuple:
    """The frames whose target keys/values frame `frame` also attends to (never itself).

    first: every frame → frame 0. first+previous: → frame 0 and frame f−1. keyframes: keyframes are 0, k, 2k, …;
    a keyframe → frame 0, any other frame → its last keyframe."""
    if mode == "off" or frame == 0:
        return ()
    if mode == "first":
        return (0,)
    if mode == "first+previous":
        return (0,) if frame == 1 else (0, frame - 1)
    key = frame - frame % interval
    return (0,) if key == frame else (key,)


def closure(frames, mode: str, interval: int = DEFAULT_KEYFRAME_INTERVAL) -> tuple:
    """`frames` plus every frame they depend on through anchors (transitively), sorted."""
    todo, seen = list(frames), set(frames)
    while todo:
        for a in anchors(todo.pop(), mode, interval):
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return tuple(sorted(seen))


class Chunk(NamedTuple):
    frames: tuple  # the clip frames this batch runs (its output frames and their anchors)
    outputs: tuple  # positions in `frames` of the chunk's output frames


def chunks(count: int, per_batch: int, mode: str = "off", interval: int = DEFAULT_KEYFRAME_INTERVAL) -> list:
    """Split a clip of `count` frames into batches of `per_batch` output frames, each with its closure. A closure
    that outgrows the batch (first+previous chains every frame to all before it) is refused."""
    per_batch = count if per_batch <= 0 else min(per_batch, count)
    out = []
    for start in range(0, count, per_batch):
        wanted = tuple(range(start, min(count, start + per_batch)))
        frames = closure(wanted, mode, interval)
        if mode == "first+previous" and len(frames) > per_batch:
            raise PhotoswapInputError(
                "frames_per_batch", f"all {count} frames in one batch with frame_attention 'first+previous' (it "
                                    f"chains every frame to the one before, so a batch of {per_batch} cannot be "
                                    "computed on its own)",
                "set frames_per_batch to 0 or to the frame count, or use frame_attention 'first' or 'keyframes' "
                "(those chunk to any size)")
        out.append(Chunk(frames, tuple(frames.index(f) for f in wanted)))
    return out


def auto_frames_per_batch(model, latent_shape, rows_per_frame: int = 2) -> int:
    """How many frames fit one model call (`rows_per_frame` rows each: both CFG halves) in 80% of the free memory,
    by ComfyUI's own estimate of the model's activation memory."""
    import comfy.model_management as mm

    per_frame = model.model.memory_required([rows_per_frame, *latent_shape[1:]])
    free = mm.get_free_memory(model.load_device)
    return max(1, int(free * 0.8 // max(1, per_frame)))


def plan(model, count: int, latent_shape, per_batch: int, mode: str = "off", interval: int = 4,
         rows_per_frame: int = 2) -> list:
    """The chunks of a stage: `per_batch` frames per batch, 0 = as many as fit (all when the clip fits)."""
    if per_batch < 0:
        raise PhotoswapInputError("frames_per_batch", f"0 (auto) or a frame count (got {per_batch})", "use 0")
    if per_batch == 0 and count > 1:
        per_batch = min(count, auto_frames_per_batch(model, latent_shape, rows_per_frame))
        if mode == "first+previous" and per_batch < count:
            raise PhotoswapInputError(
                "frame_attention", f"a clip that fits one batch with 'first+previous' (about {per_batch} of its "
                                   f"{count} frames fit in memory at this size, and the chain cannot be split)",
                "use frame_attention 'first' or 'keyframes' (they run in batches of any size), or fewer frames or "
                "a smaller size")
    return chunks(count, per_batch, mode, interval)

