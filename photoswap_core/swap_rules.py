"""When and where each swap acts: the one place for the step windows and the layer rules (DESIGN.md §2).

Step i of N (0-based); fractions out = self-output, map = self-map, cross = cross-map:
- self-attention output: i ≤ int(out·N), inclusive, every self-attention layer, both CFG halves. (out = 0 disables it:
  the reference would still swap step 0; we treat 0 as "off" so that zero windows mean plain sampling.)
- self-attention map: i < int((out + map)·N) (the windows add), cond half only, the self-map layers.
- cross-attention map: i < int(cross·(N+1)) (the reference sizes its table N+1), every cross layer, cond half only.
- LocalBlend after step i when i ≥ int(start·N), from the cross maps of the blend layers.

Which layers are "self-map layers" and "blend layers" is a fact of the model family: the architecture adapter
(`arch`) answers it by level (level 0 = full latent resolution, each downsampling adds 1).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import PhotoswapInputError


@dataclass(frozen=True)
class SiteSets:
    """Which attention sites carry each swap, for families whose sites are chosen by block (Flux: ("double", i) /
    ("single", i) layer keys); None = the family's documented default for that role. The SD family ignores it."""
    self_output: tuple | None = None
    self_map: tuple | None = None
    cross_map: tuple | None = None
    blend: tuple | None = None


@dataclass(frozen=True)
class SwapWindows:
    self_output: float = 0.8
    self_map: float = 0.0
    cross_map: float = 0.6
    local_blend: bool = True
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    sites: SiteSets | None = None

    def validate(self, recorded_fraction: float | None = None) -> None:
        for name in ("self_output", "self_map", "cross_map", "blend_threshold", "blend_start"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0 or value != value:
                raise PhotoswapInputError(name, f"a fraction in [0, 1] (got {value})", "set it between 0 and 1")
        if self.self_output + self.self_map > 1.0 + 1e-9:
            raise PhotoswapInputError(
                "self_map", f"self_output + self_map ≤ 1 (got {self.self_output} + {self.self_map})",
                "the self-map window starts where the self-output window ends; lower one of them")
        if recorded_fraction is not None:
            needed = max(self.self_output + self.self_map, self.cross_map)
            if needed > recorded_fraction + 1e-9:
                raise PhotoswapInputError(
                    "trace", f"swap windows within the recorded fraction {recorded_fraction:g} of the steps "
                             f"(the windows need {needed:g})",
                    f"raise record_fraction on the Photoswap Attention Recorder to at least {needed:g}, or shrink "
                    "the windows")


def output_swap_active(step: int, steps: int, windows: SwapWindows) -> bool:
    return windows.self_output > 0.0 and step <= int(windows.self_output * steps)


def map_swap_active(step: int, steps: int, windows: SwapWindows) -> bool:
    return step < int((windows.self_output + windows.self_map) * steps)


def cross_swap_active(step: int, steps: int, windows: SwapWindows) -> bool:
    return step < int(windows.cross_map * (steps + 1))


def blend_active(step: int, steps: int, windows: SwapWindows) -> bool:
    return windows.local_blend and step >= int(windows.blend_start * steps)


def recorded_windows(fraction: float) -> SwapWindows:
    """The widest windows a trace recorded up to `fraction` serves (what the recorder must store)."""
    return SwapWindows(self_output=fraction, self_map=0.0, cross_map=fraction, local_blend=True)
