"""Thin ComfyUI node classes, grouped by stage. All algorithmic work lives in `photoswap_core`."""

NODE_CLASSES: list = []
