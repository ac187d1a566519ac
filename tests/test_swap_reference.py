"""Our swap vs an independent re-implementation of the official loop, where the shared model is not chaotic.

The shared 50-step CFG-7.5 cases cannot be matched to 1e-3 by anyone: the official arithmetic itself, re-run here
with 1 vs 2 threads, lands 13 % / 15 % away from the official latents (devtools/parity_floor.py, docs/swap.md). At
10 steps the same model is tame (a 1e-6 change of z_T moves the result ~7e-5), so there a bound tighter than the
issue's 1e-3 is a real test of the semantics: devtools/official_reference.py runs diffusers' own UNet with the
official four-row batch, explicit maps, in-place edits, attention store and LocalBlend, sharing no code with the
pack; our Recorder and Swap Sampler nodes run ComfyUI's UNet with the fused forms. Both at 512 px (the reference's
layer rules are literal there), from the shared synthetic start latent, with the shared prompt pair, mapper and blend
words.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

STEPS = 10
# Relative L2, ten times tighter than the 1e-3: moving one window edge by one step moves the swapped latent
# by 1.5e-3 (output 0.8 -> 0.7) to 4e-3 (cross 0.6 -> 0.5), measured by devtools/reference_sensitivity.py, so this
# bound pins every window edge; we measure ~1.9e-6 (source) and ~2.0e-6 (swapped).
TOLERANCE = 1e-4

# (self_output, self_map, cross_map, local_blend): the notebook's defaults; a self-map window after a short output
# window; a long cross window with blending off
SETTINGS = [(0.8, 0.0, 0.6, True), (0.3, 0.4, 0.5, True), (0.5, 0.3, 0.9, False)]


@pytest.fixture(scope="module")
def shared(parity_dir):
    from diffusers import UNet2DConditionModel

    from devtools.parity_model import load_parity_model

    return {
        "comfy": load_parity_model(parity_dir / "tiny_sd"),
        "diffusers_unet": UNet2DConditionModel.from_pretrained(parity_dir / "tiny_sd" / "unet").eval(),
        "text": load_file(parity_dir / "text.safetensors"),
        "x_t": load_file(parity_dir / "swap_synthetic_c0.6_so0.8_sm0.0.safetensors")["x_t"],
        "manifest": json.loads((parity_dir / "manifest.json").read_text()),
    }


def _rel(a, b):
    return float((a - b).norm() / b.norm()), float((a - b).abs().max())


@pytest.mark.parametrize("self_output,self_map,cross_map,local_blend", SETTINGS)
def test_swap_matches_official_reference(shared, pack, self_output, self_map, cross_map, local_blend):
    from comfyui_photoswap.nodes.swap_nodes import PhotoswapAttentionSwapSampler
    from comfyui_photoswap.photoswap_core.prompts import build_prompt_pair
    from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule
    from comfyui_photoswap.photoswap_core.recorder import record_trace
    from devtools.official_reference import SwapSettings, official_swap

    text, manifest, models = shared["text"], shared["manifest"], shared["comfy"]
    source_prompt, target_prompt = manifest["prompts"]
    prompts = build_prompt_pair(models.clip, source_prompt, manifest["source_subject_word"], "sks man",
                                target_prompt=target_prompt)
    nulls = text["null_embedding"].unsqueeze(0).expand(STEPS, 1, 77, 32).clone()
    words = manifest["localblend_word_inds"]
    settings = SwapSettings(STEPS, self_output, self_map, cross_map, local_blend=local_blend,
                            fuse_unedited=True)  # SDPA where the official maps are never edited nor stored
    reference = official_swap(shared["diffusers_unet"], shared["x_t"], text["text_embeddings"][0:1],
                              text["text_embeddings"][1:2], nulls, text["mapper"][0], text["alphas"][0],
                              (words["source"], words["target"]), settings)

    src = [[text["text_embeddings"][0:1], {}]]
    tgt = [[text["text_embeddings"][1:2], {}]]
    neg = [[text["null_embedding"], {}]]
    with torch.inference_mode():
        schedule = ddim_schedule(models.model.get_model_object("model_sampling"), STEPS)
        trace = record_trace(models.model, src, neg, schedule, 7.5, start_latent_vp=shared["x_t"],
                             null_embeddings=nulls, method="synthetic", fraction=1.0)
        swapped, source, _, _ = PhotoswapAttentionSwapSampler.execute(
            models.model, trace, tgt, neg, prompts, self_output=self_output, self_map=self_map, cross_map=cross_map,
            local_blend=local_blend, blend_threshold=0.3, blend_start=0.2, cfg=7.5).result
    scale = 0.18215
    src_rel, src_max = _rel(source["samples"] * scale, reference[0:1])
    tgt_rel, tgt_max = _rel(swapped["samples"] * scale, reference[1:2])
    # how far the swap moved the target from the source: the agreement must be far tighter than the edit itself
    edit, _ = _rel(reference[1:2], reference[0:1])
    print(f"windows out {self_output} map {self_map} cross {cross_map} blend {local_blend}: source rel L2 "
          f"{src_rel:.2e} (max abs {src_max:.2e}), swapped rel L2 {tgt_rel:.2e} (max abs {tgt_max:.2e}); "
          f"swapped vs source {edit:.2e}")
    assert src_rel <= TOLERANCE
    assert tgt_rel <= TOLERANCE
    assert edit > 100 * TOLERANCE
