#!/usr/bin/env python3
"""Run example workflow 1 (real-image Photoswap) end to end in a real headless ComfyUI with this pack, or serve the UI.

Called by scripts/demo.sh after setup; run that instead:

    bash scripts/demo.sh                      workflow 1 on the toy world (toyworld/: the trained toy model, its
                                              DreamBooth concept 'sks square', a held-out world photo), scored
    bash scripts/demo.sh --random-sd15        workflow 1 on the random SD1.5 checkpoint and scikit-image's
                                              'chelsea' cat photo (full-architecture plumbing; images are noise)
    bash scripts/demo.sh --checkpoint ~/models/sks_dog.safetensors --concept-words "sks dog" \\
         --photo ~/cat.jpg --source-prompt "A photo of a cat" --subject-word cat --size 512 --steps 50
                                              the same workflow on your DreamBooth checkpoint and photo
    bash scripts/demo.sh --serve              start ComfyUI with the pack (and its workflows under Templates) and
                                              leave it running; Ctrl-C stops it

Every option also reads an environment variable (PHOTOSWAP_DEMO_<OPTION>, e.g. PHOTOSWAP_DEMO_CHECKPOINT,
PHOTOSWAP_DEMO_PHOTO, PHOTOSWAP_DEMO_CONCEPT_WORDS, PHOTOSWAP_DEMO_STEPS). Outputs go to <repo>/output/demo/
(ignored by git); the server log is printed on failure.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # append, never prepend: the pack's nodes/ must not shadow ComfyUI's nodes.py

from devtools.server import ComfyServer, ComfyServerError, free_port  # noqa: E402

OUTPUT_DIR = REPO_ROOT / "output" / "demo"
SERVE_WORKDIR = REPO_ROOT / ".cache" / "demo-server"

# CPU-sized defaults: the whole run takes a few minutes on a laptop-class CPU (see README "Development")
DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_INNER = 128, 8, 2
TOYWORLD_STEPS, TOYWORLD_INNER = 50, 10  # the workflow's (and the paper's) own settings: the toy model is small


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _env(name: str, default=None):
    return os.environ.get(f"PHOTOSWAP_DEMO_{name}", default)


def serve(demo, args) -> int:
    port = args.port or (8188 if _port_free(8188) else free_port())

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, _stop)  # also when started in the background (where SIGINT is ignored)
    signal.signal(signal.SIGTERM, _stop)
    server = ComfyServer(workdir=SERVE_WORKDIR, checkpoints=demo.CHECKPOINTS, port=port, output_dir=OUTPUT_DIR,
                         disable_api_nodes=False)
    try:
        server.start()
        if args.checkpoint:
            server.add_model("checkpoints", Path(args.checkpoint).expanduser())
        demo.prepare_inputs(server.input_dir, args.photo)
        print(f"ComfyUI {server.comfyui_path} with comfyui-photoswap is running at {server.url}  (pid {server.pid})")
        print("Workflows: in the UI open Templates (or Workflow → Browse Templates) → comfyui-photoswap, or drag a "
              f"file from {REPO_ROOT / 'workflows'} onto the canvas.")
        print(f"Photo: {server.input_dir / demo.DEFAULT_PHOTO} (the workflows' Load Image default)")
        print(f"Checkpoints: {server.models_dir / 'checkpoints'} — {demo.RANDOM_CHECKPOINT} has RANDOM weights (pick "
              "it in the concept loader to try the nodes; the images will be noise)")
        print(f"Outputs: {OUTPUT_DIR}   Server log: {server.log_path}")
        print("Press Ctrl-C to stop it.", flush=True)
        while server.alive():
            time.sleep(1)
        print(f"ComfyUI exited with code {server.proc.returncode}; see {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ComfyUI", file=sys.stderr)
        return 0
    finally:
        server.stop()


class Progress:
    """Prints the server's websocket progress: which node runs, and its step count as ComfyUI reports it."""

    def __init__(self, graph: dict, stream=sys.stderr):
        self.graph, self.stream, self.last = graph, stream, None

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "executing" and data.get("node") is not None:
            node = self.graph.get(str(data["node"]), {})
            title = node.get("_meta", {}).get("title") or node.get("class_type", data["node"])
            print(f"[demo] running {title}", file=self.stream, flush=True)
        elif kind == "progress":
            value, maximum = int(data.get("value", 0)), int(data.get("max", 0) or 1)
            tenth = value * 10 // maximum
            if value == maximum or (data.get("node"), tenth) != self.last:
                print(f"[demo]   {value}/{maximum}", file=self.stream, flush=True)
            self.last = (data.get("node"), tenth)


def _announce(server) -> None:
    print(f"[demo] ComfyUI {server.comfyui_path} started with the pack at {server.url} "
          f"in {server.startup_seconds:.0f} s", file=sys.stderr)
    print(f"[demo] pack import: {server.pack_import_line() or 'NOT FOUND in the startup log'}", file=sys.stderr)


def _run_graph(demo, server, graph: dict, timeout: float, title: str) -> dict | None:
    """Run the graph with progress printed; {role: [paths]} of its saved images, or None (failure printed)."""
    try:
        result = server.run(graph, timeout=timeout, on_message=Progress(graph))
    except ComfyServerError as exc:
        print(f"[demo] FAILED: {exc}", file=sys.stderr)
        return None
    print(f"Photoswap demo finished in {result.seconds:.1f} s ({title}).")
    return demo.outputs_by_role(graph, result.outputs, OUTPUT_DIR)


def run_toyworld(demo, args) -> int:
    """Workflow 1 on the toy world: the concept from its diffusers folder, a world photo, the result scored."""
    with ComfyServer(checkpoints=(), output_dir=OUTPUT_DIR) as server:
        _announce(server)
        sc = demo.toyworld_prepare(server)
        graph = demo.toyworld_graph(server.object_info(), sc, steps=args.steps, inner_iterations=args.inner_iterations)
        print(f"[demo] running {demo.TOYWORLD_TITLE}: photo {sc.caption!r}, {args.steps} steps, null-text inversion "
              f"with at most {args.inner_iterations} iterations per step", file=sys.stderr, flush=True)
        found = _run_graph(demo, server, graph, args.timeout, demo.TOYWORLD_TITLE)
    if found is None:
        return 1
    for role, paths in found.items():
        for path in paths:
            print(f"  {role}: {path}")
    swapped, recon = found.get("swapped image"), found.get("source reconstruction")
    if not swapped or not recon:
        print("  swapped image or source reconstruction: MISSING")
        return 1
    scores = demo.toyworld_report(sc, swapped[0], recon[0])
    figure = demo.toyworld_figure(sc, [recon[0], swapped[0]], OUTPUT_DIR / "toyworld_demo.png")
    print(f"  photo | reconstruction | swapped: {figure}")
    print(f"Scores against the photo's ground truth (toyworld/metrics.py): concept found {scores['identity']}, "
          f"in place {scores['identity_in_place']} (centre off by {scores['place_error_px']:.1f} px, size off by "
          f"{scores['size_error']:.0%}), background PSNR outside the subjects {scores['background_psnr_db']:.1f} dB, "
          f"changed pixels there {scores['leakage']:.1%}, reconstruction PSNR {scores['reconstruction_psnr_db']:.1f} "
          "dB. Toy world: 64 px shapes, a model trained here on a CPU (README Limitations).")
    return 0


def run(demo, args) -> int:
    toyworld = not (args.checkpoint or args.random_sd15)
    if toyworld and not demo.toyworld_ready():
        print("[demo] the toy world's trained weights are not in this checkout yet (toyworld/weights/, see "
              "docs/quality.md): running on the random SD1.5 checkpoint instead", file=sys.stderr)
        toyworld = False
    args.steps = args.steps or (TOYWORLD_STEPS if toyworld else DEFAULT_STEPS)
    args.inner_iterations = args.inner_iterations or (TOYWORLD_INNER if toyworld else DEFAULT_INNER)
    if toyworld:
        return run_toyworld(demo, args)
    random_weights = not args.checkpoint
    width = args.width or args.size
    height = args.height or args.size
    with ComfyServer(checkpoints=demo.CHECKPOINTS if random_weights else (),
                     output_dir=OUTPUT_DIR) as server:
        _announce(server)
        checkpoint = demo.RANDOM_CHECKPOINT
        if args.checkpoint:
            path = Path(args.checkpoint).expanduser()
            if not path.is_file():
                print(f"[demo] --checkpoint {path}: no such file", file=sys.stderr)
                return 2
            checkpoint = server.add_model("checkpoints", path).name
        if args.photo and not Path(args.photo).expanduser().is_file():
            print(f"[demo] --photo {args.photo}: no such file", file=sys.stderr)
            return 2
        photo = demo.prepare_inputs(server.input_dir, Path(args.photo).expanduser() if args.photo else None)
        graph = demo.workflow_graph(server.object_info(), checkpoint=checkpoint, photo=photo, width=width,
                                    height=height, steps=args.steps, inner_iterations=args.inner_iterations,
                                    concept_words=args.concept_words, class_word=args.class_word,
                                    source_prompt=args.source_prompt, subject_word=args.subject_word)
        print(f"[demo] running {demo.TITLE} ({demo.WORKFLOW.relative_to(REPO_ROOT)}): {width}x{height} px, "
              f"{args.steps} steps, null-text inversion with at most {args.inner_iterations} iterations per step, "
              f"checkpoint {checkpoint}{' (RANDOM WEIGHTS)' if random_weights else ''}, photo "
              f"{args.photo or 'scikit-image chelsea (cat)'}", file=sys.stderr, flush=True)
        found = _run_graph(demo, server, graph, args.timeout, demo.TITLE)
    if found is None:
        return 1
    ok = True
    for role, paths in found.items():
        if not paths:
            ok = False
            print(f"  {role}: MISSING")
        for path in paths:
            print(f"  {role}: {path}")
    if random_weights:
        print(demo.RANDOM_WEIGHTS_NOTE)
    else:
        print(f"Checkpoint: {args.checkpoint} (your weights).")
    return 0 if ok and found else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run Photoswap example workflow 1 in a real ComfyUI, or serve "
                                                 "the UI. Options also come from PHOTOSWAP_DEMO_<OPTION> variables.")
    parser.add_argument("--serve", action="store_true", help="start ComfyUI with the pack and leave it running")
    parser.add_argument("--port", type=int, default=None, help="port for --serve (default 8188, else a free one)")
    parser.add_argument("--checkpoint", default=_env("CHECKPOINT"),
                        help="a real DreamBooth checkpoint file (SD1.x/SD2.x/SDXL .safetensors); default: the toy "
                             "world's trained model and concept")
    parser.add_argument("--random-sd15", action="store_true", default=bool(_env("RANDOM_SD15")),
                        help="the random full-architecture SD1.5 checkpoint and the chelsea photo instead of the toy "
                             "world (plumbing only: the images are noise)")
    parser.add_argument("--concept-words", default=_env("CONCEPT_WORDS"),
                        help="the checkpoint's concept words (identifier + class), default 'sks dog'")
    parser.add_argument("--class-word", default=_env("CLASS_WORD"), help="class word inside the concept words")
    parser.add_argument("--photo", default=_env("PHOTO"), help="your photo; default scikit-image's chelsea (a cat)")
    parser.add_argument("--source-prompt", default=_env("SOURCE_PROMPT"),
                        help="describes the photo; default 'A photo of a cat'")
    parser.add_argument("--subject-word", default=_env("SUBJECT_WORD"), help="the subject to replace; default 'cat'")
    parser.add_argument("--size", type=int, default=int(_env("SIZE", DEFAULT_SIZE)),
                        help=f"square size in px (default {DEFAULT_SIZE}; the workflow itself uses 512)")
    parser.add_argument("--width", type=int, default=_env("WIDTH") and int(_env("WIDTH")))
    parser.add_argument("--height", type=int, default=_env("HEIGHT") and int(_env("HEIGHT")))
    parser.add_argument("--steps", type=int, default=_env("STEPS") and int(_env("STEPS")),
                        help=f"DDIM steps (default: {TOYWORLD_STEPS} on the toy world, {DEFAULT_STEPS} otherwise; "
                             "the workflow/paper use 50)")
    parser.add_argument("--inner-iterations", type=int,
                        default=_env("INNER_ITERATIONS") and int(_env("INNER_ITERATIONS")),
                        help=f"null-text optimisation iterations per step at most (default: {TOYWORLD_INNER} on the "
                             f"toy world, {DEFAULT_INNER} otherwise; the workflow/paper use 10)")
    parser.add_argument("--timeout", type=float, default=float(_env("TIMEOUT", 3600)))
    parser.add_argument("--demo-module", default="devtools.demo", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    demo = importlib.import_module(args.demo_module)
    try:
        return serve(demo, args) if args.serve else run(demo, args)
    except ComfyServerError as exc:
        print(f"[demo] {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
