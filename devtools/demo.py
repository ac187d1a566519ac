"""The demo (scripts/demo.sh → scripts/run_demo.py): example workflow 1 (`workflows/1_real_image_swap_dreambooth.json`,
real-image subject swap with a DreamBooth checkpoint and null-text inversion), run end to end on a headless ComfyUI.

Default: the toy world (toyworld/): a held-out world photo, the trained toy model with its DreamBooth concept
"sks square" loaded by the Concept Loader's `diffusers folder` source, the workflow's own settings (50 steps, null-text
inversion with 10 iterations per step, the shipped windows); the swapped image is then read back by the world's
detector and scored against the photo's ground truth. `--random-sd15`: the random full-architecture SD1.5 checkpoint
(devtools/checkpoints.py) as the "DreamBooth checkpoint" and scikit-image's `chelsea` cat photo (plumbing only: the
images are noise). The user may instead point it at a real DreamBooth checkpoint, its concept words and a photo (see
scripts/run_demo.py --help).

The workflow file is converted to API format with the server's /object_info (devtools/workflow_api.py) and only
names, size and step counts are substituted — the graph is the one users drag into the UI.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = REPO_ROOT / "workflows" / "1_real_image_swap_dreambooth.json"
TITLE = "example workflow 1: real-image subject swap (DreamBooth checkpoint, null-text inversion)"
CHECKPOINTS = ("sd15",)  # cached random checkpoints the server must have (devtools.checkpoints families)
RANDOM_CHECKPOINT = "random-sd15.safetensors"
DEFAULT_PHOTO = "photoswap_cat.png"  # the name the workflows' Load Image nodes use
RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS were used: the 'DreamBooth checkpoint' is devtools/checkpoints.py's random SD1.5 checkpoint, so "
    "the swapped image, the reconstruction and the previews are noise-like. This run shows that the whole Photoswap "
    "pipeline runs on a real ComfyUI, not what a trained model produces. Pass --checkpoint (a real DreamBooth "
    "checkpoint), --concept-words and --photo to swap for real.")


def chelsea_array():
    """scikit-image's 'chelsea' photo (a cat), 300×451 RGB uint8, shipped inside the scikit-image package."""
    import skimage.data

    return skimage.data.chelsea()


def write_chelsea(path, size=None) -> Path:
    """Save the chelsea photo as PNG; `size` (width, height) crops the 3:2 image area and resizes to it."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(chelsea_array())
    if size is not None:
        image = image.crop((0, 0, 450, 300)).resize(tuple(int(v) for v in size), Image.Resampling.LANCZOS)
    image.save(path)
    return path


def prepare_inputs(input_dir, photo=None) -> str:
    """Put the photo into the server's input folder under the name the workflows use; returns that name."""
    import shutil

    target = Path(input_dir) / DEFAULT_PHOTO
    if photo:
        shutil.copyfile(photo, target)
    else:
        write_chelsea(target)
    return DEFAULT_PHOTO


def load_workflow() -> dict:
    import json

    return json.loads(WORKFLOW.read_text(encoding="utf-8"))


def workflow_graph(object_info: dict, *, checkpoint: str = RANDOM_CHECKPOINT, photo: str = DEFAULT_PHOTO,
                width: int = 256, height: int = 256, steps: int = 10, inner_iterations: int | None = None,
                concept_words: str | None = None, class_word: str | None = None, source_prompt: str | None = None,
                subject_word: str | None = None, prefix: str = "photoswap") -> dict:
    """Workflow 1 as an API graph for POST /prompt, with the given files, size and steps."""
    from devtools.workflow_api import convert, substitute

    graph = convert(load_workflow(), object_info)
    return substitute(graph, checkpoint=checkpoint, image=photo, size=(width, height), steps=steps,
                      inner_iterations=inner_iterations, concept_words=concept_words, class_word=class_word,
                      source_prompt=source_prompt, subject_word=subject_word, prefix=prefix)


OUTPUT_ROLES = {"Swapped image": "swapped image", "Source reconstruction": "source reconstruction",
                "Attention previews": "attention previews (source subject map, target concept map, blend mask, "
                                      "self-attention SVD)"}


def outputs_by_role(graph: dict, outputs: dict, output_dir) -> dict:
    """{role: [paths]} of the SaveImage nodes of workflow 1 (by their titles)."""
    found = {}
    for nid, node in graph.items():
        if node["class_type"] != "SaveImage":
            continue
        title = node.get("_meta", {}).get("title", nid)
        role = OUTPUT_ROLES.get(title, title)
        found[role] = [Path(output_dir) / img.get("subfolder", "") / img["filename"]
                       for img in outputs.get(nid, {}).get("images", [])]
    return found


def build_graph(checkpoint: str = RANDOM_CHECKPOINT, width: int = 64, height: int = 64, steps: int = 4,
                seed: int = 0, prefix: str = "photoswap_demo/smoke") -> dict:
    """The smoke graph of core nodes (checkpoint → text encode → KSampler → decode → save) that the foundation tests
    run to check the server itself; the demo runs `workflow_graph` (workflow 1)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat on a sofa"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                  "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": 7.0,
                                                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


# ---- the toy world (default) --------------------------------------------------------------------------------------
TOYWORLD_TITLE = ("example workflow 1 on the toy world: the trained toy model with its DreamBooth concept 'sks square' "
                  "(Concept Loader, diffusers folder), a held-out world photo")
TOYWORLD_SEED = 2024  # the first photo of bench/quality.py's held-out set
TOYWORLD_PHOTO = "toyworld_photo.png"


def toyworld_ready() -> bool:
    """Are the toy world's trained weights in this checkout (toyworld/weights/SHA256SUMS and the concept folder)?"""
    from toyworld import model_io as M

    return M.trained()


def toyworld_scene(seed: int = TOYWORLD_SEED):
    """The demo's photo: a held-out one-object world scene (as bench/quality.py draws them)."""
    sys_path_bench()
    from quality import photo_scenes

    return photo_scenes(seed, 1)[0]


def toyworld_prepare(server, seed: int = TOYWORLD_SEED):
    """Render the photo into the server's input folder and link the concept folder into models/diffusers."""
    from PIL import Image

    from toyworld import model_io as M
    from toyworld import scene as W

    sc = toyworld_scene(seed)
    Image.fromarray(W.render(sc)).save(Path(server.input_dir) / TOYWORLD_PHOTO)
    server.add_model("diffusers", M.WEIGHTS / M.CONCEPT_NAME)
    return sc


def toyworld_graph(object_info: dict, sc, steps: int | None = None, inner_iterations: int | None = None,
                   prefix: str = "photoswap") -> dict:
    """Workflow 1 as an API graph on the toy world: concept from the diffusers folder, the world photo at 64 px,
    the photo's caption as source prompt, its shape as subject word, the concept in its place as target prompt."""
    from devtools.workflow_api import convert, substitute
    from toyworld import model_io as M
    from toyworld import scene as W

    sys_path_bench()
    from quality import target_prompt

    graph = substitute(convert(load_workflow(), object_info), image=TOYWORLD_PHOTO, size=(W.SIZE, W.SIZE),
                       steps=steps, inner_iterations=inner_iterations, concept_words=W.CONCEPT_WORDS,
                       class_word=W.CONCEPT_CLASS, source_prompt=sc.caption, subject_word=sc.objects[0].shape,
                       prefix=prefix)
    for node in graph.values():
        if node["class_type"] == "PhotoswapConceptLoader":
            node["inputs"].update(source="diffusers folder", diffusers_folder=M.CONCEPT_NAME)
        elif node["class_type"] == "PhotoswapPromptPair":
            node["inputs"]["target_prompt"] = target_prompt(sc)
    return graph


def sys_path_bench():
    import sys

    if str(REPO_ROOT / "bench") not in sys.path:
        sys.path.append(str(REPO_ROOT / "bench"))


def toyworld_report(sc, swapped_path, reconstruction_path=None) -> dict:
    """The swapped image scored against the photo's ground truth (toyworld/metrics.py), plus the inversion PSNR."""
    import numpy as np
    from PIL import Image

    from toyworld import metrics as Q
    from toyworld import scene as W

    photo = W.render(sc)
    out = Q.swap_metrics(sc, photo, np.asarray(Image.open(swapped_path).convert("RGB")))
    if reconstruction_path:
        out["reconstruction_psnr_db"] = Q.inversion_psnr(photo, np.asarray(Image.open(reconstruction_path)
                                                                           .convert("RGB")))
    return out


def toyworld_figure(sc, paths: list, target) -> Path:
    """photo | reconstruction | swapped, 4x nearest-neighbour upscaled, side by side (the README's picture)."""
    import numpy as np
    from PIL import Image

    from toyworld import scene as W

    tiles = [W.render(sc)] + [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    strip = np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1)
    img = Image.fromarray(strip)
    img = img.resize((img.width * 4, img.height * 4), Image.Resampling.NEAREST)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    img.save(target)
    return target
