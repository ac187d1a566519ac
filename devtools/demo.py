"""The demo (scripts/demo.sh → scripts/run_demo.py): example workflow 1 (`workflows/1_real_image_swap_dreambooth.json`,
real-image subject swap with a DreamBooth checkpoint and null-text inversion), run end to end on a headless ComfyUI.

Embedded default: the random full-architecture SD1.5 checkpoint (devtools/checkpoints.py) as the "DreamBooth
checkpoint" and scikit-image's `chelsea` cat photo (a cat, as in the paper's examples). The user may instead point it
at a real DreamBooth checkpoint, its concept words and a photo (see scripts/run_demo.py --help).

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
