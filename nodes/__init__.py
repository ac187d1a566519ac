"""Thin ComfyUI node classes, grouped by stage. All algorithmic work lives in `photoswap_core`."""
import importlib
import logging

# One module per stage; each exposes NODES (a list of io.ComfyNode classes).
_STAGE_MODULES = ("concept_nodes", "prompt_nodes", "inversion_nodes", "swap_nodes", "preview_nodes")


def _collect():
    classes = []
    for name in _STAGE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # stage not built yet
            raise
        classes.extend(module.NODES)
    return classes


NODE_CLASSES = _collect()
logging.debug("comfyui-photoswap: %d nodes", len(NODE_CLASSES))
