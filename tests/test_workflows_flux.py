"""The Flux example workflows (11: a Flux LoRA through the Concept Loader; 12: zero-shot through core Redux) on the
real server with full-width, reduced-depth random Flux files through ComfyUI's own loaders (issue #17).

Files (devtools/flux_checkpoints.py, built once into the cache, ~3.1 GB): Flux-dev with 1 double + 1 single block
(UNETLoader detects it as Flux: widths are fixed by ComfyUI, only the depth shrinks), CLIP-L, a 1-block T5-XXL, the
Flux VAE, Redux and SigCLIP; a random kohya-format Flux LoRA on the file's block 0. One stand-in: DualCLIPLoader
always builds 24 T5 blocks (9.5 GB, the missing ones uninitialised), so the test graph names the test-only
`PhotoswapTestFluxCLIPLoader` (devtools/test_nodes/, same inputs, same `comfy.sd.load_clip` plus ComfyUI's
`t5xxl_model_config`) in its place. Everything else runs as shipped, at 96×64 px and 2 steps. Random weights: this
proves the graph, the loaders, the Concept Loader on Flux and Redux through the swap, never image quality.
`slow`: the files take minutes to build and a few GB of RAM to run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_workflows import PHOTO, STEPS, H, W, check_swap_outputs, chelsea_photo, run, workflow

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_NODES = REPO_ROOT / "devtools" / "test_nodes" / "photoswap_test_flux_clip"
REFERENCE = "photoswap_test_reference.png"
LORA = "photoswap_test_flux_lora.safetensors"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def write_flux_lora(path: Path) -> Path:
    """A random kohya-format Flux LoRA (lora_unet_double_blocks_0_…) for the d1s1 file, from its key layout."""
    import safetensors.torch

    from devtools.flux_checkpoints import _meta_layout
    from devtools.tiny_flux import flux_lora_for_shapes

    shapes = {k: tuple(v.shape) for k, v in _meta_layout("unet", 1, 1, 1)[0].items()}
    safetensors.torch.save_file({k: v.contiguous() for k, v in flux_lora_for_shapes(shapes, "kohya").items()},
                                str(path))
    return path


@pytest.fixture(scope="module")
def flux_server(comfy, tmp_path_factory):
    from devtools.flux_checkpoints import ensure_flux_files
    from devtools.server import ComfyServer

    files = ensure_flux_files(depth=1, single=1, t5_layers=1)
    work = tmp_path_factory.mktemp("flux_server")
    server = ComfyServer(workdir=work / "server", checkpoints=(), custom_nodes=(TEST_NODES,))
    for folder, component in (("diffusion_models", "unet"), ("text_encoders", "t5xxl"), ("text_encoders", "clip_l"),
                              ("vae", "vae"), ("style_models", "redux"), ("clip_vision", "siglip")):
        server.add_model(folder, files[component])
    server.add_model("loras", write_flux_lora(work / LORA))
    server.start()
    chelsea_photo(server.input_dir / PHOTO)
    chelsea_photo(server.input_dir / REFERENCE, size=(64, 64))
    try:
        yield server, server.object_info(), files
    finally:
        server.stop()


def flux_graph(name: str, object_info: dict, files: dict) -> dict:
    from devtools.workflow_api import convert, substitute

    graph = substitute(convert(workflow(name), object_info), lora=LORA, image=PHOTO, reference_image=REFERENCE,
                       size=(W, H), steps=STEPS, unet=files["unet"].name,
                       text_encoders=(files["t5xxl"].name, files["clip_l"].name), vae=files["vae"].name,
                       style_model=files["redux"].name, clip_vision=files["siglip"].name)
    loaders = [n for n in graph.values() if n["class_type"] == "DualCLIPLoader"]
    assert len(loaders) == 1 and loaders[0]["inputs"]["type"] == "flux", loaders
    loaders[0]["class_type"] = "PhotoswapTestFluxCLIPLoader"  # the one stand-in (module docstring)
    return graph


def test_flux_workflows_use_flux_settings():
    """As shipped: Flux loaders, direct inversion, cfg 1 everywhere, FluxGuidance on both prompts."""
    for name in ("11_flux_lora_swap", "12_flux_redux_zero_shot"):
        listed = workflow(name)["nodes"]
        nodes = {n["type"]: n for n in listed}
        assert {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance"} <= set(nodes), name
        assert sum(n["type"] == "FluxGuidance" for n in listed) == 2, name
        inv = nodes["PhotoswapNullTextInversion"]["widgets_values"]
        assert "direct" in inv and 1.0 in inv, inv
    assert "StyleModelApply" in {n["type"] for n in workflow("12_flux_redux_zero_shot")["nodes"]}


def test_workflow_11_flux_lora(flux_server):
    server, object_info, files = flux_server
    graph = flux_graph("11_flux_lora_swap", object_info, files)
    result = run(server, graph, timeout=1800)
    check_swap_outputs(server, result, graph, "11_flux_lora")
    concept = [nid for nid, n in graph.items() if n["class_type"] == "PhotoswapConceptLoader"][0]
    assert "lora" in json.dumps(result.outputs.get(concept, {}))
    log = server.log_text()
    assert "lora key not loaded" not in log, log[-3000:]


def test_workflow_12_flux_redux(flux_server):
    server, object_info, files = flux_server
    server.free(unload_models=True, free_memory=True)
    graph = flux_graph("12_flux_redux_zero_shot", object_info, files)
    check_swap_outputs(server, run(server, graph, timeout=1800), graph, "12_flux_redux")
