"""What users see of the pack besides the algorithm: every node has a description and a `photoswap/...` category,
every input and output a tooltip, display names say "Photoswap", and pyproject.toml is complete for the Comfy Registry
(parsed with ComfyUI's own `comfy_config.config_parser` when the ComfyUI in use has it)."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.unit

EXPECTED_NODES = {"PhotoswapConceptLoader", "PhotoswapPromptPair", "PhotoswapNullTextInversion",
                  "PhotoswapSaveInversion", "PhotoswapLoadInversion", "PhotoswapAttentionRecorder",
                  "PhotoswapAttentionSwapSampler", "PhotoswapAttentionPreview"}


@pytest.fixture(scope="module")
def schemas(pack):
    classes = importlib.import_module(f"{pack.__name__}.nodes").NODE_CLASSES
    return {s.node_id: s for s in (cls.define_schema() for cls in classes)}


def test_all_nodes_registered(schemas):
    assert EXPECTED_NODES <= set(schemas), sorted(EXPECTED_NODES - set(schemas))


def test_descriptions_categories_display_names(schemas):
    for node_id, schema in schemas.items():
        assert schema.description and len(schema.description) >= 60, node_id
        assert schema.category and re.fullmatch(r"photoswap/[a-z_]+", schema.category), (node_id, schema.category)
        assert schema.display_name and schema.display_name.startswith("Photoswap "), (node_id, schema.display_name)
        assert node_id.startswith("Photoswap")


def test_every_input_and_output_has_a_tooltip(schemas):
    missing = []
    for node_id, schema in schemas.items():
        for item in list(schema.inputs or []) + list(schema.outputs or []):
            tooltip = getattr(item, "tooltip", None)
            if not tooltip or len(tooltip.strip()) < 10:
                missing.append(f"{node_id}.{item.id}")
    assert not missing, f"inputs/outputs without a useful tooltip: {missing}"


def test_categories_group_by_stage(schemas):
    """One sub-category per stage, so the node menu reads as the four stages plus previews."""
    cats = {schema.category for schema in schemas.values()}
    assert cats <= {"photoswap/concept", "photoswap/prompts", "photoswap/inversion", "photoswap/swap",
                    "photoswap/preview"}, cats


def test_pyproject_registry_fields(comfy):
    import tomllib

    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project, comfy_tool = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,98}", project["name"]) and "--" not in project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    pack_init = (REPO_ROOT / "__init__.py").read_text()
    assert f'__version__ = "{project["version"]}"' in pack_init, "pyproject version and __version__ differ"
    assert len(project["description"]) > 40
    assert project["license"] == {"file": "LICENSE"} and (REPO_ROOT / "LICENSE").exists()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy_tool["PublisherId"] and comfy_tool["DisplayName"]
    assert comfy_tool["requires-comfyui"].startswith(">=")
    requirements = [line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(filter(None, requirements)) == sorted(project["dependencies"]), \
        "pyproject dependencies and requirements.txt differ"

    try:
        from comfy_config import config_parser
    except ImportError:
        pytest.skip("this ComfyUI has no comfy_config.config_parser")
    config = config_parser.extract_node_configuration(str(REPO_ROOT))
    assert config.project.name == project["name"]
    assert config.project.version == project["version"]
    assert config.project.license.file == "LICENSE"
    assert config.project.urls.repository == project["urls"]["Repository"]
    assert config.project.supported_comfyui_version == comfy_tool["requires-comfyui"]
    assert config.project.supported_os, "classifiers should name the supported operating systems"
    assert config.tool_comfy.publisher_id == comfy_tool["PublisherId"]
    assert config.tool_comfy.display_name == comfy_tool["DisplayName"]


def test_readme_node_reference_covers_every_input(schemas):
    """The README's node reference names every input of every node (so it cannot silently fall behind)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<details><summary>(.*?)</summary>(.*?)</details>", readme, flags=re.S)
    assert blocks, "README has no node reference blocks"
    for node_id, schema in schemas.items():
        block = [body for summary, body in blocks if schema.display_name in summary]
        assert block, f"README node reference has no block for {schema.display_name}"
        missing = [i.id for i in schema.inputs if f"`{i.id}`" not in block[0]]
        assert not missing, f"README node reference for {schema.display_name} misses inputs {missing}"
