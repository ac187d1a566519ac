"""The Concept Loader's choice lists, defined once: the node's combos and the core's validation read them from here."""
from __future__ import annotations

KINDS = ("checkpoint", "diffusers", "lora", "embedding")  # Concept.kind of a loaded concept ("words": typed only)
SOURCES = ("checkpoint", "diffusers folder", "lora", "embedding")  # the node's `source` combo, in KINDS order
SOURCE_TO_KIND = {**dict(zip(SOURCES, KINDS)), "diffusers": "diffusers"}  # "diffusers": accepted for scripts
NONE_CHOICE = "(none)"  # a file combo's value when nothing is picked (a valid choice even in an empty folder)


def kind_of(source: str) -> str | None:
    """The concept kind a `source` choice loads, None for an unknown choice."""
    return SOURCE_TO_KIND.get(source)
