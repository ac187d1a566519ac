"""An independent re-implementation of the official Photoswap swap loop (DESIGN.md §2) on diffusers' own UNet.

It shares no code with the pack and computes the way the official code does: the four-row batch
[uncond-source, uncond-target, cond-source, cond-target] in one UNet call, explicit softmax attention maps, q/k/v
copied source → target for the self-output window, maps edited in place (cond half only), an attention store of the
edited maps, LocalBlend as a step callback on the latents, and diffusers' DDIMScheduler for the step. Use it as a
second opinion where the shared model is not chaotic (tests/test_swap_reference.py, 10 steps) and to show how close
the official arithmetic itself comes to the official latents (devtools/parity_floor.py).

Literal official rules, valid at 512 px only (which is all it accepts): self-map replacement and the store cover
layers with ≤ 32² query tokens; LocalBlend reads the store's down_cross[2:4] + up_cross[:3] (the 16×16 layers).
Step windows follow DESIGN.md §2 for N steps (the official code hard-codes 50 in the output window; at N = 50 the
two agree); like the official code, self_output = 0 still swaps step 0 (the pack treats 0 as off, docs/swap.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

STORE_MAX_TOKENS = 32 ** 2  # the official code stores and self-map-replaces only maps with <= 32^2 query tokens


@dataclass
class SwapSettings:
    steps: int
    self_output: float
    self_map: float
    cross_map: float
    cfg: float = 7.5
    local_blend: bool = True
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    # True: self-attention layers whose maps are neither edited nor stored (> 32^2 tokens) use SDPA, the same math
    # without the 4096^2 maps (faster, for tests); False: explicit maps everywhere, as the official code computes
    fuse_unedited: bool = False


@dataclass
class _State:
    """Per-run controller state: the current step and the per-place store of summed, edited cond cross maps."""

    settings: SwapSettings
    mapper: torch.Tensor  # (77,) source column feeding each target column
    alphas: torch.Tensor  # (77,) 1 = take the mapped source column, 0 = keep the target's own
    step: int = 0
    step_maps: dict = field(default_factory=dict)
    store: dict = field(default_factory=dict)

    def output_window(self) -> bool:
        return self.step <= int(self.settings.self_output * self.settings.steps)

    def map_window(self) -> bool:
        return self.step < int((self.settings.self_output + self.settings.self_map) * self.settings.steps)

    def cross_window(self) -> bool:
        return self.step < int(self.settings.cross_map * (self.settings.steps + 1))


class _OfficialAttention:
    """Attention processor for one layer with the official semantics (explicit maps, in-place edits)."""

    def __init__(self, state: _State, place: str):
        self.state, self.place = state, place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        st = self.state
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if not is_cross and st.output_window():
            for t in (q, k, v):  # target rows take the source rows' q, k, v in both halves
                t[1], t[3] = t[0], t[2]
        rows, tokens, _ = q.shape
        h = attn.heads

        def heads(t):
            return t.reshape(rows, t.shape[1], h, -1).permute(0, 2, 1, 3).reshape(rows * h, t.shape[1], -1)

        q, k, v = heads(q), heads(k), heads(v)
        if not is_cross and tokens > STORE_MAX_TOKENS and st.settings.fuse_unedited:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
            return self._project(attn, out, rows, h, tokens)
        maps = (torch.einsum("bid,bjd->bij", q, k) * attn.scale).softmax(dim=-1)
        cond = maps[rows * h // 2:].view(2, h, tokens, -1)  # a view: edits below land in `maps`
        if is_cross and st.cross_window():
            mixed = cond[0][..., st.mapper] * st.alphas + cond[1] * (1 - st.alphas)
            cond[1] = mixed
        elif not is_cross and st.map_window() and tokens <= STORE_MAX_TOKENS:
            cond[1] = cond[0]
        if is_cross and tokens <= STORE_MAX_TOKENS:
            st.step_maps.setdefault(self.place, []).append(cond.reshape(2 * h, tokens, -1).clone())
        return self._project(attn, torch.einsum("bij,bjd->bid", maps, v), rows, h, tokens)

    @staticmethod
    def _project(attn, out, rows, h, tokens):
        out = out.reshape(rows, h, tokens, -1).permute(0, 2, 1, 3).reshape(rows, tokens, -1)
        return attn.to_out[1](attn.to_out[0](out))


def _accumulate(state: _State) -> None:
    for place, maps in state.step_maps.items():
        if place not in state.store:
            state.store[place] = maps
        else:
            state.store[place] = [a + b for a, b in zip(state.store[place], maps)]
    state.step_maps = {}


def _local_blend(latents: torch.Tensor, state: _State, word_columns: tuple[list[int], list[int]]) -> torch.Tensor:
    maps = state.store["down"][2:4] + state.store["up"][:3]
    maps = torch.cat([m.reshape(2, -1, 1, 16, 16, m.shape[-1]) for m in maps], dim=1)
    select = torch.zeros(2, 1, 1, 1, 1, maps.shape[-1])
    for row, cols in enumerate(word_columns):
        select[row, ..., cols] = 1
    heat = (maps * select).sum(-1).mean(1)
    heat = F.max_pool2d(heat, (3, 3), (1, 1), padding=(1, 1))
    heat = F.interpolate(heat, size=latents.shape[2:])
    heat = heat / heat.amax(dim=(2, 3), keepdim=True)
    mask = heat.gt(state.settings.blend_threshold)
    mask = (mask[:1] + mask).float()
    return latents[:1] + mask * (latents - latents[:1])


def official_swap(unet, x_t: torch.Tensor, source_cond: torch.Tensor, target_cond: torch.Tensor,
                  null_embeddings: torch.Tensor, mapper, alphas, blend_columns: tuple[list[int], list[int]],
                  settings: SwapSettings) -> torch.Tensor:
    """The official swap loop: returns the final latents (2, 4, H, W), row 0 = source, row 1 = swapped target.

    `null_embeddings` is (N, 1, 77, D), entry i used at step i; `x_t` (1, 4, 64, 64) in the official latent scale.
    """
    from diffusers import DDIMScheduler

    if tuple(x_t.shape[-2:]) != (64, 64):
        raise ValueError("the official reference rules are literal for 512 px (64x64 latents)")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(settings.steps)
    state = _State(settings, torch.as_tensor(mapper), torch.as_tensor(alphas, dtype=torch.float32))
    previous = unet.attn_processors
    unet.set_attn_processor({name: _OfficialAttention(state, name.split("_")[0]) for name in previous})
    try:
        latents = x_t.expand(2, *x_t.shape[1:])
        text = torch.cat([source_cond, target_cond])
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                state.step = i
                context = torch.cat([null_embeddings[i].expand(*text.shape), text])
                eps = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + settings.cfg * (eps_text - eps_uncond)
                latents = scheduler.step(eps, t, latents).prev_sample
                _accumulate(state)
                if settings.local_blend and i >= int(settings.blend_start * settings.steps):
                    latents = _local_blend(latents, state, blend_columns)
        return latents
    finally:
        unet.set_attn_processor(previous)
