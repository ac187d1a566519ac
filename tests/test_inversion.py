"""Inversion stage: the DDIM schedule vs diffusers, parity with the official code's inversion (DDIM trajectory, z_T and
null-text optimisation), the four methods on tiny SD1.x / SD2.x-v / SDXL models, the stock-sampler continuation from
the z_T LATENT, save/load (bit-identical, every error), bad inputs, and the node inside a real server.

Node code runs under `torch.inference_mode()` here, as in the server (autouse fixture below).
"""
from __future__ import annotations

import json
import math
import os
import struct
import time
import types

import pytest
import torch

from devtools.comfy_env import bootstrap

bootstrap()  # the repo root is a package importing comfy_api; ComfyUI must be importable at collection

from fixtures_server import comfy_server  # noqa: E402,F401  (module-scoped real server)

N_PARITY = 50
PARITY_NULL_TEXT_STEPS = 3  # fast parity: the first steps of the null-text optimisation (full 50 steps: slow test)


# ---------------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def inference(request):
    """Run every in-process test body like the server runs nodes: inside torch.inference_mode()."""
    if request.node.get_closest_marker("e2e"):
        yield
        return
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def inv(pack):
    from comfyui_photoswap.photoswap_core import inversion

    return inversion


@pytest.fixture(scope="module")
def io_mod(pack):
    from comfyui_photoswap.photoswap_core import inversion_io

    return inversion_io


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_photoswap.nodes import inversion_nodes

    return inversion_nodes


@pytest.fixture(scope="module")
def err_type(pack):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    return PhotoswapInputError


@pytest.fixture
def folders(tmp_path):
    """Point ComfyUI's output/input/temp folders at a temp dir for the test, restore afterwards."""
    import folder_paths

    saved = (folder_paths.get_output_directory(), folder_paths.get_input_directory(),
             folder_paths.get_temp_directory())
    dirs = {name: tmp_path / name for name in ("output", "input", "temp")}
    for d in dirs.values():
        d.mkdir()
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    yield dirs
    folder_paths.set_output_directory(saved[0])
    folder_paths.set_input_directory(saved[1])
    folder_paths.set_temp_directory(saved[2])


def encode(clip, text):
    import nodes as comfy_nodes

    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def scale_of(tiny):
    return float(tiny.model.model.latent_format.scale_factor)


def image_latent(tiny, h, w, seed=1, batch=1):
    """An unscaled LATENT whose VP latent (× scale factor) has unit std, like a photo's."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 4, h, w), generator=g) / scale_of(tiny)


def run_node(N, tiny, latent, **kwargs):
    pos = kwargs.pop("positive", None) or encode(tiny.clip, "a photo of a man")
    neg = kwargs.pop("negative", None) or encode(tiny.clip, "")
    out = N.PhotoswapNullTextInversion.execute(model=kwargs.pop("model", tiny.model), latent={"samples": latent},
                                               source_positive=pos, negative=neg, **kwargs)
    return out


def stock_continuation(model, z_t_latent, sigmas, positive, negative, cfg, sampler_name):
    """Core SamplerCustom with add_noise off from the z_T LATENT over our SIGMAS."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    sampler = comfy.samplers.sampler_object(sampler_name)
    out = SamplerCustom.execute(model=model, add_noise=False, noise_seed=0, cfg=cfg, positive=positive,
                                negative=negative, sampler=sampler, sigmas=sigmas, latent_image=z_t_latent)
    return out.result[0]["samples"]


@pytest.fixture(scope="module")
def parity(comfy, parity_dir):
    """The shared tiny diffusers model in ComfyUI and the official inversion outputs."""
    from safetensors.torch import load_file

    from devtools.parity_model import load_parity_model

    models = load_parity_model(parity_dir / "tiny_sd")
    manifest = json.loads((parity_dir / "manifest.json").read_text())
    return types.SimpleNamespace(
        model=models.model, manifest=manifest, inv=load_file(parity_dir / "inversion.safetensors"),
        text=load_file(parity_dir / "text.safetensors"))


def parity_conditioning(parity):
    """The official text embeddings as CONDITIONING (CLIP in fp32 matches them to 1e-6; this is exact)."""
    source = [[parity.text["text_embeddings"][0:1].clone(), {}]]
    null = [[parity.text["null_embedding"].clone(), {}]]
    return source, null


# ---------------------------------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("steps", [10, 25, 37, 50])
def test_schedule_equals_diffusers_ddim(pack, tiny_sd15, tiny_sd2v, tiny_sdxl, steps):
    """Timesteps equal diffusers' DDIMScheduler(scaled_linear 0.00085–0.012, set_alpha_to_one=False, steps_offset=1);
    sigmas equal √((1−ᾱ)/ᾱ) of its alphas_cumprod at those timesteps plus final_alpha_cumprod. diffusers keeps ᾱ in
    float32 (cumprod of 1000 float32 factors: ~4e-7 absolute), which the smallest σ (1−ᾱ_0 = 8.5e-4) amplifies to
    ~1.3e-5 relative; against the same formula in float64 our float32 sigmas agree to float32 rounding (1e-7)."""
    from diffusers import DDIMScheduler

    from comfyui_photoswap.photoswap_core.arch.ddim import alpha_bar, ddim_schedule

    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(steps)
    timesteps = [int(t) for t in ref.timesteps]
    alphas = torch.cat([ref.alphas_cumprod[ref.timesteps].double(),
                        torch.tensor([float(ref.final_alpha_cumprod)], dtype=torch.float64)])
    expected = ((1 - alphas) / alphas).sqrt()
    betas64 = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas64 = torch.cumprod(1 - betas64, 0)[timesteps + [0]]
    expected64 = ((1 - alphas64) / alphas64).sqrt()
    for tiny in (tiny_sd15, tiny_sd2v, tiny_sdxl):  # ε, v and SDXL share the scaled-linear table
        schedule = ddim_schedule(tiny.model.get_model_object("model_sampling"), steps)
        assert list(schedule.timesteps) == timesteps
        assert schedule.sigmas.dtype == torch.float32 and schedule.sigmas.shape == (steps + 1,)
        sigmas = schedule.sigmas.double()
        rel = ((sigmas - expected).abs() / expected).max().item()
        assert rel < 2e-5, f"{tiny.family}: max relative sigma error vs diffusers {rel:.2e}"
        rel64 = ((sigmas - expected64).abs() / expected64).max().item()
        assert rel64 < 2e-7, f"{tiny.family}: max relative sigma error vs float64 {rel64:.2e}"
        ours_alphas = torch.tensor([alpha_bar(float(s)) for s in schedule.sigmas], dtype=torch.float64)
        assert (ours_alphas - alphas).abs().max().item() < 1e-6  # ᾱ to diffusers' float32 precision
    if steps == 50:
        assert timesteps[0] == 981 and timesteps[-1] == 1
        assert float(ref.final_alpha_cumprod) == pytest.approx(0.99915, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# parity with the official code (../shared/parity)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_parity_ddim_inversion_trajectory_and_z_t(inv, parity):
    """Our DDIM inversion of the official image latent reproduces the official `ddim_latents` and x_T (≤ 1e-4 rel.)."""
    assert parity.manifest["scheduler"]["timesteps"][:2] == [981, 961]
    source, null = parity_conditioning(parity)
    latent = parity.inv["image_latent"] / 0.18215  # LATENT convention: unscaled
    t0 = time.perf_counter()
    result = inv.run_inversion(parity.model, latent, source, null, inv.InversionSettings(method="direct", steps=50))
    print(f"50-step DDIM inversion of the 64x64 parity latent: {time.perf_counter() - t0:.1f} s")
    assert list(result.schedule.timesteps) == parity.manifest["scheduler"]["timesteps"]
    ref = parity.inv["ddim_latents"]
    assert len(result.inversion_latents) == ref.shape[0] == N_PARITY + 1
    worst = 0.0
    for k in range(N_PARITY + 1):
        ours, theirs = result.inversion_latents[k], ref[k]
        rel = float((ours - theirs).norm() / theirs.norm())
        worst = max(worst, rel)
        assert rel <= 1e-4, f"inversion latent {k}: relative error {rel:.2e}"
    z_rel = float((result.z_t - parity.inv["x_T"]).norm() / parity.inv["x_T"].norm())
    print(f"worst trajectory relative error {worst:.2e}; z_T relative error {z_rel:.2e}")
    assert z_rel <= 1e-4
    # direct: the source trajectory is the inversion, reversed and pinned; it ends exactly at the image latent
    assert torch.equal(result.trajectory[0], result.inversion_latents[-1])
    assert torch.equal(result.trajectory[-1], parity.inv["image_latent"])


@pytest.mark.unit
def test_parity_null_text_first_steps(inv, parity):
    """Null-text optimisation from the official DDIM trajectory (the shared start, z_T = official x_T) for the first
    PARITY_NULL_TEXT_STEPS of 50 steps with the reference settings (cfg 7.5, 10 iterations, lr 1e-2, ε 1e-5).

    The acceptance criterion: our CFG step with our optimised embedding lands at least as close to the inversion
    latent one step lower as the official embedding does (within float noise, rel. 1e-3), at every step run. Also:
    the same iteration counts and last losses as recorded by the official run, and nearly the same embeddings
    (Adam's first steps are sign steps, so float noise moves single coordinates by ~lr; bound 2e-3 on values ~3).
    A full 50-step run is `test_parity_null_text_full` (slow)."""
    from comfyui_photoswap.photoswap_core.evaluator import DirectEvaluator

    K = PARITY_NULL_TEXT_STEPS
    source, null = parity_conditioning(parity)
    ref = parity.inv["ddim_latents"]
    official = parity.inv["uncond_embeddings"]
    settings = inv.InversionSettings(method="null_text", steps=N_PARITY, cfg=7.5, inner_iterations=10,
                                     early_stop_epsilon=1e-5, learning_rate=1e-2)
    from comfyui_photoswap.photoswap_core.arch.ddim import alpha_bar, ddim_schedule, ddim_step

    schedule = ddim_schedule(parity.model.get_model_object("model_sampling"), N_PARITY)
    evaluator = DirectEvaluator(parity.model, ref[0].shape)
    cond = evaluator.model_kwargs(source[0])
    null_ctx = evaluator.model_kwargs(null[0])["c_crossattn"]
    t0 = time.perf_counter()
    kept, trajectory, iterations, losses = inv.null_text_optimization(
        evaluator, schedule, [ref[k] for k in range(N_PARITY + 1)], cond, null_ctx, settings, max_steps=K)
    print(f"null-text, first {K} of 50 steps at 64x64: {time.perf_counter() - t0:.1f} s")
    manifest = parity.manifest["inversion"]
    assert iterations == manifest["inner_iterations_per_step"][:K]
    recorded = manifest["inner_final_loss_per_step"]
    recorded = json.loads(recorded) if isinstance(recorded, str) else recorded
    x_official = ref[N_PARITY]
    for i in range(K):
        assert losses[i][-1] == pytest.approx(recorded[i], rel=1e-4), f"step {i}: last pre-update loss"
        assert float((kept[i].cpu() - official[i]).abs().max()) < 2e-3, f"step {i}: embedding"
        sigma = float(schedule.sigmas[i])
        eps_c = evaluator.eps(x_official, sigma, cond["c_crossattn"])
        eps_u = evaluator.eps(x_official, sigma, official[i])
        x_official = ddim_step(x_official, eps_u + 7.5 * (eps_c - eps_u), alpha_bar(sigma),
                               alpha_bar(float(schedule.sigmas[i + 1])))
        target = ref[N_PARITY - 1 - i]
        ours_err = float((trajectory[i + 1] - target).pow(2).mean())
        official_err = float((x_official - target).pow(2).mean())
        print(f"step {i}: CFG step MSE to the inversion latent: ours {ours_err:.6e}, official {official_err:.6e}")
        assert ours_err <= official_err * (1 + 1e-3)


@pytest.mark.slow
def test_parity_null_text_full(inv, parity):
    """All 50 steps (~650 UNet calls at 64x64, 10+ minutes on a CPU): our null-text inversion of the official image
    latent reconstructs it with CFG 7.5 at least as closely as the official embeddings (from the official x_T)."""
    from comfyui_photoswap.photoswap_core.evaluator import DirectEvaluator

    source, null = parity_conditioning(parity)
    image = parity.inv["image_latent"]
    settings = inv.InversionSettings(method="null_text", steps=N_PARITY)
    result = inv.run_inversion(parity.model, image / 0.18215, source, null, settings)
    assert result.inner_iterations == parity.manifest["inversion"]["inner_iterations_per_step"]
    evaluator = DirectEvaluator(parity.model, image.shape)
    cond = evaluator.model_kwargs(source[0])
    official = inv.cfg_trajectory(evaluator, result.schedule, parity.inv["x_T"], cond,
                                  parity.inv["uncond_embeddings"], 7.5)
    ours_err = float((result.trajectory[-1] - image).pow(2).mean())
    official_err = float((official[-1] - image).pow(2).mean())
    print(f"CFG-7.5 reconstruction MSE: ours {ours_err:.6e}, official embeddings {official_err:.6e}")
    assert ours_err <= official_err * (1 + 1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# methods on the tiny models
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("family,h,w", [("sd15", 12, 8), ("sd2v", 12, 8), ("sdxl", 12, 8), ("sd15", 9, 7)])
def test_direct_reconstructs_input(inv, request, family, h, w):
    """`direct`: the source trajectory ends at the input latent (≤ 1e-5 max abs; pinned, so exactly), starts at z_T,
    null = the negative's embedding; any latent size (odd sizes too: ComfyUI's UNet matches skip shapes)."""
    tiny = request.getfixturevalue(f"tiny_{family}")
    latent = image_latent(tiny, h, w)
    pos, neg = encode(tiny.clip, "a photo of a man"), encode(tiny.clip, "")
    result = inv.run_inversion(tiny.model, latent, pos, neg, inv.InversionSettings(method="direct", steps=8))
    image_vp = latent * scale_of(tiny)
    assert float((result.trajectory[-1] - image_vp).abs().max()) <= 1e-5
    assert torch.equal(result.trajectory[0], result.inversion_latents[-1])
    assert [tuple(t.shape) for t in result.trajectory] == [(1, 4, h, w)] * 9
    assert float((result.z_t - image_vp).abs().max()) > 0.1  # a real inversion happened
    assert result.null_embeddings.shape == (8, *neg[0][0].shape)
    assert torch.equal(result.null_embeddings[3], neg[0][0].float())
    assert result.arch.prediction == ("v" if family == "sd2v" else "eps")


@pytest.mark.unit
@pytest.mark.parametrize("method", ["direct", "ddim", "negative_prompt", "null_text"])
def test_model_calls_and_progress(inv, tiny_sd15, monkeypatch, method):
    """Model evaluations per method (direct: N, zero beyond the inversion; ddim/negative_prompt: N + 2N; null_text:
    N + per step 1 cond + iterations + 1) and progress units summing to progress_total (the ProgressBar total)."""
    from comfyui_photoswap.photoswap_core import evaluator

    calls = {"n": 0}
    original = evaluator.DirectEvaluator.eps

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(evaluator.DirectEvaluator, "eps", counting)
    n = 4
    settings = inv.InversionSettings(method=method, steps=n, inner_iterations=2)
    units = []
    tiny = tiny_sd15
    result = inv.run_inversion(tiny.model, image_latent(tiny, 8, 8), encode(tiny.clip, "a photo of a man"),
                               encode(tiny.clip, ""), settings, progress=units.append)
    assert sum(units) == inv.progress_total(settings)
    expected = {"direct": n, "ddim": 3 * n, "negative_prompt": 3 * n,
                "null_text": n + sum(2 + k for k in result.inner_iterations)}[method]
    assert calls["n"] == expected


@pytest.mark.unit
def test_negative_prompt_null_is_source_embedding(inv, tiny_sd15):
    tiny = tiny_sd15
    pos = encode(tiny.clip, "a photo of a man")
    result = inv.run_inversion(tiny.model, image_latent(tiny, 8, 8), pos, encode(tiny.clip, ""),
                               inv.InversionSettings(method="negative_prompt", steps=4))
    for i in range(4):
        assert torch.equal(result.null_embeddings[i], pos[0][0].float())
    # the trajectory is the CFG pass with that null
    assert not torch.equal(result.trajectory[-1], result.inversion_latents[0])


# The tiny model's cfg-7.5 pass is far off the inversion; the reference's lr 1e-2 with 10 iterations only closes part
# of the gap on it, so this test uses a larger lr (the algorithm is the same; parity with the reference settings is
# checked on the parity model above). NT_EPSILON is chosen from this model's losses (~0.5–2) so that some steps stop
# early and others run all iterations, which the rule check below needs to be meaningful. CPU autograd is not bitwise
# deterministic and Adam amplifies that, so the reconstruction MSE varies from run to run (0.72–0.85 with these
# settings, vs 20.0 for plain DDIM; 6 iterations gave 0.83–1.28): the 10× bound keeps a margin.
NT_STEPS, NT_ITERATIONS, NT_LR, NT_EPSILON = 6, 8, 0.1, 0.75


@pytest.mark.unit
def test_null_text_beats_ddim_and_follows_early_stop_rule(inv, comfy):
    """On the tiny SD1.x model (built under inference mode, so its weights are inference tensors as in the server and
    the optimisation takes the path that swaps them for equal normal tensors): CFG-7.5 reconstruction from the
    optimised null embeddings is ≥ 10× closer to the image latent than plain DDIM inversion's; each step's iteration count is the first iteration
    whose pre-update loss < ε + 2e-5·i·50/N, else the maximum."""
    from comfyui_photoswap.photoswap_core.arch import single_conditioning
    from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule
    from devtools.tiny_models import build_tiny

    tiny = build_tiny("sd15", seed=0)
    assert next(tiny.model.model.diffusion_model.parameters()).is_inference()
    pos, neg = encode(tiny.clip, "a photo of a man"), encode(tiny.clip, "")
    latent = image_latent(tiny, 8, 8)
    image_vp = latent * scale_of(tiny)
    schedule = ddim_schedule(tiny.model.get_model_object("model_sampling"), NT_STEPS)
    src, null = single_conditioning(pos, "p"), single_conditioning(neg, "n")
    plain = inv.invert(tiny.model, schedule, image_vp, src, null, inv.InversionSettings(method="ddim", steps=NT_STEPS))
    settings = inv.InversionSettings(method="null_text", steps=NT_STEPS, cfg=7.5, inner_iterations=NT_ITERATIONS,
                                     early_stop_epsilon=NT_EPSILON, learning_rate=NT_LR)
    t0 = time.perf_counter()
    out = inv.invert(tiny.model, schedule, image_vp, src, null, settings)
    seconds = time.perf_counter() - t0
    plain_err = float((plain.trajectory[-1] - image_vp).pow(2).mean())
    nt_err = float((out.trajectory[-1] - image_vp).pow(2).mean())
    print(f"null-text {NT_STEPS} steps × ≤{NT_ITERATIONS} iterations: {seconds:.1f} s; reconstruction MSE: "
          f"ddim {plain_err:.3e}, null_text {nt_err:.3e} ({plain_err / nt_err:.0f}x); iterations {out.inner_iterations}")
    assert nt_err * 10 <= plain_err
    assert len(out.losses) == len(out.inner_iterations) == NT_STEPS
    for i, (count, step_losses) in enumerate(zip(out.inner_iterations, out.losses)):
        threshold = NT_EPSILON + 2e-5 * i * 50 / NT_STEPS
        below = [k for k, loss in enumerate(step_losses) if loss < threshold]
        expected = below[0] + 1 if below else NT_ITERATIONS
        assert count == expected == len(step_losses), f"step {i}: {count} iterations, losses {step_losses}"
    early = [k for k in out.inner_iterations if k < NT_ITERATIONS]
    assert early and len(early) < NT_STEPS, f"NT_EPSILON no longer splits the steps: {out.inner_iterations}"
    assert not torch.equal(out.null_embeddings[0], neg[0][0].float())  # the embedding was optimised


@pytest.mark.unit
def test_null_text_optimises_in_float32_on_a_bf16_model(inv, comfy):
    """A bf16 UNet (as ComfyUI loads models on many GPUs): the null embeddings are optimised and stored in float32,
    the losses are finite, and the optimisation still beats plain DDIM inversion's reconstruction."""
    from comfyui_photoswap.photoswap_core.arch import single_conditioning
    from comfyui_photoswap.photoswap_core.arch.ddim import ddim_schedule
    from devtools.tiny_models import build_tiny

    tiny = build_tiny("sd15", seed=0)
    base = tiny.model.model
    base.diffusion_model.to(torch.bfloat16)  # under inference mode: bf16 inference tensors, as the server loads them
    assert next(base.diffusion_model.parameters()).is_inference()
    base.diffusion_model.dtype = torch.bfloat16
    base.manual_cast_dtype = None
    assert base.get_dtype() == torch.bfloat16
    pos, neg = encode(tiny.clip, "a photo of a man"), encode(tiny.clip, "")
    image_vp = image_latent(tiny, 8, 8) * scale_of(tiny)
    schedule = ddim_schedule(tiny.model.get_model_object("model_sampling"), 3)
    src, null = single_conditioning(pos, "p"), single_conditioning(neg, "n")
    plain = inv.invert(tiny.model, schedule, image_vp, src, null, inv.InversionSettings(method="ddim", steps=3))
    settings = inv.InversionSettings(method="null_text", steps=3, cfg=7.5, inner_iterations=3,
                                     early_stop_epsilon=0.0, learning_rate=NT_LR)  # bf16 on a CPU is slow: few steps
    out = inv.invert(tiny.model, schedule, image_vp, src, null, settings)
    assert out.null_embeddings.dtype == torch.float32
    assert all(math.isfinite(v) for step in out.losses for v in step)
    assert not torch.equal(out.null_embeddings[0], neg[0][0].float())
    plain_err = float((plain.trajectory[-1].float() - image_vp).pow(2).mean())
    nt_err = float((out.trajectory[-1].float() - image_vp).pow(2).mean())
    print(f"bf16 model: reconstruction MSE ddim {plain_err:.3e}, null_text {nt_err:.3e}")
    assert nt_err < plain_err


@pytest.mark.unit
def test_cancel_interrupts_inversion(inv, tiny_sd15):
    import comfy.model_management as mm

    tiny = tiny_sd15
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            inv.run_inversion(tiny.model, image_latent(tiny, 8, 8), encode(tiny.clip, "a man"),
                              encode(tiny.clip, ""), inv.InversionSettings(method="null_text", steps=4))
    finally:
        mm.interrupt_current_processing(False)


# ---------------------------------------------------------------------------------------------------------------------
# the node and the stock-sampler continuation
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_nodes_registered_with_schema(pack, N):
    from comfyui_photoswap.nodes import NODE_CLASSES

    expected = {"PhotoswapNullTextInversion": "Photoswap Null-Text DDIM Inversion",
                "PhotoswapSaveInversion": "Photoswap Save Inversion",
                "PhotoswapLoadInversion": "Photoswap Load Inversion"}
    for cls in N.NODES:
        assert cls in NODE_CLASSES
        schema = cls.define_schema()
        assert expected[schema.node_id] == schema.display_name
        assert schema.category == "photoswap/inversion" and schema.description
        assert all(i.tooltip for i in schema.inputs), schema.node_id
    inv_schema = N.PhotoswapNullTextInversion.define_schema()
    assert [i.id for i in inv_schema.inputs] == ["model", "latent", "source_positive", "negative", "steps", "cfg",
                                                 "method", "inner_iterations", "early_stop_epsilon", "learning_rate",
                                                 "solver", "vae", "frame_options"]
    defaults = {i.id: getattr(i, "default", None) for i in inv_schema.inputs}
    assert defaults["steps"] == 50 and defaults["cfg"] == 7.5 and defaults["method"] == "null_text"
    assert defaults["inner_iterations"] == 10 and defaults["early_stop_epsilon"] == 1e-5
    assert defaults["learning_rate"] == 1e-2 and defaults["solver"] == "euler"
    assert next(i for i in inv_schema.inputs if i.id == "solver").optional  # API graphs without it keep running
    assert [o.display_name for o in inv_schema.outputs] == ["inversion", "z_T", "sigmas", "reconstruction"]
    assert N.PhotoswapSaveInversion.define_schema().is_output_node


@pytest.mark.integration
@pytest.mark.parametrize("family,sampler_name,cfg", [("sd15", "euler", 1.0), ("sd2v", "ddim", 1.0),
                                                     ("sdxl", "euler", 7.5)])
def test_stock_sampler_continues_from_z_t(N, request, folders, family, sampler_name, cfg):
    """Core SamplerCustom (add_noise off, our SIGMAS) from the node's z_T LATENT reproduces our own `ddim`-method
    source pass. The stock sampler ends in k-space at σ_N = σ(0) ≠ 0 and returns LATENT = x_k/scale with
    x_k = x_VP·√(1+σ_N²), so our VP reconstruction is compared as x_VP·√(1+σ_N²)/scale. At cfg 1 ComfyUI skips the
    uncond branch (our pass computes it and weights it 0); at cfg 7.5 on SDXL the uncond branch uses the negative's
    pooled output in both. (`direct` pins the trajectory, which no stock sampler does; cfg-1 sampling from its z_T
    only approximately returns to the image.)"""
    tiny = request.getfixturevalue(f"tiny_{family}")
    pos, neg = encode(tiny.clip, "a photo of a man"), encode(tiny.clip, "")
    out = run_node(N, tiny, image_latent(tiny, 12, 8), positive=pos, negative=neg, steps=6, cfg=cfg, method="ddim",
                   vae=tiny.vae)
    result, z_t, sigmas, image = out.result
    assert image.shape == (1, 96, 64, 3) and out.ui["images"] and "reconstruction error" in out.ui["text"][0]
    sigma0, sigma_n = float(sigmas[0]), float(sigmas[-1])
    assert torch.equal(sigmas, result.schedule.sigmas) and sigma_n > 0
    assert torch.allclose(z_t["samples"], result.z_t * math.sqrt(1 + sigma0 ** 2) / scale_of(tiny), rtol=0, atol=0)
    stock = stock_continuation(tiny.model, z_t, sigmas, pos, neg, cfg, sampler_name)
    ours = result.trajectory[-1] * math.sqrt(1 + sigma_n ** 2) / scale_of(tiny)
    err = float((stock - ours).abs().max())
    print(f"{family} cfg {cfg}: stock {sampler_name} vs ours max |Δ| {err:.2e} (max |x| {float(ours.abs().max()):.2f})")
    assert err <= 5e-5 * max(1.0, float(ours.abs().max()))


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------------
def _unsupported_model(class_name):
    import comfy.supported_models as sm

    config = object.__new__(getattr(sm, class_name))  # only the class matters to inspect_model
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))


@pytest.mark.integration
@pytest.mark.parametrize("case,input_name,fragment", [
    ("mixed_sizes", "latent", "one size"),  # a batch of frames is a clip (tests/test_clips.py); sizes must agree
    ("steps1", "steps", "at least 2 steps"),
    ("cfg0", "cfg", "> 0"),
    ("cfg_negative", "cfg", "> 0"),
    ("null_text_cfg1", "cfg", "cfg > 1"),
    ("nan", "latent", "NaN"),
    ("channels16", "latent", "4 latent channels"),
    ("video_latent", "latent", "video-model latent"),
    ("lr0", "learning_rate", "> 0"),
    ("two_entry_conditioning", "source_positive", "one entry"),
    ("flux2", "model", "Flux2"),  # Flux (dev/schnell) is supported since #17: tests/test_flux_swap.py
    ("sd3", "model", "SD3"),
])
def test_bad_inputs_are_refused_clearly(N, tiny_sd15, err_type, case, input_name, fragment):
    tiny = tiny_sd15
    latent = image_latent(tiny, 8, 8)
    pos = encode(tiny.clip, "a photo of a man")
    kwargs = dict(steps=4, cfg=7.5, method="direct")
    if case == "mixed_sizes":
        from comfy.nested_tensor import NestedTensor

        latent = NestedTensor([torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 6)])  # run_node wraps it
    elif case == "steps1":
        kwargs["steps"] = 1
    elif case == "cfg0":
        kwargs["cfg"] = 0.0
    elif case == "cfg_negative":
        kwargs["cfg"] = -1.0
    elif case == "null_text_cfg1":
        kwargs.update(cfg=1.0, method="null_text")
    elif case == "nan":
        latent = latent.clone()
        latent[0, 0, 0, 0] = float("nan")
    elif case == "channels16":
        latent = torch.zeros((1, 16, 8, 8))
    elif case == "video_latent":
        latent = torch.zeros((1, 4, 2, 8, 8))
    elif case == "lr0":
        kwargs.update(method="null_text", learning_rate=0.0)
    elif case == "two_entry_conditioning":
        pos = pos + encode(tiny.clip, "a dog")
    elif case in ("flux2", "sd3"):
        kwargs["model"] = _unsupported_model({"flux2": "Flux2", "sd3": "SD3"}[case])
    with pytest.raises(err_type) as info:
        run_node(N, tiny, latent, positive=pos, **kwargs)
    assert info.value.input_name == input_name, str(info.value)
    assert fragment in str(info.value)
    assert "Fix:" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------------------
class _NotSerialisable:
    pass


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    else:
        assert a == b


@pytest.fixture(scope="module")
def saved_sdxl(pack, tiny_sdxl):
    """A small SDXL inversion whose conditioning carries a pooled output, JSON options and an unstorable object."""
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion

    with torch.inference_mode():
        tiny = tiny_sdxl
        pos, neg = encode(tiny.clip, "a photo of a man"), encode(tiny.clip, "")
        pos = [[pos[0][0], dict(pos[0][1], width=96, crop_w=0, label="source", sizes=(64, 96), strength=1.0,
                                control=_NotSerialisable())]]
        result = run_inversion(tiny.model, image_latent(tiny, 12, 8), pos, neg,
                               InversionSettings(method="direct", steps=3))
    return result


@pytest.fixture(scope="module")
def null_text_sd15(pack, tiny_sd15):
    from comfyui_photoswap.photoswap_core.inversion import InversionSettings, run_inversion

    with torch.inference_mode():
        tiny = tiny_sd15
        return run_inversion(tiny.model, image_latent(tiny, 8, 8), encode(tiny.clip, "a photo of a man"),
                             encode(tiny.clip, ""), InversionSettings(method="null_text", steps=2, inner_iterations=2,
                                                                      learning_rate=0.05))


@pytest.mark.integration
@pytest.mark.parametrize("which", ["sdxl_direct", "sd15_null_text"])
def test_save_load_round_trip_is_bit_identical(N, io_mod, request, folders, caplog, which):
    from comfyui_photoswap.photoswap_core import inversion_files
    from comfyui_photoswap.photoswap_core.inversion import z_t_latent

    result = request.getfixturevalue({"sdxl_direct": "saved_sdxl", "sd15_null_text": "null_text_sd15"}[which])
    tiny = request.getfixturevalue("tiny_sdxl" if which == "sdxl_direct" else "tiny_sd15")
    with caplog.at_level("WARNING", logger="photoswap"):
        ui_text = N.PhotoswapSaveInversion.execute(inversion=result, filename_prefix="rt/test").ui["text"][0]
    path = folders["output"] / "photoswap" / "rt" / "test_00001.safetensors"
    assert path.is_file() and "photoswap/rt/test_00001.safetensors" in ui_text
    if which == "sdxl_direct":
        assert "source.control" in caplog.text  # the unstorable option is reported
    files = inversion_files.saved_inversion_files()
    assert files[0] == "photoswap/rt/test_00001.safetensors [output]"
    loaded, z_t, sigmas, source, negative = N.PhotoswapLoadInversion.execute(inversion_file=files[0],
                                                                             model=tiny.model).result
    for name in ("trajectory", "inversion_latents", "null_embeddings", "latent_shape", "weights_fingerprint",
                 "latent_fingerprint", "inner_iterations", "negative_conditioning"):
        _assert_same(getattr(result, name), getattr(loaded, name))
    assert loaded.settings == result.settings and loaded.arch == result.arch
    assert loaded.schedule.timesteps == result.schedule.timesteps
    _assert_same(loaded.schedule.sigmas, result.schedule.sigmas)
    expected_options = {k: v for k, v in result.source_conditioning[0][1].items() if k != "control"}
    _assert_same(loaded.source_conditioning, [[result.source_conditioning[0][0], expected_options]])
    assert source is loaded.source_conditioning and negative is loaded.negative_conditioning
    _assert_same(sigmas, result.schedule.sigmas)
    _assert_same(z_t["samples"], z_t_latent(result)["samples"])
    # saving the loaded inversion writes the same bytes (no timestamps; deterministic)
    N.PhotoswapSaveInversion.execute(inversion=loaded, filename_prefix="rt/test")
    second = path.with_name("test_00002.safetensors")
    assert second.read_bytes() == path.read_bytes()
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    meta = json.loads(header["__metadata__"]["photoswap_inversion"])
    from comfyui_photoswap import __version__

    assert meta["pack_version"] == __version__ and meta["method"] == result.settings.method
    assert meta["steps"] == result.schedule.steps and meta["model"]["family"] == result.arch.family
    assert meta["latent_shape"] == list(result.latent_shape)


def _write_bad_copies(path, tmp_path):
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    copies = {"truncated": data[: len(data) // 2], "tiny": data[:5]}
    flipped = bytearray(data)
    flipped[-3] ^= 0x40  # last tensor bytes: size unchanged, data damaged
    copies["flipped"] = bytes(flipped)

    def with_metadata(**changes):
        h = json.loads(json.dumps(header))
        meta = json.loads(h["__metadata__"]["photoswap_inversion"])
        meta.update(changes)
        h["__metadata__"]["photoswap_inversion"] = json.dumps(meta)
        raw = json.dumps(h).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + data[8 + header_len:]

    copies["version"] = with_metadata(format_version=99)
    copies["not_ours"] = with_metadata(format="something-else")
    no_meta = json.loads(json.dumps(header))
    del no_meta["__metadata__"]
    raw = json.dumps(no_meta).encode()
    raw += b" " * (-len(raw) % 8)
    copies["no_metadata"] = struct.pack("<Q", len(raw)) + raw + data[8 + header_len:]
    out = {}
    for name, content in copies.items():
        p = tmp_path / f"bad_{name}.safetensors"
        p.write_bytes(content)
        out[name] = p
    return out


@pytest.mark.integration
def test_load_errors_are_clear(N, io_mod, saved_sdxl, tiny_sdxl, tiny_sd15, folders, err_type, caplog, tmp_path):
    from comfyui_photoswap.photoswap_core import inversion_files

    path = folders["output"] / "photoswap" / "x_00001.safetensors"
    io_mod.save_inversion(saved_sdxl, path)
    bad = _write_bad_copies(path, folders["input"])
    expectations = {"truncated": "truncated", "tiny": "truncated", "flipped": "checksum",
                    "version": "newer comfyui-photoswap", "not_ours": "without Photoswap inversion metadata",
                    "no_metadata": "without Photoswap inversion metadata"}
    for name, fragment in expectations.items():
        with pytest.raises(err_type) as info:
            N.PhotoswapLoadInversion.execute(inversion_file=f"bad_{name}.safetensors", model=tiny_sdxl.model)
        assert info.value.input_name == "inversion_file" and fragment in str(info.value), (name, str(info.value))
    with pytest.raises(err_type, match="not found"):
        io_mod.load_inversion(folders["output"] / "photoswap" / "missing.safetensors")
    with pytest.raises(err_type, match="none found"):
        inversion_files.resolve_inversion_file(inversion_files.NO_FILES)
    with pytest.raises(err_type, match="pick a file from the list"):
        inversion_files.resolve_inversion_file("../../etc/passwd")

    good = "photoswap/x_00001.safetensors [output]"
    # another family
    with pytest.raises(err_type) as info:
        N.PhotoswapLoadInversion.execute(inversion_file=good, model=tiny_sd15.model)
    assert info.value.input_name == "model" and "sdxl" in str(info.value) and "sd1" in str(info.value)
    # same family, other weights (a LoRA-like weight patch)
    patched = tiny_sdxl.model.clone()
    key = next(k for k in tiny_sdxl.model.model.diffusion_model.state_dict() if k.endswith("proj_in.weight"))
    weight = tiny_sdxl.model.model.diffusion_model.state_dict()[key]
    patched.add_patches({f"diffusion_model.{key}": (torch.ones_like(weight),)}, 0.1)
    with pytest.raises(err_type) as info:
        N.PhotoswapLoadInversion.execute(inversion_file=good, model=patched)
    assert "weights fingerprint differs" in str(info.value)
    assert "load the same checkpoint/LoRAs, or re-run the inversion" in str(info.value)
    # latent size: error; same size, other values: warning
    with pytest.raises(err_type) as info:
        N.PhotoswapLoadInversion.execute(inversion_file=good, model=tiny_sdxl.model,
                                         latent={"samples": image_latent(tiny_sdxl, 8, 12)})
    assert info.value.input_name == "latent" and "12×8" in str(info.value)
    with caplog.at_level("WARNING", logger="photoswap"):
        N.PhotoswapLoadInversion.execute(inversion_file=good, model=tiny_sdxl.model,
                                         latent={"samples": image_latent(tiny_sdxl, 12, 8, seed=5)})
    assert "differs from the one that was inverted" in caplog.text
    loaded, _ = io_mod.load_inversion(path)
    io_mod.check_steps(loaded, 3)
    with pytest.raises(err_type, match="3 steps"):
        io_mod.check_steps(loaded, 50)
    # the same weights: passes (fingerprint independent of thread count)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        io_mod.check_model(loaded, tiny_sdxl.model)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
def test_save_prefix_outside_output_refused(N, saved_sdxl, folders, err_type):
    with pytest.raises(err_type) as info:
        N.PhotoswapSaveInversion.execute(inversion=saved_sdxl, filename_prefix="../../escape")
    assert info.value.input_name == "filename_prefix"
    assert not list(folders["output"].parent.glob("escape*"))


# ---------------------------------------------------------------------------------------------------------------------
# real server
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_null_text_inversion_in_real_server(comfy_server, io_mod):
    """Load Image → VAE Encode → null-text inversion (2 steps × 2 iterations, 64×64 px, random full SD1.5) → Save
    Inversion through /prompt: gradients work inside the server's inference mode. Then Load Inversion → Save again
    (same model, fingerprint check in the server) writes the same bytes."""
    from PIL import Image

    from devtools.checkpoints import checkpoint_path

    ckpt = checkpoint_path("sd15").name
    gradient = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    gradient.save(comfy_server.input_dir / "photoswap_inversion_e2e.png")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a man", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "photoswap_inversion_e2e.png"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "PhotoswapNullTextInversion",
              "inputs": {"model": ["1", 0], "latent": ["5", 0], "source_positive": ["2", 0], "negative": ["3", 0],
                         "steps": 2, "cfg": 7.5, "method": "null_text", "inner_iterations": 2,
                         "early_stop_epsilon": 1e-5, "learning_rate": 0.01}},
        "7": {"class_type": "PhotoswapSaveInversion", "inputs": {"inversion": ["6", 0], "filename_prefix": "e2e/inv"}},
    }
    result = comfy_server.run(graph, timeout=600)
    print(f"null-text inversion through /prompt: {result.seconds:.1f} s")
    saved = comfy_server.output_dir / "photoswap" / "e2e" / "inv_00001.safetensors"
    assert saved.is_file()
    assert "saved photoswap/e2e/inv_00001.safetensors" in json.dumps(result.outputs["7"])
    assert "reconstruction error" in json.dumps(result.outputs["6"])
    loaded, meta = io_mod.load_inversion(saved)
    assert meta["method"] == "null_text" and meta["steps"] == 2 and meta["model"]["family"] == "sd1"
    assert len(loaded.inner_iterations) == 2 and all(1 <= k <= 2 for k in loaded.inner_iterations)
    assert torch.isfinite(loaded.null_embeddings).all()
    start = loaded.negative_conditioning[0][0].float()
    assert float((loaded.null_embeddings[0] - start).abs().max()) > 1e-4  # the embedding was optimised
    reload = {
        "1": graph["1"],
        "8": {"class_type": "PhotoswapLoadInversion",
              "inputs": {"inversion_file": "photoswap/e2e/inv_00001.safetensors [output]", "model": ["1", 0]}},
        "9": {"class_type": "PhotoswapSaveInversion", "inputs": {"inversion": ["8", 0], "filename_prefix": "e2e/inv"}},
    }
    comfy_server.run(reload, timeout=300)
    again = saved.with_name("inv_00002.safetensors")
    assert again.read_bytes() == saved.read_bytes()
