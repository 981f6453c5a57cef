"""``enable_cache(pipe, spec)``: caches on a diffusers pipeline's own network, with fewstep's and diffusers'
schedulers. A pipeline with a cache gives the samples of ``fewstep.sample`` with the same cache under guidance;
a cache that never reuses changes nothing; ``disable_cache`` leaves the network as it was."""

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import tiny_pipelines as tiny
from fewstep import ClassifierFreeGuidance, from_diffusers, sample
from fewstep.caching import BlockCache, CacheStats, DeepCache, TaylorSeer, disable_cache, enable_cache
from fewstep.scheduler import FewstepScheduler

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # Stable Diffusion's betas
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny.vae(), text_encoder=None, tokenizer=None, unet=tiny.sd_unet(),
        scheduler=diffusers.DDIMScheduler(**SD, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, torch.randn(1, 5, 12), torch.randn(1, 5, 12)


def run_sd(sd, scheduler, steps=10):
    pipe, emb, neg = sd
    pipe.scheduler = scheduler
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=GUIDANCE,
                output_type="latent", generator=torch.Generator().manual_seed(1), height=16, width=16).images


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _state(net):
    return ({k: list(m) if isinstance(m, torch.nn.ModuleList) else m for k, m in net._modules.items()},
            len(net._forward_hooks), len(net._forward_pre_hooks))


def test_pipeline_cache_equals_fewstep_sample_with_the_cache_under_guidance(sd):
    pipe, emb, neg = sd
    base = pipe.scheduler.config
    scheduler = FewstepScheduler.from_config(base, solver="ddim")
    handle = enable_cache(pipe, "deepcache:interval=3")
    try:
        got = run_sd(sd, scheduler)
        assert handle.stats.reused == 6 and handle.stats.reused_steps == [1, 2, 4, 5, 7, 8]
    finally:
        disable_cache(pipe)
    den = ClassifierFreeGuidance(DeepCache(from_diffusers(pipe.unet, base), interval=3), GUIDANCE,
                                 uncond={"encoder_hidden_states": neg})
    x_init = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    stats = CacheStats()
    want = sample(den, "ddim", torch.tensor(scheduler._plan.times, dtype=torch.float64), x_init=x_init,
                  cond={"encoder_hidden_states": emb}, hooks=[stats])
    assert rel(got, want) < 1e-5
    assert stats.reused == 2 * 6  # one state per branch here, one batched pass in the pipeline


@pytest.mark.parametrize("make", [lambda c: diffusers.DPMSolverMultistepScheduler.from_config(c),
                                  lambda c: diffusers.HeunDiscreteScheduler.from_config(c),
                                  lambda c: FewstepScheduler.from_config(c, solver="heun")])
def test_no_reuse_changes_nothing_with_any_scheduler_and_disable_restores(sd, make):
    pipe = sd[0]
    before = _state(pipe.unet)
    plain = run_sd(sd, make(pipe.scheduler.config), steps=6)
    handle = enable_cache(pipe, "deepcache:interval=1")
    assert torch.equal(run_sd(sd, make(pipe.scheduler.config), steps=6), plain)
    assert handle.stats.reused == 0 and handle.stats.full == len(pipe.scheduler.timesteps)
    enable_cache(pipe, "deepcache:interval=2")  # replaces the first: blocks wrapped once
    cached = run_sd(sd, make(pipe.scheduler.config), steps=6)
    assert not torch.equal(cached, plain)
    second = run_sd(sd, make(pipe.scheduler.config), steps=6)  # a new run starts from a fresh state
    assert torch.equal(second, cached)
    disable_cache(pipe)
    assert _state(pipe.unet) == before
    assert torch.equal(run_sd(sd, make(pipe.scheduler.config), steps=6), plain)


@pytest.fixture(scope="module")
def sd3():
    return tiny.sd3_pipeline(layers=3)


def run_sd3(sd3, scheduler, steps=8):
    pipe, _, cond, uncond = sd3
    pipe.scheduler = scheduler
    return pipe(**tiny.sd3_call(cond, uncond, steps=steps, guidance=GUIDANCE), output_type="latent",
                generator=torch.Generator().manual_seed(1)).images


@pytest.mark.parametrize(("spec", "make"), [("taylorseer:interval=3:order=1", lambda d: TaylorSeer(d, interval=3)),
                                            ("block:threshold=0.3", lambda d: BlockCache(d, threshold=0.3))])
def test_sd3_pipeline_cache_equals_fewstep_sample(sd3, spec, make):
    """The forecast clock is the network's timestep input, the same in both paths; block decisions per sample."""
    pipe, base, cond, uncond = sd3
    scheduler = FewstepScheduler.from_config(base.config, solver="euler")
    handle = enable_cache(pipe, spec)
    try:
        got = run_sd3(sd3, scheduler)
    finally:
        disable_cache(pipe)
    den = ClassifierFreeGuidance(make(from_diffusers(pipe.transformer, base.config)), GUIDANCE, uncond=uncond)
    x_init = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    want = sample(den, "euler", torch.tensor(scheduler._plan.times, dtype=torch.float64), x_init=x_init, cond=cond)
    assert rel(got, want) < 1e-4
    assert handle.stats.mean_work < 1.0


def test_flux_pipeline_with_diffusers_scheduler(sd3):
    torch.manual_seed(0)
    base = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                     max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = diffusers.FluxPipeline(scheduler=base, vae=tiny.vae(), text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=tiny.flux_transformer())
    pipe.set_progress_bar_config(disable=True)
    cond = {"prompt_embeds": torch.randn(1, 5, 12), "pooled_prompt_embeds": torch.randn(1, 12)}

    def go():
        return pipe(**cond, num_inference_steps=8, output_type="latent", height=32, width=32,
                    generator=torch.Generator().manual_seed(1)).images

    plain = go()
    handle = enable_cache(pipe, "block:threshold=0")
    assert torch.equal(go(), plain)
    handle = enable_cache(pipe, "taylorseer:interval=3:order=2")
    out = go()
    assert handle.stats.reused > 0 and not torch.equal(out, plain) and torch.isfinite(out).all()
    disable_cache(pipe)
    assert torch.equal(go(), plain)


def test_errors(sd):
    pipe = sd[0]
    before = _state(pipe.unet)
    with pytest.raises(ValueError, match="runs the pipeline first"):
        enable_cache(pipe, "auto:target_error=0.05")
    with pytest.raises(ValueError, match="target_error must be"):
        enable_cache(pipe, "auto:target_error=-1", prompt_embeds=sd[1], num_inference_steps=4)
    with pytest.raises(ValueError, match="unknown cache 'nope'"):
        enable_cache(pipe, "nope")
    with pytest.raises(TypeError, match="cache 'deepcache'.*bogus"):
        enable_cache(pipe, "deepcache:bogus=1")
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        enable_cache(pipe, "block:threshold=0.1")
    assert _state(pipe.unet) == before


def test_auto_calibrates_by_running_the_pipeline(sd):
    pipe, emb, neg = sd
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")
    call = {"prompt_embeds": emb, "negative_prompt_embeds": neg, "num_inference_steps": 8, "height": 16,
            "width": 16, "guidance_scale": GUIDANCE}
    before = _state(pipe.unet)
    handle = enable_cache(pipe, "auto:target_error=0.2:method=taylorseer", seeds=[1000, 1001], **call)
    cal = handle.calibration
    try:
        assert {row[0] for row in cal.table} == {"taylorseer"} and len(cal.table) == 28
        assert cal.method == "taylorseer" and cal.error_upper <= 0.2 and cal.work < 1
        pipe(**call, generator=torch.Generator().manual_seed(3), output_type="latent")
        assert handle.stats.mean_work == pytest.approx(cal.work, rel=1e-6)
    finally:
        disable_cache(pipe)
    assert _state(pipe.unet) == before


def test_magcache_records_its_curve_from_a_pipeline_run(sd3):
    pipe, base, cond, uncond = sd3
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(base.config)
    call = tiny.sd3_call(cond, uncond, steps=10, guidance=GUIDANCE)
    plain = pipe(**call, generator=torch.Generator().manual_seed(1), output_type="latent").images
    handle = enable_cache(pipe, "magcache:threshold=0.0", seeds=[1000], **call)  # SD3 repeats no given pooled
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(1), output_type="latent").images, plain)
    handle = enable_cache(pipe, "magcache:threshold=2.0:retention=0", seeds=[1000], **call)
    out = pipe(**call, generator=torch.Generator().manual_seed(1), output_type="latent").images
    disable_cache(pipe)
    curve = handle.recipe.magnitude.curve
    assert len(curve.clocks) == 10 and max(curve.clocks) <= 1000  # one point per step, in the network's time input
    assert handle.stats.reused > 0 and not torch.equal(out, plain)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler"])
def test_schedulers_that_do_not_count_steps_still_reuse(sd, name):
    """DDIM, DDPM and PNDM have no step_index: an evaluation is a change of timestep (every call was taken for a
    new guidance branch at step 0 before, and nothing was ever reused)."""
    pipe = sd[0]
    scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    handle = enable_cache(pipe, "deepcache:interval=3")
    try:
        run_sd(sd, scheduler, steps=10)
    finally:
        disable_cache(pipe)
    calls = handle.stats.full + handle.stats.reused
    assert calls == len(scheduler.timesteps) and handle.stats.reused >= calls // 2
    if name != "PNDMScheduler":  # PNDM evaluates its first timestep twice
        assert handle.stats.reused_steps == [1, 2, 4, 5, 7, 8]


def test_img2img_counts_steps_from_where_the_run_starts(sd):
    """strength 0.5 starts at step 5 of 10: warmup and the schedule count from the run's first evaluation."""
    pipe0 = sd[0]
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=pipe0.vae, text_encoder=None, tokenizer=None, unet=pipe0.unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(pipe0.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    handle = enable_cache(pipe, "taylorseer:interval=4:warmup=2")
    try:
        pipe(prompt_embeds=sd[1], negative_prompt_embeds=sd[2], image=torch.rand(1, 3, 16, 16), strength=0.5,
             num_inference_steps=10, guidance_scale=GUIDANCE, output_type="latent",
             generator=torch.Generator().manual_seed(1))
    finally:
        disable_cache(pipe)
    assert handle.stats.steps == [(0, False), (1, False), (2, True), (3, True), (4, False)]


def test_networks_that_change_their_input_in_place_do_not_change_the_cache(sd):
    """FreeU scales an up block's input in place; reused features are handed out as copies, and FreeU set while a
    cache is on reaches the real blocks."""
    pipe = sd[0]
    scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver="ddim")
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    try:
        with_freeu = run_sd(sd, scheduler, steps=6)
        pipe.disable_freeu()
        enable_cache(pipe, "deepcache:interval=1")
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)  # through the cache's block wrappers
        assert torch.equal(run_sd(sd, scheduler, steps=6), with_freeu)
        seen = []
        enable_cache(pipe, "encoder:interval=6:schedule=uniform")
        block = pipe.unet.up_blocks[0].real
        hook = block.register_forward_pre_hook(lambda m, a, k: seen.append(float(k["hidden_states"].norm())),
                                               with_kwargs=True)
        run_sd(sd, scheduler, steps=6)
        hook.remove()
        assert len(seen) == 6 and len(set(seen)) == 1  # the mid block's output of step 0, never scaled again
    finally:
        disable_cache(pipe)
        pipe.disable_freeu()


def test_a_forward_that_raises_leaves_no_hooks_and_the_pipeline_can_be_collected(sd):
    import gc
    import weakref

    pipe0 = sd[0]
    unet = tiny.sd_unet()
    pipe = diffusers.StableDiffusionPipeline(
        vae=pipe0.vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=pipe0.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    before = {n: len(m._forward_hooks) for n, m in unet.named_modules()}
    keys = list(unet.state_dict())
    enable_cache(pipe, "deepcache:interval=2")
    assert list(unet.state_dict()) == keys  # the wrapped blocks are invisible to state dicts and LoRA loaders
    calls = []

    def fail(*_):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    h = unet.up_blocks[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        run_sd((pipe, *sd[1:]), FewstepScheduler.from_config(pipe0.scheduler.config, solver="ddim"), steps=4)
    h.remove()
    disable_cache(pipe)
    assert {n: len(m._forward_hooks) for n, m in unet.named_modules()} == before
    ref = weakref.ref(pipe)
    enable_cache(pipe, "deepcache:interval=2")
    del pipe, unet
    gc.collect()
    assert ref() is None
