#!/usr/bin/env python3
"""Run the demo workflow (devtools/demo.py) in a real headless ComfyUI with this pack, or serve the UI.

Called by scripts/demo.sh after setup; run that instead. Options:
    --serve           start ComfyUI with the pack and keep it running (prints the URL; Ctrl-C stops it)
    --port N          port for --serve (default 8188, or a free one if 8188 is taken)
    --steps N --size PX --seed N   demo workflow settings
Outputs go to <repo>/output/demo/ (ignored by git); the server log of a run is printed on failure.
"""
from __future__ import annotations

import argparse
import importlib
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


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def serve(demo, port: int | None) -> int:
    port = port or (8188 if _port_free(8188) else free_port())

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, _stop)  # also when started in the background (where SIGINT is ignored)
    signal.signal(signal.SIGTERM, _stop)
    server = ComfyServer(workdir=SERVE_WORKDIR, checkpoints=demo.CHECKPOINTS, port=port, output_dir=OUTPUT_DIR,
                         disable_api_nodes=False)
    try:
        server.start()
        demo.prepare_inputs(server.input_dir)
        print(f"ComfyUI {server.comfyui_path} with comfyui-photoswap is running at {server.url}  (pid {server.pid})")
        print(f"Checkpoints (RANDOM weights, for trying the nodes only): {server.models_dir / 'checkpoints'}")
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


def run(demo, args) -> int:
    with ComfyServer(checkpoints=demo.CHECKPOINTS, output_dir=OUTPUT_DIR) as server:
        print(f"[demo] ComfyUI {server.comfyui_path} started with the pack at {server.url} "
              f"in {server.startup_seconds:.0f} s", file=sys.stderr)
        line = server.pack_import_line()
        print(f"[demo] pack import: {line or 'NOT FOUND in the startup log'}", file=sys.stderr)
        demo.prepare_inputs(server.input_dir)
        graph = demo.build_graph(width=args.size, height=args.size, steps=args.steps, seed=args.seed)
        print(f"[demo] running the {demo.TITLE}, {args.size}x{args.size} px, {args.steps} steps", file=sys.stderr)
        try:
            result = server.run(graph)
        except ComfyServerError as exc:
            print(f"[demo] FAILED: {exc}", file=sys.stderr)
            return 1
    print(f"Demo finished in {result.seconds:.1f} s ({demo.TITLE}).")
    for image in result.images:
        print(f"Output image: {image}")
    print(demo.RANDOM_WEIGHTS_NOTE)
    return 0 if result.images else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the demo workflow in a real ComfyUI, or serve the UI.")
    parser.add_argument("--serve", action="store_true", help="start ComfyUI with the pack and leave it running")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-module", default="devtools.demo", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    demo = importlib.import_module(args.demo_module)
    try:
        return serve(demo, args.port) if args.serve else run(demo, args)
    except ComfyServerError as exc:
        print(f"[demo] {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
