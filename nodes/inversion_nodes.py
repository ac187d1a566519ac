"""Inversion stage: real image latent → PHOTOSWAP_INVERSION (z_T, source trajectory, null embeddings), save / load.

The z_T LATENT output is z_T in ComfyUI's LATENT convention for a sampler that starts at σ_0 = sigmas[0] with noise
disabled: samples = z_T_VP·√(1+σ_0²)/latent_scale (ComfyUI multiplies by the scale and works in k-space,
x_k = x_VP·√(1+σ²)). Wire it with the SIGMAS output into a stock SamplerCustom (add_noise off, sampler euler or ddim)
to continue from the inversion; see docs/inversion.md.
"""
from __future__ import annotations

import logging
import math
import os

import folder_paths
from comfy_api.latest import io, ui

from ..photoswap_core.errors import PhotoswapInputError
from .types import CATEGORY, Inversion

log = logging.getLogger("photoswap")

METHOD_CHOICES = ["null_text", "direct", "negative_prompt", "ddim"]
SAVE_SUBFOLDER = "photoswap"
NO_FILES = "(no saved inversions)"


def z_t_latent(result) -> dict:
    """The stock-sampler LATENT of the inversion's z_T (k-space at σ_0, unscaled by the VAE factor)."""
    sigma0 = float(result.schedule.sigmas[0])
    return {"samples": (result.z_t.float() * math.sqrt(1.0 + sigma0 * sigma0) / result.model_info.latent_scale)
            .contiguous()}


def _summary(result, image_vp=None) -> str:
    s = result.settings
    lines = [f"method {s.method}, {result.schedule.steps} steps, cfg {s.cfg:g}, model {result.model_info.config_name} "
             f"({result.model_info.prediction}), latent {result.latent_shape[-2]}×{result.latent_shape[-1]}"]
    if image_vp is not None:
        diff = (result.trajectory[-1].float() - image_vp.float().cpu())
        lines.append(f"reconstruction error (VP latent): max |Δ| {float(diff.abs().max()):.3e}, "
                     f"MSE {float(diff.pow(2).mean()):.3e}")
    if result.inner_iterations:
        early = sum(1 for k in result.inner_iterations if k < s.inner_iterations)
        lines.append(f"inner iterations per step: {list(result.inner_iterations)} ({early} of "
                     f"{len(result.inner_iterations)} steps stopped early)")
    return "\n".join(lines)


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
                io.Latent.Input("latent", tooltip="The source image latent from VAE Encode (batch of 1; any size "
                                                  "and aspect)."),
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
                io.Combo.Input("method", options=METHOD_CHOICES, default="null_text",
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
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: decode the reconstruction (the source trajectory's last latent) as "
                                     "a preview and as the IMAGE output."),
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
                inner_iterations=10, early_stop_epsilon=1e-5, learning_rate=1e-2, vae=None) -> io.NodeOutput:
        import comfy.utils

        from ..photoswap_core.inversion import InversionSettings, progress_total, run_inversion

        if method not in METHOD_CHOICES:
            raise PhotoswapInputError("method", f"one of {', '.join(METHOD_CHOICES)} (got {method!r})",
                                      "pick a listed method")
        if method == "null_text" and not learning_rate > 0:
            raise PhotoswapInputError("learning_rate", f"a learning rate > 0 (got {learning_rate})",
                                      "use 0.01 (the reference's value)")
        if not isinstance(latent, dict) or "samples" not in latent:
            raise PhotoswapInputError("latent", "a LATENT (from VAE Encode)", "connect VAE Encode's output")
        settings = InversionSettings(method=method, steps=int(steps), cfg=float(cfg),
                                     inner_iterations=int(inner_iterations),
                                     early_stop_epsilon=float(early_stop_epsilon), learning_rate=float(learning_rate))
        samples = latent["samples"]
        pbar = comfy.utils.ProgressBar(max(1, progress_total(settings)))
        result = run_inversion(model, samples, source_positive, negative, settings, progress=lambda k: pbar.update(k))
        summary = _summary(result, samples.float().cpu() * result.model_info.latent_scale)
        log.info("Photoswap inversion: %s", summary.replace("\n", "; "))
        image = None
        ui_out = {"text": (summary,)}
        if vae is not None:
            image = vae.decode(result.trajectory[-1].float() / result.model_info.latent_scale)
            if image.dim() == 5:  # video VAEs return [B, T, H, W, C]
                image = image.reshape(-1, *image.shape[-3:])
            ui_out.update(ui.PreviewImage(image, cls=cls).as_dict())
        return io.NodeOutput(result, z_t_latent(result), result.schedule.sigmas.clone(), image, ui=ui_out)


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
        path = save_path(filename_prefix)
        from ..photoswap_core.inversion_io import save_inversion

        save_inversion(inversion, path)
        rel = os.path.relpath(path, folder_paths.get_output_directory())
        log.info("Photoswap: saved the inversion to %s", path)
        return io.NodeOutput(ui={"text": (f"saved {rel} ({_summary(inversion)})",)})


def save_path(filename_prefix: str) -> str:
    """output/photoswap/<prefix>_NNNNN.safetensors with the next free counter (never outside output/photoswap)."""
    import re

    root = os.path.join(os.path.abspath(folder_paths.get_output_directory()), SAVE_SUBFOLDER)
    os.makedirs(root, exist_ok=True)
    prefix = (filename_prefix or "inversion").strip() or "inversion"
    try:
        folder, filename, _, _, _ = folder_paths.get_save_image_path(prefix, root)
    except Exception as exc:  # noqa: BLE001 — ComfyUI raises a bare Exception for paths outside the folder
        raise PhotoswapInputError("filename_prefix", f"a file name inside output/{SAVE_SUBFOLDER} (got {prefix!r})",
                                  "remove '..' and absolute paths from the prefix") from exc
    os.makedirs(folder, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(filename)}_(\d+)\.safetensors$")
    used = [int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m]
    counter = max(used, default=0) + 1
    return os.path.join(folder, f"{filename}_{counter:05d}.safetensors")


def saved_inversion_files() -> list[str]:
    """Combo entries: output/photoswap/** as 'photoswap/… [output]' (newest first), then input/** .safetensors."""
    entries = []
    out_dir = os.path.abspath(folder_paths.get_output_directory())
    root = os.path.join(out_dir, SAVE_SUBFOLDER)
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".safetensors"):
                full = os.path.join(dirpath, name)
                try:
                    found.append((-os.path.getmtime(full), os.path.relpath(full, out_dir)))
                except OSError:
                    continue
    entries += [f"{rel.replace(os.sep, '/')} [output]" for _, rel in sorted(found)]
    in_dir = os.path.abspath(folder_paths.get_input_directory())
    inputs = []
    for dirpath, dirs, files in os.walk(in_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        inputs += [os.path.relpath(os.path.join(dirpath, n), in_dir).replace(os.sep, "/")
                   for n in files if n.endswith(".safetensors")]
    entries += sorted(inputs)
    return entries or [NO_FILES]


def resolve_inversion_file(name: str) -> str:
    """Absolute path of a combo entry, refusing anything outside output/photoswap and the input folder."""
    if not name or name == NO_FILES:
        raise PhotoswapInputError("inversion_file", "a saved inversion (none found in output/photoswap or input)",
                                  "run Photoswap Null-Text DDIM Inversion → Photoswap Save Inversion first, or copy a "
                                  ".safetensors inversion into ComfyUI's input folder, then refresh")
    path = os.path.abspath(folder_paths.get_annotated_filepath(name))
    allowed = (os.path.join(os.path.abspath(folder_paths.get_output_directory()), SAVE_SUBFOLDER),
               os.path.abspath(folder_paths.get_input_directory()))
    if not any(os.path.commonpath((root, path)) == root for root in allowed):
        raise PhotoswapInputError("inversion_file", f"a file in output/{SAVE_SUBFOLDER} or the input folder "
                                                    f"(got {name!r})", "pick a file from the list")
    return path


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
        from ..photoswap_core import inversion_io

        path = resolve_inversion_file(inversion_file)
        result, _ = inversion_io.load_inversion(path)
        inversion_io.check_model(result, model)
        if latent is not None:
            inversion_io.check_latent(result, latent["samples"])
        summary = f"loaded {inversion_file}: {_summary(result)}"
        return io.NodeOutput(result, z_t_latent(result), result.schedule.sigmas.clone(),
                             result.source_conditioning, result.negative_conditioning, ui={"text": (summary,)})


NODES = [PhotoswapNullTextInversion, PhotoswapSaveInversion, PhotoswapLoadInversion]
