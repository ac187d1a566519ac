#!/usr/bin/env python
"""Clips (#15): temporal consistency of a swapped clip and its cost per frame, frame_attention off vs on.

    .venv/bin/python bench/bench_clips.py --family tiny --size 64 --frames 4 --steps 10
    .venv/bin/python bench/bench_clips.py --family sd15 --size 512 --frames 8 --device cuda
    .venv/bin/python bench/bench_clips.py --family toyworld --frames 4 --steps 20   # the trained toy world
    .venv/bin/python bench/bench_clips.py --family toyworld --subject recolour      # ... its base model recolouring
    .venv/bin/python bench/bench_clips.py --family toyworld --photos same_class     # ... a square, the concept's class

The clip has known motion: a synthetic image (gradients + a bright disc, bench_inversion.load_models), its disc moved
`--shift` px to the right per frame (the background stays), VAE-encoded frame by frame as one latent batch. Per
frame_attention mode the direct-inversion pipeline (run_inversion → record_clip → swap) runs on the clip, and:
- `subject_flicker`: mean |T_{f+1} − T_f moved by the known shift| inside the disc (swapped latents, motion
  compensated) relative to the mean |T| there — lower = the new subject looks the same from frame to frame;
- `background_flicker`: mean |T_{f+1} − T_f| outside the disc of both frames, relative — lower = a stable background;
- `motion_error_px`: the blend mask's centroid shift per frame minus the known shift, mean absolute (px) — near 0 =
  the swapped subject follows the source motion (NaN when the mask is empty or full: random weights);
- `seconds_per_frame` and `ratio_to_single` (the clip's time / frames ÷ one frame's swap alone; target ≤ 1.1 with
  batching on a GPU), `peak_mb_per_frame` (CUDA: max allocated over the clip / frames; CPU: not measured).
On random-weight models (tiny, the random SD1.5) the consistency numbers show the mechanism, not quality.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
for _path in (REPO_ROOT, BENCH_DIR):  # append: the pack's nodes/ must not shadow ComfyUI's nodes.py
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

import bench_inversion as bi  # noqa: E402

MODES = ("off", "first", "keyframes")


def make_clip(vae, size: int, frames: int, shift: int):
    """(LATENT samples [F, 4, h, w], disc masks [F, size, size] in pixels): the disc moves `shift` px per frame."""
    import torch

    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images, discs = [], []
    for f in range(frames):
        cx = 0.3 + f * shift / size
        disc = (((xs - cx) ** 2 + (ys - 0.55) ** 2) < 0.03).float()
        images.append(torch.stack([xs, ys, 0.5 * (1 - disc) + disc * 0.9], dim=-1))
        discs.append(disc)
    return vae.encode(torch.stack(images)), torch.stack(discs)


def consistency(target, discs, shift_cells: int, mask) -> dict:
    """The temporal metrics of swapped latents [F, 4, h, w] (module docstring)."""
    import torch
    import torch.nn.functional as F

    inside = F.adaptive_max_pool2d(discs[:, None], target.shape[-2:])[:, 0] > 0.5  # [F, h, w]
    subj, back, motion = [], [], []
    for f in range(target.shape[0] - 1):
        moved = torch.roll(target[f], shift_cells, dims=-1)
        region = inside[f + 1]
        if region.any():
            subj.append(float((target[f + 1] - moved).abs()[:, region].mean() / target[f + 1].abs()[:, region].mean()))
        outside = ~(inside[f] | inside[f + 1])
        back.append(float((target[f + 1] - target[f]).abs()[:, outside].mean() / target[f].abs()[:, outside].mean()))
        m0, m1 = mask[f, 0].float(), mask[f + 1, 0].float()
        if 0 < m0.mean() < 1 and 0 < m1.mean() < 1:
            xs = torch.arange(m0.shape[-1], dtype=torch.float32)
            c0, c1 = float((m0.sum(0) * xs).sum() / m0.sum()), float((m1.sum(0) * xs).sum() / m1.sum())
            motion.append(abs((c1 - c0) - shift_cells) * 8)
    mean = (lambda v: sum(v) / len(v) if v else float("nan"))
    return {"subject_flicker": mean(subj), "background_flicker": mean(back), "motion_error_px": mean(motion)}


def run(family="tiny", size=64, frames=4, steps=10, shift=8, device="cpu") -> dict:
    import torch

    from devtools.comfy_env import bootstrap

    bootstrap(cpu=device == "cpu")
    with torch.inference_mode():
        model, clip, vae, _ = bi.load_models(family, size)
    return measure(model, clip, vae, size, frames, steps, shift, device) | {"family": family}


def measure(model, clip, vae, size=64, frames=4, steps=10, shift=8, device="cpu") -> dict:
    """The clip report on models already loaded (run_bench.py --clip-frames calls this on its suite's models)."""
    import torch

    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion
    from comfyui_photoswap.photoswap_core.prompts import build_prompt_pair
    from comfyui_photoswap.photoswap_core.recorder import record_clip
    from comfyui_photoswap.photoswap_core.swap_rules import SwapWindows
    from comfyui_photoswap.photoswap_core.swap_sampler import swap

    with torch.inference_mode():
        samples, discs = make_clip(vae, size, frames, shift)
        src, neg = bi.encode(clip, "a photo of a ball"), bi.encode(clip, "")
        tgt = bi.encode(clip, "a photo of a sks dog")
        prompts = build_prompt_pair(clip, "a photo of a ball", "ball", "sks dog")
        windows = SwapWindows(0.5, 0.0, 0.5, True)
        settings = InversionSettings(method="direct", steps=steps)

        def pipeline(x, mode):
            inv = run_inversion(model, x, src, neg, settings)
            trace = record_clip(model, src, neg, inv.schedule, bi.CFG, trajectory_vp=inv.trajectory,
                                null_embeddings=inv.null_embeddings, method="direct")
            return swap(model, trace, tgt, neg, prompts, windows, bi.CFG, frame_attention=mode)

        pipeline(samples[:1], "off")  # warm-up
        t0 = time.perf_counter()
        pipeline(samples[:1], "off")
        single = time.perf_counter() - t0
        report = {"family": type(model.model.model_config).__name__, "size": size, "frames": frames, "steps": steps,
                  "shift_px": shift, "single_image_s": single, "modes": {}, "machine": bi.machine_info(device)}
        for mode in MODES:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            result = pipeline(samples, mode)
            seconds = time.perf_counter() - t0
            entry = consistency(result.target.float(), discs, shift // 8, result.mask)
            entry.update(seconds_per_frame=seconds / frames, ratio_to_single=seconds / frames / single)
            if device == "cuda":
                entry["peak_mb_per_frame"] = torch.cuda.max_memory_allocated() / 2**20 / frames
            report["modes"][mode] = entry
    return report


CLIP_PHOTOS = ("heldout", "same_class")  # bench/quality.py's held-out photos, or its photos of the concept's class


def toyworld_clip(frames: int, shift: int, seed: int = 2024, photos: str = "heldout"):
    """A toy-world photo (one of `photos`, CLIP_PHOTOS) whose object moves `shift` px right per frame (the background
    stays): the scenes."""
    from dataclasses import replace

    from quality import photo_scenes, same_class_scenes
    from toyworld import scene as W

    for sc in photo_scenes(seed, 64) if photos == "heldout" else same_class_scenes(seed + 500, 64):
        o = sc.objects[0]
        if o.cx + (frames - 1) * shift + o.side / 2 <= W.SIZE - 4:
            return [replace(sc, objects=(replace(o, cx=o.cx + f * shift),)) for f in range(frames)]
    raise RuntimeError("no held-out photo leaves room for the motion: use fewer frames or a smaller --shift")


def measure_toyworld(frames=4, steps=20, shift=8, subject="concept", photos="heldout", concept_maps="own") -> dict:
    """The clip report in the trained toy world (toyworld/, models through the Concept Loader): besides the latent
    flicker figures, per frame the detector's reading of the decoded swap -- the new subject found, and how far its
    centre is from the moving source object's (follows the motion when small). `subject`: "concept" swaps in the
    DreamBooth sks square; "recolour" has the base model recolour the object (bench/quality.py's world edit), a new
    subject the model draws reliably, so the frame figures do not hinge on the concept's weak identity. `photos`
    "same_class" moves a square (the concept's class, where the concept is found most often). `concept_maps`: the
    Prompt Pair's choice ("subject": the new subject's tokens take the old one's cross-attention maps)."""
    import numpy as np
    import torch

    from quality import SHIPPED, recolour, target_prompt
    from toyworld import harness as H
    from toyworld import metrics as Q
    from toyworld import scene as W

    H.boot()  # ComfyUI first: its nodes.py (not the pack's nodes/ package), and the pack importable
    import nodes

    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion
    from comfyui_photoswap.photoswap_core.recorder import record_clip
    from comfyui_photoswap.photoswap_core.swap_rules import SwapWindows
    from comfyui_photoswap.photoswap_core.swap_sampler import swap

    clip_scenes = toyworld_clip(frames, shift, photos=photos)
    if subject == "recolour":
        loaded = H.load_concept("base")
        old_colour, new_colour = recolour(clip_scenes[0])
        src, tgt, neg, prompts = H.prompt_pair(loaded, clip_scenes[0].caption, old_colour, words=new_colour,
                                               concept_maps=concept_maps)
        want = {"colour": new_colour, "shape": clip_scenes[0].objects[0].shape}
        label = f"base model, the object recoloured {new_colour}"
    else:
        loaded = H.load_concept("dreambooth")
        src, tgt, neg, prompts = H.prompt_pair(loaded, clip_scenes[0].caption, clip_scenes[0].objects[0].shape,
                                               target_prompt(clip_scenes[0]), concept_maps=concept_maps)
        want, label = {}, "DreamBooth sks square"
    win = SwapWindows(**SHIPPED)  # the shipped windows, as bench/quality.py names them
    model = loaded.model
    with torch.inference_mode():
        pixels = torch.from_numpy(W.render_batch(clip_scenes)).float() / 255.0
        samples = nodes.VAEEncode().encode(loaded.vae, pixels)[0]["samples"]
        discs = torch.from_numpy(np.stack([W.object_mask(sc.objects[0]) for sc in clip_scenes])).float()
        inv = run_inversion(model, samples, src, neg, InversionSettings(method="direct", steps=steps))
        trace = record_clip(model, src, neg, inv.schedule, 7.5, trajectory_vp=inv.trajectory,
                            null_embeddings=inv.null_embeddings, method="direct")
        report = {"family": f"toyworld (trained, {label})", "subject": subject, "photos": photos,
                  "concept_maps": concept_maps, "size": W.SIZE, "frames": frames,
                  "steps": steps, "shift_px": shift, "caption": clip_scenes[0].caption, "modes": {}}
        for mode in MODES:
            t0 = time.perf_counter()
            result = swap(model, trace, tgt, neg, prompts, win, 7.5, frame_attention=mode)
            seconds = time.perf_counter() - t0
            entry = consistency(result.target.float(), discs, shift // 8, result.mask)
            images = nodes.VAEDecode().decode(loaded.vae, {"samples": result.target})[0]
            images = (images.clamp(0, 1) * 255).round().byte().cpu().numpy()
            per_frame = [Q.swap_metrics(sc, W.render(sc), img, **want) for img, sc in zip(images, clip_scenes)]
            offsets = [m["place_error_px"] for m in per_frame if m["identity"]]
            entry.update(seconds_per_frame=seconds / frames, identity_per_frame=[m["identity"] for m in per_frame],
                         identity=float(np.mean([m["identity"] for m in per_frame])),
                         concept_offset_px=float(np.mean(offsets)) if offsets else float("nan"))
            report["modes"][mode] = entry
    report["machine"] = bi.machine_info("cpu")
    return report


def format_report(report: dict) -> str:
    lines = [f"clips: {report['family']} {report['size']} px, {report['frames']} frames, {report['steps']} steps, "
             f"subject moving {report['shift_px']} px/frame; one image {report.get('single_image_s', float('nan')):.2f} s",
             f"{'frame_attention':<16}{'subject flicker':>16}{'background':>12}{'motion err px':>15}"
             f"{'s/frame':>9}{'× single':>10}{'MB/frame':>10}"]
    for mode, e in report["modes"].items():
        lines.append(f"{mode:<16}{e['subject_flicker']:>16.4f}{e['background_flicker']:>12.4f}"
                     f"{e['motion_error_px']:>15.2f}{e['seconds_per_frame']:>9.2f}"
                     f"{e.get('ratio_to_single', float('nan')):>10.2f}{e.get('peak_mb_per_frame', float('nan')):>10.1f}"
                     + (f"   new subject found {e['identity']:.0%}, {e['concept_offset_px']:.1f} px from the moving "
                        "source object" if "identity" in e else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="tiny", choices=(*bi.FAMILIES, "toyworld"),
                        help="toyworld: the trained toy model and its DreamBooth concept (toyworld/weights/)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--shift", type=int, default=8, help="disc motion in px per frame (a multiple of 8)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--subject", default="concept", choices=("concept", "recolour"),
                        help="toyworld only: swap in the DreamBooth concept, or have the base model recolour the "
                             "object (a new subject it draws reliably)")
    parser.add_argument("--photos", default="heldout", choices=CLIP_PHOTOS,
                        help="toyworld only: the moving object from bench/quality.py's held-out photos, or a square "
                             "from its same_class photos (the concept's class)")
    parser.add_argument("--concept-maps", default="own", choices=("own", "subject"),
                        help="toyworld only: the Prompt Pair's concept_maps (subject: the new subject's tokens take "
                             "the old one's cross-attention maps)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.family == "toyworld":
        report = measure_toyworld(args.frames, args.steps, args.shift, args.subject, args.photos, args.concept_maps)
    elif args.subject != "concept" or args.photos != "heldout" or args.concept_maps != "own":
        parser.error("--subject recolour, --photos same_class and --concept-maps subject need --family toyworld (the "
                     "random-weight families draw no subject)")
    else:
        report = run(args.family, args.size, args.frames, args.steps, args.shift, args.device)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
