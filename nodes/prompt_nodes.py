"""Prompt stage: the source/target prompt pair, encoded, with Photoswap's token bookkeeping."""
from __future__ import annotations

from comfy_api.latest import io

from ..photoswap_core.prompts import CONCEPT_MAPS, encode_prompt_pair
from .types import CATEGORY, Concept, Prompts


class PhotoswapPromptPair(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoswapPromptPair",
            display_name="Photoswap Prompt Pair",
            category=f"{CATEGORY}/prompts",
            description=(
                "Builds the two prompts of a Photoswap: the source prompt (describes the source image) and the target "
                "prompt (the source prompt with the subject word replaced by the concept words, unless written "
                "explicitly). Encodes both like CLIP Text Encode and outputs the token alignment (mapper/alphas) and "
                "the subject token positions the swap sampler and LocalBlend need. Several subjects: separate the "
                "subject words and the concepts with ';' ('cat; mug' → 'sks dog; zwx cup', or chain Concept "
                "Loaders); a region word per pair restricts that pair's swap to where the word's cross-attention is "
                "('head'); one subject word twice with two regions composes it from two concepts."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the model (SD1.x, SD2.x or SDXL), e.g. from the Photoswap "
                                              "Concept Loader or a checkpoint loader."),
                io.String.Input("source_prompt", multiline=True, default="A photo of a cat",
                                tooltip="Describes the source image. Must contain the subject word."),
                io.String.Input("subject_word", default="cat",
                                tooltip="The word in the source prompt naming the subject to replace (e.g. 'cat'). "
                                        "Its cross-attention drives LocalBlend on the source side. Several subjects: "
                                        "'cat; mug' (one concept each, same order)."),
                io.String.Input("concept_words", default="sks dog",
                                tooltip="The words naming the new concept, e.g. 'sks dog' (DreamBooth) or "
                                        "'embedding:name' (textual inversion); several: 'sks dog; zwx cup'. "
                                        "Overridden by a connected concept."),
                io.String.Input("target_prompt", multiline=True, default="", optional=True,
                                tooltip="Optional explicit target prompt; it must contain the concept words. Empty = "
                                        "the source prompt with the subject word replaced by the concept words."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt, encoded like CLIP Text Encode (used where a sampler needs a "
                                        "negative conditioning, e.g. for a synthetic source image)."),
                io.String.Input("region_words", default="", optional=True,
                                tooltip="Optional part-level swap: per pair, a word of the source prompt ('head', "
                                        "'hat') whose cross-attention map is the only place that pair's swap and "
                                        "blend act; ';'-separated in pair order, empty items = the whole subject. "
                                        "Outside every region the result is the source."),
                io.Combo.Input("concept_maps", options=list(CONCEPT_MAPS), default=CONCEPT_MAPS[0], optional=True,
                               tooltip="Whose cross-attention maps the concept's tokens take during the sampler's "
                                       "cross_map window. 'own' (the official Photoswap): the concept keeps its own "
                                       "maps; only the self-attention swaps carry the subject's place. 'subject': "
                                       "the concept's tokens take the subject word's maps, so the concept is drawn "
                                       "where the subject was; try it when the concept appears beside the subject "
                                       "or at a place of its own (a concept of another class than the subject)."),
                Concept.Input("concept", optional=True,
                              tooltip="A PHOTOSWAP_CONCEPT from the Photoswap Concept Loader (or the last of chained "
                                      "loaders: one concept per subject word); when connected its words replace "
                                      "concept_words."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="source_positive",
                                       tooltip="The encoded source prompt."),
                io.Conditioning.Output(display_name="target_positive",
                                       tooltip="The encoded target prompt (ControlNet etc. may be applied to it)."),
                io.Conditioning.Output(display_name="negative", tooltip="The encoded negative prompt."),
                Prompts.Output(display_name="prompts",
                               tooltip="Token bookkeeping for the swap: token ids of both prompts, the alignment "
                                       "(mapper/alphas) and the subject/concept token positions."),
            ],
        )

    @classmethod
    def execute(cls, clip, source_prompt, subject_word, concept_words, target_prompt="", negative_prompt="",
                region_words="", concept_maps=CONCEPT_MAPS[0], concept=None) -> io.NodeOutput:
        source, target, negative, pair = encode_prompt_pair(clip, source_prompt, subject_word, concept_words,
                                                            target_prompt, negative_prompt, concept, region_words,
                                                            concept_maps)
        return io.NodeOutput(source, target, negative, pair)


NODES = [PhotoswapPromptPair]
