"""Feature caches on every supported architecture (tiny random-weight instances of the real diffusers classes).

With no reuse, every method equals the uncached model bit for bit on every family (the network's own ``forward``
runs; the blocks are wrapped, not replayed), on grids that end at 0 and at ``t_min > 0``. With reuse: work is
saved, decisions are per sample (a sample is the same in any batch), guidance keeps one state per branch, and
calibration accepts guided and class/text-conditioned denoisers.
"""

import inspect

import diffusers
import pytest
import torch

from fewstep import ClassifierFreeGuidance, from_diffusers, sample
from fewstep.caching import (
    ADAPTERS,
    METHODS,
    BlockCache,
    CacheStats,
    DeepCache,
    EncoderPropagation,
    MagCache,
    TaylorSeer,
    adapter_of,
    cache_error,
    cache_from_spec,
    calibrate_cache,
    magnitude_curve,
    make_cache,
)
from fewstep.models import FAMILIES
from fewstep.models.base import Denoiser
from test_families import DDPM, FLOW, _build, _cond

UNETS = ["UNet2DModel", "UNet2DConditionModel", "SDXL"]
CHAINS = ["DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel"]
FAMILY_NAMES = UNETS + CHAINS
FLOWS = {"SD3Transformer2DModel", "FluxTransformer2DModel"}


@pytest.fixture(scope="module")
def dens():
    return {n: from_diffusers(_build(n).eval(), FLOW if n in FLOWS else DDPM) for n in FAMILY_NAMES}


def _shape(name, den):
    return (2, 8, 8)  # every tiny family: 2 latent channels (Flux's unpacked), 8x8


def _run(name, den, solver="ddim", steps=6, seeds="0-2", grid="time_quadratic", times=None, **kw):
    cond = kw.pop("cond", _cond(name, 1))
    with torch.no_grad():
        return sample(den, solver, times if times is not None else steps, shape=_shape(name, den), seeds=seeds,
                      grid=grid, cond=cond, **kw)


def _no_reuse(name, den):
    if name in UNETS:
        return [DeepCache(den, interval=1), EncoderPropagation(den, interval=1),
                TaylorSeer(den, interval=1, order=2), DeepCache(den, interval=1, order=1)]
    curve = magnitude_curve(den, "ddim", 6, shape=_shape(name, den), cond=_cond(name, 1))
    return [BlockCache(den, threshold=0.0), BlockCache(den, threshold=0.0, order=1),
            TaylorSeer(den, interval=1), MagCache(den, curve=curve, threshold=0.0)]


def _ending_at_t_min(den, steps=5):
    lo, hi = den.t_min, den.t_max
    return [hi - (hi - lo) * (i / steps) ** 1.5 for i in range(steps + 1)]  # last time t_min > 0


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_no_reuse_is_the_model_bit_for_bit(dens, name):
    den = dens[name]
    for solver in ("ddim", "heun"):
        base = _run(name, den, solver)
        for cached in _no_reuse(name, den):
            assert torch.equal(_run(name, cached, solver), base), (name, cached, solver)


@pytest.mark.parametrize("solver", ["heun", "f_ddim", "dpm_solver_3"])
@pytest.mark.parametrize("name", ["UNet2DModel", "DiTTransformer2DModel"])
def test_interval_one_is_exact_on_grids_ending_above_zero(dens, name, solver):
    """Heun's corrector, F-DDIM's look-ahead and DPM-Solver-3's inner points evaluate at the final grid time
    ``t_min > 0``: that evaluation has its own step slot and is computed (it reused features before)."""
    den = dens[name]
    times = _ending_at_t_min(den)
    base = _run(name, den, solver, times=times)
    makers = ([lambda: DeepCache(den, interval=1), lambda: EncoderPropagation(den, interval=1)] if name in UNETS
              else [lambda: TaylorSeer(den, interval=1)])
    for make in makers:
        stats = CacheStats()
        assert torch.equal(_run(name, make(), solver, times=times, hooks=[stats]), base)
        assert stats.reused == 0


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_reuse_saves_work_and_stays_close(dens, name):
    den = dens[name]
    base = _run(name, den, steps=10)
    methods = ([DeepCache(den, interval=3), EncoderPropagation(den, interval=3), TaylorSeer(den, interval=3)]
               if name in UNETS else [BlockCache(den, threshold=10.0, max_reuse=2),
                                      BlockCache(den, threshold=10.0, max_reuse=2, order=1),
                                      TaylorSeer(den, interval=3, order=2)])
    for cached in methods:
        stats = CacheStats()
        out = _run(name, cached, steps=10, hooks=[stats])
        assert stats.reused > 0 and stats.mean_work < 1.0, (name, cached)
        assert torch.isfinite(out).all() and not torch.equal(out, base)


@pytest.mark.parametrize("name", CHAINS)
def test_per_sample_decisions_make_batches_exact(dens, name):
    """A sample's cache decisions depend on it alone: sample k is the same in a batch of 4 and of 2."""
    den = dens[name]
    cond4, cond2 = _cond(name, 4, seed=5), _cond(name, 4, seed=5)
    if name == "DiTTransformer2DModel":
        cond2 = {"class_labels": cond4["class_labels"][2:]}
    else:
        cond2 = {k: (v[2:] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 4 else
                     ({kk: vv[2:] for kk, vv in v.items()} if isinstance(v, dict) else v)) for k, v in cond4.items()}
    for make in (lambda: BlockCache(den, threshold=0.3), lambda: BlockCache(den, threshold=0.3, order=1),
                 lambda: TaylorSeer(den, interval=3)):
        stats = CacheStats()
        full = _run(name, make(), steps=10, seeds="0-3", cond=cond4, hooks=[stats])
        part = _run(name, make(), steps=10, seeds="2-3", cond=cond2)
        scale = float(part.abs().max())
        assert float((full[2:] - part).abs().max()) <= 1e-5 * scale  # float32 batch round-off only


class _TwoCaches(Denoiser):
    """Guidance with a separate cache object per branch: what one state per branch must equal."""

    def __init__(self, make, scale, uncond):
        self.c, self.u, self.scale, self.uncond = make(), make(), scale, uncond
        self.schedule = self.c.schedule

    def for_run(self, run):
        bound = _TwoCaches.__new__(_TwoCaches)
        bound.c, bound.u = self.c.for_run(run), self.u.for_run(run)
        bound.scale, bound.uncond, bound.schedule = self.scale, self.uncond, self.schedule
        return bound

    def __call__(self, x, t, cond=None):
        x0_u = self.u(x, t, self.uncond)
        return x0_u + self.scale * (self.c(x, t, cond) - x0_u)


@pytest.mark.parametrize(("name", "make"), [
    ("UNet2DConditionModel", lambda d: DeepCache(d, interval=3)),
    ("SDXL", lambda d: TaylorSeer(d, interval=3)),
    ("DiTTransformer2DModel", lambda d: BlockCache(d, threshold=0.5)),
    ("FluxTransformer2DModel", lambda d: BlockCache(d, threshold=0.5, order=1)),
])
def test_guidance_keeps_one_cache_state_per_branch(dens, name, make):
    den = dens[name]
    uncond = None if name == "DiTTransformer2DModel" else _cond(name, 1, seed=9)
    guided = ClassifierFreeGuidance(make(den), 4.0, uncond=uncond)
    stats = CacheStats()
    out = _run(name, guided, steps=10, hooks=[stats])
    assert torch.equal(out, _run(name, _TwoCaches(lambda: make(den), 4.0, uncond), steps=10))
    assert stats.reused > 0  # a shared state compared each branch with the other one and never reused


def test_caches_go_under_guidance_when_built_from_a_guided_denoiser(dens):
    den = dens["DiTTransformer2DModel"]
    guided = ClassifierFreeGuidance(den, 4.0)
    cached = make_cache(guided, "block", threshold=0.5)
    assert isinstance(cached, ClassifierFreeGuidance) and isinstance(cached.inner, BlockCache)
    assert torch.equal(_run("DiTTransformer2DModel", cached),
                       _run("DiTTransformer2DModel", ClassifierFreeGuidance(BlockCache(den, threshold=0.5), 4.0)))


def test_calibration_takes_guided_and_single_label_conditioning(dens):
    """A batch-1 label with 8 seeds (an IndexError before), and a guided denoiser (refused before)."""
    den = dens["DiTTransformer2DModel"]
    kw = {"shape": den.sample_shape, "seeds": "0-7", "cond": {"class_labels": torch.tensor([3])}}
    cal = calibrate_cache(den, "ddim", 8, target_error=0.05, **kw)
    assert cal.method in ("block", "none")
    guided = ClassifierFreeGuidance(den, 4.0)
    cal = calibrate_cache(guided, "ddim", 8, target_error=0.05, method="all", **kw)
    assert {row[0] for row in cal.table} == {"block", "taylorseer", "magcache"}
    if cal.method != "none":
        held = _run("DiTTransformer2DModel", make_cache(guided, cal.method, **cal.knobs), steps=8, seeds="0-7",
                    cond=kw["cond"])
        exact = _run("DiTTransformer2DModel", guided, steps=8, seeds="0-7", cond=kw["cond"])
        assert float(cache_error(held, exact).mean()) <= cal.error_upper + 1e-12


@pytest.mark.parametrize("spec", ["auto:target_error=-1", "auto:target_error=0", "auto:target_error=nan"])
def test_non_positive_target_error_is_refused(dens, spec):
    den = dens["UNet2DModel"]
    with pytest.raises(ValueError, match="target_error must be a number > 0"):
        cache_from_spec(den, spec, solver="ddim", steps=5, shape=den.sample_shape)


def test_clear_errors(dens):
    unet, dit = dens["UNet2DModel"], dens["DiTTransformer2DModel"]
    with pytest.raises(TypeError, match="UNet2DModel, UNet2DConditionModel"):
        DeepCache(dit)
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        BlockCache(unet)
    with pytest.raises(ValueError, match="curve"):
        MagCache(dit)
    with pytest.raises(TypeError, match="goes under the guidance"):
        BlockCache(ClassifierFreeGuidance(dit, 4.0))
    with pytest.raises(TypeError, match="cache 'taylorseer'.*bogus"):
        TaylorSeer(dit, bogus=1)
    with pytest.raises(ValueError, match="order"):
        BlockCache(dit, order=-1)
    sana = from_diffusers(_build("SanaTransformer2DModel").eval(), FLOW)
    with pytest.raises(TypeError, match="feature caches wrap the blocks of"):
        BlockCache(sana)
    sd = dens["UNet2DConditionModel"]
    cond = {**_cond("UNet2DConditionModel", 1), "mid_block_additional_residual": torch.zeros(1, 32, 4, 4)}
    with pytest.raises(ValueError, match="mid_block_additional_residual"):
        _run("UNet2DConditionModel", DeepCache(sd, interval=2), cond=cond)


def test_the_original_network_is_never_modified(dens):
    den = dens["FluxTransformer2DModel"]
    net = den.model
    before = (list(net.transformer_blocks), list(net.single_transformer_blocks), dict(net._modules),
              len(net._forward_hooks), len(net._forward_pre_hooks))
    _run("FluxTransformer2DModel", BlockCache(den, threshold=0.5), steps=4)
    after = (list(net.transformer_blocks), list(net.single_transformer_blocks), dict(net._modules),
             len(net._forward_hooks), len(net._forward_pre_hooks))
    assert before == after
    assert set(METHODS) == {"deepcache", "encoder", "block", "taylorseer", "magcache"}
    assert isinstance(net, diffusers.FluxTransformer2DModel)


def test_forecasts_survive_repeated_times_and_float16():
    """Heun evaluates twice at one time (corrector, next predictor): a zero-width difference is no derivative.
    float16 features keep float32 Taylor tables (dt^2 / 2 reaches 5e5 on a 0-1000 clock)."""
    from fewstep.caching.policies import Forecast

    def q(c):
        return 3.0 * c * c + 2.0 * c + 1.0

    f = Forecast(2)
    for c in (900.0, 800.0, 800.0, 700.0):
        f.update(None, (torch.full((1, 2), q(c), dtype=torch.float64),), torch.tensor([c]), 1)
    # TaylorSeer's forecast from the three distinct times, step h = -100: backward differences over h, h^2
    h, dt = -100.0, -100.0
    d1, d2 = q(700) - q(800), q(700) - 2 * q(800) + q(900)
    want = q(700) + d1 / h * dt + d2 / h ** 2 * dt ** 2 / 2
    assert float(f.predict(None, torch.tensor([600.0]))[0][0, 0]) == pytest.approx(want, rel=1e-12)
    h = Forecast(2)
    for c in (999.0, 899.0, 799.0):
        h.update(None, (torch.full((1, 2), c / 100, dtype=torch.float16),), torch.tensor([c]), 1)
    out = h.predict(None, torch.tensor([399.0]), like=(torch.zeros(1, dtype=torch.float16),))[0]
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and abs(float(out[0, 0]) - 3.99) < 0.05


@pytest.mark.parametrize("solver", ["heun", "dpm_solver_2"])
def test_taylorseer_with_two_evaluations_per_step(dens, solver):
    den = dens["DiTTransformer2DModel"]
    base = _run("DiTTransformer2DModel", den, solver, steps=10)
    out = _run("DiTTransformer2DModel", TaylorSeer(den, interval=3, order=2, warmup=3), solver, steps=10)
    assert torch.isfinite(out).all() and float(cache_error(out, base).mean()) < 0.05


def test_a_network_whose_forward_was_replaced_is_refused(dens):
    import functools

    den = dens["UNet2DModel"]
    net = den.model
    net.forward = functools.partial(type(net).forward, net)  # what offloading hooks do
    try:
        with pytest.raises(TypeError, match="forward was replaced"):
            _run("UNet2DModel", DeepCache(den, interval=2))
    finally:
        del net.forward


def test_the_families_tested_here_are_every_derived_adapter():
    """Every block adapter the family registry gives is exercised by the tests above (SDXL: a UNet2DConditionModel
    configuration)."""
    assert {n for n, a in ADAPTERS.items() if a.kind == "unet"} == set(UNETS) - {"SDXL"}
    assert {n for n, a in ADAPTERS.items() if a.kind == "chain"} == set(CHAINS)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_each_cache_layout_is_pinned_to_the_real_blocks(dens, name):
    """What a family's entry says of its blocks holds for the real classes: the block lists are where it says, a
    block's ``forward`` takes the inputs named (every block; a starred one only some blocks take, the U-Nets'
    cross-attention input), and a block returns the streams named, in that number."""
    den = dens[name]
    net = den.model
    adapter = adapter_of(net)
    assert adapter is ADAPTERS[type(net).__name__] and adapter.lists == FAMILIES[type(net).__name__].blocks
    returned: dict[str, list[int]] = {}
    hooks = []
    for blocks in adapter.lists:
        held = getattr(net, blocks.attr)
        items = [held] if blocks.single else list(held)
        assert items, blocks.attr
        takes = [set(inspect.signature(b.forward).parameters) for b in items]
        for key in (entry for entry in blocks.takes if not entry.endswith("*")):
            assert all(key in t for t in takes), (blocks.attr, key)

        def count(m, args, out, attr=blocks.attr):
            returned.setdefault(attr, []).append(len(out) if isinstance(out, tuple) else 1)

        hooks += [b.register_forward_hook(count) for b in items]
    try:
        _run(name, den, steps=1)
    finally:
        for h in hooks:
            h.remove()
    for blocks in adapter.lists:
        assert set(returned[blocks.attr]) == {len(blocks.returns)}, (blocks.attr, returned[blocks.attr])
    assert adapter.streams == (adapter.lists[0].returns if adapter.kind == "chain" else ("hidden_states",))


def test_a_family_without_a_cache_layout_is_refused_with_its_reason():
    sana = from_diffusers(_build("SanaTransformer2DModel").eval(), FLOW)
    reason = FAMILIES["SanaTransformer2DModel"].no_cache
    with pytest.raises(TypeError, match="feature caches wrap the blocks of") as err:
        adapter_of(sana.model)
    assert reason in str(err.value) and ", ".join(ADAPTERS) in str(err.value)
