"""Convert a UI-format ComfyUI workflow (what the frontend saves, and what users share: nodes + links +
widgets_values) into the API format that `POST /prompt` takes ({id: {class_type, inputs}}), using the server's
`/object_info` to name the widget values.

    from devtools.workflow_api import convert
    api_graph = convert(json.load(open("workflows/1_real_image_swap_dreambooth.json")), server.object_info())

How the frontend (1.32.x) lays out a node's `widgets_values`, and so what this module assumes:
- one value per widget input, in the node definition's input order (`input_order`: required, then optional);
  widget inputs are INT, FLOAT, STRING, BOOLEAN and combos (a list of choices, or "COMBO"), unless `forceInput`;
- right after a widget whose spec has `control_after_generate`, one more value: the control mode ("fixed",
  "increment", "decrement", "randomize"). Files written before the frontend saved it (no extra values at all) are
  accepted too;
- right after a widget whose spec has an `*_upload` flag (LoadImage's `image_upload`), the upload button's value
  ("image"), which is not an input;
- a widget input that is connected (a "converted widget": its `inputs` entry has `widget` and a `link`) still has
  its slot in `widgets_values`, but the link wins;
- `widgets_values` may also be a dict keyed by widget name (some nodes save it that way).

Frontend-only nodes are resolved away: `Note` / `MarkdownNote` (dropped), `Reroute` (links followed through),
`PrimitiveNode` (its value is written into every widget input it feeds). Muted nodes (mode 2) are dropped; bypassed
nodes (mode 4) are replaced by their pass-through (each output takes the first input of the same type), as the
frontend does when it queues a prompt. Group nodes / subgraphs are not supported (refused with a clear error).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}
REROUTE_TYPES = {"Reroute"}
PRIMITIVE_TYPES = {"PrimitiveNode"}
FRONTEND_ONLY = NOTE_TYPES | REROUTE_TYPES | PRIMITIVE_TYPES
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


class WorkflowConversionError(ValueError):
    """The workflow cannot be converted: unknown node type, widget values that do not fit, a broken link…"""


@dataclass(frozen=True)
class WidgetSlot:
    name: str  # the input name
    extra: int  # values following this widget's own value in widgets_values (control mode, upload button)
    control: bool  # one of the extras is a control_after_generate value


def _spec_type_and_options(spec) -> tuple:
    if not isinstance(spec, (list, tuple)) or not spec:
        return None, {}
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0], options


def is_widget_spec(spec) -> bool:
    """Does the frontend create a widget for this input spec (from /object_info)?"""
    kind, options = _spec_type_and_options(spec)
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def input_specs(node_info: dict) -> list:
    """[(name, spec, required)] in the frontend's order (object_info `input_order` when present)."""
    inputs = node_info.get("input", {})
    order = node_info.get("input_order") or {}
    out = []
    for section, required in (("required", True), ("optional", False)):
        specs = inputs.get(section) or {}
        names = list(order.get(section) or []) or list(specs)
        names += [n for n in specs if n not in names]
        out += [(name, specs[name], required) for name in names if name in specs]
    return out


def widget_slots(node_info: dict) -> list:
    """The node's widgets in `widgets_values` order, with how many extra values follow each one."""
    slots = []
    for name, spec, _required in input_specs(node_info):
        if not is_widget_spec(spec):
            continue
        _kind, options = _spec_type_and_options(spec)
        control = bool(options.get("control_after_generate"))
        uploads = sum(1 for key, value in options.items() if key.endswith("_upload") and value)
        slots.append(WidgetSlot(name, int(control) + uploads, control))
    return slots


def map_widget_values(node: dict, node_info: dict) -> dict:
    """{input name: value} for a UI node's widgets_values."""
    values = node.get("widgets_values")
    slots = widget_slots(node_info)
    if values is None:
        return {}
    if isinstance(values, dict):
        return {slot.name: values[slot.name] for slot in slots if slot.name in values}
    values = list(values)
    full = len(slots) + sum(slot.extra for slot in slots)
    no_control = full - sum(1 for slot in slots if slot.control)
    if len(values) == full:
        skip_control = False
    elif len(values) == no_control and no_control != full:
        skip_control = True
    else:
        layout = ", ".join(slot.name + (f" (+{slot.extra})" if slot.extra else "") for slot in slots)
        raise WorkflowConversionError(
            f"node {node.get('id')} ({node.get('type')}): {len(values)} widget values {values!r} do not fit the "
            f"node's widgets [{layout}] ({full} values expected). The workflow was saved with another version of "
            "this node; re-open it in the UI, check the widgets and save it again.")
    mapped, i = {}, 0
    for slot in slots:
        mapped[slot.name] = values[i]
        i += 1 + (slot.extra - (1 if (slot.control and skip_control) else 0))
    return mapped


def _check_supported(workflow: dict) -> None:
    if not isinstance(workflow, dict) or "nodes" not in workflow:
        if isinstance(workflow, dict) and workflow and all(isinstance(v, dict) and "class_type" in v
                                                           for v in workflow.values()):
            raise WorkflowConversionError("this is already an API-format graph (POST it to /prompt as it is)")
        raise WorkflowConversionError("not a UI-format workflow: no 'nodes' list")
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    if subgraphs:
        raise WorkflowConversionError("workflows with subgraphs are not supported by this converter")


def _links_by_id(workflow: dict) -> dict:
    """link id -> (origin node id, origin slot, target node id, target slot, type). Accepts both the list form
    (version 0.4) and the object form (`{id, origin_id, …}`)."""
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        else:
            link_id, origin, origin_slot, target, target_slot, kind = link[:6]
            links[link_id] = (origin, origin_slot, target, target_slot, kind)
    return links


def convert(workflow: dict, object_info: dict) -> dict:
    """UI-format workflow → API-format graph. Raises WorkflowConversionError with the node id when it cannot."""
    _check_supported(workflow)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = _links_by_id(workflow)

    def upstream(link_id, seen=()):
        """(node id, output slot) a link comes from, through reroutes and bypassed nodes; or ("value", v) for a
        primitive; None when the chain ends unconnected."""
        if link_id is None:
            return None
        if link_id not in links:
            raise WorkflowConversionError(f"link {link_id} is used by a node but missing from the links list")
        origin, origin_slot, _target, _slot, kind = links[link_id]
        node = nodes.get(origin)
        if node is None:
            raise WorkflowConversionError(f"link {link_id} comes from node {origin}, which is not in the workflow")
        if origin in seen:
            raise WorkflowConversionError(f"link {link_id}: a cycle through node {origin}")
        seen = seen + (origin,)
        if node["type"] in REROUTE_TYPES:
            inputs = node.get("inputs") or []
            return upstream(inputs[0].get("link") if inputs else None, seen)
        if node["type"] in PRIMITIVE_TYPES:
            values = node.get("widgets_values") or []
            if not values:
                raise WorkflowConversionError(f"primitive node {origin} has no value")
            return ("value", values[0])
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            out_type = kind or ((node.get("outputs") or [{}])[origin_slot].get("type"))
            for entry in node.get("inputs") or []:
                if entry.get("link") is not None and entry.get("type") == out_type:
                    return upstream(entry["link"], seen)
            return None
        if node.get("mode", MODE_ALWAYS) == MODE_NEVER:
            return None
        return (str(origin), origin_slot)

    graph = {}
    for node_id, node in nodes.items():
        kind = node.get("type")
        if kind in FRONTEND_ONLY or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowConversionError(
                f"node {node_id}: unknown node type {kind!r} (not in the server's /object_info: a custom node pack "
                "that is not installed, or a node removed from this ComfyUI version)")
        specs = {name: (spec, required) for name, spec, required in input_specs(info)}
        inputs = map_widget_values(node, info)
        for entry in node.get("inputs") or []:
            name = entry.get("name")
            if name not in specs:
                if entry.get("link") is not None:
                    raise WorkflowConversionError(f"node {node_id} ({kind}): input {name!r} is connected but the "
                                                  "node has no such input")
                continue
            source = upstream(entry.get("link"))
            if source is None:
                continue  # an unconnected socket; a widget keeps its value
            if source[0] == "value":
                inputs[name] = source[1]
            else:
                inputs[name] = [source[0], source[1]]
        missing = [name for name, (spec, required) in specs.items() if required and name not in inputs]
        if missing:
            raise WorkflowConversionError(f"node {node_id} ({kind}): required input(s) {', '.join(missing)} not "
                                          "connected")
        entry = {"class_type": kind, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        graph[str(node_id)] = entry

    # drop links into nodes that were removed (muted) so /prompt does not see dangling references
    for entry in graph.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in graph:
                del entry["inputs"][name]
    return graph


# ------------------------------------------------------------------------------------------------ editing helpers
def nodes_of_type(graph: dict, class_type: str) -> list:
    """[(id, node)] of an API graph's nodes of one type, sorted by id."""
    return sorted(((nid, n) for nid, n in graph.items() if n["class_type"] == class_type), key=lambda x: int(x[0]))


def set_inputs(graph: dict, class_type: str, **values) -> int:
    """Set widget inputs on every node of a type that has them (not connected ones). Returns how many nodes changed."""
    changed = 0
    for _nid, node in nodes_of_type(graph, class_type):
        hit = False
        for name, value in values.items():
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = value
                hit = True
        changed += hit
    return changed


def substitute(graph: dict, *, checkpoint: str | None = None, lora: str | None = None, image: str | None = None,
               size: tuple | None = None, steps: int | None = None, inner_iterations: int | None = None,
               controlnet: str | None = None, inversion_file: str | None = None, concept_words: str | None = None,
               class_word: str | None = None, source_prompt: str | None = None, subject_word: str | None = None,
               prefix: str | None = None, video: str | None = None, unet: str | None = None,
               text_encoders: tuple | None = None, vae: str | None = None, style_model: str | None = None,
               clip_vision: str | None = None, reference_image: str | None = None) -> dict:
    """A copy of an API graph of the example workflows with the user's (or the tests') files and a smaller run.

    checkpoint: every CheckpointLoaderSimple, and the Photoswap concept loader when its source is 'checkpoint';
    lora: the concept loader when its source is 'lora' (and core LoraLoader); image: LoadImage; size (width,
    height): ImageScale and EmptyLatentImage; steps: inversion, recorder (and KSampler); controlnet:
    ControlNetLoader; inversion_file: Photoswap Load Inversion; concept words / prompts: the concept loader and the
    prompt pair; video: LoadVideo; prefix: replaces the leading 'photoswap' folder of every SaveImage / Save Inversion prefix.
    Flux (workflows 11-12): unet: UNETLoader; text_encoders (t5, clip_l): DualCLIPLoader; vae: VAELoader; style_model:
    StyleModelLoader; clip_vision: CLIPVisionLoader; reference_image: a LoadImage that feeds CLIP Vision Encode
    (else `image` goes to every LoadImage)."""
    graph = copy.deepcopy(graph)
    one_file = {"LoraLoader": ("lora_name", lora), "UNETLoader": ("unet_name", unet), "VAELoader": ("vae_name", vae),
                "StyleModelLoader": ("style_model_name", style_model), "CLIPVisionLoader": ("clip_name", clip_vision),
                "LoadVideo": ("file", video), "ControlNetLoader": ("control_net_name", controlnet),
                "PhotoswapLoadInversion": ("inversion_file", inversion_file)}  # node type: (input, value)
    for _nid, node in graph.items():
        kind, inputs = node["class_type"], node["inputs"]

        def put(name, value):
            if value is not None and name in inputs and not isinstance(inputs[name], list):
                inputs[name] = value

        if kind in one_file:
            put(*one_file[kind])
        elif kind == "CheckpointLoaderSimple":
            put("ckpt_name", checkpoint)
        elif kind == "PhotoswapConceptLoader":
            if inputs.get("source") == "checkpoint":
                put("ckpt_name", checkpoint)
            if inputs.get("source") == "lora":
                put("lora_name", lora)
            put("concept_words", concept_words)
            put("class_word", class_word)
        elif kind == "LoadImage":
            feeds_vision = any(n["class_type"] == "CLIPVisionEncode" and isinstance(n["inputs"].get("image"), list)
                               and str(n["inputs"]["image"][0]) == str(_nid) for n in graph.values())
            put("image", reference_image if feeds_vision and reference_image is not None else image)
        elif kind == "DualCLIPLoader" and text_encoders is not None:
            put("clip_name1", text_encoders[0])
            put("clip_name2", text_encoders[1])
        elif kind in ("ImageScale", "EmptyLatentImage") and size is not None:
            put("width", int(size[0]))
            put("height", int(size[1]))
        elif kind in ("PhotoswapNullTextInversion", "PhotoswapAttentionRecorder", "KSampler"):
            put("steps", steps)
            if kind == "PhotoswapNullTextInversion":
                put("inner_iterations", inner_iterations)
        elif kind == "PhotoswapPromptPair":
            put("concept_words", concept_words)
            put("source_prompt", source_prompt)
            put("subject_word", subject_word)
        elif kind in ("SaveImage", "SaveVideo", "PhotoswapSaveInversion") and prefix is not None:
            old = inputs.get("filename_prefix", "")
            if isinstance(old, str):
                head, _, tail = old.partition("/")
                inputs["filename_prefix"] = f"{prefix}/{tail}" if head == "photoswap" and tail else f"{prefix}/{old}"
    return graph


def load(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def copy_graph(graph: dict) -> dict:
    return copy.deepcopy(graph)


def main(argv=None) -> int:
    """python -m devtools.workflow_api WORKFLOW.json [--object-info FILE | --url http://127.0.0.1:8188]"""
    import argparse
    import sys
    import urllib.request

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("workflow")
    parser.add_argument("--object-info", help="a saved /object_info JSON")
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="a running ComfyUI (default %(default)s)")
    args = parser.parse_args(argv)
    if args.object_info:
        object_info = load(args.object_info)
    else:
        with urllib.request.urlopen(args.url.rstrip("/") + "/object_info", timeout=120) as resp:
            object_info = json.loads(resp.read())
    try:
        graph = convert(load(args.workflow), object_info)
    except WorkflowConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    json.dump(graph, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
