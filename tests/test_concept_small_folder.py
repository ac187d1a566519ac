"""The Concept Loader on a small-width SD1-topology diffusers folder (ComfyUI's shape detection does not know it).

The folder is the shared parity model `../shared/parity/tiny_sd` (widths 32/64/64/64, context 32, 2-layer CLIP of
width 32, 32-channel VAE). Loaded through the node, each component is compared with the same component loaded by
diffusers/transformers from the same folder, on the same inputs: the UNet's ε, the CLIP's embeddings, the VAE's latent
mean and decoded image. A textual-inversion embedding of width 32 is used with the loaded CLIP, and folders whose
configs ComfyUI's SD classes cannot build are refused with an error naming the config entry.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from devtools.comfy_env import bootstrap

bootstrap()

pytestmark = pytest.mark.integration

FOLDER = "tiny_sd"
PROMPT = "a photo of a sks man"


@pytest.fixture(scope="module")
def model_dirs(comfy, parity_dir, tmp_path_factory):
    """models/diffusers (holding a link to the shared tiny folder) and models/embeddings, registered with
    folder_paths and removed afterwards."""
    import folder_paths

    root = tmp_path_factory.mktemp("small_folder_models")
    dirs = {name: root / name for name in ("diffusers", "embeddings")}
    for name, d in dirs.items():
        d.mkdir()
        folder_paths.add_model_folder_path(name, str(d))
        folder_paths.filename_list_cache.pop(name, None)
    os.symlink(parity_dir / FOLDER, dirs["diffusers"] / FOLDER)
    yield dirs
    for name, d in dirs.items():
        paths = folder_paths.folder_names_and_paths[name][0]
        if str(d) in paths:
            paths.remove(str(d))
        folder_paths.filename_list_cache.pop(name, None)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def node(pack):
    from comfyui_photoswap.nodes.concept_nodes import PhotoswapConceptLoader

    return PhotoswapConceptLoader


def run_node(node, **kwargs):
    """Execute the node the way ComfyUI's executor does (locked class clone, EXECUTE_NORMALIZED)."""
    from comfy_api.internal import make_locked_method_func

    return make_locked_method_func(node, "EXECUTE_NORMALIZED", node.PREPARE_CLASS_CLONE({}))(**kwargs).result


@pytest.fixture(scope="module")
def loaded(node, model_dirs):
    return run_node(node, source="diffusers folder", diffusers_folder=FOLDER, concept_words="sks man",
                    class_word="man")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


def test_loads_through_comfy_classes(loaded):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd

    model, clip, vae, concept = loaded
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and isinstance(clip, comfy.sd.CLIP)
    assert isinstance(vae, comfy.sd.VAE)
    assert type(model.model.model_config).__name__ == "SD15"  # the scheduler says epsilon
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert model.model.model_config.unet_config["model_channels"] == 32
    assert model.model.latent_format.scale_factor == pytest.approx(0.18215)
    assert (concept.words, concept.class_word, concept.kind) == ("sks man", "man", "diffusers")
    assert concept.token_ids == (48136, 786) and "'sks' is one token" in concept.report


def test_unet_equals_diffusers(loaded, parity_dir):
    import comfy.model_management as mm
    from diffusers import UNet2DConditionModel

    model = loaded[0]
    reference = UNet2DConditionModel.from_pretrained(parity_dir / FOLDER / "unet").float().eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 32, 24), generator=gen)
    context = torch.randn((2, 77, 32), generator=gen)
    t = torch.tensor([999, 321])
    mm.load_models_gpu([model])
    unet = model.model.diffusion_model
    with torch.no_grad():
        device, dtype = next(unet.parameters()).device, model.model.get_dtype()
        got = unet(x.to(device, dtype), timesteps=t.to(device), context=context.to(device, dtype)).cpu()
        want = reference(x, t, encoder_hidden_states=context).sample
    assert relative_error(got, want) <= 1e-4, relative_error(got, want)
    assert float(want.std()) > 0.1  # the comparison is not of two near-zero outputs


def test_clip_equals_transformers(loaded, parity_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    clip = loaded[1]
    folder = parity_dir / FOLDER
    ids = CLIPTokenizer.from_pretrained(folder / "tokenizer")(PROMPT, padding="max_length", max_length=77,
                                                             return_tensors="pt").input_ids
    with torch.no_grad():
        want = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)(ids).last_hidden_state
    got = clip.encode_from_tokens(clip.tokenize(PROMPT))
    assert got.shape == (1, 77, 32)
    torch.testing.assert_close(got.float().cpu(), want, rtol=1e-4, atol=1e-5)


def test_vae_equals_diffusers(loaded, parity_dir):
    from diffusers import AutoencoderKL

    vae = loaded[2]
    reference = AutoencoderKL.from_pretrained(parity_dir / FOLDER / "vae").float().eval()
    image = torch.rand((1, 64, 48, 3), generator=torch.Generator().manual_seed(1))  # ComfyUI IMAGE: BHWC in [0, 1]
    latent = vae.encode(image)
    with torch.no_grad():
        mean = reference.encode(image.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
        decoded = (reference.decode(mean).sample.clamp(-1, 1) + 1) / 2
    assert latent.shape == (1, 4, 8, 6)
    assert relative_error(latent.cpu(), mean) <= 1e-4, relative_error(latent.cpu(), mean)
    got = vae.decode(latent).reshape(1, 64, 48, 3).cpu()
    assert relative_error(got, decoded.permute(0, 2, 3, 1)) <= 1e-4


def test_textual_inversion_of_the_small_width(node, loaded, model_dirs):
    """An embedding whose two vectors are the token embeddings of "sks man" encodes like the words themselves."""
    import safetensors.torch

    clip = loaded[1]
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.detach().float().cpu()
    vectors = table[[48136, 786]].clone()
    safetensors.torch.save_file({"emb_params": vectors}, model_dirs["embeddings"] / "tiny_sks_man.safetensors")
    safetensors.torch.save_file({"emb_params": torch.zeros(1, 768)}, model_dirs["embeddings"] / "wide.safetensors")
    import folder_paths

    folder_paths.filename_list_cache.pop("embeddings", None)
    _m, ti_clip, _v, concept = run_node(node, source="embedding", embedding_name="tiny_sks_man.safetensors",
                                        clip=clip)
    assert concept.words == "embedding:tiny_sks_man" and concept.embedding_name == "tiny_sks_man"
    with_embedding = ti_clip.encode_from_tokens(ti_clip.tokenize(f"a photo of a {concept.words}"))
    with_words = clip.encode_from_tokens(clip.tokenize(PROMPT))
    torch.testing.assert_close(with_embedding, with_words, rtol=0, atol=1e-5)
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    with pytest.raises(PhotoswapInputError) as info:  # an SD1.5-width embedding does not fit this CLIP
        run_node(node, source="embedding", embedding_name="wide.safetensors", clip=clip)
    assert info.value.input_name == "embedding_name" and "[32]" in str(info.value)


def _variant(model_dirs, parity_dir, name: str, part: str, **changes) -> str:
    """A copy of the tiny folder (links to its files) whose `part`/config.json has `changes`."""
    folder = model_dirs["diffusers"] / name
    folder.mkdir()
    for entry in (parity_dir / FOLDER).iterdir():
        if entry.name != part:
            os.symlink(entry, folder / entry.name)
    (folder / part).mkdir()
    for f in (parity_dir / FOLDER / part).iterdir():
        if f.name != "config.json":
            os.symlink(f, folder / part / f.name)
    cfg = json.loads((parity_dir / FOLDER / part / "config.json").read_text())
    (folder / part / "config.json").write_text(json.dumps({**cfg, **changes}))
    return name


@pytest.mark.parametrize("part,changes,named", [
    ("unet", {"norm_num_groups": 16}, "norm_num_groups"),
    ("unet", {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"]}, "down blocks"),
    ("unet", {"attention_head_dim": [2, 3, 4, 4]}, "head"),
    ("text_encoder", {"hidden_act": "relu"}, "hidden_act"),
    ("vae", {"latent_channels": 8}, "latent_channels"),
])
def test_unbuildable_configs_are_refused(node, model_dirs, parity_dir, part, changes, named):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    name = _variant(model_dirs, parity_dir, f"bad_{part}_{named.replace(' ', '_')}", part, **changes)
    with pytest.raises(PhotoswapInputError) as info:
        run_node(node, source="diffusers folder", diffusers_folder=name, concept_words="sks man")
    message = str(info.value)
    assert info.value.input_name == "diffusers_folder" and named in message and name in message, message
