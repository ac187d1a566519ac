"""The toy model's architecture, the SD1 tokenization ComfyUI uses, and the diffusers folder it is saved as.

Why one module: training (diffusers/transformers classes) and inference (ComfyUI's classes, through the pack's
Concept Loader) must agree exactly on configs, tokenization and file layout; both read them here.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# the committed weights; TOYWORLD_WEIGHTS points the harness and the training scripts elsewhere (development)
WEIGHTS = Path(os.environ.get("TOYWORLD_WEIGHTS", Path(__file__).resolve().parent / "weights"))
BASE_NAME = "toyworld_base"
CONCEPT_NAME = "toyworld_sks_square"
LORA_NAME = "toyworld_sks_square_lora.safetensors"
EMBEDDING_NAME = "toyworld_sks.safetensors"
MAX_TOKENS, BOS, EOS = 77, 49406, 49407
SCALE = 0.18215  # SD1 latent scale: ComfyUI's SD15 latent format multiplies VAE latents by it

TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4,
               "num_hidden_layers": 3, "max_position_embeddings": MAX_TOKENS, "hidden_act": "quick_gelu",
               "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
UNET_CHANNELS = (32, 64, 64, 64)
UNET_CONFIG = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": UNET_CHANNELS,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    "attention_head_dim": [c // 16 for c in UNET_CHANNELS],  # diffusers' SD1 name for the head COUNT: 16-wide heads
    "norm_num_groups": 32, "use_linear_projection": False,
}
VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
              "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [64, 64, 128, 128],
              "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 64,
              "scaling_factor": SCALE}
SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
                    "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}
PREDICTIONS = ("epsilon", "v_prediction")  # the committed weights: epsilon (SCHEDULER_CONFIG's default)


def use_prediction(prediction: str) -> None:
    """Make `prediction` the objective that training, sampling and saved folders use (SCHEDULER_CONFIG).

    Why a choice: at 2600 UNet steps v-prediction bound the prompt far better in this small model (background colour
    100 % of held-out generations against 31 % with epsilon; at 5200 steps epsilon binds it too), but the v model's
    swap keeps less of the photo than no swap (docs/quality.md, "ε or v?"), so epsilon stays the committed default."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction {prediction!r}: use one of {PREDICTIONS}")
    SCHEDULER_CONFIG["prediction_type"] = prediction


def training_scheduler():
    """diffusers' DDPMScheduler of SCHEDULER_CONFIG (the training noise schedule and its alphas_cumprod)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if k != "_class_name"})


def folder_prediction(folder: Path) -> str:
    """The objective a saved diffusers folder was trained with (its scheduler config)."""
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]


def training_target(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output under SCHEDULER_CONFIG's objective: the noise (epsilon), or
    v = sqrt(a) noise - sqrt(1-a) x0 (a per sample, broadcast over C, H, W)."""
    if SCHEDULER_CONFIG["prediction_type"] == "epsilon":
        return noise
    a = alphas_cumprod_t.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def tokenizer_dir() -> Path:
    """The real SD1 CLIP tokenizer files, as ComfyUI ships them (comfy/sd1_tokenizer)."""
    from devtools.comfy_env import comfyui_path

    return comfyui_path() / "comfy" / "sd1_tokenizer"


_TOKENIZER = {}


def tokenizer():
    if "tok" not in _TOKENIZER:
        from transformers import CLIPTokenizer

        _TOKENIZER["tok"] = CLIPTokenizer.from_pretrained(str(tokenizer_dir()))
    return _TOKENIZER["tok"]


def token_ids(text: str) -> list[int]:
    """Ids the way ComfyUI's SD1 tokenizer builds them: BOS, words, EOS, padded with EOS to 77."""
    ids = tokenizer()(text)["input_ids"][1:-1][: MAX_TOKENS - 2]
    return [BOS] + ids + [EOS] * (MAX_TOKENS - 1 - len(ids))


def tokenize(texts, cache: dict | None = None) -> torch.Tensor:
    rows = []
    for t in texts:
        if cache is not None and t in cache:
            rows.append(cache[t])
            continue
        row = token_ids(t)
        if cache is not None:
            cache[t] = row
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def new_models(seed: int, text_layers: int = TEXT_CONFIG["num_hidden_layers"]):
    """(vae, text_encoder, unet) freshly initialised from `seed`; `text_layers` transformer layers in the text
    encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**{k: v for k, v in VAE_CONFIG.items() if k != "scaling_factor"})
    text = CLIPTextModel(CLIPTextConfig(**(TEXT_CONFIG | {"num_hidden_layers": text_layers})))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return vae, text, unet


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_component(module, folder: Path, weights_name: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    module.save_config(folder) if hasattr(module, "save_config") else module.config.to_json_file(folder / "config.json")
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(folder / weights_name), metadata={"format": "pt"})


def save_vae(folder: Path, vae) -> None:
    """Rewrite a folder's VAE (stage 3 of training changes only the decoder)."""
    _save_component(vae, folder / "vae", "diffusion_pytorch_model.safetensors")


def _hf_text_key(key: str) -> str:
    """The key layout of the CLIP checkpoints on the Hub ('text_model.' prefix), whatever transformers calls it."""
    return key if key.startswith("text_model.") else "text_model." + key


def save_diffusers_folder(folder: Path, vae, text, unet, concept: dict | None = None) -> None:
    """A diffusers StableDiffusionPipeline folder, fp16 weights (what the Concept Loader's `diffusers folder` reads)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _save_component(unet, folder / "unet", "diffusion_pytorch_model.safetensors")
    _save_component(vae, folder / "vae", "diffusion_pytorch_model.safetensors")
    (folder / "text_encoder").mkdir()
    text.config.to_json_file(str(folder / "text_encoder" / "config.json"))
    from safetensors.torch import save_file

    te = {_hf_text_key(k): v.detach().to(torch.float16).contiguous() for k, v in text.state_dict().items()}
    save_file(te, str(folder / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(tokenizer_dir(), folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if concept:
        (folder / "concept.json").write_text(json.dumps(concept, indent=2) + "\n")


def load_diffusers_folder(folder: Path, dtype=torch.float32):
    """(vae, text_encoder, unet) from a saved folder, for training the concept and for diffusers cross-checks."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    return vae, text, unet


NOT_TRAINED = (f"the toy-world weights are not trained yet (no {WEIGHTS}/SHA256SUMS or no {CONCEPT_NAME}/ beside it); "
               "train them with python -m toyworld.train_base, then python -m toyworld.train_concept")


def trained(root: Path = WEIGHTS) -> bool:
    """Are the trained weights here (the manifest and the concept folder)? The one check the tests, the demo and the
    benchmarks share; whether the files are intact is check_manifest's question."""
    return (root / "SHA256SUMS").is_file() and (root / CONCEPT_NAME).is_dir()


def write_manifest(root: Path = WEIGHTS) -> dict:
    """SHA256SUMS over every weight/config file under weights/ (sha256sum -c format)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("SHA256SUMS",) and
                   p.suffix != ".png")
    lines = [f"{sha256(p)}  {p.relative_to(root).as_posix()}" for p in files]
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in files}


def check_manifest(root: Path = WEIGHTS) -> list[str]:
    """Files whose sha256 differs from SHA256SUMS (empty = all good)."""
    bad = []
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        path = root / name
        if not path.is_file() or sha256(path) != digest:
            bad.append(name)
    return bad
