"""comfyui-photoswap: Photoswap (NeurIPS 2023) personalized subject swapping for ComfyUI.

ComfyUI loads this folder as a custom node pack and calls `comfy_entrypoint` (V3 node API). Nothing heavy is
imported here beyond ComfyUI's own API; node modules import the algorithm from `photoswap_core` lazily.
"""
from comfy_api.latest import ComfyExtension, io

__version__ = "0.1.0"


class PhotoswapExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes import NODE_CLASSES

        return list(NODE_CLASSES)


async def comfy_entrypoint() -> PhotoswapExtension:
    return PhotoswapExtension()


WEB_DIRECTORY = None
