"""Run the pack's nodes on toy-world photos in-process, the way ComfyUI's executor runs them.

Why: the quality benchmark and the tests must measure the pack as users run it -- the Concept Loader, Prompt Pair,
inversion, recorder and swap sampler node classes (their `execute` through the executor's locked entry, inside
`torch.inference_mode()` like the server) and ComfyUI's own VAE Encode/Decode -- not a re-implementation.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import model_io as M
from . import scene as W

_STATE: dict = {}


def boot():
    """ComfyUI in-process (CPU) with the pack imported; the toy weights registered as model folders."""
    if "pack" in _STATE:
        return _STATE["pack"]
    from devtools.comfy_env import bootstrap

    bootstrap()
    import folder_paths

    import comfyui_photoswap as pack

    root = Path(tempfile.mkdtemp(prefix="toyworld_models_"))
    for kind in ("diffusers", "loras", "embeddings"):
        (root / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(root / kind))
    for name in (M.BASE_NAME, M.CONCEPT_NAME):
        os.symlink(M.WEIGHTS / name, root / "diffusers" / name, target_is_directory=True)
    os.symlink(M.WEIGHTS / M.LORA_NAME, root / "loras" / M.LORA_NAME)
    os.symlink(M.WEIGHTS / M.EMBEDDING_NAME, root / "embeddings" / M.EMBEDDING_NAME)
    os.symlink(M.WEIGHTS / Path(M.EMBEDDING_NAME).with_suffix(".json"),
               root / "embeddings" / Path(M.EMBEDDING_NAME).with_suffix(".json").name)
    for kind in ("diffusers", "loras", "embeddings"):
        folder_paths.filename_list_cache.pop(kind, None)
    _STATE["pack"], _STATE["root"] = pack, root
    return pack


def node(module: str, name: str):
    import importlib

    pack = boot()
    return getattr(importlib.import_module(f"{pack.__name__}.nodes.{module}"), name)


def run_node(cls, **kwargs):
    """Execute a node class like ComfyUI's executor (locked class clone, EXECUTE_NORMALIZED, inference mode)."""
    from comfy_api.internal import make_locked_method_func

    run = make_locked_method_func(cls, "EXECUTE_NORMALIZED", cls.PREPARE_CLASS_CLONE({}))
    with torch.inference_mode():
        out = run(**kwargs)
    return out.result, out


@dataclass
class Loaded:
    model: object
    clip: object
    vae: object
    concept: object  # the CONCEPT
    how: str  # which Concept Loader source made them

    @property
    def words(self) -> str:
        return self.concept.words


def load_concept(form: str) -> Loaded:
    """One concept form through the Concept Loader: 'dreambooth' (diffusers folder), 'lora' and 'embedding' (on the
    base folder's MODEL/CLIP), or 'base' (the base folder, concept words typed)."""
    if form in _STATE.get("forms", {}):
        return _STATE["forms"][form]
    loader = node("concept_nodes", "PhotoswapConceptLoader")
    words = {"concept_words": "sks square", "class_word": "square"}
    if form in ("dreambooth", "base"):
        folder = M.CONCEPT_NAME if form == "dreambooth" else M.BASE_NAME
        (model, clip, vae, concept), _ = run_node(loader, source="diffusers folder", diffusers_folder=folder,
                                                  **words)
        how = "Concept Loader (diffusers folder)"
    else:
        base = load_concept("base")
        kwargs = {"lora_name": M.LORA_NAME} if form == "lora" else {"embedding_name": M.EMBEDDING_NAME}
        (model, clip, vae, concept), _ = run_node(loader, source=form, model=base.model, clip=base.clip,
                                                  vae=base.vae, **words, **kwargs)
        how = f"Concept Loader ({form}) on the base loaded by: {base.how}"
    loaded = Loaded(model, clip, vae, concept, how)
    _STATE.setdefault("forms", {})[form] = loaded
    return loaded


def generate(loaded: Loaded, prompt: str, seed: int, steps: int, cfg: float = 7.5) -> np.ndarray:
    """One text-to-image generation through ComfyUI (CLIPTextEncode, KSampler DDIM, empty negative), decoded."""
    import nodes

    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(loaded.clip, prompt)[0]
        neg = nodes.CLIPTextEncode().encode(loaded.clip, "")[0]
        empty = {"samples": torch.zeros(1, 4, W.SIZE // 8, W.SIZE // 8)}
        lat = nodes.common_ksampler(loaded.model, seed, steps, cfg, "ddim", "ddim_uniform", pos, neg, empty)[0]
    return decode(loaded.vae, lat)


def encode(vae, image: np.ndarray) -> dict:
    """LATENT of a uint8 HxWx3 photo through ComfyUI's VAE Encode node."""
    import nodes

    pixels = torch.from_numpy(image).float()[None] / 255.0
    with torch.inference_mode():
        return nodes.VAEEncode().encode(vae, pixels)[0]


def decode(vae, latent: dict) -> np.ndarray:
    """uint8 HxWx3 image of a LATENT through ComfyUI's VAE Decode node."""
    import nodes

    with torch.inference_mode():
        img = nodes.VAEDecode().decode(vae, latent)[0]
    return (img[0].clamp(0, 1) * 255).round().byte().cpu().numpy()


def prompt_pair(loaded: Loaded, source_prompt: str, subject_word: str, target_prompt: str = "",
                words: str | None = None, concept_maps: str = "own"):
    """The Prompt Pair node with the loaded concept, or, with `words`, plain words in the subject's place (an edit
    of the world: no concept connected)."""
    pp = node("prompt_nodes", "PhotoswapPromptPair")
    concept = {} if words is not None else {"concept": loaded.concept}
    (src, tgt, neg, prompts), _ = run_node(pp, clip=loaded.clip, source_prompt=source_prompt,
                                           subject_word=subject_word, concept_words=words or loaded.words,
                                           target_prompt=target_prompt, concept_maps=concept_maps, **concept)
    return src, tgt, neg, prompts


def invert(loaded: Loaded, latent: dict, src, neg, method: str, steps: int, cfg: float = 7.5,
           inner_iterations: int = 10, learning_rate: float = 1e-2):
    """(inversion, reconstruction uint8 image, inner iterations per step) through the inversion node."""
    inv_node = node("inversion_nodes", "PhotoswapNullTextInversion")
    (inversion, _z, _sig, image), _ = run_node(inv_node, model=loaded.model, latent=latent, source_positive=src,
                                               negative=neg, steps=steps, cfg=cfg, method=method,
                                               inner_iterations=inner_iterations, learning_rate=learning_rate,
                                               vae=loaded.vae)
    recon = (image[0].clamp(0, 1) * 255).round().byte().cpu().numpy()
    return inversion, recon, list(getattr(inversion, "inner_iterations", []) or [])


def record(loaded: Loaded, inversion, src, neg, steps: int, cfg: float = 7.5):
    rec = node("swap_nodes", "PhotoswapAttentionRecorder")
    (trace, source_latent), _ = run_node(rec, model=loaded.model, source_positive=src, negative=neg,
                                         inversion=inversion, steps=steps, cfg=cfg, record_fraction=1.0,
                                         record_self_maps=True)
    return trace, source_latent


def swap(loaded: Loaded, trace, tgt, neg, prompts, cfg: float = 7.5, **windows) -> tuple[dict, dict]:
    sampler = node("swap_nodes", "PhotoswapAttentionSwapSampler")
    (swapped, source, _mask, _pair_masks), _ = run_node(sampler, model=loaded.model, trace=trace,
                                                        target_positive=tgt, negative=neg, prompts=prompts, cfg=cfg,
                                                        **windows)
    return swapped, source
