"""The shipped workflows in the real ComfyUI frontend (the comfyui-frontend-package the provisioned server serves),
driven in headless Chromium (Debian's `chromium`, /usr/bin/chromium) by Playwright — offline, no browser download.

For every workflows/*.json: `app.loadGraphData(workflow)` raises no missing-nodes dialog, every node type is in
`LiteGraph.registered_node_types`, no node is flagged `has_errors` (drawn red), and the frontend's own
re-serialization keeps every widget value and link (so the files are what the frontend saves). A screenshot per
workflow goes to artifacts/frontend/ (git-ignored). A negative control proves the missing-node check fires.

Needs: `apt-get install chromium` and `pip install playwright` (the Python package only; `playwright install` is
NOT needed). Skipped with the reason when either is missing. Regenerate the committed workflows and thumbnails with
`.venv/bin/python devtools/make_workflows.py`.
"""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from fixtures_server import comfy_server  # noqa: F401  (module-scoped server fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "workflows"
ARTIFACTS = REPO_ROOT / "artifacts" / "frontend"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def _why_unavailable() -> str | None:
    from devtools.make_workflows import CHROMIUM

    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run frontend tests"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package 'playwright' is not installed (pip install playwright; no browser download needed)"
    return None


pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def frontend(comfy_server):  # noqa: F811
    reason = _why_unavailable()
    if reason:
        pytest.skip(reason)
    from devtools.make_workflows import Frontend

    with Frontend(comfy_server.url) as fe:
        yield fe


def _widget_values(workflow: dict) -> dict:
    return {n["id"]: n.get("widgets_values") for n in workflow["nodes"]}


def _links(workflow: dict) -> list:
    return sorted(tuple(link[:6]) for link in workflow["links"])


def test_workflows_listed_as_templates(comfy_server):  # noqa: F811
    """ComfyUI lists the pack's workflows/ folder under Templates and serves the files and their .jpg thumbnails."""
    listing = comfy_server.get("/api/workflow_templates")
    assert sorted(listing.get("comfyui-photoswap", [])) == NAMES
    for name in NAMES:
        base = f"{comfy_server.url}/api/workflow_templates/comfyui-photoswap/{name}"
        with urllib.request.urlopen(base + ".json", timeout=30) as resp:
            assert json.loads(resp.read())["nodes"]
        with urllib.request.urlopen(base + ".jpg", timeout=30) as resp:  # the template browser's thumbnail URL
            assert resp.read(3) == b"\xff\xd8\xff"


def test_missing_node_detection_fires(frontend):
    """Negative control: an unknown node type is reported (dialog, unregistered, has_errors)."""
    bogus = {"last_node_id": 1, "last_link_id": 0, "links": [], "groups": [], "config": {}, "extra": {},
             "version": 0.4, "nodes": [{"id": 1, "type": "PhotoswapNoSuchNode", "pos": [0, 0], "size": [200, 80],
                                        "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                                        "properties": {}, "widgets_values": [1]}]}
    result = frontend.load(bogus)
    node = result["nodes"][0]
    assert not node["registered"] and node["has_errors"]
    assert any("PhotoswapNoSuchNode" in d for d in result["dialogs"]), result["dialogs"]
    frontend.page.keyboard.press("Escape")
    # close it and wait until it is gone: on a slow machine a closing dialog was still in the DOM when the next
    # test loaded its workflow, and that test then read this test's "missing nodes" message
    frontend.page.wait_for_function("""() => {
      for (const b of document.querySelectorAll('.p-dialog-close-button')) b.click();
      return !Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))
        .some(d => d.innerText.includes('PhotoswapNoSuchNode')); }""", polling=250, timeout=30_000)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_without_missing_nodes(frontend, name):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    registered = frontend.registered_types()
    missing = sorted({n["type"] for n in workflow["nodes"]} - registered)
    assert not missing, f"{name}: node types not registered in the frontend: {missing}"

    result = frontend.load(workflow)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    frontend.screenshot(ARTIFACTS / f"{name}.png")
    dialogs = [d for d in result["dialogs"] if "missing" in d.lower() or "not found" in d.lower()]
    assert not dialogs, f"{name}: {dialogs}"
    red = [(n["id"], n["type"]) for n in result["nodes"] if n["has_errors"] or not n["registered"]]
    assert not red, f"{name}: nodes flagged with errors: {red}"
    assert len(result["nodes"]) == len(workflow["nodes"])

    saved = json.loads(result["serialized"])
    assert _widget_values(saved) == _widget_values(workflow), f"{name}: the frontend changed widget values"
    assert _links(saved) == _links(workflow), f"{name}: the frontend changed links"
    for node in result["nodes"]:  # every widget the frontend built got its value from the file
        original = next(n for n in workflow["nodes"] if n["id"] == node["id"])
        values = [v for _name, v in node["widgets"]]
        if node["type"] not in ("Note", "MarkdownNote"):
            assert values == original["widgets_values"], (name, node["type"], values, original["widgets_values"])
    assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
