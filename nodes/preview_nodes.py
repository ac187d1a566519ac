"""Photoswap Attention Preview: see which image regions the subject and concept words attend to."""
from __future__ import annotations

from comfy_api.latest import io, ui

from .types import CATEGORY, Prompts, SourceTrace


class PhotoswapAttentionPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoswapAttentionPreview",
            display_name="Photoswap Attention Preview",
            category=f"{CATEGORY}/preview",
            description=(
                "Grey-scale panels for choosing words and windows: the source subject word's cross-attention map and "
                "the target concept token's map (on the source layout) for each subject pair, the LocalBlend mask, "
                "and the top SVD component of the source self-attention maps (paper Fig. 3), at the LocalBlend "
                "resolution."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL used by the recorder and the sampler."),
                SourceTrace.Input("trace", tooltip="From Photoswap Attention Recorder."),
                Prompts.Input("prompts", tooltip="From Photoswap Prompt Pair (which tokens are subject/concept)."),
                io.Conditioning.Input("target_positive", tooltip="The encoded target prompt."),
                io.Float.Input("step_fraction", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Which denoising step to look at, as a fraction of the steps (0 = noisiest)."),
                io.Mask.Input("blend_mask", optional=True,
                              tooltip="Optional: the swap sampler's blend_mask, shown as the third panel."),
            ],
            outputs=[io.Image.Output(display_name="previews",
                                     tooltip="Batch of images: source subject and target concept (per pair), "
                                             "blend mask, self-attention SVD (4 for one pair).")],
        )

    @classmethod
    def execute(cls, model, trace, prompts, target_positive, step_fraction=0.5, blend_mask=None) -> io.NodeOutput:
        from ..photoswap_core.preview import attention_previews

        images = attention_previews(model, trace, prompts, target_positive, step_fraction, blend_mask)
        return io.NodeOutput(images, ui=ui.PreviewImage(images, cls=cls))


NODES = [PhotoswapAttentionPreview]
