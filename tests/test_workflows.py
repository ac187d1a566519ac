"""The shipped example workflows (workflows/*.json): well-formed UI-format files of core + Photoswap nodes, converted to
API format with the server's /object_info (devtools/workflow_api.py) and run end to end on a real headless ComfyUI
with the random full-architecture checkpoints, a real photo (scikit-image's `chelsea` cat, 96×64), a tiny LoRA and a
random full-size SD1.5 ControlNet; every expected output must exist with the right size.

Substitutions (devtools.workflow_api.substitute): model/LoRA/ControlNet/image names, ImageScale/EmptyLatentImage size
96×64, 2 steps, 1 null-text iteration per step. Everything else runs as shipped. The SDXL workflow is `slow`.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path

import pytest

from fixtures_server import comfy_server  # noqa: F401  (module-scoped server fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "workflows"
W, H = 96, 64  # test photo and run size (non-square on purpose)
STEPS, INNER = 2, 1
PHOTO = "photoswap_test_chelsea_96x64.png"
VIDEO, VIDEO_FRAMES = "photoswap_test_clip.mp4", 3
LORA_SD15, LORA_SDXL = "photoswap_test_lora_sd15.safetensors", "photoswap_test_lora_sdxl.safetensors"
CONTROLNET_FILE = "random-controlnet-sd15.safetensors"

EXPECTED_FILES = ["1_real_image_swap_dreambooth", "2_real_image_swap_lora_direct", "3_synthetic_swap",
                  "4_controlnet_canny_target", "5_sdxl_real_image_swap", "6_window_sweep_grid", "7a_save_inversion",
                  "7b_load_inversion_swap", "8_multi_concept_two_loras", "9_composition_by_parts",
                  "10_video_clip_swap", "11_flux_lora_swap", "12_flux_redux_zero_shot"]
PACK_MODULE_PREFIX = "custom_nodes."
FRONTEND_ONLY = {"Note", "MarkdownNote"}


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ test assets
def chelsea_photo(path: Path, size=(W, H)) -> Path:
    from devtools.demo import write_chelsea

    return write_chelsea(path, size)


def write_lora_sd15(path: Path) -> Path:
    """A tiny kohya-format LoRA on SD1.5 (two UNet attention layers, one text-encoder layer), fp16."""
    import safetensors.torch
    import torch

    gen = torch.Generator().manual_seed(5)
    shapes = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
              "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (1280, 1280),
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}
    sd = {}
    for name, (out_f, in_f) in shapes.items():
        sd[f"{name}.lora_down.weight"] = (torch.randn(4, in_f, generator=gen) * 0.05).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(out_f, 4, generator=gen) * 0.05).half()
        sd[f"{name}.alpha"] = torch.tensor(4.0)
    safetensors.torch.save_file(sd, str(path))
    return path


def write_lora_sdxl(path: Path) -> Path:
    """A tiny diffusers/PEFT-format LoRA on SDXL (UNet only), fp16."""
    import safetensors.torch
    import torch

    gen = torch.Generator().manual_seed(6)
    shapes = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048),
              "down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_q": (1280, 1280)}
    sd = {}
    for name, (out_f, in_f) in shapes.items():
        sd[f"unet.{name}.lora_A.weight"] = (torch.randn(4, in_f, generator=gen) * 0.05).half()
        sd[f"unet.{name}.lora_B.weight"] = (torch.randn(out_f, 4, generator=gen) * 0.05).half()
    safetensors.torch.save_file(sd, str(path))
    return path


CONTROLNET_VERSION = "1"


def random_controlnet_sd15(folder: Path | None = None) -> Path:
    """A full-size SD1.5 ControlNet (the layout of control_v11p_sd15_*.safetensors: `comfy.cldm.cldm.ControlNet`
    keys, hint channels 3) with deterministic random weights, about 0.7 GB fp16, written once into the checkpoint
    cache. ComfyUI detects a ControlNet's config from its key shapes, so it must be full size to match SD1.5."""
    import torch

    from devtools import checkpoints
    from devtools.comfy_env import bootstrap

    folder = Path(folder or checkpoints.cache_dir())
    path = folder / CONTROLNET_FILE
    if path.exists():
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                meta = json.loads(fh.read(n)).get("__metadata__", {})
            if meta.get("photoswap_controlnet") == CONTROLNET_VERSION:
                return path
        except (OSError, ValueError, struct.error):
            pass
    checkpoints.check_disk_space(folder, int(0.75e9), f"{CONTROLNET_FILE} (random SD1.5 ControlNet)")
    bootstrap()
    import comfy.cldm.cldm
    import comfy.ops

    cfg = dict(checkpoints.UNET_CONFIGS["sd15"])
    for key in ("out_channels", "use_temporal_resblock", "use_temporal_attention", "transformer_depth_output"):
        cfg.pop(key, None)
    cfg["hint_channels"] = 3
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init,
                                         **cfg)
    sd = net.state_dict()
    rows, offset = [], 0
    for key in sorted(sd):
        nbytes = math.prod(sd[key].shape) * 2
        rows.append((key, tuple(sd[key].shape), offset, offset + nbytes))
        offset += nbytes
    header = {"__metadata__": {"photoswap_controlnet": CONTROLNET_VERSION,
                               "photoswap_note": "RANDOM WEIGHTS for testing; not a trained ControlNet"}}
    for key, shape, start, end in rows:
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for key, shape, start, end in rows:
                if len(shape) >= 2:
                    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                    std = 1.0 / math.sqrt(math.prod(shape[1:]))
                    if "zero_convs" in key or "middle_block_out" in key:
                        std *= 0.1  # the "zero" convolutions: small, so the control is a nudge
                    values = torch.randn(shape, generator=gen) * std
                elif key.endswith("bias"):
                    values = torch.zeros(shape)
                else:
                    values = torch.ones(shape)
                fh.write(values.half().numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------ PNG sizes
def png_size(path: Path) -> tuple:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])  # (width, height)


# ------------------------------------------------------------------------------------------------ unit: files
@pytest.mark.unit
def test_all_workflows_and_thumbnails_present():
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert names == sorted(EXPECTED_FILES)
    for name in names:
        for ext in (".png", ".jpg"):
            thumb = WORKFLOWS / f"{name}{ext}"
            assert thumb.exists() and thumb.stat().st_size > 10_000, f"thumbnail {thumb} missing or empty"
        w, h = png_size(WORKFLOWS / f"{name}.png")
        assert w >= 800 and h >= 400, (name, w, h)


@pytest.mark.unit
@pytest.mark.parametrize("name", EXPECTED_FILES)
def test_workflow_is_frontend_ui_format(name):
    """What the frontend saves: version 0.4, nodes with id/type/pos/size/inputs/outputs/widgets_values, a links array
    whose every entry is referenced by its target input and its origin output."""
    wf = workflow(name)
    assert wf["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in wf, key
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"])
    assert wf["last_node_id"] >= max(nodes)
    for node in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in node, (name, node.get("id"), key)
        assert node["mode"] == 0
    links = {link[0]: link for link in wf["links"]}
    assert wf["last_link_id"] >= max(links)
    for link_id, origin, origin_slot, target, target_slot, kind in wf["links"]:
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert link_id in (nodes[origin]["outputs"][origin_slot]["links"] or [])
        assert nodes[origin]["outputs"][origin_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["type"] in (kind, "*")
    for node in wf["nodes"]:
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                assert slot["link"] in links
    types = {n["type"] for n in wf["nodes"]}
    assert {"PhotoswapPromptPair", "PhotoswapAttentionRecorder", "PhotoswapAttentionSwapSampler"} <= types \
        or name == "7a_save_inversion"
    assert "MarkdownNote" in types, "every example workflow explains itself in a note"


@pytest.mark.unit
def test_official_defaults_in_workflow_1():
    """Workflow 1 is the reference setting: null-text inversion at 50 steps, cfg 7.5, the notebook's windows."""
    from devtools.workflow_api import WidgetSlot  # noqa: F401  (module imports without a server)

    wf = workflow("1_real_image_swap_dreambooth")
    by_type = {n["type"]: n for n in wf["nodes"]}
    assert by_type["PhotoswapNullTextInversion"]["widgets_values"] == [50, 7.5, "null_text", 10, 1e-05, 0.01,
                                                                       "euler"]
    assert by_type["PhotoswapAttentionSwapSampler"]["widgets_values"] == [0.8, 0.0, 0.6, True, 0.3, 0.2, 7.5, False]
    assert by_type["PhotoswapPromptPair"]["widgets_values"][:3] == ["A photo of a cat", "cat", "sks dog"]


# ------------------------------------------------------------------------------------------------ unit: converter
OI = {
    "KSampler": {"input": {"required": {
        "model": ["MODEL"], "seed": ["INT", {"default": 0, "control_after_generate": True}],
        "steps": ["INT", {"default": 20}], "cfg": ["FLOAT", {"default": 8.0}],
        "sampler_name": [["euler", "ddim"]], "scheduler": [["normal", "karras"]], "positive": ["CONDITIONING"],
        "negative": ["CONDITIONING"], "latent_image": ["LATENT"], "denoise": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "output_name": ["LATENT"]},
    "LoadImage": {"input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}},
                  "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"]},
    "Loader": {"input": {"required": {"name": [["m.safetensors"]]}}, "output": ["MODEL", "CONDITIONING", "LATENT"],
               "output_name": ["MODEL", "CONDITIONING", "LATENT"]},
    "Opt": {"input": {"required": {"x": ["IMAGE"]}, "optional": {"y": ["IMAGE"], "s": ["STRING", {"default": ""}],
                                                                 "f": ["FLOAT", {"forceInput": True}]}},
            "output": ["IMAGE"], "output_name": ["IMAGE"]},
}


def _ui_node(node_id, kind, inputs=(), outputs=(), widgets=None, mode=0, title=None):
    node = {"id": node_id, "type": kind, "pos": [0, 0], "size": [100, 100], "flags": {}, "order": 0, "mode": mode,
            "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs], "properties": {}}
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


def _ksampler_graph(seed_link=None, widgets=(5, "fixed", 12, 6.5, "ddim", "karras", 0.7)):
    loader = _ui_node(1, "Loader", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]},
                                            {"name": "CONDITIONING", "type": "CONDITIONING", "links": [2, 3]},
                                            {"name": "LATENT", "type": "LATENT", "links": [4]}], widgets=["m.safetensors"])
    ks_inputs = [{"name": "model", "type": "MODEL", "link": 1}, {"name": "positive", "type": "CONDITIONING", "link": 2},
                 {"name": "negative", "type": "CONDITIONING", "link": 3},
                 {"name": "latent_image", "type": "LATENT", "link": 4},
                 {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": seed_link}]
    ks = _ui_node(2, "KSampler", inputs=ks_inputs, outputs=[{"name": "LATENT", "type": "LATENT", "links": None}],
                  widgets=list(widgets))
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 2, 1, "CONDITIONING"], [3, 1, 1, 2, 2, "CONDITIONING"],
             [4, 1, 2, 2, 3, "LATENT"]]
    return {"nodes": [loader, ks], "links": links, "version": 0.4}


@pytest.mark.unit
def test_convert_widget_order_control_after_generate_and_links():
    from devtools.workflow_api import convert

    api = convert(_ksampler_graph(), OI)
    assert api["1"] == {"class_type": "Loader", "inputs": {"name": "m.safetensors"}}
    assert api["2"]["inputs"] == {"seed": 5, "steps": 12, "cfg": 6.5, "sampler_name": "ddim", "scheduler": "karras",
                                  "denoise": 0.7, "model": ["1", 0], "positive": ["1", 1], "negative": ["1", 1],
                                  "latent_image": ["1", 2]}
    # files saved without the control value (older frontends) are read too
    api = convert(_ksampler_graph(widgets=(5, 12, 6.5, "ddim", "karras", 0.7)), OI)
    assert api["2"]["inputs"]["steps"] == 12 and api["2"]["inputs"]["denoise"] == 0.7


@pytest.mark.unit
def test_convert_primitive_reroute_converted_widget_and_upload():
    from devtools.workflow_api import convert

    wf = _ksampler_graph(seed_link=5)
    prim = _ui_node(3, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [6],
                                                  "widget": {"name": "seed"}}], widgets=[1234, "fixed"])
    reroute = _ui_node(4, "Reroute", inputs=[{"name": "", "type": "*", "link": 6}],
                       outputs=[{"name": "", "type": "INT", "links": [5]}])
    note = _ui_node(5, "MarkdownNote", widgets=["hello"])
    image = _ui_node(6, "LoadImage", inputs=[{"name": "image", "type": "COMBO", "widget": {"name": "image"},
                                              "link": None},
                                             {"name": "upload", "type": "IMAGEUPLOAD", "widget": {"name": "upload"},
                                              "link": None}],
                     outputs=[{"name": "IMAGE", "type": "IMAGE", "links": None}], widgets=["b.png", "image"])
    wf["nodes"] += [prim, reroute, note, image]
    wf["links"] += [[5, 4, 0, 2, 4, "INT"], [6, 3, 0, 4, 0, "INT"]]
    api = convert(wf, OI)
    assert api["2"]["inputs"]["seed"] == 1234  # the primitive's value, through the reroute, wins over the widget
    assert api["2"]["inputs"]["steps"] == 12
    assert api["6"] == {"class_type": "LoadImage", "inputs": {"image": "b.png"}}
    assert set(api) == {"1", "2", "6"}


@pytest.mark.unit
def test_convert_optional_inputs_bypass_mute_and_dict_widgets():
    from devtools.workflow_api import convert

    src = _ui_node(1, "LoadImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1, 2]}],
                   widgets=["a.png", "image"])
    bypassed = _ui_node(2, "Opt", inputs=[{"name": "x", "type": "IMAGE", "link": 1}],
                        outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [3]}], widgets=["zzz"], mode=4)
    muted = _ui_node(3, "Opt", inputs=[{"name": "x", "type": "IMAGE", "link": 2}],
                     outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [4]}], widgets=[""], mode=2)
    sink = _ui_node(4, "Opt", inputs=[{"name": "x", "type": "IMAGE", "link": 3},
                                      {"name": "y", "type": "IMAGE", "link": 4, "shape": 7},
                                      {"name": "f", "type": "FLOAT", "link": None}],
                    outputs=[{"name": "IMAGE", "type": "IMAGE", "links": None}], widgets={"s": "hi"}, title="Sink")
    wf = {"nodes": [src, bypassed, muted, sink], "version": 0.4,
          "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 1, 0, 3, 0, "IMAGE"], [3, 2, 0, 4, 0, "IMAGE"],
                    [4, 3, 0, 4, 1, "IMAGE"]]}
    api = convert(wf, OI)
    assert set(api) == {"1", "4"}
    assert api["4"] == {"class_type": "Opt", "inputs": {"s": "hi", "x": ["1", 0]}, "_meta": {"title": "Sink"}}


@pytest.mark.unit
def test_convert_errors_are_clear():
    from devtools.workflow_api import WorkflowConversionError, convert

    with pytest.raises(WorkflowConversionError, match="widget values .* do not fit"):
        convert(_ksampler_graph(widgets=(5, "fixed", 12)), OI)
    bad = _ksampler_graph()
    bad["nodes"][0]["type"] = "SomePackNode"
    with pytest.raises(WorkflowConversionError, match="unknown node type 'SomePackNode'"):
        convert(bad, OI)
    with pytest.raises(WorkflowConversionError, match="already an API-format graph"):
        convert({"1": {"class_type": "Loader", "inputs": {}}}, OI)
    unconnected = _ksampler_graph()
    unconnected["nodes"][1]["inputs"][0]["link"] = None
    with pytest.raises(WorkflowConversionError, match="required input.*model"):
        convert(unconnected, OI)


# ------------------------------------------------------------------------------------------------ e2e
@pytest.fixture(scope="module")
def wf_env(comfy_server, tmp_path_factory):  # noqa: F811
    """The module's server with the test photo, LoRA and ControlNet in place, and its /object_info."""
    from devtools.checkpoints import checkpoint_path

    if not checkpoint_path("sd15").exists():
        pytest.skip("random SD1.5 checkpoint not built (scripts/make_checkpoints.py; scripts/test.sh does it)")
    assets = tmp_path_factory.mktemp("wf_assets")
    chelsea_photo(comfy_server.input_dir / PHOTO)
    comfy_server.add_model("loras", write_lora_sd15(assets / LORA_SD15))
    comfy_server.add_model("controlnet", random_controlnet_sd15())
    return comfy_server, comfy_server.object_info()


def api_graph(name: str, object_info: dict, checkpoint="random-sd15.safetensors", lora=LORA_SD15, **extra) -> dict:
    from devtools.workflow_api import convert, substitute

    graph = convert(workflow(name), object_info)
    return substitute(graph, checkpoint=checkpoint, lora=lora, image=PHOTO, size=(W, H), steps=STEPS,
                      inner_iterations=INNER, controlnet=CONTROLNET_FILE, **extra)


def saved_images(server, result, graph) -> dict:
    """{SaveImage title: [paths]} from the run's history (only SaveImage nodes; previews go to temp)."""
    out = {}
    for nid, node in graph.items():
        if node["class_type"] != "SaveImage":
            continue
        entry = result.outputs.get(nid, {})
        title = node.get("_meta", {}).get("title", nid)
        out[title] = [server.output_dir / img.get("subfolder", "") / img["filename"] for img in entry.get("images", [])]
    return out


def check_swap_outputs(server, result, graph, prefix: str, pairs: int = 1):
    images = saved_images(server, result, graph)
    assert set(images) >= {"Swapped image", "Source reconstruction", "Attention previews"} or \
        set(images) >= {"Swapped image", "Source image (synthetic)", "Attention previews"}, images
    for title, paths in images.items():
        expected = {"Attention previews": 2 * pairs + 2, "Mask of each subject pair": pairs}.get(title, 1)
        assert len(paths) == expected, (title, paths)
        for path in paths:
            assert path.exists(), path
            assert png_size(path) == (W, H), (title, path, png_size(path))
            assert f"photoswap/{prefix}/" in str(path).replace(os.sep, "/"), path


def fresh(server) -> None:
    """Unload models and clear ComfyUI's node cache (POST /free), so one server can run workflows on different
    models without holding them all in RAM. The server handles the flag between prompts; give it a moment."""
    import time

    server.free(unload_models=True, free_memory=True)
    time.sleep(2.0)


def run(server, graph, timeout=900):
    result = server.run(graph, timeout=timeout)
    print(f"\n[workflows] ran in {result.seconds:.1f} s")
    return result


@pytest.mark.e2e
def test_types_are_core_or_pack(wf_env):
    """Only core ComfyUI nodes and this pack's nodes (frontend-only notes aside), as /object_info reports them."""
    server, object_info = wf_env
    for name in EXPECTED_FILES:
        for node in workflow(name)["nodes"]:
            kind = node["type"]
            if kind in FRONTEND_ONLY:
                continue
            assert kind in object_info, (name, kind)
            module = object_info[kind].get("python_module", "")
            is_pack = module.startswith(PACK_MODULE_PREFIX) and kind.startswith("Photoswap")
            is_core = module == "nodes" or module.startswith("comfy_extras.")
            assert is_pack or is_core, (name, kind, module)


@pytest.mark.e2e
@pytest.mark.parametrize("name", EXPECTED_FILES)
def test_workflow_converts(wf_env, name):
    """Every workflow (SDXL included) converts with the live /object_info: every node but the notes becomes an API
    node, and every widget value lands on an input the node declares."""
    server, object_info = wf_env
    ui = workflow(name)
    graph = api_graph(name, object_info)
    assert set(graph) == {str(n["id"]) for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    for nid, node in graph.items():
        info = object_info[node["class_type"]]["input"]
        declared = set(info.get("required", {})) | set(info.get("optional", {}))
        assert set(node["inputs"]) <= declared, (name, nid, set(node["inputs"]) - declared)
        assert set(info.get("required", {})) <= set(node["inputs"]), (name, nid)


# Order matters for speed only: workflows 1, 4, 6, 7 share the checkpoint, the photo and the null-text inversion, so
# ComfyUI's cache (which keeps the nodes the next prompt shares with the last one) inverts once for all of them.
@pytest.mark.e2e
def test_workflow_1_real_image_dreambooth(wf_env):
    server, object_info = wf_env
    fresh(server)
    graph = api_graph("1_real_image_swap_dreambooth", object_info)
    check_swap_outputs(server, run(server, graph), graph, "1_dreambooth")


@pytest.mark.e2e
def test_workflow_4_controlnet(wf_env):
    server, object_info = wf_env
    graph = api_graph("4_controlnet_canny_target", object_info)
    result = run(server, graph)
    check_swap_outputs(server, result, graph, "4_controlnet")
    canny = [nid for nid, n in graph.items() if n["class_type"] == "PreviewImage"]
    assert canny and result.outputs[canny[0]]["images"], "the Canny edges preview is missing"


@pytest.mark.e2e
def test_workflow_6_window_sweep_grid(wf_env):
    from devtools.make_workflows import SWEEP_CROSS_MAP, SWEEP_SELF_OUTPUT, sweep_label

    server, object_info = wf_env
    graph = api_graph("6_window_sweep_grid", object_info)
    samplers = [n["inputs"] for n in graph.values() if n["class_type"] == "PhotoswapAttentionSwapSampler"]
    assert sorted((s["self_output"], s["cross_map"]) for s in samplers) == sorted(
        (a, b) for a in SWEEP_SELF_OUTPUT for b in SWEEP_CROSS_MAP)
    result = run(server, graph)
    images = saved_images(server, result, graph)
    singles = [p for paths in images.values() for p in paths if "grid__" not in p.name]
    assert len(singles) == len(SWEEP_SELF_OUTPUT) * len(SWEEP_CROSS_MAP)
    for a in SWEEP_SELF_OUTPUT:
        for b in SWEEP_CROSS_MAP:
            hits = [p for p in singles if p.name.startswith(sweep_label(a, b) + "_")]
            assert len(hits) == 1 and png_size(hits[0]) == (W, H), (a, b, singles)
    grids = [p for paths in images.values() for p in paths if "grid__" in p.name]
    assert len(grids) == 1
    spacing = 8
    cols, rows = len(SWEEP_SELF_OUTPUT), len(SWEEP_CROSS_MAP)
    assert png_size(grids[0]) == (cols * W + (cols - 1) * spacing, rows * H + (rows - 1) * spacing)


@pytest.mark.e2e
def test_workflow_7_save_then_load_inversion(wf_env):
    server, object_info = wf_env
    graph = api_graph("7a_save_inversion", object_info)
    prefix = [n["inputs"]["filename_prefix"] for n in graph.values() if n["class_type"] == "PhotoswapSaveInversion"]
    assert prefix == ["photoswap_cat"]
    before = set((server.output_dir / "photoswap").glob("photoswap_cat_*.safetensors"))
    run(server, graph)
    saved = sorted(set((server.output_dir / "photoswap").glob("photoswap_cat_*.safetensors")) - before)
    assert len(saved) == 1 and saved[0].stat().st_size > 0, saved

    choice = f"photoswap/{saved[0].name} [output]"
    options = server.object_info("PhotoswapLoadInversion")["PhotoswapLoadInversion"]["input"]["required"][
        "inversion_file"]
    assert choice in json.dumps(options), options  # the combo lists the new file (what a page refresh shows)
    graph = api_graph("7b_load_inversion_swap", object_info, inversion_file=choice)
    result = run(server, graph)
    check_swap_outputs(server, result, graph, "7b_loaded")
    inversion_nodes = [n for n in graph.values() if n["class_type"] == "PhotoswapNullTextInversion"]
    assert not inversion_nodes, "7b must not invert again"


@pytest.mark.e2e
def test_workflow_3_synthetic(wf_env):
    server, object_info = wf_env
    fresh(server)
    graph = api_graph("3_synthetic_swap", object_info)
    check_swap_outputs(server, run(server, graph), graph, "3_synthetic")


@pytest.mark.e2e
def test_workflow_2_lora_direct(wf_env):
    server, object_info = wf_env
    fresh(server)  # another model (LoRA): start from an empty cache and unloaded models
    graph = api_graph("2_real_image_swap_lora_direct", object_info)
    result = run(server, graph)
    check_swap_outputs(server, result, graph, "2_lora_direct")
    concept = [nid for nid, n in graph.items() if n["class_type"] == "PhotoswapConceptLoader"][0]
    assert "lora" in json.dumps(result.outputs.get(concept, {}))


@pytest.mark.e2e
@pytest.mark.parametrize("name,prefix", [("8_multi_concept_two_loras", "8_multi_concept"),
                                         ("9_composition_by_parts", "9_composition")])
def test_workflow_8_9_two_concepts(wf_env, name, prefix):
    """Two chained Concept Loaders (LoRAs) and two subject pairs (8: two subjects; 9: one subject, two regions):
    previews per pair and one mask per pair are saved."""
    server, object_info = wf_env
    fresh(server)
    graph = api_graph(name, object_info)
    concepts = [n for n in graph.values() if n["class_type"] == "PhotoswapConceptLoader"]
    assert len(concepts) == 2 and any("previous" in n["inputs"] for n in concepts)
    result = run(server, graph)
    check_swap_outputs(server, result, graph, prefix, pairs=2)
    assert "Mask of each subject pair" in saved_images(server, result, graph)


def write_clip(path: Path, frames: int = VIDEO_FRAMES, size=(W, H)) -> Path:
    """A short clip with known motion (PyAV, H.264 or MPEG-4): the test photo shifted right by 4 px per frame."""
    import av
    import numpy as np
    from PIL import Image

    photo = np.asarray(Image.open(chelsea_photo(path.with_suffix(".png"), size)).convert("RGB"))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(photo, 4 * i, axis=1).copy(), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.e2e
def test_workflow_10_video_clip(wf_env):
    """A clip through the core video nodes: Load Video → Get Video Components → the swap with Frame Options →
    Create Video → Save Video; the saved video has every frame at the run size."""
    import av

    server, object_info = wf_env
    fresh(server)
    write_clip(server.input_dir / VIDEO)
    graph = api_graph("10_video_clip_swap", object_info, video=VIDEO)
    assert any(n["class_type"] == "PhotoswapFrameOptions" for n in graph.values())
    result = run(server, graph)
    save = next(nid for nid, n in graph.items() if n["class_type"] == "SaveVideo")
    entries = [e for key in ("images", "videos", "animated") for e in result.outputs.get(save, {}).get(key, [])
               if isinstance(e, dict)]
    assert entries, result.outputs.get(save)
    path = server.output_dir / entries[0].get("subfolder", "") / entries[0]["filename"]
    assert path.exists() and "photoswap/10_video/" in str(path).replace(os.sep, "/"), path
    with av.open(str(path)) as container:
        frames = [f for f in container.decode(video=0)]
    assert len(frames) == VIDEO_FRAMES and (frames[0].width, frames[0].height) == (W, H)


@pytest.mark.e2e
@pytest.mark.slow
def test_workflow_5_sdxl(tmp_path):
    from devtools.checkpoints import ensure_checkpoint
    from devtools.server import ComfyServer

    ensure_checkpoint("sdxl")
    with ComfyServer(workdir=tmp_path / "server", checkpoints=("sdxl",)) as server:
        chelsea_photo(server.input_dir / PHOTO)
        server.add_model("loras", write_lora_sdxl(tmp_path / LORA_SDXL))
        object_info = server.object_info()
        graph = api_graph("5_sdxl_real_image_swap", object_info, checkpoint="random-sdxl.safetensors",
                          lora=LORA_SDXL)
        check_swap_outputs(server, run(server, graph, timeout=1800), graph, "5_sdxl")
