"""Concept stage: load a learned subject (DreamBooth checkpoint, diffusers folder, LoRA, textual inversion)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..photoswap_core.concept import (NONE_CHOICE, SOURCES, diffusers_folder_choices, file_choices, load_concept,
                                      source_fingerprint)
from .types import CATEGORY, Concept


class PhotoswapConceptLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhotoswapConceptLoader",
            display_name="Photoswap DreamBooth Concept Loader",
            category=f"{CATEGORY}/concept",
            description=(
                "Loads a learned concept (the subject Photoswap swaps in) in the form you have it: a single-file "
                "DreamBooth checkpoint, a diffusers DreamBooth output folder (added tokens such as '<sks>' work), a "
                "DreamBooth-LoRA (kohya or diffusers/PEFT keys) on a base model, or a textual-inversion embedding. "
                "Outputs the model, CLIP and VAE to use, and the concept: its words (e.g. 'sks dog'), class word and "
                "token ids. Concept words come from metadata next to/inside the file when present, else from the "
                "concept_words widget; how they tokenize is reported (log and node text), with a warning when the "
                "identifier is a common word."),
            inputs=[
                io.Combo.Input("source", options=list(SOURCES), default="checkpoint",
                               tooltip="Which form the concept comes in: 'checkpoint' = a full DreamBooth checkpoint "
                                       "file (models/checkpoints); 'diffusers folder' = the training script's output "
                                       "folder (models/diffusers); 'lora' = a DreamBooth-LoRA (models/loras) applied "
                                       "on the connected base model/clip; 'embedding' = a textual-inversion "
                                       "embedding (models/embeddings) used through 'embedding:<name>'."),
                io.Combo.Input("ckpt_name", options=file_choices("checkpoints"), default=NONE_CHOICE,
                               tooltip="Source 'checkpoint': the DreamBooth checkpoint. .safetensors is read "
                                       "directly; .ckpt/.pt only through ComfyUI's safe (weights-only) loader."),
                io.Combo.Input("diffusers_folder", options=diffusers_folder_choices(), default=NONE_CHOICE,
                               tooltip="Source 'diffusers folder': a pipeline folder under models/diffusers "
                                       "(model_index.json, unet/, text_encoder/, vae/, tokenizer/). An SD1/SD2-"
                                       "topology folder of other widths is built from its own config files."),
                io.Combo.Input("lora_name", options=file_choices("loras"), default=NONE_CHOICE,
                               tooltip="Source 'lora': the DreamBooth-LoRA file, applied on the model/clip inputs. "
                                       "A LoRA for another model family (e.g. SDXL on an SD1.5 base) is an error."),
                io.Combo.Input("embedding_name", options=file_choices("embeddings"), default=NONE_CHOICE,
                               tooltip="Source 'embedding': the textual-inversion embedding; the concept words "
                                       "become 'embedding:<name>' (plus class_word when given)."),
                io.String.Input("concept_words", default="sks dog",
                                tooltip="The words the concept was trained with: identifier + class word, e.g. "
                                        "'sks dog'. Used unless the file carries concept words in its metadata "
                                        "(see prefer_metadata). Ignored for source 'embedding'."),
                io.String.Input("class_word", default="",
                                tooltip="The class noun inside the concept words ('dog' in 'sks dog'). Empty = "
                                        "unknown: the prompt pair infers it (the subject word, else the last word)."),
                io.Boolean.Input("prefer_metadata", default=True,
                                 tooltip="Use concept words found in metadata (a <name>.json/.txt next to the file, "
                                         "concept.json in a diffusers folder, safetensors metadata, kohya dataset "
                                         "names, the diffusers model card) over the concept_words widget."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Source 'lora': how strongly the LoRA changes the diffusion model "
                                       "(0 = unchanged)."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Source 'lora': how strongly the LoRA changes the text encoder "
                                       "(0 = unchanged)."),
                io.Model.Input("model", optional=True,
                               tooltip="Base diffusion model for sources 'lora' (required) and 'embedding' (passed "
                                       "through). Ignored for 'checkpoint'/'diffusers folder'."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Base CLIP for sources 'lora' (the LoRA's text-encoder part goes here) and "
                                      "'embedding' (required). Ignored for 'checkpoint'/'diffusers folder'."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional VAE. When connected it is the VAE output for every source (overrides "
                                     "a checkpoint's/folder's own VAE); for 'lora'/'embedding' it is passed through."),
                Concept.Input("previous", optional=True,
                              tooltip="Several subjects in one swap: the CONCEPT of an earlier Concept Loader (wire "
                                      "its MODEL/CLIP into this one too, so LoRAs stack). The output then holds both "
                                      "concepts, in order: one per subject word of the Prompt Pair."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The diffusion model with the concept."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder that knows the concept's tokens."),
                io.Vae.Output(display_name="VAE",
                              tooltip="The checkpoint's/folder's VAE, or the connected one (None when neither)."),
                Concept.Output(display_name="CONCEPT",
                               tooltip="PHOTOSWAP_CONCEPT: the concept words, class word, kind and token ids, for "
                                       "the Photoswap Prompt Pair (with `previous` connected: all chained concepts)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, source, ckpt_name=NONE_CHOICE, diffusers_folder=NONE_CHOICE, lora_name=NONE_CHOICE,
                           embedding_name=NONE_CHOICE, **kwargs):
        return source_fingerprint(source, ckpt_name, diffusers_folder, lora_name, embedding_name)

    @classmethod
    def execute(cls, source, ckpt_name=NONE_CHOICE, diffusers_folder=NONE_CHOICE, lora_name=NONE_CHOICE,
                embedding_name=NONE_CHOICE, concept_words="", class_word="", prefer_metadata=True,
                strength_model=1.0, strength_clip=1.0, model=None, clip=None, vae=None,
                previous=None) -> io.NodeOutput:
        loaded = load_concept(source, ckpt_name=ckpt_name, diffusers_folder=diffusers_folder, lora_name=lora_name,
                              embedding_name=embedding_name, concept_words=concept_words, class_word=class_word,
                              prefer_metadata=prefer_metadata, strength_model=strength_model,
                              strength_clip=strength_clip, model=model, clip=clip, vae=vae, previous=previous)
        return io.NodeOutput(loaded.model, loaded.clip, loaded.vae, loaded.concept,
                             ui=ui.PreviewText(loaded.concept.report))


NODES = [PhotoswapConceptLoader]
