"""Concept loading (photoswap_core.concept, PhotoswapConceptLoader) in a real in-process ComfyUI.

Every form is created here with random weights in temporary model folders registered with ComfyUI's folder_paths:
a full-architecture SD1.5 diffusers folder written by diffusers' own `save_pretrained` (plus a variant whose
tokenizer has an added token "<sks>" with a trained embedding row), a single-file checkpoint made from that variant
through ComfyUI's own saving logic, LoRA files in kohya and diffusers/PEFT key formats, embeddings and bad inputs.
Everything is then loaded through the node. Weights are fp16 on disk (ComfyUI loads them as fp32 on the CPU, so
"equal" means bit-equal after the upcast).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

import pytest
import torch

from devtools.comfy_env import bootstrap

# The repo root is a package whose __init__ imports comfy_api: ComfyUI must be importable before pytest imports it.
bootstrap()

pytestmark = pytest.mark.integration

SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512, "act_fn": "silu",
}
# diffusers keys checked after loading (UNet keys are mapped to ComfyUI's with comfy.utils.unet_to_diffusers)
UNET_CHECK = ["conv_in.weight", "time_embedding.linear_1.weight",
              "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
              "down_blocks.1.resnets.0.conv1.weight", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
              "up_blocks.3.attentions.2.proj_out.weight", "conv_out.bias"]
TEXT_CHECK = ["text_model.embeddings.position_embedding.weight",
              "text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.encoder.layers.11.mlp.fc2.weight",
              "text_model.final_layer_norm.weight"]
VAE_CHECK = {"encoder.conv_in.weight": "encoder.conv_in.weight",
             "encoder.down_blocks.1.resnets.0.conv1.weight": "encoder.down.1.block.0.conv1.weight",
             "decoder.conv_out.weight": "decoder.conv_out.weight", "quant_conv.weight": "quant_conv.weight"}
ADDED_TOKEN = "<sks>"


# ---------------------------------------------------------------------------------------------------------------------
# building the forms
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def fill_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights in the module's dtype: fan-in scaled normals, norms near 1, small biases."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() >= 2:
            std = 0.5 if "embedding" in name else p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))


def _meta_built(factory, dtype=torch.float16):
    with torch.device("meta"):
        module = factory()
    module = module.to(dtype).to_empty(device="cpu")
    return module


def sd1_tokenizer_dir() -> str:
    import comfy.sd1_clip

    return os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer")


def write_sd15_diffusers(folder: str) -> dict:
    """A full-size SD1.5 pipeline with random fp16 weights via StableDiffusionPipeline.save_pretrained. Returns fp32
    copies of the tensors the tests check."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = _meta_built(lambda: UNet2DConditionModel.from_config(SD15_UNET))
    fill_(unet, 1)
    text = _meta_built(lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT)))
    fill_(text, 2)
    vae = _meta_built(lambda: AutoencoderKL.from_config(SD15_VAE))
    fill_(vae, 3)
    tokenizer = CLIPTokenizer.from_pretrained(sd1_tokenizer_dir())
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    text_sd = {("text_model." + k if not k.startswith("text_model.") else k): v  # transformers 5 drops the prefix
               for k, v in text.state_dict().items()}
    ref = {"unet": {k: unet.state_dict()[k].float().clone() for k in UNET_CHECK},
           "text": {k: text_sd[k].float().clone() for k in TEXT_CHECK + [
               "text_model.embeddings.token_embedding.weight"]},
           "vae": {k: vae.state_dict()[k].float().clone() for k in VAE_CHECK}}
    del pipe, unet, text, vae
    return ref


def write_added_token_variant(plain: str, folder: str) -> torch.Tensor:
    """`plain` with an added tokenizer token "<sks>" whose trained row is appended to the text encoder's token
    embedding (textual inversion inside DreamBooth). UNet/VAE are hard links. Returns the trained row (fp32)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    os.makedirs(folder)
    for part in ("unet", "vae"):
        os.makedirs(os.path.join(folder, part))
        for f in os.listdir(os.path.join(plain, part)):
            os.link(os.path.join(plain, part, f), os.path.join(folder, part, f))
    for f in ("model_index.json",):
        shutil.copy(os.path.join(plain, f), os.path.join(folder, f))
    shutil.copytree(os.path.join(plain, "scheduler"), os.path.join(folder, "scheduler"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(plain, "tokenizer"))
    assert tokenizer.add_tokens([ADDED_TOKEN]) == 1
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    text = CLIPTextModel.from_pretrained(os.path.join(plain, "text_encoder"), dtype=torch.float16)
    text.resize_token_embeddings(len(tokenizer))
    row = (torch.randn(768, generator=torch.Generator().manual_seed(7)) * 0.5).half()
    with torch.no_grad():
        text.get_input_embeddings().weight[49408] = row
    text.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
    with open(os.path.join(folder, "README.md"), "w") as fh:  # the model card diffusers' DreamBooth script writes
        fh.write("---\nlicense: creativeml-openrail-m\nbase_model: runwayml/stable-diffusion-v1-5\n"
                 f"instance_prompt: a photo of {ADDED_TOKEN} dog\ntags:\n- dreambooth\n---\n# DreamBooth\n")
    return row.float()


def lora_tensors(shapes: dict, rank: int, seed: int) -> dict:
    """{module: (down, up)} random LoRA factors; `shapes` = {module: (out, in[, kh, kw])}."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, shape in shapes.items():
        if len(shape) == 4:
            down = torch.randn((rank, shape[1], shape[2], shape[3]), generator=gen) * 0.1
            up = torch.randn((shape[0], rank, 1, 1), generator=gen) * 0.1
        else:
            down = torch.randn((rank, shape[1]), generator=gen) * 0.1
            up = torch.randn((shape[0], rank), generator=gen) * 0.1
        out[module] = (down.half(), up.half())
    return out


# diffusers module -> weight shape, for a LoRA on the SD1.5 base (UNet attention + a conv, one text-encoder layer)
SD15_LORA_UNET = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
                  "down_blocks.1.resnets.0.conv1": (640, 320, 3, 3),
                  "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (1280, 1280)}
SD15_LORA_TEXT = {"text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}
# the same layers as an SDXL base has them (context 2048, a second transformer block SD1.5 lacks)
SDXL_LORA_UNET = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048),
                  "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": (640, 640),
                  "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v": (1280, 2048)}


def write_lora(path: str, fmt: str, unet: dict, text: dict, rank: int = 4, alpha: float | None = None,
               seed: int = 11, metadata: dict | None = None, comfy_key=None, extra: dict | None = None) -> dict:
    """Write a LoRA in `fmt`: "kohya", "peft" (diffusers) or "comfy" (ComfyUI's Train LoRA / Save LoRA Weights:
    `diffusion_model.<ComfyUI module>` names, UNet only; `comfy_key` maps a diffusers module to it). Returns
    {module: (down, up)}."""
    import safetensors.torch

    factors = lora_tensors({**unet, **text}, rank, seed)
    sd = {}
    for module, (down, up) in factors.items():
        is_text = module in text
        if fmt in ("kohya", "comfy"):
            if fmt == "comfy":
                name = comfy_key(module)
            else:
                name = ("lora_te_" if is_text else "lora_unet_") + module.replace(".", "_")
            sd[f"{name}.lora_down.weight"] = down
            sd[f"{name}.lora_up.weight"] = up
            if alpha is not None:
                sd[f"{name}.alpha"] = torch.tensor(float(alpha))
        else:
            name = ("text_encoder." if is_text else "unet.") + module
            sd[f"{name}.lora_A.weight"] = down
            sd[f"{name}.lora_B.weight"] = up
    sd.update(extra or {})
    safetensors.torch.save_file(sd, path, metadata=metadata)
    return factors


def delta(down: torch.Tensor, up: torch.Tensor, shape) -> torch.Tensor:
    return (up.float().flatten(1) @ down.float().flatten(1)).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def C(comfy, pack):
    from comfyui_photoswap.photoswap_core import concept

    return concept


@pytest.fixture(scope="module")
def Err(pack):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    return PhotoswapInputError


@pytest.fixture(scope="module")
def Node(comfy, pack):
    from comfyui_photoswap.nodes.concept_nodes import PhotoswapConceptLoader

    return PhotoswapConceptLoader


FOLDERS = ("checkpoints", "diffusers", "loras", "embeddings")


@pytest.fixture(scope="module")
def dirs(comfy, tmp_path_factory):
    """Temporary models/<kind> folders registered with folder_paths, removed (files and registration) afterwards."""
    import folder_paths

    root = tmp_path_factory.mktemp("photoswap_models")
    out = {}
    for name in FOLDERS:
        d = root / name
        d.mkdir()
        folder_paths.add_model_folder_path(name, str(d))
        out[name] = str(d)
    yield out
    for name in FOLDERS:
        paths = folder_paths.folder_names_and_paths[name][0]
        if out[name] in paths:
            paths.remove(out[name])
        folder_paths.filename_list_cache.pop(name, None)
    shutil.rmtree(root, ignore_errors=True)


def refresh(name: str) -> None:
    import folder_paths

    folder_paths.filename_list_cache.pop(name, None)


@pytest.fixture(scope="module")
def plain(dirs):
    """The plain SD1.5 diffusers folder (name, reference tensors)."""
    folder = os.path.join(dirs["diffusers"], "sd15_plain")
    ref = write_sd15_diffusers(folder)
    free_memory()
    return "sd15_plain", ref


@pytest.fixture(scope="module")
def added(dirs, plain):
    """The added-token variant (name, trained row of "<sks>")."""
    folder = os.path.join(dirs["diffusers"], "sd15_sks")
    return "sd15_sks", write_added_token_variant(os.path.join(dirs["diffusers"], plain[0]), folder)


def run_node(Node, **kwargs):
    """Execute the node the way ComfyUI's executor does (locked class clone, EXECUTE_NORMALIZED)."""
    from comfy_api.internal import make_locked_method_func

    run = make_locked_method_func(Node, "EXECUTE_NORMALIZED", Node.PREPARE_CLASS_CLONE({}))
    out = run(**kwargs)
    return out.result, out


@pytest.fixture(scope="module")
def base(Node, plain):
    """The plain folder loaded through the node: (model, clip, vae, concept). Also the base for LoRA/embedding."""
    result, _ = run_node(Node, source="diffusers folder", diffusers_folder=plain[0], concept_words="sks dog")
    return result


def comfy_unet_key(model, diffusers_key: str) -> str:
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return "diffusion_model." + mapping[diffusers_key]


def unet_weight(model, diffusers_key: str) -> torch.Tensor:
    return model.model.state_dict()[comfy_unet_key(model, diffusers_key)]


def text_weight(clip, key: str) -> torch.Tensor:
    return clip.cond_stage_model.clip_l.transformer.state_dict()[key]


def assert_weights_equal(model, clip, vae, ref, vocab_rows=49408):
    for k in UNET_CHECK:
        torch.testing.assert_close(unet_weight(model, k).float(), ref["unet"][k], rtol=0, atol=0, msg=k)
    for k in TEXT_CHECK:
        torch.testing.assert_close(text_weight(clip, k).float(), ref["text"][k], rtol=0, atol=0, msg=k)
    emb = text_weight(clip, "text_model.embeddings.token_embedding.weight").float()
    torch.testing.assert_close(emb[:vocab_rows], ref["text"]["text_model.embeddings.token_embedding.weight"],
                               rtol=0, atol=0)
    vsd = vae.first_stage_model.state_dict()
    for dk, ck in VAE_CHECK.items():
        torch.testing.assert_close(vsd[ck].float(), ref["vae"][dk], rtol=0, atol=0, msg=dk)


def content_ids(clip, text):
    """Content tokens of `text` (ComfyUI's tokenization, primary encoder): ints and embedding tensors."""
    from comfyui_photoswap.photoswap_core.clip_tokens import content_tokens

    return content_tokens(clip, text)


def free_memory() -> None:
    """Drop what a test loaded: collect cycles, forget dead ComfyUI models, give freed pages back to the OS."""
    import ctypes
    import gc

    import comfy.model_management as mm

    gc.collect()
    mm.cleanup_models()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def contains(seq, sub) -> bool:
    return any(list(seq[i:i + len(sub)]) == list(sub) for i in range(len(seq) - len(sub) + 1))


# ---------------------------------------------------------------------------------------------------------------------
# node definition
# ---------------------------------------------------------------------------------------------------------------------
def test_node_schema(Node, pack):
    from comfyui_photoswap.nodes import NODE_CLASSES

    assert Node in NODE_CLASSES
    schema = Node.define_schema()
    assert schema.display_name == "Photoswap DreamBooth Concept Loader"
    assert schema.category == "photoswap/concept"
    assert schema.description
    assert all(inp.tooltip for inp in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    assert [o.io_type for o in schema.outputs] == ["MODEL", "CLIP", "VAE", "PHOTOSWAP_CONCEPT"]
    assert {i.id for i in schema.inputs if i.optional} == {"model", "clip", "vae", "previous"}
    v1 = Node.INPUT_TYPES()  # what /object_info serves
    assert v1["required"]["source"][1]["options"] == ["checkpoint", "diffusers folder", "lora", "embedding"]
    assert set(v1["optional"]) == {"model", "clip", "vae", "previous"}
    assert Node.GET_NODE_INFO_V1()["display_name"] == "Photoswap DreamBooth Concept Loader"


def test_combos_list_model_folders(Node, dirs, plain):
    refresh("diffusers")
    schema = Node.define_schema()
    options = {i.id: i.options for i in schema.inputs if hasattr(i, "options") and i.options is not None}
    assert plain[0] in options["diffusers_folder"]
    for name in ("ckpt_name", "diffusers_folder", "lora_name", "embedding_name"):
        assert options[name][0] == "(none)"  # a valid value even when the folder is empty


# ---------------------------------------------------------------------------------------------------------------------
# concept words: metadata, validation, report
# ---------------------------------------------------------------------------------------------------------------------
def test_word_metadata_sources(C, tmp_path):
    import safetensors.torch

    t = {"x": torch.zeros(1)}
    f = tmp_path / "a.safetensors"
    safetensors.torch.save_file(t, f, metadata={"photoswap.concept_words": "zwx toy", "photoswap.class_word": "toy"})
    meta = C.find_word_metadata(str(f))
    assert (meta.words, meta.class_word) == ("zwx toy", "toy")
    (tmp_path / "a.json").write_text(json.dumps({"concept_words": "sks cat", "class_word": "cat"}))
    assert C.find_word_metadata(str(f)).words == "sks cat"  # sidecar wins over the header
    g = tmp_path / "k.safetensors"
    safetensors.torch.save_file(t, g, metadata={"ss_dataset_dirs": json.dumps({"20_ohwx man": {"n_repeats": 20}})})
    assert C.find_word_metadata(str(g)).words == "ohwx man"
    h = tmp_path / "h.safetensors"
    safetensors.torch.save_file(t, h)
    assert C.find_word_metadata(str(h)) is None
    (tmp_path / "h.txt").write_text("\n  sks backpack \n")
    assert C.find_word_metadata(str(h)).words == "sks backpack"
    (tmp_path / "c.json").write_text(json.dumps({"trainedWords": ["tok shoe", "other"]}))
    assert C.find_word_metadata(str(tmp_path / "c.ckpt")).words == "tok shoe"
    assert C.words_from_instance_prompt("a photo of sks dog") == "sks dog"
    assert C.words_from_instance_prompt("A picture of an sks teapot.") == "sks teapot"
    assert C.words_from_instance_prompt("sks dog sitting on a beach in summer") is None
    meta = C.WordMetadata(words="sks cat", class_word="cat", origin="x")
    assert C.resolve_words("sks dog", "", meta, prefer_metadata=True) == ("sks cat", "cat", "x")
    assert C.resolve_words("sks  dog ", "", meta, prefer_metadata=False)[:2] == ("sks dog", "")


def test_tokenization_report_and_common_word_warning(C, caplog):
    with caplog.at_level(logging.INFO):
        ids, strings, report = C.analyse_words(None, "sks dog", "dog", kind="checkpoint", origin="test")
    assert ids == (48136, 1929) and strings == ("sks</w>", "dog</w>")
    assert "'sks' is one token (id 48136" in report
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _ids, _s, report = C.analyse_words(None, "dog man", "man", kind="checkpoint", origin="test")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'dog' is a common word" in warnings[0]
    assert "WARNING" in report
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _ids, _s, report = C.analyse_words(None, "zwx dog", "", kind="lora", origin="test")
    assert "splits into 2 tokens" in report and "inferred" in report
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------------------------------
# diffusers folder
# ---------------------------------------------------------------------------------------------------------------------
def test_diffusers_added_token(Node, C, dirs, added, plain):
    from transformers import CLIPTextModel, CLIPTokenizer

    name, row = added
    (model, clip, vae, concept), out = run_node(Node, source="diffusers folder", diffusers_folder=name,
                                                concept_words="ignored words")
    # words from the model card's instance prompt; the added token is one token with its trained row
    assert concept.words == f"{ADDED_TOKEN} dog" and concept.token_ids == (49408, 1929)
    assert "added token" in concept.report and out.ui is not None
    assert C.unused_added_tokens_warning(name, [ADDED_TOKEN], concept.token_ids, concept.words) is None
    assert "do not use them" in C.unused_added_tokens_warning(name, [ADDED_TOKEN], (48136, 1929), "sks dog")
    emb = text_weight(clip, "text_model.embeddings.token_embedding.weight").float()
    assert emb.shape[0] == 49409
    torch.testing.assert_close(emb[49408], row, rtol=0, atol=0)
    assert_weights_equal(model, clip, vae, plain[1])
    prompt = f"a photo of a {ADDED_TOKEN} dog"
    assert contains(content_ids(clip, prompt), concept.token_ids)
    # the encoding equals the diffusers text encoder's with its own tokenizer (what DreamBooth trained against)
    folder = os.path.join(dirs["diffusers"], name)
    hf_tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    hf_te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), dtype=torch.float32)
    ids = hf_tok(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert 49408 in ids[0].tolist()
    with torch.no_grad():
        expected = hf_te(ids).last_hidden_state
    cond = clip.encode_from_tokens(clip.tokenize(prompt))
    torch.testing.assert_close(cond.float(), expected, rtol=1e-3, atol=1e-3)
    # the input-less tokenizer of another CLIP is untouched (the loader copies, never mutates shared objects)
    import comfy.sd1_clip

    assert comfy.sd1_clip.SDTokenizer().tokenizer(prompt)["input_ids"].count(49408) == 0
    del model, clip, vae, hf_te, out
    free_memory()


def test_diffusers_folder_weights_and_concept(base, plain):
    model, clip, vae, concept = base
    assert_weights_equal(model, clip, vae, plain[1])
    assert type(model.model.model_config).__name__ == "SD15"
    assert (concept.words, concept.kind, concept.class_word) == ("sks dog", "diffusers", "")
    assert concept.token_ids == (48136, 1929) and concept.source == plain[0]
    assert "'sks' is one token" in concept.report
    target = content_ids(clip, "a photo of a sks dog")
    assert contains(target, concept.token_ids)


def test_diffusers_folder_missing_unet(Node, Err, dirs, plain):
    broken = os.path.join(dirs["diffusers"], "no_unet")
    os.makedirs(broken)
    for part in ("text_encoder", "vae", "tokenizer"):
        os.makedirs(os.path.join(broken, part))
    shutil.copy(os.path.join(dirs["diffusers"], plain[0], "model_index.json"), broken)
    refresh("diffusers")
    with pytest.raises(Err) as info:
        run_node(Node, source="diffusers folder", diffusers_folder="no_unet", concept_words="sks dog")
    assert "no unet/ subfolder" in str(info.value) and info.value.input_name == "diffusers_folder"


# ---------------------------------------------------------------------------------------------------------------------
# single-file checkpoint
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(dirs, base, added):
    """A single-file checkpoint saved in ComfyUI's layout (what CheckpointSave writes), fp16, from the plain folder's
    loaded weights plus the "<sks>" row appended to the token embedding (49409 rows: what saving a CLIP with an added
    token gives). Its sidecar JSON names the concept and the added token (the file alone cannot: no tokenizer)."""
    import comfy.utils

    model, clip, vae, _c = base
    clip_sd = clip.get_sd()
    key = "clip_l.transformer.text_model.embeddings.token_embedding.weight"
    clip_sd[key] = torch.cat([clip_sd[key], added[1][None].to(clip_sd[key].dtype)])
    sd = model.model.state_dict_for_saving(clip_sd, vae.get_sd())
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path = os.path.join(dirs["checkpoints"], "sks_dog.safetensors")
    comfy.utils.save_torch_file(sd, path)
    del sd, clip_sd
    free_memory()
    with open(os.path.join(dirs["checkpoints"], "sks_dog.json"), "w") as fh:
        json.dump({"concept_words": f"{ADDED_TOKEN} dog", "class_word": "dog", "added_tokens": [ADDED_TOKEN]}, fh)
    refresh("checkpoints")
    return "sks_dog.safetensors"


def test_checkpoint_file(Node, checkpoint, added, plain, pack):
    """Weights, the added token restored from the sidecar, and the concept feeding PhotoswapPromptPair."""
    (model, clip, vae, concept), _ = run_node(Node, source="checkpoint", ckpt_name=checkpoint, concept_words="x y")
    assert_weights_equal(model, clip, vae, plain[1])
    assert type(model.model.model_config).__name__ == "SD15"
    assert (concept.words, concept.class_word, concept.kind) == (f"{ADDED_TOKEN} dog", "dog", "checkpoint")
    assert concept.token_ids == (49408, 1929)
    torch.testing.assert_close(text_weight(clip, "text_model.embeddings.token_embedding.weight")[49408].float(),
                               added[1], rtol=0, atol=0)
    assert contains(content_ids(clip, f"a photo of a {ADDED_TOKEN} dog"), concept.token_ids)
    try:
        from comfyui_photoswap.nodes.prompt_nodes import PhotoswapPromptPair
    except ImportError:  # the prompt pair is another stage; the encode check above covers the target prompt
        PhotoswapPromptPair = None
    if PhotoswapPromptPair is not None:
        out = PhotoswapPromptPair.execute(clip=clip, source_prompt="a photo of a dog", subject_word="dog",
                                          concept_words="unused", concept=concept)
        pair = out.result[3]
        assert pair.target_prompt == f"a photo of a {ADDED_TOKEN} dog"
        assert contains(pair.target_ids, concept.token_ids)
        assert [pair.target_ids[i] for i in pair.target_subject_positions] == [49408]
    del model, clip, vae
    free_memory()


def test_pickle_ckpt_refused(Node, Err, dirs):
    path = os.path.join(dirs["checkpoints"], "pickled.ckpt")
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}, path)
    tensors_only = os.path.join(dirs["checkpoints"], "not_a_model.ckpt")
    torch.save({"state_dict": {"foo.weight": torch.zeros(2, 2)}}, tensors_only)
    refresh("checkpoints")
    with pytest.raises(Err) as info:
        run_node(Node, source="checkpoint", ckpt_name="pickled.ckpt", concept_words="sks dog")
    assert "safe loader" in str(info.value) and info.value.input_name == "ckpt_name"
    with pytest.raises(Err) as info:  # read by the safe loader, but not a model
        run_node(Node, source="checkpoint", ckpt_name="not_a_model.ckpt", concept_words="sks dog")
    assert info.value.input_name == "ckpt_name"


def test_empty_concept_words(Node, Err, dirs, plain, added):
    with pytest.raises(Err) as info:
        run_node(Node, source="diffusers folder", diffusers_folder=plain[0], concept_words="   ")
    assert info.value.input_name == "concept_words"
    with pytest.raises(Err) as info:  # metadata cannot be used when turned off
        run_node(Node, source="diffusers folder", diffusers_folder="sd15_sks", concept_words="",
                 prefer_metadata=False)
    assert info.value.input_name == "concept_words"


def test_class_word_must_be_in_words(Node, Err, plain):
    with pytest.raises(Err) as info:
        run_node(Node, source="diffusers folder", diffusers_folder=plain[0], concept_words="sks dog",
                 class_word="cat")
    assert info.value.input_name == "class_word"


# ---------------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------------
def patched(model_or_clip, keys_fn):
    """Weights after ComfyUI's real patching (load_models_gpu), then unpatched again."""
    import comfy.model_management as mm

    patcher = getattr(model_or_clip, "patcher", model_or_clip)
    mm.load_models_gpu([patcher])
    try:
        return {k: v.float().clone() for k, v in keys_fn().items()}
    finally:
        mm.unload_all_models()


NORM = "down_blocks.0.attentions.0.norm"  # a 1-D weight: ComfyUI's trainer stores a plain ".diff" for those


@pytest.mark.parametrize("fmt", ["kohya", "peft", "comfy"])
def test_lora_delta(Node, dirs, base, fmt):
    """Patched weights (ComfyUI's real load/patch path) = base + up@down * alpha/rank * strength; 0 = unchanged."""
    model, clip, _vae, _concept = base
    rank = 4
    if fmt in ("kohya", "comfy"):
        alpha, metadata = 2.0, None
        scale = alpha / rank
    else:  # diffusers writes PEFT's lora_alpha into the header; absent, alpha = rank (scale 1)
        alpha, metadata = None, {"lora_adapter_metadata": json.dumps({"unet": {"r": rank, "lora_alpha": 8},
                                                                      "text_encoder": {"r": rank, "lora_alpha": 8}})}
        scale = 8 / rank
    text = {} if fmt == "comfy" else SD15_LORA_TEXT

    def comfy_module(module):
        return comfy_unet_key(model, module + ".weight")[:-len(".weight")]

    norm_diff = torch.randn(320, generator=torch.Generator().manual_seed(3)).half() * 0.1
    extra = {comfy_module(NORM) + ".diff": norm_diff} if fmt == "comfy" else None
    name = f"dog_{fmt}.safetensors"
    factors = write_lora(os.path.join(dirs["loras"], name), fmt, SD15_LORA_UNET, text, rank, alpha,
                         metadata=metadata, comfy_key=comfy_module, extra=extra)
    with open(os.path.join(dirs["loras"], f"dog_{fmt}.txt"), "w") as fh:
        fh.write("sks dog\n")
    refresh("loras")

    def unet_now(m):
        return lambda: {k: unet_weight(m, k + ".weight") for k in [*SD15_LORA_UNET, NORM]}

    def text_now(c):
        return lambda: {k: text_weight(c, k + ".weight") for k in SD15_LORA_TEXT}

    before_u = patched(model, unet_now(model))
    before_t = patched(clip, text_now(clip))
    (m1, c1, v1, concept), _ = run_node(Node, source="lora", lora_name=name, model=model, clip=clip,
                                        strength_model=1.0, strength_clip=1.0, concept_words="widget words")
    assert (concept.words, concept.kind, concept.token_ids) == ("sks dog", "lora", (48136, 1929))
    assert v1 is None and m1 is not model and c1 is not clip
    after_u = patched(m1, unet_now(m1))
    after_t = patched(c1, text_now(c1))
    for k, shape in SD15_LORA_UNET.items():
        down, up = factors[k]
        torch.testing.assert_close(after_u[k] - before_u[k], delta(down, up, shape) * scale, rtol=1e-4, atol=1e-5)
    norm_expected = norm_diff.float() if fmt == "comfy" else torch.zeros(320)
    torch.testing.assert_close(after_u[NORM] - before_u[NORM], norm_expected, rtol=1e-4, atol=1e-5)
    for k, shape in text.items():
        down, up = factors[k]
        torch.testing.assert_close(after_t[k] - before_t[k], delta(down, up, shape) * scale, rtol=1e-4, atol=1e-5)
    if not text:
        for k, v in after_t.items():
            torch.testing.assert_close(v, before_t[k], rtol=0, atol=0)
    # strength 0: nothing changes
    (m0, c0, _v, _c), _ = run_node(Node, source="lora", lora_name=name, model=model, clip=clip,
                                   strength_model=0.0, strength_clip=0.0)
    for k, v in patched(m0, unet_now(m0)).items():
        torch.testing.assert_close(v, before_u[k], rtol=0, atol=0)
    for k, v in patched(c0, text_now(c0)).items():
        torch.testing.assert_close(v, before_t[k], rtol=0, atol=0)
    # the base objects were never changed
    for k, v in patched(model, unet_now(model)).items():
        torch.testing.assert_close(v, before_u[k], rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_wrong_family(Node, Err, dirs, base, fmt):
    model, clip, _vae, _concept = base
    name = f"sdxl_{fmt}.safetensors"
    write_lora(os.path.join(dirs["loras"], name), fmt, SDXL_LORA_UNET, {}, 4, 4.0)
    refresh("loras")
    with pytest.raises(Err) as info:
        run_node(Node, source="lora", lora_name=name, model=model, clip=clip, concept_words="sks dog")
    msg = str(info.value)
    assert info.value.input_name == "lora_name" and "SDXL" in msg and "SD15" in msg, msg


def test_lora_without_matching_keys(Node, Err, dirs, base):
    import safetensors.torch

    model, clip, _vae, _concept = base
    sd = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072).half(),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4).half()}
    safetensors.torch.save_file(sd, os.path.join(dirs["loras"], "flux.safetensors"))
    refresh("loras")
    with pytest.raises(Err) as info:
        run_node(Node, source="lora", lora_name="flux.safetensors", model=model, clip=clip, concept_words="sks dog")
    assert "DiT" in str(info.value) and info.value.input_name == "lora_name"
    with pytest.raises(Err) as info:
        run_node(Node, source="lora", lora_name="flux.safetensors", concept_words="sks dog")
    assert info.value.input_name == "model"


# ---------------------------------------------------------------------------------------------------------------------
# textual-inversion embedding
# ---------------------------------------------------------------------------------------------------------------------
def test_embedding(Node, dirs, base):
    import safetensors.torch

    _model, clip, _vae, _concept = base
    vectors = torch.randn((2, 768), generator=torch.Generator().manual_seed(5))
    safetensors.torch.save_file({"emb_params": vectors}, os.path.join(dirs["embeddings"], "my_cat.safetensors"))
    refresh("embeddings")
    (m, c, v, concept), _ = run_node(Node, source="embedding", embedding_name="my_cat.safetensors", clip=clip,
                                     class_word="cat", concept_words="ignored")
    assert m is None and v is None
    assert (concept.words, concept.embedding_name, concept.kind) == ("embedding:my_cat cat", "my_cat", "embedding")
    assert concept.token_ids == (2368,)  # the class word; the embedding's vectors are not ids
    tokens = content_ids(c, f"a photo of a {concept.words}")
    vecs = [t for t in tokens if isinstance(t, torch.Tensor)]
    assert len(vecs) == 2
    for got, want in zip(vecs, vectors):
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0)
    assert contains([t for t in tokens if not isinstance(t, torch.Tensor)], concept.token_ids)
    plain_cond = c.encode_from_tokens(c.tokenize("a photo of a cat"))
    cond = c.encode_from_tokens(c.tokenize(f"a photo of a {concept.words}"))
    assert cond.shape == (1, 77, 768) and not torch.allclose(cond, plain_cond)


def test_embedding_errors(Node, Err, dirs, base):
    import safetensors.torch

    _model, clip, _vae, _concept = base
    sd2_path = os.path.join(dirs["embeddings"], "sd2.safetensors")
    safetensors.torch.save_file({"emb_params": torch.zeros(1, 1024)}, sd2_path)
    refresh("embeddings")
    with pytest.raises(Err) as info:
        run_node(Node, source="embedding", embedding_name="does_not_exist.pt", clip=clip)
    assert info.value.input_name == "embedding_name" and "sd2.safetensors" in str(info.value)
    with pytest.raises(Err) as info:
        run_node(Node, source="embedding", embedding_name="sd2.safetensors", clip=clip)
    assert "another model family" in str(info.value)
    with pytest.raises(Err) as info:
        run_node(Node, source="embedding", embedding_name="sd2.safetensors")
    assert info.value.input_name == "clip"


# ---------------------------------------------------------------------------------------------------------------------
# small pieces
# ---------------------------------------------------------------------------------------------------------------------
def test_prediction_type_from_scheduler(C, tiny_sd15):
    import comfy.model_sampling

    m = C.apply_prediction_type(tiny_sd15.model, "v_prediction")
    assert m is not tiny_sd15.model
    assert isinstance(m.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    assert C.apply_prediction_type(tiny_sd15.model, "epsilon") is tiny_sd15.model
    assert C.apply_prediction_type(tiny_sd15.model, None) is tiny_sd15.model


def test_fingerprint_changes_with_file(Node, dirs, tmp_path):
    import safetensors.torch

    path = os.path.join(dirs["loras"], "fp.safetensors")
    safetensors.torch.save_file({"a": torch.zeros(1)}, path)
    refresh("loras")
    first = Node.fingerprint_inputs(source="lora", lora_name="fp.safetensors")
    assert first
    safetensors.torch.save_file({"a": torch.zeros(3)}, path)
    assert Node.fingerprint_inputs(source="lora", lora_name="fp.safetensors") != first


def _concept_digest(loaded):
    """What a concept source produces, for the regression digests: the concept (file names only: temp folders vary),
    sums of a sample of the patched diffusion weights, the target prompt's encoding and the VAE's first weights."""
    model, clip, vae, concept = loaded
    fields = {k: (os.path.basename(v) if k == "source" else v) for k, v in concept.__dict__.items() if k != "report"}
    out = {"concept": fields, "report_lines": len(concept.report.splitlines())}
    if model is not None:
        keys = ["conv_in.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight", "conv_out.bias"]
        out["unet"] = patched(model, lambda: {k: unet_weight(model, k) for k in keys})
    if clip is not None:
        out["encoded"] = clip.encode_from_tokens(clip.tokenize(f"a photo of a {concept.words}"))
    if vae is not None:
        out["vae"] = vae.get_sd()["encoder.conv_in.weight"]
    return out


def test_every_source_output_is_unchanged(Node, dirs, base, added, checkpoint):
    """Behaviour pin for refactors (see tests/test_regression_digests.py): each concept source's outputs."""
    import safetensors.torch
    from test_regression_digests import check_digests

    model, clip, _vae, _concept = base
    write_lora(os.path.join(dirs["loras"], "pin_kohya.safetensors"), "kohya", SD15_LORA_UNET, SD15_LORA_TEXT, 4, 2.0)
    vectors = torch.randn((2, 768), generator=torch.Generator().manual_seed(9))
    safetensors.torch.save_file({"emb_params": vectors}, os.path.join(dirs["embeddings"], "pin_cat.safetensors"))
    refresh("loras")
    refresh("embeddings")
    outputs = {"diffusers": _concept_digest(base)}
    outputs["diffusers_added"] = _concept_digest(run_node(Node, source="diffusers folder", diffusers_folder=added[0],
                                                          concept_words="sks dog")[0])
    outputs["checkpoint"] = _concept_digest(run_node(Node, source="checkpoint", ckpt_name=checkpoint,
                                                     concept_words="x y")[0])
    outputs["lora"] = _concept_digest(run_node(Node, source="lora", lora_name="pin_kohya.safetensors", model=model,
                                               clip=clip, strength_model=0.7, strength_clip=0.5,
                                               concept_words="sks dog", class_word="dog")[0])
    outputs["embedding"] = _concept_digest(run_node(Node, source="embedding", embedding_name="pin_cat.safetensors",
                                                    clip=clip, class_word="cat")[0])
    free_memory()
    check_digests("concept_sources", outputs)


# ---------------------------------------------------------------------------------------------------------------------
# end to end: the node inside a real headless ComfyUI server
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_node_in_real_server(tmp_path, pack):
    """CheckpointLoaderSimple (random SD1.5) -> concept loader (source lora) -> PreviewAny, through /prompt; then a
    family-mismatch LoRA surfaces as the node's execution error."""
    from devtools.checkpoints import checkpoint_path
    from devtools.server import ComfyServer, ExecutionFailed

    if not checkpoint_path("sd15").exists():
        pytest.skip("random SD1.5 checkpoint not built (scripts/make_checkpoints.py; scripts/test.sh does it)")
    good, bad = tmp_path / "e2e_dog.safetensors", tmp_path / "e2e_sdxl.safetensors"
    write_lora(str(good), "kohya", SD15_LORA_UNET, SD15_LORA_TEXT, 4, 4.0)
    write_lora(str(bad), "peft", SDXL_LORA_UNET, {}, 4)
    with ComfyServer(workdir=tmp_path / "server", checkpoints=("sd15",)) as server:
        server.start()
        server.add_model("loras", good)
        server.add_model("loras", bad)
        info = server.object_info("PhotoswapConceptLoader")["PhotoswapConceptLoader"]
        assert info["display_name"] == "Photoswap DreamBooth Concept Loader"

        def graph(lora):
            return {
                "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_path("sd15").name}},
                "2": {"class_type": "PhotoswapConceptLoader",
                      "inputs": {"source": "lora", "ckpt_name": "(none)", "diffusers_folder": "(none)",
                                 "lora_name": lora, "embedding_name": "(none)", "concept_words": "sks dog",
                                 "class_word": "dog", "prefer_metadata": True, "strength_model": 1.0,
                                 "strength_clip": 1.0, "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]}},
                "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
            }

        result = server.run(graph(good.name), timeout=300)
        outputs = result.outputs
        assert "sks dog" in json.dumps(outputs["3"]) and "'sks' is one token" in json.dumps(outputs["2"])
        with pytest.raises(ExecutionFailed) as info:
            server.run(graph(bad.name), timeout=300)
        assert info.value.node_type == "PhotoswapConceptLoader" and "SDXL" in info.value.exception_message
