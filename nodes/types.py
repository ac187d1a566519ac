"""Custom socket types and the category, declared once for every node module."""
from comfy_api.latest import io

CATEGORY = "photoswap"

Inversion = io.Custom("PHOTOSWAP_INVERSION")  # photoswap_core.inversion.InversionResult
SourceTrace = io.Custom("PHOTOSWAP_SOURCE_TRACE")  # photoswap_core.trace.SourceTrace
Prompts = io.Custom("PHOTOSWAP_PROMPTS")  # photoswap_core.prompts.PromptPair
Concept = io.Custom("PHOTOSWAP_CONCEPT")  # photoswap_core.concept.Concept or ConceptChain
FrameOptions = io.Custom("PHOTOSWAP_FRAME_OPTIONS")  # photoswap_core.frames.FrameOptions
