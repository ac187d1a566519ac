#!/usr/bin/env python3
"""Generate the example workflows in `workflows/` (UI format, as the ComfyUI frontend saves them) and their thumbnails.

    .venv/bin/python devtools/make_workflows.py              # start the provisioned ComfyUI, build every workflow
                                                             # from its /object_info, round-trip each one through
                                                             # the real frontend (headless Chromium), save the
                                                             # frontend's own serialization + a screenshot thumbnail
    .venv/bin/python devtools/make_workflows.py --no-frontend    # only the object_info-based JSON (no browser)

Widget values are laid out from `/object_info` exactly like the frontend does (see devtools/workflow_api.py, which
reads them back); the frontend pass then loads each graph with `app.loadGraphData`, sizes the nodes as the frontend
computes them, arranges them in the columns given below, and writes `JSON.stringify(app.graph.serialize())` — the
same object the frontend's "Save"/"Export" writes. The screenshot of the canvas becomes `workflows/<name>.png` (and a
`.jpg` copy, the name the frontend's template browser looks up for custom-node templates).

Every workflow uses only core ComfyUI nodes and this pack's nodes. Model/image names are placeholders for the user's
own files (the README says which); the tests substitute the random checkpoints and a test photo.

Also holds the headless-Chromium driver (`Frontend`) used by tests/test_frontend.py.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # append, never prepend: the pack's nodes/ must not shadow ComfyUI's nodes.py

from devtools.workflow_api import input_specs, is_widget_spec, widget_slots  # noqa: E402

WORKFLOW_DIR = REPO_ROOT / "workflows"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

# placeholders for the user's files (README "Quick start" says where each goes)
PHOTO = "photoswap_cat.png"
DREAMBOOTH_SD15 = "sks_dog_dreambooth_sd15.safetensors"
BASE_SD15 = "v1-5-pruned-emaonly.safetensors"
LORA_SD15 = "sks_dog_lora_sd15.safetensors"
LORA_SD15_SECOND = "zwx_cup_lora_sd15.safetensors"  # workflows 8 and 9: a second concept
LORA_SD15_BEAR = "zwx_bear_lora_sd15.safetensors"
BASE_SDXL = "sd_xl_base_1.0.safetensors"
LORA_SDXL = "sks_dog_lora_sdxl.safetensors"
CONTROLNET_SD15 = "control_v11p_sd15_canny.safetensors"
FLUX_UNET = "flux1-dev.safetensors"  # workflows 11-12: Flux-dev as ComfyUI's Flux workflows load it
FLUX_T5, FLUX_CLIP_L, FLUX_VAE = "t5xxl_fp16.safetensors", "clip_l.safetensors", "ae.safetensors"
FLUX_LORA = "sks_dog_flux_lora.safetensors"
FLUX_REDUX, FLUX_SIGCLIP = "flux1-redux-dev.safetensors", "sigclip_vision_patch14_384.safetensors"
REFERENCE = "photoswap_reference_dog.png"  # workflow 12: a photo of the new subject
FLUX_STEPS, FLUX_GUIDANCE = 28, 3.5
SAVED_INVERSION = "photoswap/photoswap_cat_00001.safetensors [output]"
VIDEO = "photoswap_clip.mp4"  # workflow 10: a short clip in ComfyUI's input folder
SOURCE_PROMPT = "A photo of a cat"
SUBJECT = "cat"
CONCEPT = "sks dog"
CLASS_WORD = "dog"

# official notebook defaults (the swap sampler's defaults) and the paper's 50-step setting
NOTEBOOK = dict(self_output=0.8, self_map=0.0, cross_map=0.6)
STEPS, CFG = 50, 7.5

GROUP_COLORS = {"load": "#3f789e", "invert": "#a1309b", "swap": "#b06634", "out": "#8A8", "note": "#444"}


# ------------------------------------------------------------------------------------------------ graph builder
class Node:
    def __init__(self, graph: "Workflow", node_id: int, kind: str, info: dict, col: int, title: str | None):
        self.graph, self.id, self.type, self.info, self.col, self.title = graph, node_id, kind, info, col, title
        self.widgets: dict = {}
        self.links_in: dict = {}  # input name -> link id
        self.links_out: dict = {}  # output index -> [link ids]

    def out(self, name_or_index) -> int:
        names = self.info.get("output_name") or self.info.get("output") or []
        if isinstance(name_or_index, int):
            return name_or_index
        if name_or_index in names:
            return names.index(name_or_index)
        types = self.info.get("output") or []
        if name_or_index in types:
            return types.index(name_or_index)
        raise KeyError(f"{self.type} has no output {name_or_index!r} (outputs {names})")


class Workflow:
    """A UI-format workflow built from /object_info; `to_ui()` returns the frontend's JSON layout."""

    def __init__(self, name: str, object_info: dict, title: str):
        self.name, self.object_info, self.title = name, object_info, title
        self.nodes: list = []
        self.links: list = []  # [id, origin, origin_slot, target, target_slot, type]
        self.groups: list = []  # (title, [nodes], color)
        self.notes: list = []

    def add(self, kind: str, col: int, title: str | None = None, **widgets) -> Node:
        if kind in ("Note", "MarkdownNote"):
            info = {"input": {}, "output": [], "output_name": []}
        else:
            if kind not in self.object_info:
                raise KeyError(f"node type {kind!r} is not in /object_info")
            info = self.object_info[kind]
        node = Node(self, len(self.nodes) + 1, kind, info, col, title)
        known = {slot.name for slot in widget_slots(info)}
        unknown = set(widgets) - known
        if unknown and kind not in ("Note", "MarkdownNote"):
            raise KeyError(f"{kind} has no widget(s) {sorted(unknown)} (widgets: {sorted(known)})")
        node.widgets = dict(widgets)
        self.nodes.append(node)
        return node

    def note(self, col: int, text: str, title: str = "Note") -> Node:
        node = self.add("MarkdownNote", col, title=title)
        node.widgets = {"text": text}
        return node

    def link(self, src: Node, output, dst: Node, input_name: str) -> None:
        slot = src.out(output)
        specs = {name: spec for name, spec, _ in input_specs(dst.info)}
        if input_name not in specs:
            raise KeyError(f"{dst.type} has no input {input_name!r}")
        if input_name in dst.links_in:
            raise ValueError(f"{dst.type}.{input_name} is already connected")
        link_id = len(self.links) + 1
        kind = (src.info.get("output") or [])[slot]
        self.links.append([link_id, src.id, slot, dst.id, None, kind])  # target slot filled in by to_ui
        dst.links_in[input_name] = link_id
        src.links_out.setdefault(slot, []).append(link_id)

    def group(self, title: str, nodes: list, color: str) -> None:
        self.groups.append((title, list(nodes), color))

    # --------------------------------------------------------------------------------------------------- UI JSON
    def _widget_values(self, node: Node) -> list:
        if node.type in ("Note", "MarkdownNote"):
            return [node.widgets["text"]]
        values = []
        specs = {name: spec for name, spec, _ in input_specs(node.info)}
        for slot in widget_slots(node.info):
            spec = specs[slot.name]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if slot.name in node.widgets:
                value = node.widgets[slot.name]
            elif "default" in options:
                value = options["default"]
            elif isinstance(spec[0], list):
                value = spec[0][0] if spec[0] else ""
            elif spec[0] == "COMBO":
                value = (options.get("options") or [""])[0]
            else:
                value = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0])
            values.append(value)
            if slot.control:
                values.append("fixed")  # reproducible example runs; the user can switch to randomize
            values += ["image"] * (slot.extra - int(slot.control))  # the upload button's value
        return values

    def to_ui(self) -> dict:
        link_by_id = {link[0]: link for link in self.links}
        ui_nodes = []
        for order, node in enumerate(self.nodes):
            inputs = []
            sockets, widgets = [], []
            for name, spec, required in input_specs(node.info):
                kind = spec[0]
                entry = {"name": name, "localized_name": name}
                if is_widget_spec(spec):
                    entry.update({"type": "COMBO" if isinstance(kind, list) else kind, "widget": {"name": name}})
                    widgets.append((name, spec, entry))
                    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    for key, flag in options.items():
                        if key.endswith("_upload") and flag:
                            up = {"name": "upload", "localized_name": "choose file to upload",
                                  "type": key.split("_")[0].upper() + "UPLOAD", "widget": {"name": "upload"},
                                  "link": None}
                            widgets.append(("upload", None, up))
                else:
                    entry["type"] = kind
                    if not required:
                        entry["shape"] = 7
                    sockets.append((name, spec, entry))
            for name, _spec, entry in sockets + widgets:
                entry.setdefault("link", node.links_in.get(name))
                if entry["link"] is not None:
                    link_by_id[entry["link"]][4] = len(inputs)
                inputs.append(entry)
            outputs = []
            names = node.info.get("output_name") or []
            for i, kind in enumerate(node.info.get("output") or []):
                outputs.append({"name": names[i] if i < len(names) else kind, "localized_name": names[i]
                                if i < len(names) else kind, "type": "COMBO" if isinstance(kind, list) else kind,
                                "links": node.links_out.get(i) or None})
            ui = {"id": node.id, "type": node.type, "pos": [node.col * 400, 0], "size": [320, 120], "flags": {},
                  "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                  "properties": {"Node name for S&R": node.type} if node.type not in ("Note", "MarkdownNote")
                  else {}, "widgets_values": self._widget_values(node)}
            if node.title:
                ui["title"] = node.title
            if node.type in ("Note", "MarkdownNote"):
                ui["color"], ui["bgcolor"] = "#432", "#653"
            ui_nodes.append(ui)
        missing = [link for link in self.links if link[4] is None]
        assert not missing, missing
        groups = [{"id": i + 1, "title": title, "bounding": [0, 0, 100, 100], "color": color, "font_size": 24,
                   "flags": {}} for i, (title, _nodes, color) in enumerate(self.groups)]
        return {"id": f"photoswap-{self.name}", "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(self.links), "nodes": ui_nodes, "links": [list(link) for link in self.links],
                "groups": groups, "config": {},
                "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}, "frontendVersion": "1.32.9"}, "version": 0.4}

    def layout(self) -> dict:
        """What the frontend pass needs to arrange the nodes: columns and group members."""
        return {"columns": {str(node.id): node.col for node in self.nodes},
                "groups": [[node.id for node in nodes] for _t, nodes, _c in self.groups]}


# ------------------------------------------------------------------------------------------------ the workflows
def _concept_checkpoint(wf: Workflow, col: int = 0, ckpt: str = DREAMBOOTH_SD15) -> Node:
    return wf.add("PhotoswapConceptLoader", col, source="checkpoint", ckpt_name=ckpt, concept_words=CONCEPT,
                  class_word=CLASS_WORD)


def _concept_lora(wf: Workflow, base: str, lora: str, col: int = 0) -> tuple:
    loader = wf.add("CheckpointLoaderSimple", col, ckpt_name=base)
    concept = wf.add("PhotoswapConceptLoader", col, source="lora", lora_name=lora, concept_words=CONCEPT,
                     class_word=CLASS_WORD)
    for i, name in enumerate(("model", "clip", "vae")):
        wf.link(loader, i, concept, name)
    return loader, concept


def _photo(wf: Workflow, concept: Node, size: tuple, col: int = 1) -> tuple:
    image = wf.add("LoadImage", col, image=PHOTO)
    scale = wf.add("ImageScale", col, upscale_method="lanczos", width=size[0], height=size[1], crop="center")
    wf.link(image, "IMAGE", scale, "image")
    encode = wf.add("VAEEncode", col)
    wf.link(scale, "IMAGE", encode, "pixels")
    wf.link(concept, "VAE", encode, "vae")
    return image, scale, encode


def _prompt_pair(wf: Workflow, concept: Node, col: int = 1) -> Node:
    pair = wf.add("PhotoswapPromptPair", col, source_prompt=SOURCE_PROMPT, subject_word=SUBJECT,
                  concept_words=CONCEPT, negative_prompt="", target_prompt="")
    wf.link(concept, "CLIP", pair, "clip")
    wf.link(concept, "CONCEPT", pair, "concept")
    return pair


def _inversion(wf: Workflow, concept: Node, encode: Node, pair: Node, method: str, col: int = 2) -> Node:
    inv = wf.add("PhotoswapNullTextInversion", col, steps=STEPS, cfg=CFG, method=method, inner_iterations=10,
                 early_stop_epsilon=1e-5, learning_rate=0.01)
    wf.link(concept, "MODEL", inv, "model")
    wf.link(encode, "LATENT", inv, "latent")
    wf.link(pair, "source_positive", inv, "source_positive")
    wf.link(pair, "negative", inv, "negative")
    wf.link(concept, "VAE", inv, "vae")
    return inv


def _src(models, kind: str) -> tuple:
    """(node, output) of `kind` ("MODEL", "VAE"): from a Concept Loader node, or from {kind: (node, output)} when
    separate loaders provide them (Flux: UNETLoader, VAELoader)."""
    return models[kind] if isinstance(models, dict) else (models, kind)


def _recorder(wf: Workflow, concept, source_positive: tuple, negative: tuple, col: int = 3,
              inversion: Node | None = None, latent: Node | None = None, seed: int = 8888, steps: int = STEPS,
              cfg: float = CFG) -> Node:
    rec = wf.add("PhotoswapAttentionRecorder", col, seed=seed, steps=steps, cfg=cfg, record_fraction=1.0,
                 record_self_maps=False, storage="auto", memory_budget_gb=0.0)
    wf.link(*_src(concept, "MODEL"), rec, "model")
    wf.link(*source_positive, rec, "source_positive")
    wf.link(*negative, rec, "negative")
    if inversion is not None:
        wf.link(inversion, "inversion", rec, "inversion")
    if latent is not None:
        wf.link(latent, "LATENT", rec, "latent")
    return rec


def _sampler(wf: Workflow, concept, rec: Node, target_positive: tuple, negative: tuple, pair: Node,
             col: int = 3, title: str | None = None, **windows) -> Node:
    settings = dict(NOTEBOOK, local_blend=True, blend_threshold=0.3, blend_start=0.2, cfg=CFG, force_lockstep=False)
    settings.update(windows)
    swap = wf.add("PhotoswapAttentionSwapSampler", col, title=title, **settings)
    wf.link(*_src(concept, "MODEL"), swap, "model")
    wf.link(rec, "trace", swap, "trace")
    wf.link(*target_positive, swap, "target_positive")
    wf.link(*negative, swap, "negative")
    wf.link(pair, "prompts", swap, "prompts")
    return swap


def _decode_save(wf: Workflow, concept, latent: tuple, prefix: str, col: int, title: str | None = None) -> tuple:
    decode = wf.add("VAEDecode", col)
    wf.link(*latent, decode, "samples")
    wf.link(*_src(concept, "VAE"), decode, "vae")
    save = wf.add("SaveImage", col, title=title, filename_prefix=prefix)
    wf.link(decode, "IMAGE", save, "images")
    return decode, save


def _outputs(wf: Workflow, concept, rec: Node, pair: Node, swap: Node, prefix: str, col: int = 4,
             target_positive: tuple | None = None) -> list:
    d1, s1 = _decode_save(wf, concept, (swap, "swapped"), f"{prefix}/swapped", col, "Swapped image")
    d2, s2 = _decode_save(wf, concept, (swap, "source"), f"{prefix}/source_reconstruction", col,
                          "Source reconstruction")
    preview = wf.add("PhotoswapAttentionPreview", col, step_fraction=0.5)
    wf.link(*_src(concept, "MODEL"), preview, "model")
    wf.link(rec, "trace", preview, "trace")
    wf.link(pair, "prompts", preview, "prompts")
    wf.link(*(target_positive or (pair, "target_positive")), preview, "target_positive")
    wf.link(swap, "blend_mask", preview, "blend_mask")
    s3 = wf.add("SaveImage", col, title="Attention previews", filename_prefix=f"{prefix}/attention_previews")
    wf.link(preview, "previews", s3, "images")
    return [d1, s1, d2, s2, preview, s3]


def wf_real_dreambooth(oi) -> Workflow:
    wf = Workflow("1_real_image_swap_dreambooth", oi, "Photoswap 1: real-image subject swap, DreamBooth checkpoint, "
                                                       "null-text inversion (official defaults)")
    concept = _concept_checkpoint(wf)
    note = wf.note(0, NOTES["1"])
    image, scale, encode = _photo(wf, concept, (512, 512))
    pair = _prompt_pair(wf, concept)
    inv = _inversion(wf, concept, encode, pair, "null_text")
    rec = _recorder(wf, concept, (pair, "source_positive"), (pair, "negative"), inversion=inv)
    swap = _sampler(wf, concept, rec, (pair, "target_positive"), (pair, "negative"), pair)
    outs = _outputs(wf, concept, rec, pair, swap, "photoswap/1_dreambooth")
    _standard_groups(wf, [concept, note], [image, scale, encode, pair], [inv], [rec, swap], outs)
    return wf


def wf_real_lora_direct(oi) -> Workflow:
    wf = Workflow("2_real_image_swap_lora_direct", oi, "Photoswap 2: real-image swap, LoRA concept on a base model, "
                                                        "fast 'direct' inversion")
    loader, concept = _concept_lora(wf, BASE_SD15, LORA_SD15)
    note = wf.note(0, NOTES["2"])
    image, scale, encode = _photo(wf, concept, (512, 512))
    pair = _prompt_pair(wf, concept)
    inv = _inversion(wf, concept, encode, pair, "direct")
    rec = _recorder(wf, concept, (pair, "source_positive"), (pair, "negative"), inversion=inv)
    swap = _sampler(wf, concept, rec, (pair, "target_positive"), (pair, "negative"), pair)
    outs = _outputs(wf, concept, rec, pair, swap, "photoswap/2_lora_direct")
    _standard_groups(wf, [loader, concept, note], [image, scale, encode, pair], [inv], [rec, swap], outs)
    return wf


def wf_synthetic(oi) -> Workflow:
    wf = Workflow("3_synthetic_swap", oi, "Photoswap 3: synthetic-image swap (the recorder generates the source)")
    concept = _concept_checkpoint(wf)
    note = wf.note(0, NOTES["3"])
    pair = _prompt_pair(wf, concept)
    empty = wf.add("EmptyLatentImage", 1, width=512, height=512, batch_size=1)
    rec = _recorder(wf, concept, (pair, "source_positive"), (pair, "negative"), col=2, latent=empty)
    swap = _sampler(wf, concept, rec, (pair, "target_positive"), (pair, "negative"), pair, col=2)
    outs = _outputs(wf, concept, rec, pair, swap, "photoswap/3_synthetic", col=3)
    outs[3].title = "Source image (synthetic)"
    wf.group("Model and concept", [concept, note], GROUP_COLORS["load"])
    wf.group("Prompts and size", [pair, empty], GROUP_COLORS["load"])
    wf.group("Source pass (generated) and swap", [rec, swap], GROUP_COLORS["swap"])
    wf.group("Outputs", outs, GROUP_COLORS["out"])
    return wf


def wf_controlnet(oi) -> Workflow:
    wf = Workflow("4_controlnet_canny_target", oi, "Photoswap 4: ControlNet (Canny of the source photo) on the "
                                                    "target conditioning")
    concept = _concept_checkpoint(wf)
    note = wf.note(0, NOTES["4"])
    image, scale, encode = _photo(wf, concept, (512, 512))
    pair = _prompt_pair(wf, concept)
    inv = _inversion(wf, concept, encode, pair, "null_text")
    canny = wf.add("Canny", 2, low_threshold=0.4, high_threshold=0.8)
    wf.link(scale, "IMAGE", canny, "image")
    edges = wf.add("PreviewImage", 2, title="Canny edges")
    wf.link(canny, "IMAGE", edges, "images")
    cn_loader = wf.add("ControlNetLoader", 2, control_net_name=CONTROLNET_SD15)
    apply = wf.add("ControlNetApplyAdvanced", 2, strength=0.6, start_percent=0.0, end_percent=0.5)
    wf.link(pair, "target_positive", apply, "positive")
    wf.link(pair, "negative", apply, "negative")
    wf.link(cn_loader, "CONTROL_NET", apply, "control_net")
    wf.link(canny, "IMAGE", apply, "image")
    wf.link(concept, "VAE", apply, "vae")
    rec = _recorder(wf, concept, (pair, "source_positive"), (pair, "negative"), inversion=inv)
    swap = _sampler(wf, concept, rec, (apply, "positive"), (apply, "negative"), pair)
    outs = _outputs(wf, concept, rec, pair, swap, "photoswap/4_controlnet", target_positive=(apply, "positive"))
    wf.group("Model and concept", [concept, note], GROUP_COLORS["load"])
    wf.group("Photo and prompts", [image, scale, encode, pair], GROUP_COLORS["load"])
    wf.group("Inversion, ControlNet", [inv, canny, edges, cn_loader, apply], GROUP_COLORS["invert"])
    wf.group("Source pass and swap", [rec, swap], GROUP_COLORS["swap"])
    wf.group("Outputs", outs, GROUP_COLORS["out"])
    return wf


def wf_sdxl(oi) -> Workflow:
    wf = Workflow("5_sdxl_real_image_swap", oi, "Photoswap 5: SDXL real-image swap (LoRA concept, null-text "
                                                 "inversion, 1024 px)")
    loader, concept = _concept_lora(wf, BASE_SDXL, LORA_SDXL)
    note = wf.note(0, NOTES["5"])
    image, scale, encode = _photo(wf, concept, (1024, 1024))
    pair = _prompt_pair(wf, concept)
    inv = _inversion(wf, concept, encode, pair, "null_text")
    rec = _recorder(wf, concept, (pair, "source_positive"), (pair, "negative"), inversion=inv)
    swap = _sampler(wf, concept, rec, (pair, "target_positive"), (pair, "negative"), pair)
    outs = _outputs(wf, concept, rec, pair, swap, "photoswap/5_sdxl")
    _standard_groups(wf, [loader, concept, note], [image, scale, encode, pair], [inv], [rec, swap], outs)
    return wf


SWEEP_SELF_OUTPUT = (0.2, 0.5, 0.8)  # columns
SWEEP_CROSS_MAP = (0.4, 0.6)  # rows


def sweep_label(self_output: float, cross_map: float) -> str:
    return f"self_output_{self_output:g}__cross_map_{cross_map:g}"


def wf_sweep(oi) -> Workflow:
    wf = Workflow("6_window_sweep_grid", oi, "Photoswap 6: window sweep — several (self_output, cross_map) settings "
                                             "in one run, as a labelled grid")
    concept = _concept_checkpoint(wf)
    note = wf.note(0, NOTES["6"])
    image, scale, encode = _photo(wf, concept, (512, 512))
    pair = _prompt_pair(wf, concept)
    inv = _inversion(wf, concept, encode, pair, "null_text")
    rec = _recorder(wf, concept, (pair, "source_positive"), (pair, "negative"), inversion=inv)
    rows, swaps, saves = [], [], []
    for r, cross in enumerate(SWEEP_CROSS_MAP):
        row = []
        for c, self_out in enumerate(SWEEP_SELF_OUTPUT):
            col = 4 + c
            label = sweep_label(self_out, cross)
            swap = _sampler(wf, concept, rec, (pair, "target_positive"), (pair, "negative"), pair, col=col,
                            title=f"Swap: self_output {self_out:g}, cross_map {cross:g}", self_output=self_out,
                            cross_map=cross)
            decode, save = _decode_save(wf, concept, (swap, "swapped"), f"photoswap/6_sweep/{label}", col,
                                        title=f"{self_out:g} / {cross:g}")
            swaps.append(swap)
            saves += [decode, save]
            row.append(decode)
        rows.append(row)
    gcol = 4 + len(SWEEP_SELF_OUTPUT)
    stitched_rows, grid_nodes = [], []
    for r, row in enumerate(rows):
        current = row[0]
        for nxt in row[1:]:
            stitch = wf.add("ImageStitch", gcol, title=f"row cross_map {SWEEP_CROSS_MAP[r]:g}", direction="right",
                            match_image_size=True, spacing_width=8, spacing_color="white")
            wf.link(current, "IMAGE", stitch, "image1")
            wf.link(nxt, "IMAGE", stitch, "image2")
            grid_nodes.append(stitch)
            current = stitch
        stitched_rows.append(current)
    current = stitched_rows[0]
    for nxt in stitched_rows[1:]:
        stitch = wf.add("ImageStitch", gcol, title="rows stacked", direction="down", match_image_size=True,
                        spacing_width=8, spacing_color="white")
        wf.link(current, "IMAGE", stitch, "image1")
        wf.link(nxt, "IMAGE", stitch, "image2")
        grid_nodes.append(stitch)
        current = stitch
    cols = "-".join(f"{v:g}" for v in SWEEP_SELF_OUTPUT)
    rows_label = "-".join(f"{v:g}" for v in SWEEP_CROSS_MAP)
    grid = wf.add("SaveImage", gcol, title="Grid: columns self_output, rows cross_map",
                  filename_prefix=f"photoswap/6_sweep/grid__columns_self_output_{cols}__rows_cross_map_{rows_label}")
    wf.link(current, "IMAGE", grid, "images")
    grid_nodes.append(grid)
    _standard_groups(wf, [concept, note], [image, scale, encode, pair], [inv], [rec], [])
    for c, self_out in enumerate(SWEEP_SELF_OUTPUT):
        members = [n for n in swaps + saves if n.col == 4 + c]
        wf.group(f"self_output {self_out:g}", members, GROUP_COLORS["swap"])
    wf.group("Grid (ImageStitch)", grid_nodes, GROUP_COLORS["out"])
    return wf


def wf_save_inversion(oi) -> Workflow:
    wf = Workflow("7a_save_inversion", oi, "Photoswap 7a: invert a photo once and save the inversion")
    concept = _concept_checkpoint(wf)
    note = wf.note(0, NOTES["7a"])
    image, scale, encode = _photo(wf, concept, (512, 512))
    pair = _prompt_pair(wf, concept)
    inv = _inversion(wf, concept, encode, pair, "null_text")
    save = wf.add("PhotoswapSaveInversion", 2, filename_prefix="photoswap_cat")
    wf.link(inv, "inversion", save, "inversion")
    wf.group("Model and concept", [concept, note], GROUP_COLORS["load"])
    wf.group("Photo and prompts", [image, scale, encode, pair], GROUP_COLORS["load"])
    wf.group("Null-text inversion, saved", [inv, save], GROUP_COLORS["invert"])
    return wf


def wf_load_inversion(oi) -> Workflow:
    wf = Workflow("7b_load_inversion_swap", oi, "Photoswap 7b: load the saved inversion and swap (no inversion run)")
    concept = _concept_checkpoint(wf)
    note = wf.note(0, NOTES["7b"])
    load = wf.add("PhotoswapLoadInversion", 1, inversion_file=SAVED_INVERSION)
    wf.link(concept, "MODEL", load, "model")
    pair = _prompt_pair(wf, concept)
    rec = _recorder(wf, concept, (load, "source_positive"), (load, "negative"), col=2, inversion=load)
    swap = _sampler(wf, concept, rec, (pair, "target_positive"), (load, "negative"), pair, col=2)
    outs = _outputs(wf, concept, rec, pair, swap, "photoswap/7b_loaded", col=3)
    wf.group("Model and concept", [concept, note], GROUP_COLORS["load"])
    wf.group("Saved inversion and prompts", [load, pair], GROUP_COLORS["invert"])
    wf.group("Source pass and swap", [rec, swap], GROUP_COLORS["swap"])
    wf.group("Outputs", outs, GROUP_COLORS["out"])
    return wf


def _second_concept(wf: Workflow, first: Node, lora: str, words: str, class_word: str, col: int = 0) -> Node:
    """A Concept Loader chained after `first`: its MODEL/CLIP on top (LoRAs stack), `previous` = first's CONCEPT."""
    concept = wf.add("PhotoswapConceptLoader", col, source="lora", lora_name=lora, concept_words=words,
                     class_word=class_word)
    for name in ("MODEL", "CLIP", "VAE"):
        wf.link(first, name, concept, name.lower())
    wf.link(first, "CONCEPT", concept, "previous")
    return concept


def _two_concept_swap(wf: Workflow, source_prompt: str, subjects: str, regions: str, second: tuple, prefix: str):
    loader, first = _concept_lora(wf, BASE_SD15, LORA_SD15)
    concept = _second_concept(wf, first, *second)
    image, scale, encode = _photo(wf, concept, (512, 512))
    pair = wf.add("PhotoswapPromptPair", 1, source_prompt=source_prompt, subject_word=subjects,
                  concept_words=f"{CONCEPT}; {second[1]}", negative_prompt="", target_prompt="",
                  region_words=regions)
    wf.link(concept, "CLIP", pair, "clip")
    wf.link(concept, "CONCEPT", pair, "concept")
    inv = _inversion(wf, concept, encode, pair, "direct")
    rec = _recorder(wf, concept, (pair, "source_positive"), (pair, "negative"), inversion=inv)
    rec.widgets["record_self_maps"] = True
    swap = _sampler(wf, concept, rec, (pair, "target_positive"), (pair, "negative"), pair)
    outs = _outputs(wf, concept, rec, pair, swap, prefix)
    masks = wf.add("MaskToImage", 4)
    wf.link(swap, "pair_masks", masks, "mask")
    save_masks = wf.add("SaveImage", 4, title="Mask of each subject pair", filename_prefix=f"{prefix}/pair_masks")
    wf.link(masks, "IMAGE", save_masks, "images")
    return [loader, first, concept], [image, scale, encode, pair], [inv], [rec, swap], outs + [masks, save_masks]


def wf_multi_concept(oi) -> Workflow:
    wf = Workflow("8_multi_concept_two_loras", oi, "Photoswap 8: two subjects, two concepts (two LoRAs chained "
                                                   "Concept Loaders) in one swap")
    load, photo, invert, swap, outs = _two_concept_swap(
        wf, "A photo of a cat next to a mug", "cat; mug", "", (LORA_SD15_SECOND, "zwx cup", "cup"),
        "photoswap/8_multi_concept")
    note = wf.note(0, NOTES["8"])
    _standard_groups(wf, load + [note], photo, invert, swap, outs)
    return wf


def wf_composition(oi) -> Workflow:
    wf = Workflow("9_composition_by_parts", oi, "Photoswap 9: composition by parts — the head of one concept on "
                                                "the body of another")
    load, photo, invert, swap, outs = _two_concept_swap(
        wf, "A photo of a cat with a round head and a long body", "cat; cat", "head; body",
        (LORA_SD15_BEAR, "zwx bear", "bear"), "photoswap/9_composition")
    note = wf.note(0, NOTES["9"])
    _standard_groups(wf, load + [note], photo, invert, swap, outs)
    return wf


def wf_video_clip(oi) -> Workflow:
    """A clip through the core video nodes: its frames are one latent batch; Frame Options sets the cross-frame
    attention; the swapped frames become a video again with the source's frame rate and audio."""
    wf = Workflow("10_video_clip_swap", oi, "Photoswap 10: swap a subject through a short video clip (frames as a "
                                            "batch, cross-frame attention)")
    loader, concept = _concept_lora(wf, BASE_SD15, LORA_SD15)
    note = wf.note(0, NOTES["10"])
    video = wf.add("LoadVideo", 1, file=VIDEO)
    parts = wf.add("GetVideoComponents", 1)
    wf.link(video, "VIDEO", parts, "video")
    first = wf.add("ImageFromBatch", 1, title="First 16 frames", batch_index=0, length=16)
    wf.link(parts, "images", first, "image")
    scale = wf.add("ImageScale", 1, upscale_method="lanczos", width=512, height=512, crop="center")
    wf.link(first, "IMAGE", scale, "image")
    encode = wf.add("VAEEncode", 1)
    wf.link(scale, "IMAGE", encode, "pixels")
    wf.link(concept, "VAE", encode, "vae")
    pair = _prompt_pair(wf, concept)
    options = wf.add("PhotoswapFrameOptions", 2, frame_attention="first", keyframe_interval=4, frames_per_batch=0)
    inv = _inversion(wf, concept, encode, pair, "direct")
    rec = _recorder(wf, concept, (pair, "source_positive"), (pair, "negative"), inversion=inv)
    swap = _sampler(wf, concept, rec, (pair, "target_positive"), (pair, "negative"), pair)
    for node in (inv, rec, swap):
        wf.link(options, "frame_options", node, "frame_options")
    decode = wf.add("VAEDecode", 4)
    wf.link(swap, "swapped", decode, "samples")
    wf.link(concept, "VAE", decode, "vae")
    create = wf.add("CreateVideo", 4, fps=30.0)
    wf.link(decode, "IMAGE", create, "images")
    wf.link(parts, "fps", create, "fps")
    wf.link(parts, "audio", create, "audio")
    save = wf.add("SaveVideo", 4, title="Swapped video", filename_prefix="photoswap/10_video/swapped",
                  format="auto", codec="auto")
    wf.link(create, "VIDEO", save, "video")
    _standard_groups(wf, [loader, concept, note], [video, parts, first, scale, encode, pair], [options, inv],
                     [rec, swap], [decode, create, save])
    return wf


def _flux_loaders(wf: Workflow, col: int = 0) -> tuple:
    """(UNETLoader, DualCLIPLoader type flux, VAELoader): Flux-dev as ComfyUI's own Flux workflows load it."""
    unet = wf.add("UNETLoader", col, unet_name=FLUX_UNET, weight_dtype="default")
    clip = wf.add("DualCLIPLoader", col, clip_name1=FLUX_T5, clip_name2=FLUX_CLIP_L, type="flux")
    vae = wf.add("VAELoader", col, vae_name=FLUX_VAE)
    return unet, clip, vae


def _flux_swap(wf: Workflow, model: tuple, clip: tuple, vae: tuple, concept: Node | None, concept_words: str,
               prefix: str, target_hook=None) -> dict:
    """Photo → Prompt Pair (FluxGuidance on both prompts) → direct inversion (cfg 1) → Recorder → Swap Sampler →
    outputs, on Flux. `target_hook(wf, guided_target) -> (node, output)` may rewrite the target conditioning."""
    image = wf.add("LoadImage", 1, image=PHOTO)
    scale = wf.add("ImageScale", 1, upscale_method="lanczos", width=1024, height=1024, crop="center")
    wf.link(image, "IMAGE", scale, "image")
    encode = wf.add("VAEEncode", 1)
    wf.link(scale, "IMAGE", encode, "pixels")
    wf.link(*vae, encode, "vae")
    pair = wf.add("PhotoswapPromptPair", 1, source_prompt=SOURCE_PROMPT, subject_word=SUBJECT,
                  concept_words=concept_words, negative_prompt="", target_prompt="")
    wf.link(*clip, pair, "clip")
    if concept is not None:
        wf.link(concept, "CONCEPT", pair, "concept")
    guided = {}
    for role in ("source_positive", "target_positive"):
        guided[role] = wf.add("FluxGuidance", 2, title=f"Guidance ({role.split('_')[0]})", guidance=FLUX_GUIDANCE)
        wf.link(pair, role, guided[role], "conditioning")
    target = (guided["target_positive"], "CONDITIONING")
    extra = []
    if target_hook is not None:
        extra, target = target_hook(wf, target)
    inv = wf.add("PhotoswapNullTextInversion", 2, steps=FLUX_STEPS, cfg=1.0, method="direct", inner_iterations=10,
                 early_stop_epsilon=1e-5, learning_rate=0.01)
    wf.link(*model, inv, "model")
    wf.link(encode, "LATENT", inv, "latent")
    wf.link(guided["source_positive"], "CONDITIONING", inv, "source_positive")
    wf.link(pair, "negative", inv, "negative")
    models = {"MODEL": model, "VAE": vae}
    rec = _recorder(wf, models, (guided["source_positive"], "CONDITIONING"), (pair, "negative"), inversion=inv,
                    steps=FLUX_STEPS, cfg=1.0)
    swap = _sampler(wf, models, rec, target, (pair, "negative"), pair, cfg=1.0)
    outs = _outputs(wf, models, rec, pair, swap, prefix, target_positive=target)
    return {"photo": [image, scale, encode, pair], "invert": [guided["source_positive"], guided["target_positive"],
                                                              inv] + extra,
            "swap": [rec, swap], "outs": outs}


def wf_flux_lora(oi) -> Workflow:
    """Flux-dev + a Flux LoRA concept (kohya / ai-toolkit / diffusers keys) through the Concept Loader."""
    wf = Workflow("11_flux_lora_swap", oi, "Photoswap 11: real-image swap on Flux with a Flux LoRA concept")
    unet, clip, vae = _flux_loaders(wf)
    concept = wf.add("PhotoswapConceptLoader", 0, source="lora", lora_name=FLUX_LORA, concept_words=CONCEPT,
                     class_word=CLASS_WORD)
    for node, name in ((unet, "model"), (clip, "clip"), (vae, "vae")):
        wf.link(node, 0, concept, name)
    parts = _flux_swap(wf, (concept, "MODEL"), (concept, "CLIP"), (concept, "VAE"), concept, CONCEPT,
                       "photoswap/11_flux_lora")
    note = wf.note(0, NOTES["11"])
    _standard_groups(wf, [unet, clip, vae, concept, note], parts["photo"], parts["invert"], parts["swap"],
                     parts["outs"])
    return wf


def wf_flux_redux(oi) -> Workflow:
    """Zero-shot: the concept from a reference photo through core Redux (CLIP Vision Encode + Apply Style Model on
    the target conditioning), no training."""
    wf = Workflow("12_flux_redux_zero_shot", oi, "Photoswap 12: zero-shot swap on Flux, the new subject from a "
                                                 "reference photo (Redux)")
    unet, clip, vae = _flux_loaders(wf)

    def redux(wf, target):
        ref = wf.add("LoadImage", 2, title="Reference photo of the new subject", image=REFERENCE)
        vision = wf.add("CLIPVisionLoader", 2, clip_name=FLUX_SIGCLIP)
        seen = wf.add("CLIPVisionEncode", 2, crop="center")
        wf.link(vision, "CLIP_VISION", seen, "clip_vision")
        wf.link(ref, "IMAGE", seen, "image")
        style = wf.add("StyleModelLoader", 2, style_model_name=FLUX_REDUX)
        apply = wf.add("StyleModelApply", 2, title="Redux on the target prompt", strength=1.0,
                       strength_type="multiply")
        wf.link(*target, apply, "conditioning")
        wf.link(style, "STYLE_MODEL", apply, "style_model")
        wf.link(seen, "CLIP_VISION_OUTPUT", apply, "clip_vision_output")
        return [ref, vision, seen, style, apply], (apply, "CONDITIONING")

    parts = _flux_swap(wf, (unet, "MODEL"), (clip, "CLIP"), (vae, "VAE"), None, CLASS_WORD,
                       "photoswap/12_flux_redux", target_hook=redux)
    note = wf.note(0, NOTES["12"])
    _standard_groups(wf, [unet, clip, vae, note], parts["photo"], parts["invert"], parts["swap"], parts["outs"])
    return wf


def _standard_groups(wf, load, photo, invert, swap, outs):
    wf.group("Model and concept", load, GROUP_COLORS["load"])
    wf.group("Photo and prompts", photo, GROUP_COLORS["load"])
    wf.group("Inversion", invert, GROUP_COLORS["invert"])
    wf.group("Source pass and swap", swap, GROUP_COLORS["swap"])
    if outs:
        wf.group("Outputs", outs, GROUP_COLORS["out"])


_WHERE = (f"Put the photo into `ComfyUI/input/` (or use the Load Image upload button). Describe it in "
          f"**source_prompt** and name the subject in **subject_word** (here '{SUBJECT}').")
NOTES = {
    "1": ("## Real-image swap (DreamBooth checkpoint)\n"
          f"1. Put your DreamBooth checkpoint into `models/checkpoints/` and pick it in the concept loader "
          f"(concept words e.g. `{CONCEPT}`).\n2. {_WHERE}\n3. Queue. The null-text inversion (paper/official "
          "method, 50 steps) is the slow part; it is cached, so changing only the swap windows re-runs only the "
          "sampler.\n\nSwap windows are the official notebook's (self_output 0.8, self_map 0, cross_map 0.6). "
          "The paper's text uses λ_φ=10, λ_M=25, λ_A=20 of 50 steps: self_output 0.2, self_map 0.3 (the map window "
          "follows the output window here), cross_map 0.4."),
    "2": ("## Real-image swap (LoRA concept, direct inversion)\n"
          "1. Base SD1.5 checkpoint in `models/checkpoints/`, your DreamBooth-LoRA in `models/loras/`.\n"
          f"2. {_WHERE}\n3. Queue. `direct` inversion pins the source pass to the DDIM inversion: exact "
          "reconstruction, no optimisation, much faster than null-text."),
    "3": ("## Synthetic swap\nNo photo: the recorder generates the source image from the seed and the source "
          "prompt, then the swap sampler renders the same scene with your concept. Change the seed for another "
          "source image."),
    "4": ("## ControlNet on the target\nCanny edges of the source photo (core **Canny** node) steer the target pass "
          "through **Apply ControlNet** on the prompt pair's target conditioning. The source pass (recorder) has no "
          "ControlNet, so the reconstruction is unchanged.\nControlNet: `models/controlnet/` (an SD1.5 Canny "
          "ControlNet). Lower strength / end_percent if the new subject is forced into the old outline."),
    "5": ("## SDXL real-image swap\nSDXL base in `models/checkpoints/`, an SDXL DreamBooth-LoRA in `models/loras/`. "
          "1024 px, null-text inversion. Switch the inversion to `direct` for a much faster run."),
    "6": ("## Window sweep\nOne inversion and one recorder feed six swap samplers with different windows; only "
          "the samplers run again when you change them. Every result is saved with its settings in the file name "
          "(`self_output_<a>__cross_map_<b>`), and the grid (core Image Stitch) is saved as one image: "
          "columns self_output 0.2 / 0.5 / 0.8 (left → right), rows cross_map 0.4 / 0.6 (top → bottom). Core "
          "ComfyUI has no node that draws text, so the labels are the node titles and file names."),
    "7a": ("## Save an inversion\nInvert once (null-text inversion is the slow step) and save it to "
           "`output/photoswap/photoswap_cat_00001.safetensors`. Open workflow 7b to swap with it."),
    "8": ("## Two subjects, two concepts\nChain Concept Loaders like LoRA loaders: the second one takes the first "
          "one's MODEL, CLIP and CONCEPT (`previous`), so both LoRAs stack. The Prompt Pair gets the subject words "
          "in the same order, separated by ';' (`cat; mug`); each subject becomes its concept. LocalBlend keeps "
          "the background outside the union of the subjects' masks; `pair_masks` shows each one."),
    "9": ("## Composition by parts\nOne subject named twice (`cat; cat`) with a region word each (`head; body`, "
          "words of the source prompt): the head region attends only to the first concept's tokens, the body "
          "region only to the second's, and outside both regions the result is the source. An explicit MASK "
          "(any mask node) on the sampler's `region_mask` restricts the whole swap the same way."),
    "10": ("## Swap through a video clip\nLoad Video → Get Video Components gives the frames as an IMAGE batch; "
           "every frame is one latent of the batch (a clip). Each frame is inverted and reconstructed on its own "
           "(the source's motion stays), and **Photoswap Frame Options** sets `frame_attention` (default `first`: "
           "every frame's target self-attention also looks at frame 0, so the new subject looks the same in every "
           "frame). Start with a few frames (ImageFromBatch `length`) at 512 px; `frames_per_batch` bounds the "
           "memory (0 = as many as fit; the result does not depend on it). The swapped frames go back into a video "
           "with the source's frame rate and audio."),
    "11": ("## Flux real-image swap with a Flux LoRA\nFlux-dev in `models/diffusion_models/`, `t5xxl_fp16` and "
           "`clip_l` in `models/text_encoders/`, `ae.safetensors` in `models/vae/`, your Flux LoRA (kohya, ai-toolkit "
           f"or diffusers keys) in `models/loras/` (concept words e.g. `{CONCEPT}`).\n{_WHERE}\nOn Flux the inversion "
           "is `direct` (the flow ODE, source pinned: exact reconstruction) and every cfg is 1: the guidance is "
           "Flux-dev's distilled one, set on **FluxGuidance** (both prompts). 28 steps, 1024 px."),
    "12": ("## Flux zero-shot swap (Redux, no training)\nThe new subject comes from a reference photo: **CLIP Vision "
           "Encode** (SigCLIP, `models/clip_vision/`) + **Apply Style Model** (`flux1-redux-dev`, "
           "`models/style_models/`) add its image tokens to the *target* prompt only; the source pass stays the "
           "photo's. concept_words is a plain class word (`dog`), no learned token. How strongly Redux holds the "
           "reference's identity is not measured yet (no trained Flux weights here); lower the style strength if "
           "the reference's background leaks in."),
    "7b": ("## Swap with a saved inversion\nPick the file saved by 7a (refresh the page after saving). It must be "
           "used with the same model (checkpoint and LoRAs) it was made with: the loader checks the weights. The "
           "prompt pair's source prompt must be the one the inversion was made with."),
}

BUILDERS = [wf_real_dreambooth, wf_real_lora_direct, wf_synthetic, wf_controlnet, wf_sdxl, wf_sweep,
            wf_save_inversion, wf_load_inversion, wf_multi_concept, wf_composition, wf_video_clip, wf_flux_lora,
            wf_flux_redux]


def build_all(object_info: dict) -> list:
    return [builder(object_info) for builder in BUILDERS]


# ------------------------------------------------------------------------------------------------ the frontend
WAIT_FOR_APP = ("() => window.app && window.app.graph && window.LiteGraph && window.app.canvas && "
                "Object.keys(LiteGraph.registered_node_types || {}).length > 50")

LOAD_JS = """
async ([wf, layout]) => {
  app.graph.clear();
  await app.loadGraphData(wf, true, true, null);
  await new Promise(r => setTimeout(r, 300));
  const nodes = app.graph.nodes;
  if (layout) {
    const byId = Object.fromEntries(nodes.map(n => [String(n.id), n]));
    for (const n of nodes) {
      const s = n.computeSize();
      const w = n.type.endsWith('Note') ? 360 : Math.max(s[0], 300);
      n.setSize([w, n.type.endsWith('Note') ? Math.max(s[1], 240) : s[1]]);
    }
    const cols = {};
    for (const [id, c] of Object.entries(layout.columns)) (cols[c] = cols[c] || []).push(byId[id]);
    const gap = 36, titleH = LiteGraph.NODE_TITLE_HEIGHT || 30, groupPad = 76;
    let x = 0;
    for (const c of Object.keys(cols).map(Number).sort((a, b) => a - b)) {
      let y = groupPad, maxW = 0;
      let prevGroup = null;
      for (const n of cols[c]) {
        const g = layout.groups.findIndex(m => m.includes(n.id));
        if (prevGroup !== null && g !== prevGroup) y += groupPad;
        prevGroup = g;
        n.pos = [x, y + titleH];
        y += n.size[1] + titleH + gap;
        maxW = Math.max(maxW, n.size[0]);
      }
      x += maxW + 70;
    }
    const groups = app.graph.groups || app.graph._groups;
    layout.groups.forEach((members, i) => {
      const g = groups[i];
      if (!g || !members.length) return;
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const id of members) {
        const n = byId[String(id)];
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - titleH);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
      }
      const b = [x0 - 12, y0 - 62, x1 - x0 + 24, y1 - y0 + 74];
      if (g._bounding) g._bounding.set(b); else g.bounding = b;
    });
    app.graph.setDirtyCanvas(true, true);
  }
  const dialogs = Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))
      .map(d => d.innerText || '').filter(t => t.trim());
  const report = nodes.map(n => ({id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
      has_errors: !!n.has_errors, widgets: (n.widgets || []).map(w => [w.name, w.value])}));
  return {dialogs, nodes: report, serialized: JSON.stringify(app.graph.serialize())};
}
"""

SHOT_CSS = """
body * { visibility: hidden !important; }
#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }
"""

BOUNDS_JS = """
() => {
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph.nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 40);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  for (const g of (app.graph.groups || app.graph._groups || [])) {
    const b = g._bounding || g.bounding;
    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
  }
  return [x0, y0, x1, y1];
}
"""

FIT_JS = """
async () => {
  document.querySelectorAll('style').forEach(e => { if (e.textContent.includes('visibility: hidden !important'))
    e.setAttribute('data-photoswap-shot', '1'); });
  app.canvas.show_info = false;
  try { await app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 1); } catch (e) {}
  const nodes = app.graph.nodes;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 40);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  for (const g of (app.graph.groups || app.graph._groups || [])) {
    const b = g._bounding || g.bounding;
    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
  }
  const canvas = app.canvas.canvas;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  const pad = 20;
  const scale = Math.min((w - 2 * pad) / (x1 - x0), (h - 2 * pad) / (y1 - y0), 1.0);
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [pad / scale - x0 + ((w - 2 * pad) / scale - (x1 - x0)) / 2,
                          pad / scale - y0 + ((h - 2 * pad) / scale - (y1 - y0)) / 2];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  await new Promise(r => setTimeout(r, 400));
  return [x0, y0, x1, y1, scale];
}
"""


class FrontendUnavailable(RuntimeError):
    pass


class Frontend:
    """Headless Chromium (Debian's /usr/bin/chromium) on the ComfyUI frontend a server serves, via Playwright."""

    def __init__(self, url: str, executable: str = CHROMIUM, viewport=(1600, 1000), timeout_ms: int = 180_000):
        self.url, self.executable, self.viewport, self.timeout_ms = url, executable, viewport, timeout_ms
        self.console_errors: list = []

    def __enter__(self):
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as exc:
            raise FrontendUnavailable("the Python package 'playwright' is not installed") from exc
        if not Path(self.executable).exists():
            raise FrontendUnavailable(f"{self.executable} not found (apt-get install chromium)")
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=self.executable, args=CHROMIUM_FLAGS, headless=True)
        self.page = self.browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]})
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(f"pageerror: {e}"))
        self.page.goto(self.url, wait_until="load", timeout=self.timeout_ms)
        self.page.wait_for_function(WAIT_FOR_APP, timeout=self.timeout_ms)
        self._quiet_ui()
        return self

    def _quiet_ui(self):
        """Close first-run dialogs/toasts so screenshots show the canvas."""
        self.page.wait_for_timeout(1000)
        self.page.keyboard.press("Escape")
        self.page.evaluate("""() => {
          for (const b of document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button')) b.click();
        }""")

    def __exit__(self, *exc):
        try:
            self.browser.close()
        finally:
            self._pw.stop()

    def registered_types(self) -> set:
        return set(self.page.evaluate("() => Object.keys(LiteGraph.registered_node_types)"))

    def load(self, workflow: dict, layout: dict | None = None) -> dict:
        """Load a UI workflow with app.loadGraphData; returns {dialogs, nodes (type, registered, has_errors,
        widgets), serialized (the frontend's JSON text of the graph)}."""
        return self.page.evaluate(LOAD_JS, [workflow, layout])

    def screenshot(self, path: Path, width: int | None = None) -> None:
        """A PNG of the canvas alone (menus, side bar, minimap and toasts hidden; node DOM widgets such as
        multiline prompts and notes kept), the viewport shaped to the graph and the view fitted to it."""
        bounds = self.page.evaluate(BOUNDS_JS)
        width = width or int(min(2600, max(1600, 0.72 * (bounds[2] - bounds[0]) + 40)))
        aspect = (bounds[3] - bounds[1]) / max(1.0, bounds[2] - bounds[0])
        height = int(min(1400, max(600, width * aspect + 40)))
        self.page.set_viewport_size({"width": width, "height": height})
        self.page.wait_for_timeout(300)
        self.page.add_style_tag(content=SHOT_CSS)
        self.page.evaluate(FIT_JS)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        self.page.evaluate("() => document.querySelectorAll('style[data-photoswap-shot]').forEach(e => e.remove())")
        self.page.set_viewport_size({"width": self.viewport[0], "height": self.viewport[1]})


def _thumbnail_copies(png: Path) -> None:
    """workflows/<name>.png → also <name>.jpg (the frontend's template browser looks for .jpg)."""
    from PIL import Image

    with Image.open(png) as image:
        image.convert("RGB").save(png.with_suffix(".jpg"), quality=85, optimize=True)


class _RunningServer:
    """A ComfyUI that is already running (--url)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def object_info(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.url + "/object_info", timeout=120) as resp:
            return json.loads(resp.read())


def generate(out_dir: Path = WORKFLOW_DIR, frontend: bool = True, shots_dir: Path | None = None,
             url: str | None = None, only: list | None = None) -> list:
    from devtools.server import ComfyServer

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with (_RunningServer(url) if url else ComfyServer(checkpoints=("sd15",))) as server:
        object_info = server.object_info()
        workflows = [wf for wf in build_all(object_info) if not only or wf.name in only]
        if not frontend:
            for wf in workflows:
                path = out_dir / f"{wf.name}.json"
                path.write_text(json.dumps(wf.to_ui(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                written.append(path)
            return written
        with Frontend(server.url) as fe:
            for wf in workflows:
                result = fe.load(wf.to_ui(), wf.layout())
                bad = [n for n in result["nodes"] if not n["registered"] or n["has_errors"]]
                if bad or any("missing" in d.lower() for d in result["dialogs"]):
                    raise RuntimeError(f"{wf.name}: the frontend reports problems: {bad} {result['dialogs']}")
                saved = json.loads(result["serialized"])
                saved.setdefault("extra", {})["photoswap"] = {"title": wf.title}
                path = out_dir / f"{wf.name}.json"
                path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                shot = out_dir / f"{wf.name}.png"
                fe.screenshot(shot)
                _thumbnail_copies(shot)
                if shots_dir:
                    shutil.copy(shot, shots_dir / shot.name)
                written += [path, shot]
                print(f"[make_workflows] {path} ({len(saved['nodes'])} nodes) + thumbnail",
                      file=sys.stderr)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-frontend", action="store_true", help="write the object_info-based JSON only")
    parser.add_argument("--out", type=Path, default=WORKFLOW_DIR)
    parser.add_argument("--url", help="use a ComfyUI that is already running (with this pack) instead of starting one")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="build only these workflows (file names, no .json)")
    args = parser.parse_args(argv)
    generate(args.out, frontend=not args.no_frontend, url=args.url, only=args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
