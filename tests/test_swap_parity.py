"""Parity with the official Photoswap code (eric-ai-lab/photoswap @570ca0de) on the shared tiny model.

Cases from ../shared/parity (see its README): the real-image swap and the synthetic swap at the notebook's settings
(cross 0.6, self-output 0.8, self-map 0.0, LocalBlend on, 50 steps, CFG 7.5, 512 px), started from the shared z_T and
null embeddings, through our Recorder and Swap Sampler nodes; and the LocalBlend mask step on its own.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def parity(parity_dir):
    from devtools.parity_model import load_parity_model

    return {
        "model": load_parity_model(parity_dir / "tiny_sd"),
        "text": load_file(parity_dir / "text.safetensors"),
        "inversion": load_file(parity_dir / "inversion.safetensors"),
        "manifest": json.loads((parity_dir / "manifest.json").read_text()),
        "dir": parity_dir,
    }


def _rel(a, b):
    return float((a - b).norm() / b.norm()), float((a - b).abs().max())


# The shared random model is chaotic under CFG 7.5: perturbing z_T by 1e-6 moves its 50-step result by ~1.2 %
# (measured at 16×16 latents). ComfyUI's UNet differs from diffusers' by ~1.5e-6, so end-to-end agreement is bounded
# by that floor (measured: source 13 %, swapped 3.6 % relative L2 at 64×64). The 1e-3 target is NOT met by
# this test; the exact parts of the algorithm are pinned elsewhere (mapper, LocalBlend step, inversion, window rules),
# and the whole swap is checked to 1e-4 against a re-implementation of the official loop at 10 steps, where the model
# is not chaotic (tests/test_swap_reference.py). The official arithmetic itself lands 13-15 % away from these latents
# depending on the CPU thread count (devtools/parity_floor.py --official-threads 1,2).
CHAOS_BOUND = 0.25


@pytest.mark.slow
@pytest.mark.parametrize("case", ["swap_real_c0.6_so0.8_sm0.0", "swap_synthetic_c0.6_so0.8_sm0.0"])
def test_swap_matches_official(parity, case, pack):
    from comfyui_photoswap.nodes.swap_nodes import PhotoswapAttentionRecorder, PhotoswapAttentionSwapSampler
    from comfyui_photoswap.photoswap_core.prompts import build_prompt_pair

    ms = parity["model"]
    text, manifest = parity["text"], parity["manifest"]
    expected = load_file(parity["dir"] / f"{case}.safetensors")
    setting = manifest["runs"][case]["setting"]
    source_prompt, target_prompt = manifest["prompts"]
    prompts = build_prompt_pair(ms.clip, source_prompt, manifest["source_subject_word"], "sks man",
                                target_prompt=target_prompt)
    assert list(prompts.mapper) == text["mapper"][0].tolist()
    scale = 0.18215
    src = [[text["text_embeddings"][0:1], {}]]
    tgt = [[text["text_embeddings"][1:2], {}]]
    neg = [[text["null_embedding"], {}]]
    x_t = expected["x_t"]
    if "real" in case:
        nulls = parity["inversion"]["uncond_embeddings"]  # (50, 1, 77, 32): the official optimised embeddings
    else:
        nulls = text["null_embedding"].unsqueeze(0).expand(50, 1, 77, 32).clone()
    from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule
    from comfyui_photoswap.photoswap_core.recorder import record_trace

    with torch.inference_mode():
        schedule = ddim_schedule(ms.model.get_model_object("model_sampling"), manifest["num_ddim_steps"])
        # the official source row is a plain CFG pass from z_T with the given null embeddings: record it as such
        trace = record_trace(ms.model, src, neg, schedule, manifest["guidance_scale"], start_latent_vp=x_t,
                             null_embeddings=nulls, method="null_text" if "real" in case else "synthetic",
                             fraction=max(setting["cross_map_replace_steps"], setting["self_output_replace_steps"]))
        swapped, source, mask, _pair_masks = PhotoswapAttentionSwapSampler.execute(
            ms.model, trace, tgt, neg, prompts, self_output=setting["self_output_replace_steps"],
            self_map=setting["self_map_replace_steps"], cross_map=setting["cross_map_replace_steps"],
            local_blend=True, blend_threshold=0.3, blend_start=0.2, cfg=manifest["guidance_scale"]).result
    ref = expected["latents_final"]
    src_rel, src_max = _rel(source["samples"] * scale, ref[0:1])
    tgt_rel, tgt_max = _rel(swapped["samples"] * scale, ref[1:2])
    print(f"{case}: source rel L2 {src_rel:.2e} (max abs {src_max:.2e}); swapped rel L2 {tgt_rel:.2e} "
          f"(max abs {tgt_max:.2e})")
    assert src_rel <= CHAOS_BOUND
    assert tgt_rel <= CHAOS_BOUND
    # the final LocalBlend mask equals the official one (it is all-true on this random model; see README)
    official_mask = expected["localblend_masks_uint8"][-1, 1, 0].bool()
    ours = mask[0, ::8, ::8].bool()
    assert torch.equal(ours, official_mask)


def test_localblend_step_matches_official(parity, pack):
    from comfyui_photoswap.photoswap_core.blend import apply_blend, blend_mask

    unit = load_file(parity["dir"] / "localblend_unit.safetensors")
    words = parity["manifest"]["localblend_word_inds"]
    layers = ["down_cross_2", "down_cross_3", "up_cross_0", "up_cross_1", "up_cross_2"]
    per_row = unit[layers[0]].shape[0] // 2
    src = torch.stack([unit[k][:per_row][..., words["source"]].sum(-1) for k in layers]).mean((0, 1))
    tgt = torch.stack([unit[k][per_row:][..., words["target"]].sum(-1) for k in layers]).mean((0, 1))
    mask = blend_mask(src.reshape(1, 16, 16), tgt.reshape(1, 16, 16), (64, 64), 0.3)  # one frame
    assert torch.equal(mask[0, 0], unit["mask"][1, 0].bool())
    x = unit["x_t"]
    out = apply_blend(x[0:1], x[1:2], mask)
    assert torch.equal(out, unit["x_t_out"][1:2])
    assert torch.equal(x[0:1], unit["x_t_out"][0:1])
