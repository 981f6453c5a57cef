"""diffusers' own cache hooks as peers: exact without reuse, truthful work, per-run and per-branch state, the module
left as found, clear errors."""

import copy
import functools

import diffusers
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import tiny_pipelines as tiny
from fewstep import ClassifierFreeGuidance, sample
from fewstep.bench.cache_peers import DIFFUSERS_CACHES, DiffusersCache
from fewstep.models import Denoiser, ModelDenoiser, Run, from_diffusers
from fewstep.schedules import DiscreteVP

try:
    from fewstep.caching import CacheStats
except ImportError:  # the caching package mid-rewrite: the same counter, locally
    class CacheStats:
        def on_start(self, grid):
            self.full = self.reused = 0
            self.work = 0.0
            self.steps = []

        def on_cache(self, step, reused, work):
            self.reused += int(reused)
            self.full += int(not reused)
            self.work += work
            self.steps.append((step, reused))

        @property
        def mean_work(self):
            calls = self.full + self.reused
            return self.work / calls if calls else 1.0


SCHED = DiscreteVP.named("linear")
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
ATTN1 = [r"transformer_blocks\.\d+\.attn1"]  # TaylorSeer's default patterns match '...attn', not DiT's 'attn1'
ONES = [1.0] * 10  # MagCache ratios of a model whose residual never changes: the accumulated error stays 0

# name: (knobs that never reuse, knobs that reuse) on the class-conditional DiT
SETTINGS = {
    "fbcache": ({"threshold": 0.0}, {"threshold": 1e9}),
    "pab": ({"spatial_attention_block_skip_range": 1},
            {"spatial_attention_block_skip_range": 3, "spatial_attention_timestep_skip_range": (-1, 1001)}),
    "fastercache": ({"spatial_attention_block_skip_range": 1}, {"spatial_attention_block_skip_range": 2}),
    "taylorseer": ({"cache_interval": 1, "cache_identifiers": ATTN1},
                   {"cache_interval": 3, "disable_cache_before_step": 1, "cache_identifiers": ATTN1}),
    "magcache": ({"max_skip_steps": 0, "mag_ratios": ONES}, {"threshold": 1.0, "mag_ratios": ONES}),
    "seacache": ({"threshold": 0.0}, {"threshold": 1e9, "max_consecutive_cached": 0}),
}


def _dit_net():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                           num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                           norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def dit():
    return ModelDenoiser(_dit_net(), SCHED, default_cond={"class_labels": torch.tensor(10)})


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    net = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                           pooled_projection_dim=12, guidance_embeds=False,
                                           axes_dims_rope=(2, 2, 4)).eval()
    cond = {"encoder_hidden_states": torch.randn(1, 5, 12), "pooled_projections": torch.randn(1, 12)}
    return from_diffusers(net, FLOW), cond


def _run(den, hooks=(), **kw):
    return sample(den, "ddim", 10, shape=(1, 8, 8), seeds="0-3", grid="time_quadratic", hooks=list(hooks), **kw)


def _flux_run(den, cond, hooks=()):
    return sample(den, "euler", 8, shape=(4, 8, 8), seeds="0-1", grid="time_uniform", cond=cond, hooks=list(hooks))


def _marks(net):
    """Everything a hook could leave on the modules: instance attributes and torch hook tables."""
    return [(name, sorted(m.__dict__), len(m._forward_pre_hooks), len(m._forward_hooks),
             len(m._forward_pre_hooks_with_kwargs), len(m._forward_hooks_with_kwargs))
            for name, m in net.named_modules()]


def test_every_cache_of_this_diffusers_is_known():
    assert set(DIFFUSERS_CACHES) == set(SETTINGS)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_no_reuse_is_the_model_bit_for_bit_and_reuse_changes_it(dit, name):
    """diffusers' hooks call the block's (or attention's) original forward with the same arguments and return its
    output untouched on their compute path, so a setting that never reuses is the plain model bit for bit."""
    never, reuse = SETTINGS[name]
    base = _run(dit)
    stats = CacheStats()
    with DiffusersCache(dit, name, **never) as cached:
        assert torch.equal(_run(cached, [stats]), base)
    assert stats.reused == 0 and stats.full == 10 and stats.mean_work == 1.0
    with DiffusersCache(dit, name, **reuse) as cached:
        out = _run(cached, [stats])
    assert stats.reused > 0 and stats.mean_work < 1.0
    assert not torch.allclose(out, base, atol=1e-4)


def test_work_counts_the_blocks_that_really_ran(dit, monkeypatch):
    """An independent count: calls of the blocks' own forward (patched on the class before diffusers captures it).
    FBCache runs the first of the 3 equal blocks on a reused step, all three otherwise."""
    calls = [0]
    original = BasicTransformerBlock.forward

    @functools.wraps(original)  # diffusers reads the block's signature through it
    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BasicTransformerBlock, "forward", counted)

    class Ran:
        def on_start(self, grid):
            self.seen, self.last = [], calls[0]

        def on_cache(self, step, reused, work):
            self.seen.append((calls[0] - self.last, reused, work))
            self.last = calls[0]

    for threshold in (0.0, 0.3, 1e9):
        ran = Ran()
        with DiffusersCache(dit, "fbcache", threshold=threshold) as cached:
            _run(cached, [ran])
        assert len(ran.seen) == 10
        # work is the share of the network's multiply-accumulates computed (fewstep's unit): all of it when the
        # 3 blocks ran; on a reused step the first block plus the layers around the blocks, the same every time
        assert all(reused == (n < 3) and (work == 1.0) == (n == 3) for n, reused, work in ran.seen)
        assert all(1 / 3 < work < 1 / 2 for n, _, work in ran.seen if n < 3)
        assert len({work for n, _, work in ran.seen if n < 3}) <= 1
        if threshold == 0.0:
            assert {n for n, _, _ in ran.seen} == {3}
        if threshold == 1e9:
            assert [n for n, _, _ in ran.seen] == [3] + [1] * 9


def test_the_module_is_left_as_found(dit, flux):
    for den, run in ((dit, lambda c: _run(c)), (flux[0], lambda c: _flux_run(c, flux[1]))):
        net = den.model
        before = _marks(net)
        for name in ("fbcache", "pab", "seacache"):
            with DiffusersCache(den, name, **SETTINGS[name][1]) as cached:
                run(cached)
                run(cached)
                assert _marks(net) != before  # the hooks are on while the block is open
            assert _marks(net) == before
        with pytest.raises(RuntimeError, match="boom"), DiffusersCache(den, "fbcache", threshold=1e9) as cached:
            run(cached)
            raise RuntimeError("boom")
        assert _marks(net) == before
        assert not hasattr(net, "_diffusers_hook") and "forward" not in net.__dict__
    assert not flux[0].model.is_cache_enabled  # Flux has CacheMixin: enable_cache / disable_cache were used


def test_runs_back_to_back_are_identical(dit):
    with DiffusersCache(dit, "fbcache", threshold=0.3) as cached:
        first, second = _run(cached), _run(cached)
    with DiffusersCache(dit, "fbcache", threshold=0.3) as cached:
        third = _run(cached)
    assert torch.equal(first, second) and torch.equal(first, third)


class _TwoNetGuidance(Denoiser):
    """Guidance with each branch on its own network and cache: the reference for separate branch states."""

    def __init__(self, cond_den, uncond_den, scale):
        self.c, self.u, self.scale = cond_den, uncond_den, scale
        self.schedule, self.required_cond = cond_den.schedule, ()

    def for_run(self, run):
        return _TwoNetGuidance(self.c.for_run(run), self.u.for_run(run), self.scale)

    def __call__(self, x, t, cond=None):
        x0_u = self.u(x, t, None)
        x0_c = self.c(x, t, cond)
        return x0_u + self.scale * (x0_c - x0_u)  # ClassifierFreeGuidance's arithmetic


class _OneCopyGuidance(_TwoNetGuidance):
    """Guidance that binds one copy for both branches (as fewstep's guidance once did)."""

    def for_run(self, run):
        bound = self.c.for_run(run)
        return _TwoNetGuidance(bound, bound, self.scale)


@pytest.mark.parametrize("name, knobs", [("fbcache", {"threshold": 1e9}),
                                         ("pab", SETTINGS["pab"][1])])
def test_guidance_branches_keep_their_own_state(dit, name, knobs):
    """The guided run equals guidance over two copies of the network, each with its own hook: it would not if the
    branches shared one state (the conditional branch would reuse the unconditional branch's features).
    FBCache keys its state by cache context; PAB keeps one per module, swapped per branch."""
    labels = {"class_labels": torch.tensor([1, 2, 3, 4])}
    other = copy.deepcopy(dit.model)
    twin = ModelDenoiser(other, SCHED, default_cond={"class_labels": torch.tensor(10)})
    ref_stats, stats = CacheStats(), CacheStats()
    with DiffusersCache(dit, name, **knobs) as c, DiffusersCache(twin, name, **knobs) as u:
        want = _run(_TwoNetGuidance(c, u, 4.0), [ref_stats], cond=labels)
    with DiffusersCache(dit, name, **knobs) as cached:
        got = _run(ClassifierFreeGuidance(cached, 4.0), [stats], cond=labels)
        one_copy = _run(_OneCopyGuidance(cached, cached, 4.0), cond=labels)
    assert ref_stats.reused > 0 and stats.mean_work < 1.0
    assert sorted(stats.steps) == sorted(ref_stats.steps)
    assert torch.equal(got, want) and torch.equal(one_copy, want)


def test_flux_through_its_cache_mixin(flux):
    den, cond = flux
    base = _flux_run(den, cond)
    stats = CacheStats()
    with DiffusersCache(den, "fbcache", threshold=0.0) as cached:
        assert torch.equal(_flux_run(cached, cond, [stats]), base)
        assert den.model.is_cache_enabled
    assert stats.mean_work == 1.0
    with DiffusersCache(den, "magcache", threshold=1.0) as cached:  # diffusers' FLUX_MAG_RATIOS by default
        out = _flux_run(cached, cond, [stats])
    assert stats.mean_work < 1.0 and not torch.equal(out, base)


def test_one_run_at_a_time_and_only_inside_the_block(dit):
    cached = DiffusersCache(dit, "fbcache", threshold=0.3)
    with pytest.raises(ValueError, match="with block"):
        _run(cached)
    with pytest.raises(TypeError, match=r"fewstep\.sample\(\)"):
        cached(torch.zeros(1, 1, 8, 8), 0.5)
    x = torch.randn(2, 1, 8, 8)
    runs = [Run((0, 1), (0.9, 0.5, 0.0)), Run((0, 1), (0.9, 0.5, 0.0))]
    with cached:
        first, second = (cached.for_run(r) for r in runs)
        first(x, 0.9)
        second(x, 0.9)  # a new run takes the module over
        with pytest.raises(RuntimeError, match="one after another"):
            first(x, 0.5)
        with pytest.raises(ValueError, match="already"):
            DiffusersCache(dit, "pab")
        with pytest.raises(ValueError, match="already open"):
            cached.__enter__()


def test_clear_errors(dit):
    unet = ModelDenoiser(tiny.unet2d(), SCHED)
    torch.manual_seed(0)
    sd3 = from_diffusers(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16), FLOW)
    cases = [
        (ValueError, "fbcache, pab", lambda: DiffusersCache(dit, "teacache")),
        (TypeError, "did you mean 'threshold'", lambda: DiffusersCache(dit, "fbcache", treshold=0.1)),
        (ValueError, "timestep of each evaluation", lambda: DiffusersCache(dit, "pab", current_timestep_callback=int)),
        (ValueError, "separate calls", lambda: DiffusersCache(dit, "fastercache", is_guidance_distilled=False)),
        (ValueError, "grid steps", lambda: DiffusersCache(dit, "magcache", num_inference_steps=10)),
        (ValueError, "mag_ratios= for DiTTransformer2DModel", lambda: DiffusersCache(dit, "magcache")),
        (ValueError, "cache_identifiers", lambda: DiffusersCache(dit, "taylorseer")),
        (ValueError, "non-negative", lambda: DiffusersCache(dit, "seacache", threshold=-1.0)),
        (ValueError, "UNet2DModel", lambda: DiffusersCache(unet, "fbcache")),
        (ValueError, "SD3Transformer2DModel", lambda: DiffusersCache(sd3, "fbcache")),
        (TypeError, "ModelDenoiser", lambda: DiffusersCache(ClassifierFreeGuidance(dit, 2.0), "fbcache")),
    ]
    for kind, match, make in cases:
        with pytest.raises(kind, match=match) as err:
            make()
        assert "\n" not in str(err.value)
    with DiffusersCache(dit, "fastercache", spatial_attention_timestep_skip_range=(-1, 1001)) as cached, \
            pytest.raises(ValueError, match="first call"):
        _run(cached)
    assert not hasattr(unet.model, "_diffusers_hook") and not hasattr(dit.model, "_diffusers_hook")


def test_the_block_lists_diffusers_recognises_are_its_own():
    """fewstep's copy of the block-list names diffusers' block-residual caches look for (diffusers keeps them
    private) is diffusers' list."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    from fewstep.bench.cache_peers import _STACK_NAMES

    assert frozenset(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS) == _STACK_NAMES


def test_work_is_in_the_unit_of_fewsteps_caches(dit):
    """``work`` is the share of a full evaluation's multiply-accumulates, for diffusers' hooks as for fewstep's
    caches: FBCache's reused evaluations (block 0 runs, blocks 1 and 2 are skipped) compute ``1 - share(1, 2)``,
    the shares measured by WorkMeter on a plain forward, and fewstep's first-block cache reusing the same blocks
    reports the same number."""
    from fewstep.caching import BlockCache
    from fewstep.caching.stats import WorkMeter

    net = dit.model
    meter = WorkMeter(net, dict(enumerate(net.transformer_blocks)))
    meter.arm()
    with torch.no_grad():
        net(torch.randn(4, 1, 8, 8), timestep=torch.full((4,), 500.0), class_labels=torch.full((4,), 10))
    meter.disarm()
    skipped = 1.0 - meter.share([1, 2])
    assert 0.3 < skipped < 0.4  # not the blocks' count (1/3): the embedding and head run too, block 0 is larger

    class Works:
        def on_start(self, grid):
            self.seen = []

        def on_cache(self, step, reused, work):
            self.seen.append((reused, work))

    peer, own = Works(), Works()
    with DiffusersCache(dit, "fbcache", threshold=1e9) as cached:
        _run(cached, [peer])
    _run(BlockCache(dit, threshold=1e9, warmup=1, max_reuse=100), [own])
    for seen in (peer.seen, own.seen):
        assert seen[0] == (False, 1.0) and len(seen) == 10
        assert all(reused and work == pytest.approx(skipped, rel=1e-12) for reused, work in seen[1:]), seen
