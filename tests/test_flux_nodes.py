"""The existing nodes with a Flux MODEL/CLIP/VAE (issue #17), in-process on the tiny Flux: Prompt Pair → Inversion
(direct, cfg 1) → Attention Recorder → Swap Sampler, through ComfyUI's node executor. Validation lives in the core."""
from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = pytest.mark.integration

SRC, SUBJECT, CONCEPT = "a photo of a cat on a sofa", "cat", "sks dog"


@pytest.fixture(scope="module")
def tf(comfy):
    from devtools.tiny_flux import build_tiny_flux

    return build_tiny_flux(seed=0)


def run_node(node, **kwargs):
    from comfy_api.internal import make_locked_method_func

    run = make_locked_method_func(node, "EXECUTE_NORMALIZED", node.PREPARE_CLASS_CLONE({}))
    with torch.inference_mode():
        return run(**kwargs).result


def _node(pack, module, name):
    return getattr(importlib.import_module(f"{pack.__name__}.nodes.{module}"), name)


def test_flux_graph_through_the_nodes(pack, tf):
    prompt_pair = _node(pack, "prompt_nodes", "PhotoswapPromptPair")
    inversion = _node(pack, "inversion_nodes", "PhotoswapNullTextInversion")
    recorder = _node(pack, "swap_nodes", "PhotoswapAttentionRecorder")
    sampler = _node(pack, "swap_nodes", "PhotoswapAttentionSwapSampler")
    src, tgt, neg, prompts = run_node(prompt_pair, clip=tf.clip, source_prompt=SRC, subject_word=SUBJECT,
                                      concept_words=CONCEPT)
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        latent = {"samples": tf.vae.encode(image)}
    assert latent["samples"].shape == (1, 16, 8, 12)
    result, z_t, sigmas, recon = run_node(inversion, model=tf.model, latent=latent, source_positive=src,
                                          negative=neg, steps=4, cfg=1.0, method="direct", vae=tf.vae)[:4]
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0 and recon.shape == (1, 64, 96, 3)
    trace, source = run_node(recorder, model=tf.model, source_positive=src, negative=neg, inversion=result,
                             record_self_maps=True)
    assert float((source["samples"] - latent["samples"]).abs().max()) <= 1e-5  # the photo, reconstructed
    swapped, source2, mask, pair_masks = run_node(sampler, model=tf.model, trace=trace, target_positive=tgt,
                                                  negative=neg, prompts=prompts, cfg=1.0)
    assert torch.equal(source2["samples"], source["samples"])
    assert swapped["samples"].shape == source["samples"].shape
    assert float((swapped["samples"] - source["samples"]).abs().max()) > 1e-3
    assert mask.shape == (1, 64, 96) and pair_masks.shape == (1, 64, 96)
    preview = _node(pack, "preview_nodes", "PhotoswapAttentionPreview")
    (images,) = run_node(preview, model=tf.model, trace=trace, prompts=prompts, target_positive=tgt)[:1]
    assert images.shape == (4, 64, 96, 3) and torch.isfinite(images).all()
    assert float(images[0].max()) == 1.0 and float(images[0].min()) == 0.0  # a map with structure, normalised


def test_flux_node_defaults_that_cannot_apply_name_the_fix(pack, tf):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    prompt_pair = _node(pack, "prompt_nodes", "PhotoswapPromptPair")
    inversion = _node(pack, "inversion_nodes", "PhotoswapNullTextInversion")
    src, _, neg, _ = run_node(prompt_pair, clip=tf.clip, source_prompt=SRC, subject_word=SUBJECT,
                              concept_words=CONCEPT)
    latent = {"samples": torch.zeros(1, 16, 8, 12)}
    with pytest.raises(PhotoswapInputError, match="'direct' inversion on Flux"):
        run_node(inversion, model=tf.model, latent=latent, source_positive=src, negative=neg, steps=4)
    with pytest.raises(PhotoswapInputError, match="cfg 1 on Flux"):
        run_node(inversion, model=tf.model, latent=latent, source_positive=src, negative=neg, steps=4,
                 method="direct")
