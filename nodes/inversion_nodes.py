"""Inversion stage: real image latent → PHOTOSWAP_INVERSION (z_T, source trajectory, null embeddings), save / load.

The z_T LATENT output is z_T in ComfyUI's LATENT convention for a sampler that starts at σ_0 = sigmas[0] with noise
disabled (for the SD family samples = z_T_VP·√(1+σ_0²)/latent_scale: ComfyUI multiplies by the scale and works in
k-space, x_k = x_VP·√(1+σ²)). Wire it with the SIGMAS output into a stock SamplerCustom (add_noise off, sampler euler
or ddim) to continue from the inversion; see docs/inversion.md.
"""
from __future__ import annotations

import logging
import os

import torch

from comfy_api.latest import io, ui

from ..photoswap_core.errors import PhotoswapInputError
from ..photoswap_core.inversion import METHODS, SOLVERS, summary, z_t_latent
from ..photoswap_core.inversion_files import resolve_inversion_file, saved_inversion_files
from .types import CATEGORY, FrameOptions, Inversion

log = logging.getLogger("photoswap")



class PhotoswapNullTextInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhotoswapNullTextInversion",
            display_name="Photoswap Null-Text DDIM Inversion",
            category=f"{CATEGORY}/inversion",
            description=(
                "Inverts a real image latent into Photoswap's source pass: the starting noise z_T, the source "
                "trajectory and the per-step null (unconditional) embeddings, on the reference DDIM schedule "
                "(timesteps 981 … 1 for 50 steps, then ᾱ_0). Methods: 'null_text' (the paper/official code: DDIM "
                "inversion, then per-step null-embedding optimisation so CFG reconstructs the image), 'direct' (DDIM "
                "inversion only; the source row is pinned to the inversion latents — exact, fastest), "
                "'negative_prompt' (null := source prompt embedding), 'ddim' (plain, for comparison). Works for "
                "SD1.x, SD2.x (v-prediction) and SDXL (the token embedding is optimised; the pooled output stays as "
                "given). Outputs the inversion for the Photoswap Attention Recorder, the z_T LATENT and the SIGMAS "
                "for a stock SamplerCustom (add_noise off) and, with a VAE, a decoded reconstruction preview. Save "
                "it with Photoswap Save Inversion: null-text inversion is slow."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x or SDXL) — the same model, with the "
                                                "same LoRAs, that the recorder and swap sampler will use."),
                io.Latent.Input("latent", tooltip="The source image latent from VAE Encode (any size and aspect; "
                                                  "a batch of frames is a clip, each frame inverted on its own)."),
                io.Conditioning.Input("source_positive",
                                      tooltip="The encoded source prompt describing the image (Photoswap Prompt "
                                              "Pair's source_positive, or CLIP Text Encode)."),
                io.Conditioning.Input("negative",
                                      tooltip="The unconditional prompt, normally the empty prompt \"\" (the "
                                              "reference's null text). Start value of the null-text optimisation and "
                                              "the null embedding of 'direct'/'ddim'; SDXL keeps its pooled output "
                                              "for the unconditional branch."),
                io.Int.Input("steps", default=50, min=2, max=1000,
                             tooltip="DDIM steps (the paper uses 50). The swap runs with the same steps; swap windows "
                                     "are fractions of them."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale of the source pass the inversion must reproduce (7.5 in the "
                                       "paper). 'null_text' needs cfg > 1. Use the same cfg in the swap sampler."),
                io.Combo.Input("method", options=list(METHODS), default="null_text",
                               tooltip="null_text: optimise a null embedding per step (≈ 10× the model calls of a "
                                       "sampling pass without early stopping; reference behaviour). direct: exact "
                                       "reconstruction with zero extra model calls (source row pinned to the "
                                       "inversion; recommended for speed). negative_prompt: null := source prompt. "
                                       "ddim: plain DDIM inversion, CFG drifts (comparison only)."),
                io.Int.Input("inner_iterations", default=10, min=1, max=1000,
                             tooltip="null_text: Adam iterations per step at most (10 in the reference)."),
                io.Float.Input("early_stop_epsilon", default=1e-5, min=0.0, max=10.0, step=1e-6, round=False,
                               tooltip="null_text: a step stops when its loss (before the update) falls below "
                                       "epsilon + 2e-5·i·50/steps at step i (the reference's rule, 1e-5)."),
                io.Float.Input("learning_rate", default=1e-2, min=0.0, max=10.0, step=1e-4, round=False,
                               tooltip="null_text: Adam learning rate at step 0; it decays linearly to half at the "
                                       "last step (the reference's 1e-2·(1 − i/100) for 50 steps)."),
                io.Combo.Input("solver", options=list(SOLVERS), default="euler", optional=True,
                               tooltip="The inversion's ODE step (optional: graphs saved before it exist use euler). euler: one model call per step (SD: the "
                                       "reference's DDIM inversion; Flux: the flow ODE's Euler step). midpoint: Flux "
                                       "only, RF-Solver's second-order step, two calls per step: a z_T that the ODE "
                                       "maps back to the photo far more closely at the same steps (the source row "
                                       "is pinned either way)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: decode the reconstruction (the source trajectory's last latent) as "
                                     "a preview and as the IMAGE output."),
                FrameOptions.Input("frame_options", optional=True,
                                   tooltip="A clip (latent batch of frames): from Photoswap Frame Options; only its "
                                           "frames_per_batch matters here. Each frame is inverted on its own."),
            ],
            outputs=[
                Inversion.Output(display_name="inversion",
                                 tooltip="PHOTOSWAP_INVERSION: schedule, z_T, source trajectory, null embeddings, the "
                                         "conditioning used, model family and settings. Connect to the Photoswap "
                                         "Attention Recorder or Photoswap Save Inversion."),
                io.Latent.Output(display_name="z_T",
                                 tooltip="z_T as a LATENT for a stock sampler with noise disabled, starting at the "
                                         "first of the SIGMAS (samples = z_T·√(1+σ_0²)/latent_scale)."),
                io.Sigmas.Output(display_name="sigmas",
                                 tooltip="The inversion's DDIM schedule as N+1 sigmas (σ(t_0) … σ(t_N-1), σ(0)), for "
                                         "SamplerCustom: Euler over them is exactly the reference's DDIM."),
                io.Image.Output(display_name="reconstruction",
                                tooltip="The decoded reconstruction when a VAE is connected; None (nothing to "
                                        "connect) without a VAE."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, source_positive, negative, steps=50, cfg=7.5, method="null_text",
                inner_iterations=10, early_stop_epsilon=1e-5, learning_rate=1e-2, solver="euler", vae=None,
                frame_options=None) -> io.NodeOutput:
        import comfy.utils

        from ..photoswap_core.inversion import InversionSettings, invert_latent, progress_total

        settings = InversionSettings(method=method, steps=int(steps), cfg=float(cfg),
                                     inner_iterations=int(inner_iterations),
                                     early_stop_epsilon=float(early_stop_epsilon), learning_rate=float(learning_rate),
                                     solver=solver)
        samples = latent.get("samples") if isinstance(latent, dict) else None
        frames = int(samples.shape[0]) if isinstance(samples, torch.Tensor) else 1  # the core checks the latent
        pbar = comfy.utils.ProgressBar(max(1, progress_total(settings, frames)))
        result, z_t, sigmas, image, text = invert_latent(
            model, latent, source_positive, negative, settings, vae, progress=lambda k: pbar.update(k),
            frames_per_batch=frame_options.frames_per_batch if frame_options is not None else 0)
        log.info("Photoswap inversion: %s", text.replace("\n", "; "))
        ui_out = {"text": (text,)}
        if image is not None:
            ui_out.update(ui.PreviewImage(image, cls=cls).as_dict())
        return io.NodeOutput(result, z_t, sigmas, image, ui=ui_out)


class PhotoswapSaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhotoswapSaveInversion",
            display_name="Photoswap Save Inversion",
            category=f"{CATEGORY}/inversion",
            description=(
                "Saves a PHOTOSWAP_INVERSION to output/photoswap/<prefix>_NNNNN.safetensors (safetensors tensors + a "
                "JSON metadata header: method, settings, steps, cfg, model family, latent size, weights and latent "
                "fingerprints, pack version, the conditioning it was made with). Never pickle. Load it with Photoswap "
                "Load Inversion to skip a slow null-text inversion next time."),
            inputs=[
                Inversion.Input("inversion", tooltip="The inversion to save (from Photoswap Null-Text DDIM Inversion)."),
                io.String.Input("filename_prefix", default="inversion",
                                tooltip="File name prefix inside output/photoswap; may contain subfolders "
                                        "('portraits/jack') and ComfyUI's %date% style variables. A 5-digit counter "
                                        "is appended."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, filename_prefix="inversion") -> io.NodeOutput:
        from ..photoswap_core.inversion_io import save_to_output

        rel = save_to_output(inversion, filename_prefix)
        return io.NodeOutput(ui={"text": (f"saved {rel} ({summary(inversion)})",)})


class PhotoswapLoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = saved_inversion_files()
        return io.Schema(
            node_id="PhotoswapLoadInversion",
            display_name="Photoswap Load Inversion",
            category=f"{CATEGORY}/inversion",
            description=(
                "Loads an inversion saved by Photoswap Save Inversion (from output/photoswap or the input folder) "
                "and checks it against the connected model: same family and prediction type and the same weights "
                "(fingerprint of the diffusion weights and LoRA patches) — anything else is an error, because an "
                "inversion only reconstructs the image with the weights it was made with. With a latent connected, "
                "its size must match too (a different image of the same size only warns). Step count and latent "
                "size are also checked by the stages that consume the inversion. Outputs the same as the inversion "
                "node plus the stored source and negative conditioning."),
            inputs=[
                io.Combo.Input("inversion_file", options=files, default=files[0],
                               tooltip="A saved inversion: 'photoswap/… [output]' = ComfyUI's output/photoswap "
                                       "folder (newest first), other names = the input folder. Refresh the page "
                                       "after saving a new one."),
                io.Model.Input("model", tooltip="The model you will swap with; it must be the model (checkpoint and "
                                                "LoRAs) the inversion was made with."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: the source image latent, to check it has the inverted size (and "
                                        "warn when it is a different image)."),
            ],
            outputs=[
                Inversion.Output(display_name="inversion", tooltip="The loaded PHOTOSWAP_INVERSION."),
                io.Latent.Output(display_name="z_T", tooltip="z_T as a LATENT for a stock sampler with noise "
                                                             "disabled (see the inversion node)."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The inversion's DDIM sigmas (N+1 values)."),
                io.Conditioning.Output(display_name="source_positive",
                                       tooltip="The source CONDITIONING the inversion was made with (as saved)."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="The negative CONDITIONING the inversion was made with (as saved)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, inversion_file, **kwargs):
        try:
            path = resolve_inversion_file(inversion_file)
            stat = os.stat(path)
            return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"
        except (OSError, PhotoswapInputError):
            return float("nan")  # re-run (and report the problem) every time

    @classmethod
    def execute(cls, inversion_file, model, latent=None) -> io.NodeOutput:
        from ..photoswap_core.inversion_io import load_and_check

        result, _ = load_and_check(resolve_inversion_file(inversion_file), model, latent)
        text = f"loaded {inversion_file}: {summary(result)}"
        return io.NodeOutput(result, z_t_latent(result), result.schedule.sigmas.clone(),
                             result.source_conditioning, result.negative_conditioning, ui={"text": (text,)})


NODES = [PhotoswapNullTextInversion, PhotoswapSaveInversion, PhotoswapLoadInversion]
