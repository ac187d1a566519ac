"""The pack's error type: every message names the input, what was expected, and how to fix it."""
from __future__ import annotations


class PhotoswapInputError(ValueError):
    """Bad input to a Photoswap node. ComfyUI shows the message in the UI; it must say how to fix the graph."""

    def __init__(self, input_name: str, expected: str, fix: str):
        self.input_name = input_name
        self.expected = expected
        self.fix = fix
        super().__init__(f"Photoswap: input '{input_name}': expected {expected}. Fix: {fix}.")
