"""The attention preview node on a tiny model: shapes, ranges, and that the maps are informative."""
import pytest
import torch

pytestmark = pytest.mark.integration


def test_attention_preview(tiny_sd15):
    import nodes as core

    from comfyui_photoswap.nodes.preview_nodes import PhotoswapAttentionPreview
    from comfyui_photoswap.photoswap_core.prompts import build_prompt_pair
    from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule
    from comfyui_photoswap.photoswap_core.recorder import record_trace

    ms = tiny_sd15
    enc = lambda t: core.CLIPTextEncode().encode(ms.clip, t)[0]  # noqa: E731
    prompts = build_prompt_pair(ms.clip, "a photo of a cat", "cat", "sks dog")
    schedule = ddim_schedule(ms.model.get_model_object("model_sampling"), 6)
    start = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        trace = record_trace(ms.model, enc("a photo of a cat"), enc(""), schedule, 7.5, start_latent_vp=start,
                             fraction=0.0)
        out = PhotoswapAttentionPreview.execute(ms.model, trace, prompts, enc("a photo of a sks dog"), 0.5)
    images = out.result[0]
    assert images.shape == (4, 128, 96, 3)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    # subject map, concept map and SVD panel carry structure (not constant), and differ from each other
    for panel in (0, 1, 3):
        assert float(images[panel].std()) > 0.01
    assert not torch.equal(images[0], images[1])
