"""The swap nodes inside ComfyUI: ControlNet on the target conditioning, every supported family at a non-square size,
SDXL's pooled/ADM rows, and the whole graph through a real headless server on the full-architecture SD1.5.

In-process node runs go through the executor's own entry (`EXECUTE_NORMALIZED` on a locked class clone) under
`torch.inference_mode()`, as the server runs them. Latents are 8×12 (96×64 px): non-square catches any h/w mix-up.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from fixtures_server import comfy_server  # noqa: F401  (module-scoped real server)

SRC = "a photo of a cat"
SUBJECT = "cat"
CONCEPT = "sks dog"  # one word → two tokens: the prompts have different token lengths
H, W = 8, 12  # latent rows/columns: 64×96 px
STEPS = 3


def _nodes(pack):
    swap = importlib.import_module(f"{pack.__name__}.nodes.swap_nodes")
    prompt = importlib.import_module(f"{pack.__name__}.nodes.prompt_nodes")
    return prompt.PhotoswapPromptPair, swap.PhotoswapAttentionRecorder, swap.PhotoswapAttentionSwapSampler


def run_node(node, **kwargs):
    """Execute a node the way ComfyUI's executor does, inside inference mode like the server."""
    from comfy_api.internal import make_locked_method_func

    run = make_locked_method_func(node, "EXECUTE_NORMALIZED", node.PREPARE_CLASS_CLONE({}))
    with torch.inference_mode():
        return run(**kwargs).result


class Graph:
    """Prompt pair + recorder (synthetic source) on one tiny model set; the sampler on demand."""

    def __init__(self, pack, ms, source=SRC, subject=SUBJECT, concept=CONCEPT, steps=STEPS, hw=(H, W),
                 record_self_maps=True, record_fraction=1.0, seed=1):
        self.ms = ms
        self.PromptPair, self.Recorder, self.Sampler = _nodes(pack)
        self.src, self.tgt, self.neg, self.prompts = run_node(
            self.PromptPair, clip=ms.clip, source_prompt=source, subject_word=subject, concept_words=concept)
        self.trace, self.source_latent = run_node(
            self.Recorder, model=ms.model, source_positive=self.src, negative=self.neg,
            latent={"samples": torch.zeros(1, 4, *hw)}, seed=seed, steps=steps, cfg=7.5,
            record_fraction=record_fraction, record_self_maps=record_self_maps)

    def sample(self, target_positive=None, negative=None, prompts=None, model=None, **kwargs):
        swapped, source, mask, _pair_masks = run_node(
            self.Sampler, model=model or self.ms.model, trace=self.trace,
            target_positive=self.tgt if target_positive is None else target_positive,
            negative=self.neg if negative is None else negative, prompts=prompts or self.prompts, **kwargs)
        return swapped["samples"], source["samples"], mask


def _close(a, b, tol=1e-5):
    """max |a − b| ≤ tol relative to the latents' magnitude (they reach ~100 on the tiny models)."""
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# ---------------------------------------------------------------------------------------------------- ControlNet

class UNetCalls:
    """Records, per UNet call, the Photoswap run mode and whether ControlNet residuals reached the UNet."""

    def __init__(self, diffusion_model):
        self.calls = []
        self.handle = diffusion_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        options = kwargs.get("transformer_options", {})
        run = options.get("photoswap")
        self.calls.append((getattr(run, "mode", None), kwargs.get("control") is not None,
                           tuple(options.get("cond_or_uncond", ())), kwargs.get("y")))

    def remove(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def cn_graph(pack, tiny_sd15):
    return Graph(pack, tiny_sd15)


@pytest.fixture(scope="module")
def controlnet(comfy):
    from devtools.tiny_controlnet import build_tiny_controlnet

    return build_tiny_controlnet(zero_conv_gain=0.1)


@pytest.mark.integration
@pytest.mark.parametrize("lockstep", [False, True], ids=["trace", "lockstep"])
def test_controlnet_on_target_changes_target_not_source(cn_graph, controlnet, lockstep):
    """ControlNet Apply on the target conditioning (positive only, and Advanced on positive + negative): the target
    changes, the source reconstruction stays bit-identical, and no ControlNet residual reaches a source (record) call
    — so lockstep (which recomputes the source rows next to the ControlNet target) equals trace mode."""
    import nodes

    from devtools.tiny_controlnet import hint_image

    g = cn_graph
    image = hint_image(H * 8, W * 8)
    with torch.inference_mode():
        tgt_cn = nodes.ControlNetApply().apply_controlnet(g.tgt, controlnet, image, 1.0)[0]
        pos_adv, neg_adv = nodes.ControlNetApplyAdvanced().apply_controlnet(g.tgt, g.neg, controlnet, image, 1.0,
                                                                            0.0, 1.0)
    plain_swapped, plain_source, _ = g.sample(force_lockstep=lockstep)
    cn_model_calls = []
    hook = controlnet.control_model.register_forward_hook(lambda *a: cn_model_calls.append(1))
    unet = UNetCalls(g.ms.model.model.diffusion_model)
    try:
        cn_swapped, cn_source, _ = g.sample(target_positive=tgt_cn, force_lockstep=lockstep)
        adv_swapped, adv_source, _ = g.sample(target_positive=pos_adv, negative=neg_adv, force_lockstep=lockstep)
    finally:
        hook.remove()
        unet.remove()
    assert cn_model_calls, "the ControlNet was never evaluated"
    assert torch.equal(cn_source, plain_source) and torch.equal(adv_source, plain_source)
    assert _close(plain_source, g.source_latent["samples"])
    for swapped in (cn_swapped, adv_swapped):
        assert torch.isfinite(swapped).all()
        assert float((swapped - plain_swapped).abs().max()) > 1e-2, "ControlNet had no effect on the target"
    modes = {mode for mode, _, _, _ in unet.calls}
    assert modes == ({"record", "target"} if lockstep else {"target"})
    assert not [c for c in unet.calls if c[0] == "record" and c[1]], "ControlNet residuals reached a source row"
    assert [c for c in unet.calls if c[0] == "target" and c[1]], "ControlNet residuals never reached the target"
    # the recorded trace was made without ControlNet: both modes must give the same ControlNet-guided target
    other_swapped, _, _ = g.sample(target_positive=tgt_cn, force_lockstep=not lockstep)
    assert _close(cn_swapped, other_swapped), float((cn_swapped - other_swapped).abs().max())


# ------------------------------------------------------------------------------------------------------ families

FAMILY_PROMPTS = {  # source prompt, subject, concept words: different lengths and positions per family
    "sd15": ("a photo of a cat on a sofa", "cat", "sks dog"),
    "sd2v": ("a cat", "cat", "sks small dog"),
    "sdxl": ("a photo of a cat in the garden, evening light", "cat", "sks dog"),
}


@pytest.mark.integration
@pytest.mark.parametrize("family", ["sd15", "sd2v", "sdxl"])
def test_families_non_square_nodes(request, pack, family):
    """Prompt pair → recorder (synthetic) → sampler for SD1.x, SD2.x v-prediction and SDXL at 96×64 px: finite
    latents of the right shape, a mask at image size, swapped ≠ source, and identical prompts ⇒ the source exactly."""
    ms = request.getfixturevalue(f"tiny_{family}")
    source, subject, concept = FAMILY_PROMPTS[family]
    g = Graph(pack, ms, source=source, subject=subject, concept=concept, steps=3)
    assert g.trace.arch.prediction == ("v" if family == "sd2v" else "eps")
    assert g.prompts.source_ids != g.prompts.target_ids
    swapped, src, mask = g.sample(self_output=0.5, cross_map=0.6, blend_start=0.0)
    assert swapped.shape == src.shape == (1, 4, H, W)
    assert mask.shape == (1, H * 8, W * 8)
    assert torch.isfinite(swapped).all() and torch.isfinite(src).all()
    assert float((swapped - src).abs().max()) > 1e-2
    assert _close(src, g.source_latent["samples"])
    # identity through the nodes: the target prompt is the source prompt
    _, same_tgt, _, same_prompts = run_node(g.PromptPair, clip=ms.clip, source_prompt=source, subject_word=subject,
                                            concept_words=subject, target_prompt=source)
    same, src2, _ = g.sample(target_positive=same_tgt, prompts=same_prompts, self_output=0.5, cross_map=0.6)
    assert _close(same, src2), float((same - src2).abs().max())


@pytest.mark.integration
def test_sdxl_pooled_adm_rows(pack, tiny_sdxl):
    """SDXL's ADM vector `y` (pooled text + size embedding) follows the rows: in source (record) calls the cond row
    carries the source prompt's y even though the sampler's positive is the target; uncond rows carry the negative's
    y; target calls keep the target's y. Checked in lockstep, where source and target calls share one sampler."""
    rec = UNetCalls(tiny_sdxl.model.model.diffusion_model)
    try:  # the recorder's own pass: its positive is the source prompt, so these are the reference rows
        g = Graph(pack, tiny_sdxl, source="a photo of a cat", steps=2, record_self_maps=False)
    finally:
        rec.remove()
    assert rec.calls and all(c[3] is not None for c in rec.calls)
    y_src = [c[3][row] for c in rec.calls for row, cu in enumerate(c[2]) if cu == 0]
    y_neg = [c[3][row] for c in rec.calls for row, cu in enumerate(c[2]) if cu == 1]
    assert all(torch.equal(y, y_src[0]) for y in y_src) and all(torch.equal(y, y_neg[0]) for y in y_neg)
    y_src, y_neg = y_src[0], y_neg[0]
    assert not torch.equal(y_src, y_neg)

    calls = UNetCalls(tiny_sdxl.model.model.diffusion_model)
    try:
        g.sample(force_lockstep=True, self_output=1.0, cross_map=1.0)
    finally:
        calls.remove()
    seen = {"record": [], "target": []}
    for mode, _, chunks, y in calls.calls:
        for row, cu in enumerate(chunks):
            seen[mode].append((cu, y[row]))
    assert seen["record"] and seen["target"]
    for mode, rows in seen.items():
        for cu, y in rows:
            if cu == 1:
                assert torch.equal(y, y_neg), f"{mode} uncond row lost the negative's ADM vector"
            elif mode == "record":
                assert torch.equal(y, y_src), "source cond row does not carry the source prompt's ADM vector"
            else:
                assert not torch.equal(y, y_src), "target cond row carries the source's ADM vector"
    y_tgt = [y for cu, y in seen["target"] if cu == 0]
    assert all(torch.equal(y, y_tgt[0]) for y in y_tgt)


# ---------------------------------------------------------------------------------------------------------- e2e

CKPT = "random-sd15.safetensors"


def swap_graph(width=96, height=64, steps=3, prefix="photoswap_e2e", self_output=0.8, cross_map=0.6, seed=5):
    """API graph: checkpoint → prompt pair → recorder (synthetic) → sampler → decode/save swapped and source."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pair": {"class_type": "PhotoswapPromptPair",
                 "inputs": {"clip": ["ckpt", 1], "source_prompt": "a photo of a cat on a bench", "subject_word": "cat",
                            "concept_words": "sks dog", "target_prompt": "", "negative_prompt": ""}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "rec": {"class_type": "PhotoswapAttentionRecorder",
                "inputs": {"model": ["ckpt", 0], "source_positive": ["pair", 0], "negative": ["pair", 2],
                           "latent": ["empty", 0], "seed": seed, "steps": steps, "cfg": 7.5, "record_fraction": 1.0,
                           "record_self_maps": False, "storage": "auto", "memory_budget_gb": 0.0}},
        "swap": {"class_type": "PhotoswapAttentionSwapSampler",
                 "inputs": {"model": ["ckpt", 0], "trace": ["rec", 0], "target_positive": ["pair", 1],
                            "negative": ["pair", 2], "prompts": ["pair", 3], "self_output": self_output,
                            "self_map": 0.0, "cross_map": cross_map, "local_blend": True, "blend_threshold": 0.3,
                            "blend_start": 0.2, "cfg": 7.5, "force_lockstep": False}},
        "dec_swap": {"class_type": "VAEDecode", "inputs": {"samples": ["swap", 0], "vae": ["ckpt", 2]}},
        "save_swap": {"class_type": "SaveImage", "inputs": {"images": ["dec_swap", 0],
                                                           "filename_prefix": f"{prefix}/swapped"}},
        "dec_src": {"class_type": "VAEDecode", "inputs": {"samples": ["rec", 1], "vae": ["ckpt", 2]}},
        "save_src": {"class_type": "SaveImage", "inputs": {"images": ["dec_src", 0],
                                                          "filename_prefix": f"{prefix}/source"}},
    }


def _node_images(server, result, node_id):
    out = result.outputs.get(node_id, {})
    return [server.output_dir / img.get("subfolder", "") / img["filename"] for img in out.get("images", [])]


def widget_defaults(node_info: dict) -> dict:
    """Default widget values from a node's /object_info entry (INT/FLOAT/STRING/BOOLEAN defaults, combos)."""
    values = {}
    inputs = node_info.get("input", {})
    for name, spec in {**inputs.get("required", {}), **inputs.get("optional", {})}.items():
        if not isinstance(spec, (list, tuple)) or not spec:
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(spec[0], list):  # legacy combo: [options, {...}]
            values[name] = opts.get("default", spec[0][0] if spec[0] else None)
        elif spec[0] == "COMBO":
            options = opts.get("options") or []
            values[name] = opts.get("default", options[0] if options else None)
        elif "default" in opts:
            values[name] = opts["default"]
    return values


def _inversion_node_available():
    from devtools.comfy_env import REPO_ROOT

    return (REPO_ROOT / "nodes" / "inversion_nodes.py").exists()


@pytest.mark.e2e
def test_server_swap_full_sd15_non_square(comfy_server):
    """The full-architecture random SD1.5 through /prompt at 96×64 px: swapped and source images are saved."""
    from PIL import Image

    result = comfy_server.run(swap_graph(), timeout=900)
    print(f"full SD1.5 swap graph at 96x64: {result.seconds:.1f} s")
    for node in ("save_swap", "save_src"):
        images = _node_images(comfy_server, result, node)
        assert len(images) == 1 and images[0].is_file(), (node, result.outputs)
        with Image.open(images[0]) as img:
            assert img.size == (96, 64)


@pytest.mark.e2e
def test_server_real_image_swap_with_inversion(comfy_server):
    """LoadImage (a 96×64 PNG) → VAE Encode → Null-Text Inversion (direct, 3 steps) → recorder → sampler."""
    if not _inversion_node_available():
        pytest.skip("nodes/inversion_nodes.py (PhotoswapNullTextInversion) is not in the pack yet")
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((64, 96, 3)) * 255).astype("uint8")
    pixels[16:48, 32:64] = [200, 120, 40]
    Image.fromarray(pixels).save(comfy_server.input_dir / "photoswap_e2e_96x64.png")
    inv_inputs = widget_defaults(comfy_server.object_info("PhotoswapNullTextInversion")["PhotoswapNullTextInversion"])
    inv_inputs.update({"model": ["ckpt", 0], "latent": ["enc", 0], "source_positive": ["pair", 0],
                       "negative": ["pair", 2], "method": "direct", "steps": 3})
    graph = swap_graph(prefix="photoswap_e2e_real")
    graph["load"] = {"class_type": "LoadImage", "inputs": {"image": "photoswap_e2e_96x64.png"}}
    graph["enc"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}}
    graph["inv"] = {"class_type": "PhotoswapNullTextInversion", "inputs": inv_inputs}
    graph["rec"]["inputs"]["inversion"] = ["inv", 0]
    del graph["rec"]["inputs"]["latent"]
    result = comfy_server.run(graph, timeout=900)
    print(f"full SD1.5 real-image swap graph at 96x64: {result.seconds:.1f} s")
    for node in ("save_swap", "save_src"):
        images = _node_images(comfy_server, result, node)
        assert len(images) == 1 and images[0].is_file(), (node, result.outputs)
        with Image.open(images[0]) as img:
            assert img.size == (96, 64)


@pytest.mark.e2e
def test_server_two_concepts_lora_and_embedding(comfy_server, tmp_path):
    """Several subjects through /prompt on the full SD1.5: checkpoint → Concept Loader (a kohya LoRA) → Concept
    Loader (an embedding, `previous` = the first) → Prompt Pair ('cat; bench') → recorder → sampler; the swapped image
    and one pair mask per subject are saved."""
    import safetensors.torch
    from PIL import Image
    from test_concept import SD15_LORA_TEXT, SD15_LORA_UNET, write_lora

    write_lora(str(tmp_path / "e2e_two_dog.safetensors"), "kohya", SD15_LORA_UNET, SD15_LORA_TEXT, 4, 4.0)
    vectors = torch.randn((2, 768), generator=torch.Generator().manual_seed(6))
    safetensors.torch.save_file({"emb_params": vectors}, str(tmp_path / "e2e_two_bench.safetensors"))
    comfy_server.add_model("loras", tmp_path / "e2e_two_dog.safetensors")
    comfy_server.add_model("embeddings", tmp_path / "e2e_two_bench.safetensors")
    loader = {"ckpt_name": "(none)", "diffusers_folder": "(none)", "lora_name": "(none)", "embedding_name": "(none)",
              "concept_words": "sks dog", "class_word": "", "prefer_metadata": False, "strength_model": 1.0,
              "strength_clip": 1.0}
    graph = swap_graph(prefix="photoswap_e2e_two", steps=2)
    graph["dog"] = {"class_type": "PhotoswapConceptLoader",
                    "inputs": {**loader, "source": "lora", "lora_name": "e2e_two_dog.safetensors",
                               "model": ["ckpt", 0], "clip": ["ckpt", 1]}}
    graph["bench"] = {"class_type": "PhotoswapConceptLoader",
                      "inputs": {**loader, "source": "embedding", "embedding_name": "e2e_two_bench.safetensors",
                                 "class_word": "bench", "model": ["dog", 0], "clip": ["dog", 1],
                                 "previous": ["dog", 3]}}
    graph["pair"]["inputs"].update(clip=["bench", 1], subject_word="cat; bench", concept=["bench", 3])
    for node in ("rec", "swap"):
        graph[node]["inputs"]["model"] = ["bench", 0]
    graph["masks"] = {"class_type": "MaskToImage", "inputs": {"mask": ["swap", 3]}}
    graph["save_masks"] = {"class_type": "SaveImage", "inputs": {"images": ["masks", 0],
                                                                "filename_prefix": "photoswap_e2e_two/masks"}}
    result = comfy_server.run(graph, timeout=900)
    swapped = _node_images(comfy_server, result, "save_swap")
    assert len(swapped) == 1 and swapped[0].is_file(), result.outputs
    masks = _node_images(comfy_server, result, "save_masks")
    assert len(masks) == 2  # one mask per subject pair
    with Image.open(masks[0]) as img:
        assert img.size == (96, 64)
