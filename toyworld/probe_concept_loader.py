"""Does the pack's Concept Loader (`source = "diffusers folder"`) load a small-width SD1 diffusers folder?

Prints LOADED or FAILED with the loader's message. Default folder: the shared tiny parity model; pass another path
(e.g. toyworld/weights/toyworld_base) as the first argument. Evidence for toyworld/CORE_FINDING.md.
"""
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch

    torch.set_num_threads(1)
    from devtools.comfy_env import bootstrap

    bootstrap()
    import folder_paths
    from comfy_api.internal import make_locked_method_func
    from comfyui_photoswap.nodes.concept_nodes import PhotoswapConceptLoader as Node

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/parity/tiny_sd").resolve()
    root = tempfile.mkdtemp()
    os.symlink(folder, os.path.join(root, folder.name))
    folder_paths.add_model_folder_path("diffusers", root)
    run = make_locked_method_func(Node, "EXECUTE_NORMALIZED", Node.PREPARE_CLASS_CLONE({}))
    try:
        run(source="diffusers folder", diffusers_folder=folder.name, concept_words="sks square", class_word="square")
    except Exception as exc:  # the finding is the message itself
        print("FAILED:", type(exc).__name__, exc)
        return 1
    print("LOADED", folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
