"""``FewstepScheduler`` inside real diffusers pipelines (tiny random-weight UNet2DConditionModel + AutoencoderKL).

Proves: a pipeline driven by the scheduler gives the samples of ``fewstep.sample`` on the same network, guidance,
grid and noise, with exactly as many network calls; parity with diffusers' own schedulers configured to the same
method; img2img; stochastic solvers seeded by the pipeline's generator; per-run state reset by ``set_timesteps``;
clear errors.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

import tiny_pipelines as tiny  # noqa: E402
from fewstep import ClassifierFreeGuidance, NFECounter, from_diffusers, make_solver, sample  # noqa: E402
from fewstep.scheduler import FewstepScheduler  # noqa: E402

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    unet, vae = tiny.sd_unet(), tiny.vae()
    calls = []
    unet.register_forward_hook(lambda *_: calls.append(1))
    emb, neg = torch.randn(1, 5, 12), torch.randn(1, 5, 12)
    return unet, vae, calls, emb, neg


def make_pipe(parts, cls_name="StableDiffusionPipeline"):
    unet, vae, *_ = parts
    cls = getattr(diffusers, cls_name)
    pipe = cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
               scheduler=diffusers.DDIMScheduler(**SD, clip_sample=False), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, parts, scheduler, steps, seed=1, **kw):
    _, _, calls, emb, neg = parts
    pipe.scheduler = scheduler
    calls.clear()
    out = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=GUIDANCE,
               output_type="latent", generator=torch.Generator().manual_seed(seed), **kw).images
    return out, len(calls)


def on_the_scheduler_grid(den, scheduler, solver, cond, *, side=8):
    """``fewstep.sample`` on the scheduler's planned grid from the noise a pipeline draws with seed 1."""
    x_init = randn_tensor((1, 4, side, side), generator=torch.Generator().manual_seed(1))
    return sample(den, solver, torch.tensor(scheduler._plan.times, dtype=torch.float64), x_init=x_init, cond=cond)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spec", ["ddim", "dpmpp_2m", "dpmpp_3m", "heun", "dpm_solver_2", "dpm_solver_3", "unipc",
                                  "deis", "ipndm", "sa_solver:tau=0", "hb", "ghvb", "evodiff", "bdia"])
@pytest.mark.parametrize("grid", ["diffusers", "time_quadratic", "karras"])
def test_pipeline_equals_fewstep_sample(parts, spec, grid, prediction):
    """The scheduler inside StableDiffusionPipeline = fewstep.sample with the same guidance, grid and noise, and
    the network is called exactly as often (the pipeline batches its two guidance branches into one call)."""
    unet, _, _, emb, neg = parts
    name, *knobs = spec.split(":")
    options = {k: float(v) for k, v in (kv.split("=") for kv in knobs)}
    base = diffusers.DDIMScheduler(**SD, clip_sample=False, prediction_type=prediction)
    scheduler = FewstepScheduler.from_config(base.config, solver=name, grid=grid, **options)
    steps = 5
    got, calls = run(make_pipe(parts), parts, scheduler, steps, height=16, width=16)
    den = ClassifierFreeGuidance(from_diffusers(unet, base.config), GUIDANCE, uncond={"encoder_hidden_states": neg})
    x_init = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    counter = NFECounter()
    grid_times = torch.tensor(scheduler._plan.times, dtype=torch.float64)
    want = sample(den, make_solver(name, **options), grid_times, x_init=x_init,
                  cond={"encoder_hidden_states": emb}, hooks=[counter])
    assert rel(got, want) < 1e-5
    assert calls == counter.nfe == len(scheduler.timesteps)
    if grid == "diffusers":
        base.set_timesteps(steps)
        assert torch.equal(scheduler.timesteps[:: scheduler.order][:steps], base.timesteps)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("peer,solver", [("DDIMScheduler", "ddim"), ("DPMSolverMultistepScheduler", "dpmpp_2m"),
                                         ("UniPCMultistepScheduler", "unipc")])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_parity_with_diffusers_schedulers(parts, peer, solver, prediction, spacing):
    """Configured to the same method on the base scheduler's own timesteps, the pipeline gives diffusers' latents."""
    if peer == "DDIMScheduler" and spacing == "linspace":
        pytest.skip("diffusers' DDIM steps to t - N // steps, not to its next linspace timestep (docs/parity.md)")
    extra = {"set_alpha_to_one": True, "clip_sample": False} if peer == "DDIMScheduler" else {}
    base = getattr(diffusers, peer)(**SD, **extra, prediction_type=prediction, timestep_spacing=spacing,
                                    steps_offset=1 if spacing == "leading" else 0)
    pipe = make_pipe(parts)
    for steps in (5, 8):
        want, want_calls = run(pipe, parts, type(base).from_config(base.config), steps, height=16, width=16)
        got, calls = run(pipe, parts, FewstepScheduler.from_config(base.config, solver=solver), steps,
                         height=16, width=16)
        assert rel(got, want) < 1e-5 and calls == want_calls == steps


def test_img2img_matches_ddim(parts):
    """StableDiffusionImg2ImgPipeline (strength slices the timesteps and calls set_begin_index + add_noise)."""
    pipe = make_pipe(parts, "StableDiffusionImg2ImgPipeline")
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    base = diffusers.DDIMScheduler(**SD, set_alpha_to_one=True, clip_sample=False, timestep_spacing="trailing")
    want, want_calls = run(pipe, parts, diffusers.DDIMScheduler.from_config(base.config), 10, image=image,
                           strength=0.6)
    got, calls = run(pipe, parts, FewstepScheduler.from_config(base.config, solver="ddim"), 10, image=image,
                     strength=0.6)
    assert calls == want_calls == 6 and rel(got, want) < 1e-5


def test_img2img_with_a_two_evaluation_solver(parts):
    pipe = make_pipe(parts, "StableDiffusionImg2ImgPipeline")
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    scheduler = FewstepScheduler.from_config(diffusers.DDIMScheduler(**SD, clip_sample=False).config, solver="heun",
                                             grid="time_quadratic")
    out, calls = run(pipe, parts, scheduler, 10, image=image, strength=0.5)
    assert calls == 2 * 5 - 1 and torch.isfinite(out).all()  # 5 steps, the last one to zero costs one evaluation


def test_custom_timesteps_are_the_grid(parts):
    unet, _, _, emb, neg = parts
    base = diffusers.DDIMScheduler(**SD, clip_sample=False)
    scheduler = FewstepScheduler.from_config(base.config, solver="dpmpp_2m")
    got, calls = run(make_pipe(parts), parts, scheduler, None, timesteps=[999, 749, 499, 249], height=16, width=16)
    assert calls == 4 and scheduler._plan.times == [1.0, 0.75, 0.5, 0.25, 0.0]
    den = ClassifierFreeGuidance(from_diffusers(unet, base.config), GUIDANCE, uncond={"encoder_hidden_states": neg})
    x_init = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    want = sample(den, "dpmpp_2m", [1.0, 0.75, 0.5, 0.25, 0.0], x_init=x_init, cond={"encoder_hidden_states": emb})
    assert rel(got, want) < 1e-5


def test_stochastic_solver_takes_the_pipeline_generator(parts):
    pipe = make_pipe(parts)
    cfg = diffusers.DDIMScheduler(**SD, clip_sample=False).config
    a, _ = run(pipe, parts, FewstepScheduler.from_config(cfg, solver="dpmpp_2m_sde"), 6, seed=3, height=16, width=16)
    b, _ = run(pipe, parts, FewstepScheduler.from_config(cfg, solver="dpmpp_2m_sde"), 6, seed=3, height=16, width=16)
    c, _ = run(pipe, parts, FewstepScheduler.from_config(cfg, solver="dpmpp_2m_sde"), 6, seed=4, height=16, width=16)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_runs_are_independent_and_reset_by_set_timesteps(parts):
    pipe = make_pipe(parts)
    scheduler = FewstepScheduler.from_config(diffusers.DDIMScheduler(**SD, clip_sample=False).config, solver="unipc")
    a, _ = run(pipe, parts, scheduler, 6, height=16, width=16)
    b, _ = run(pipe, parts, scheduler, 6, height=16, width=16)
    other = FewstepScheduler.from_config(scheduler.config)
    for s in (scheduler, other):
        s.set_timesteps(6)
    x = torch.randn(1, 4, 8, 8)
    outs = [s.step(torch.zeros_like(x), s.timesteps[0], x).prev_sample for s in (scheduler, other)]
    assert torch.equal(a, b) and torch.equal(outs[0], outs[1])


def test_save_and_load_keep_the_choice(tmp_path):
    config = diffusers.DDIMScheduler(**SD, clip_sample=False).config
    scheduler = FewstepScheduler.from_config(config, solver="sa_solver", tau=0, grid="karras")
    scheduler.save_pretrained(tmp_path)
    again = FewstepScheduler.from_pretrained(tmp_path)
    assert again.config["solver"] == "sa_solver" and again.config["solver_options"] == {"tau": 0}
    assert again.config["grid"] == "karras" and again.config["base_scheduler"] == "DDIMScheduler"
    for s in (scheduler, again):
        s.set_timesteps(7)
    assert torch.equal(scheduler.timesteps, again.timesteps)


def test_base_class_is_recognised_from_a_bare_config():
    for cls in (diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler, diffusers.EulerDiscreteScheduler,
                diffusers.FlowMatchEulerDiscreteScheduler):
        assert FewstepScheduler.from_config(cls().config).config["base_scheduler"] == cls.__name__


def test_errors():
    cfg = diffusers.DDIMScheduler(**SD, clip_sample=False).config
    with pytest.raises(ValueError, match="did you mean 'dpmpp_2m'"):
        FewstepScheduler.from_config(cfg, solver="dpmpp2m")
    with pytest.raises(TypeError, match="etta"):
        FewstepScheduler.from_config(cfg, solver="ddim", etta=1)
    with pytest.raises(ValueError, match="did you mean 'karras'"):
        FewstepScheduler.from_config(cfg, grid="karas")
    with pytest.raises(ValueError, match="run it with fewstep.sample"):
        FewstepScheduler.from_config(cfg, solver="f_ddim")
    s = FewstepScheduler.from_config(cfg, grid="karras")
    with pytest.raises(ValueError, match="call set_timesteps before step"):
        s.step(torch.zeros(1, 4), 999, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="use grid='diffusers'"):
        s.set_timesteps(timesteps=[999, 500])
    s.set_timesteps(2)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="expected"):
        s.step(x, 3, x)
    s.set_timesteps(2)
    for t in s.timesteps:
        x = s.step(torch.zeros(1, 4), t, x).prev_sample
    with pytest.raises(ValueError, match="after the last timestep"):
        s.step(x, s.timesteps[-1], x)


# ---------------------------------------------------------------- flow pipelines: SD3 (static shift), Flux (dynamic)


@pytest.fixture(scope="module")
def sd3():
    return tiny.sd3_pipeline()


def run_sd3(sd3, scheduler, steps=5):
    pipe, _, cond, uncond = sd3
    pipe.scheduler = scheduler
    return pipe(**tiny.sd3_call(cond, uncond, steps=steps, guidance=GUIDANCE), output_type="latent",
                generator=torch.Generator().manual_seed(1)).images


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "heun", "unipc", "dpmpp_3m"])
@pytest.mark.parametrize("grid", ["diffusers", "time_uniform"])
def test_sd3_pipeline_equals_fewstep_sample(sd3, solver, grid):
    pipe, base, cond, uncond = sd3
    scheduler = FewstepScheduler.from_config(base.config, solver=solver, grid=grid)
    got = run_sd3(sd3, scheduler)
    den = ClassifierFreeGuidance(from_diffusers(pipe.transformer, base.config), GUIDANCE, uncond=uncond)
    want = on_the_scheduler_grid(den, scheduler, solver, cond, side=8)
    assert rel(got, want) < (1e-4 if solver == "heun" else 1e-5)


def test_sd3_parity_with_flow_match_euler(sd3):
    _, base, _, _ = sd3
    want = run_sd3(sd3, diffusers.FlowMatchEulerDiscreteScheduler.from_config(base.config))
    got = run_sd3(sd3, FewstepScheduler.from_config(base.config, solver="euler"))
    assert rel(got, want) < 1e-5


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    net = tiny.flux_transformer()
    base = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                     max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = diffusers.FluxPipeline(scheduler=base, vae=tiny.vae(), text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=net)
    pipe.set_progress_bar_config(disable=True)
    cond = {"encoder_hidden_states": torch.randn(1, 5, 12), "pooled_projections": torch.randn(1, 12)}
    return pipe, base, cond


def run_flux(flux, scheduler, steps=5):
    pipe, _, cond = flux
    pipe.scheduler = scheduler
    packed = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                  num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(1),
                  height=32, width=32).images
    return pipe._unpack_latents(packed, 32, 32, pipe.vae_scale_factor)


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "heun", "unipc"])
@pytest.mark.parametrize("grid", ["diffusers", "time_uniform"])
def test_flux_pipeline_equals_fewstep_sample(flux, solver, grid):
    """Flux passes sigmas= and mu= (dynamic shifting on the 8 x 8 = 64 packed tokens of a 32 x 32 image)."""
    pipe, base, cond = flux
    scheduler = FewstepScheduler.from_config(base.config, solver=solver, grid=grid)
    got = run_flux(flux, scheduler)
    den = from_diffusers(pipe.transformer, base.config, image_seq_len=64)
    want = on_the_scheduler_grid(den, scheduler, solver, cond, side=16)
    assert rel(got, want) < (1e-4 if solver == "heun" else 1e-5)


def test_flux_parity_with_flow_match_euler(flux):
    _, base, _ = flux
    want = run_flux(flux, diffusers.FlowMatchEulerDiscreteScheduler.from_config(base.config))
    got = run_flux(flux, FewstepScheduler.from_config(base.config, solver="euler"))
    assert rel(got, want) < 1e-5


def test_dynamic_shifting_needs_mu(flux):
    _, base, _ = flux
    with pytest.raises(ValueError, match="pass mu="):
        FewstepScheduler.from_config(base.config).set_timesteps(5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_scheduler_loop_parity(prediction):
    """A pipeline's loop (scale_model_input, network, step) with EDM preconditioning, against EDMEulerScheduler."""
    from tiny_pipelines import unet2d

    torch.manual_seed(0)
    net = unet2d(1).eval()
    base = diffusers.EDMEulerScheduler(prediction_type=prediction)

    def loop(scheduler, steps=6):
        scheduler.set_timesteps(steps)
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = net(scheduler.scale_model_input(x, t), t).sample
                x = scheduler.step(out, t, x).prev_sample
        return x

    assert rel(loop(FewstepScheduler.from_config(base.config, solver="euler")), loop(base)) < 1e-5


# ---------------------------------------------------------------- SDXL (added_cond_kwargs) and DiT (class labels)


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(0)
    unet = tiny.sdxl_unet()
    # SDXL's own scheduler config: Euler, leading spacing, steps_offset 1
    base = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=tiny.vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=base)
    pipe.set_progress_bar_config(disable=True)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])  # original size, crop, target size
    cond = {"encoder_hidden_states": torch.randn(1, 5, 12),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 12), "time_ids": time_ids}}
    uncond = {"encoder_hidden_states": torch.randn(1, 5, 12),
              "added_cond_kwargs": {"text_embeds": torch.randn(1, 12), "time_ids": time_ids}}
    return pipe, base, cond, uncond


def run_sdxl(sdxl, scheduler, steps=5):
    pipe, _, cond, uncond = sdxl
    pipe.scheduler = scheduler
    return pipe(prompt_embeds=cond["encoder_hidden_states"],
                pooled_prompt_embeds=cond["added_cond_kwargs"]["text_embeds"],
                negative_prompt_embeds=uncond["encoder_hidden_states"],
                negative_pooled_prompt_embeds=uncond["added_cond_kwargs"]["text_embeds"], num_inference_steps=steps,
                guidance_scale=GUIDANCE, output_type="latent", generator=torch.Generator().manual_seed(1),
                height=16, width=16).images


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "heun"])
def test_sdxl_pipeline_equals_fewstep_sample(sdxl, solver):
    pipe, base, cond, uncond = sdxl
    scheduler = FewstepScheduler.from_config(base.config, solver=solver)
    got = run_sdxl(sdxl, scheduler)
    den = ClassifierFreeGuidance(from_diffusers(pipe.unet, base.config), GUIDANCE, uncond=uncond)
    want = on_the_scheduler_grid(den, scheduler, solver, cond, side=8)
    assert rel(got, want) < (1e-4 if solver == "heun" else 1e-5)


def test_sdxl_parity_with_euler_discrete(sdxl):
    _, base, _, _ = sdxl
    want = run_sdxl(sdxl, diffusers.EulerDiscreteScheduler.from_config(base.config))
    got = run_sdxl(sdxl, FewstepScheduler.from_config(base.config, solver="euler"))
    assert rel(got, want) < 1e-5


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    net = tiny.dit_transformer()
    pipe = diffusers.DiTPipeline(transformer=net, vae=tiny.vae(), scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_dit(pipe, scheduler, steps=5):
    pipe.scheduler = scheduler
    images = pipe(class_labels=[3, 7], num_inference_steps=steps, guidance_scale=2.0, output_type="np",
                  generator=torch.Generator().manual_seed(1)).images
    return torch.as_tensor(images)


def test_dit_pipeline_parity_with_ddim(dit):
    base = diffusers.DDIMScheduler(clip_sample=False)
    want = run_dit(dit, diffusers.DDIMScheduler.from_config(base.config))
    got = run_dit(dit, FewstepScheduler.from_config(base.config, solver="ddim"))
    assert rel(got, want) < 1e-5
    for solver in ("unipc", "heun", "dpmpp_2m_sde"):
        assert torch.isfinite(run_dit(dit, FewstepScheduler.from_config(base.config, solver=solver))).all()


def test_clip_sample_clips_x0_and_thresholding_is_refused():
    cfg = diffusers.DDIMScheduler(clip_sample=True, clip_sample_range=0.5).config
    s = FewstepScheduler.from_config(cfg, solver="ddim", grid="karras")
    s.set_timesteps(1)
    x = torch.randn(2, 4) * 5
    out = s.step(torch.zeros_like(x), s.timesteps[0], x).prev_sample  # eps = 0: x0_hat = x / alpha, then clipped
    assert float(out.abs().max()) <= 0.5
    with pytest.raises(ValueError, match="thresholding=True"):
        FewstepScheduler.from_config(diffusers.DDIMScheduler(thresholding=True).config)


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_matches_ddim(parts, strength):
    """StableDiffusionInpaintPipeline on a 4-channel UNet re-noises the kept region with add_noise at the next
    timestep after every step."""
    pipe = make_pipe(parts, "StableDiffusionInpaintPipeline")
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    base = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    kw = dict(image=image, mask_image=mask, strength=strength, height=16, width=16)
    want, want_calls = run(pipe, parts, diffusers.DDIMScheduler.from_config(base.config), 8, **kw)
    got, calls = run(pipe, parts, FewstepScheduler.from_config(base.config, solver="ddim"), 8, **kw)
    assert calls == want_calls and rel(got, want) < 1e-5


def test_from_diffusers_dynamic_shift_defaults_to_the_model_size_and_holds_to_it(flux):
    pipe, base, cond = flux
    den = from_diffusers(pipe.transformer, base.config)  # Flux's default latent: 128 x 128 -> 4096 tokens
    assert den.shift_size == (128, 128) and den.sample_shape == (4, 128, 128)
    assert den.schedule.shift == pytest.approx(float(torch.tensor(1.15).exp()))  # max_shift at max_image_seq_len
    with pytest.raises(ValueError, match="flow shift is for 128x128 latents"):
        den(torch.zeros(1, 4, 16, 16), 0.5, cond)
    sized = from_diffusers(pipe.transformer, base.config, image_seq_len=64)
    assert sized.shift_size is None and sized(torch.zeros(1, 4, 16, 16), 0.5, cond).shape == (1, 4, 16, 16)


@pytest.mark.parametrize("base_class", ["EulerDiscreteScheduler", "DDIMScheduler"])
def test_published_sigmas_are_the_grid(parts, base_class):
    """AYS-style k-diffusion sigmas passed to the pipeline (sigma / alpha of a VP model) become the grid, whether
    the base scheduler takes sigmas itself (Euler) or not (DDIM)."""
    unet, _, _, emb, neg = parts
    ays = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]  # SD 1.5, 10 steps
    base = getattr(diffusers, base_class)(**SD, **({"clip_sample": False} if base_class == "DDIMScheduler" else {}))
    scheduler = FewstepScheduler.from_config(base.config, solver="dpmpp_2m")
    got, calls = run(make_pipe(parts), parts, scheduler, None, sigmas=ays, height=16, width=16)
    times = scheduler._plan.times
    sched = scheduler._schedule
    # as in diffusers' Euler, the last sigma is where sampling ends (not 0): 10 steps, 10 network calls. The list is
    # rounded past the table at both ends (14.615 > 14.6146, 0.029 < 0.02916): those two sit on the table's ends
    smax = sched.sigma(sched.t_max) / sched.alpha(sched.t_max)
    assert calls == len(ays) - 1 and len(times) == len(ays) and times[-1] == sched.t_min
    assert [sched.sigma(t) / sched.alpha(t) for t in times[:-1]] == pytest.approx([smax, *ays[1:-1]], rel=1e-6)
    den = ClassifierFreeGuidance(from_diffusers(unet, base.config), GUIDANCE, uncond={"encoder_hidden_states": neg})
    x_init = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
    want = sample(den, "dpmpp_2m", times, x_init=x_init, cond={"encoder_hidden_states": emb})
    assert rel(got, want) < 1e-5


# ---------------------------------------------------------------- review findings, each failing before its fix


def test_latents_changed_by_the_pipeline_between_steps_are_taken(parts):
    """A step-end callback that rescales the latents (as inpainting re-noises the kept region): the next solver
    step starts from the changed latents, as diffusers' schedulers do."""
    pipe = make_pipe(parts)
    base = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")

    def halve_at_1(pipe_, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}

    kw = dict(height=16, width=16, callback_on_step_end=halve_at_1)
    want, _ = run(pipe, parts, diffusers.DDIMScheduler.from_config(base.config), 5, **kw)
    got, _ = run(pipe, parts, FewstepScheduler.from_config(base.config, solver="ddim"), 5, **kw)
    assert rel(got, want) < 1e-5


def test_another_solver_or_grid_starts_from_its_own_defaults():
    cfg = diffusers.DDIMScheduler(**SD, clip_sample=False).config
    a = FewstepScheduler.from_config(cfg, solver="sa_solver", tau=0, grid="karras", grid_options={"rho": 5})
    b = FewstepScheduler.from_config(a.config, solver="euler", grid="logsnr")
    assert b.config["solver_options"] == {} and b.config["grid_options"] == {}
    c = FewstepScheduler.from_config(a.config)  # same solver and grid: their knobs are kept
    assert c.config["solver_options"] == {"tau": 0} and c.config["grid_options"] == {"rho": 5}


def test_bad_grid_knob_fails_when_built():
    with pytest.raises(TypeError, match="grid 'karras'.*rh"):
        FewstepScheduler.from_config(diffusers.DDIMScheduler(**SD).config, grid="karras", grid_options={"rh": 7})


def test_learned_variance_output_is_split_off():
    """DeepFloyd IF-style configs (variance_type learned_range): the network returns eps and a variance."""
    cfg = diffusers.DDPMScheduler(variance_type="learned_range").config
    outs = []
    for with_variance in (False, True):
        s = FewstepScheduler.from_config(cfg, solver="ddim")
        s.set_timesteps(4)
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        eps = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        output = torch.cat([eps, torch.randn(1, 3, 8, 8)], dim=1) if with_variance else eps
        outs.append(s.step(output, s.timesteps[0], x).prev_sample)
    assert torch.equal(outs[0], outs[1])


def test_low_precision_pipelines_keep_a_float32_state():
    s = FewstepScheduler.from_config(diffusers.DDIMScheduler(**SD).config, solver="dpmpp_2m")
    s.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8).half()
    out = s.step(torch.randn(1, 4, 8, 8).half(), s.timesteps[0], x).prev_sample
    assert out.dtype == torch.float16 and s._run.x.dtype == torch.float32
