"""Test-only stand-in for DualCLIPLoader (type flux), loaded only by test servers (ComfyServer(custom_nodes=...)).

Why: DualCLIPLoader always builds T5-XXL with 24 blocks (t5_config_xxl.json) and leaves the blocks a reduced-depth
file lacks uninitialised (docs/flux_notes.md §7, §9.4), and a full 24-block random T5 is 9.5 GB. This node takes the
same inputs and calls the same `comfy.sd.load_clip(..., clip_type=FLUX)`, adding only ComfyUI's own
`t5xxl_model_config` option with the block count read from the file. The workflows ship with DualCLIPLoader; the
tests swap the class name.
"""
import comfy.sd
import folder_paths
from safetensors import safe_open


class PhotoswapTestFluxCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {"clip_name1": (names,), "clip_name2": (names,), "type": (["flux"],)},
                "optional": {"device": (["default", "cpu"],)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "photoswap/testing"

    def load(self, clip_name1, clip_name2, type, device="default"):  # noqa: A002 (DualCLIPLoader's names)
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in (clip_name1, clip_name2)]
        blocks = set()
        for path in paths:
            with safe_open(path, framework="pt") as fh:  # the header only
                blocks |= {int(k.split(".")[2]) for k in fh.keys() if k.startswith("encoder.block.")}
        layers = max(blocks) + 1 if blocks else 24
        options = {"t5xxl_model_config": {"num_layers": layers, "num_decoder_layers": layers}}
        return (comfy.sd.load_clip(ckpt_paths=paths, clip_type=comfy.sd.CLIPType.FLUX, model_options=options),)


NODE_CLASS_MAPPINGS = {"PhotoswapTestFluxCLIPLoader": PhotoswapTestFluxCLIPLoader}
