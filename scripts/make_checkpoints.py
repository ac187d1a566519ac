#!/usr/bin/env python3
"""Create the full-architecture random-weight checkpoints in the cache (once; later runs only check them).

    .venv/bin/python scripts/make_checkpoints.py            # random-sd15.safetensors (about 2.1 GB)
    .venv/bin/python scripts/make_checkpoints.py --sd21-v   # + random-sd21-768-v.safetensors (about 2.6 GB)
    .venv/bin/python scripts/make_checkpoints.py --sdxl     # + random-sdxl.safetensors (about 6.9 GB)
    .venv/bin/python scripts/make_checkpoints.py --all --verify

Cache folder: $PHOTOSWAP_CACHE/checkpoints, else <repo>/.cache/checkpoints. The weights are random (deterministic
seed): images made with them are noise. Prints one checkpoint path per line on stdout; exit code 2 on a setup problem
(e.g. not enough disk space), with the reason on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # append, never prepend: the pack's nodes/ must not shadow ComfyUI's nodes.py

from devtools.checkpoints import DEFAULT_SEED, CheckpointCacheError, ensure_checkpoint, verify  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd21-v", action="store_true", help="also build the SD2.1-768 v-prediction checkpoint")
    parser.add_argument("--sdxl", action="store_true", help="also build the SDXL checkpoint (about 6.9 GB)")
    parser.add_argument("--all", action="store_true", help="build all three")
    parser.add_argument("--no-sd15", action="store_true", help="skip the default SD1.5 checkpoint")
    parser.add_argument("--folder", type=Path, default=None, help="cache folder (default: $PHOTOSWAP_CACHE/checkpoints "
                                                                   "or .cache/checkpoints)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete file is cached")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--verify", action="store_true",
                        help="load each file with ComfyUI's checkpoint loader and check the detected family")
    args = parser.parse_args(argv)

    names = [] if args.no_sd15 else ["sd15"]
    if args.sd21_v or args.all:
        names.append("sd21-v")
    if args.sdxl or args.all:
        names.append("sdxl")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        paths = [ensure_checkpoint(name, folder=args.folder, force=args.force, seed=args.seed, log=log)
                 for name in names]
        if args.verify:
            for name, path in zip(names, paths):
                log(f"[checkpoints] {verify(name, path)}")
    except CheckpointCacheError as exc:
        print(f"make_checkpoints: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
