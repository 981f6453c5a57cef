"""Feature caches: exactness without reuse, reuse on schedule, no leaks between runs, calibration, errors."""

import threading

import diffusers
import pytest
import torch

from fewstep import make_solver, sample, zoo
from fewstep.caching import (
    BlockCache,
    CacheStats,
    DeepCache,
    EncoderPropagation,
    cache_error,
    calibrate_cache,
    full_steps,
)
from fewstep.models import ModelDenoiser
from fewstep.schedules import DiscreteVP
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

SCHED = DiscreteVP.named("linear")


@pytest.fixture(scope="module")
def unet():
    return zoo.load("unet_s")


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                          num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                          norm_num_groups=8).eval()
    return ModelDenoiser(net, SCHED, default_cond={"class_labels": torch.tensor(10)})


@pytest.fixture(scope="module")
def cond_unet():
    torch.manual_seed(0)
    net = diffusers.UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                         attention_head_dim=4, norm_num_groups=8).eval()
    return ModelDenoiser(net, SCHED)


def _run(den, solver="ddim", steps=10, seeds="0-3", **kw):
    return sample(den, make_solver(solver) if isinstance(solver, str) else solver, steps, shape=(1, 8, 8),
                  seeds=seeds, grid="time_quadratic", **kw)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "heun"])
def test_no_reuse_is_the_model_bit_for_bit(unet, dit, solver):
    base = _run(unet, solver)
    assert torch.equal(_run(DeepCache(unet, interval=1), solver), base)
    assert torch.equal(_run(EncoderPropagation(unet, interval=1, schedule="uniform"), solver), base)
    assert torch.equal(_run(BlockCache(dit, threshold=0.0), solver), _run(dit, solver))


def test_conditional_unet_no_reuse_is_exact_and_reuse_runs(cond_unet):
    ehs = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
    cond = {"encoder_hidden_states": ehs}
    base = _run(cond_unet, cond=cond)
    assert torch.equal(_run(DeepCache(cond_unet, interval=1), cond=cond), base)
    stats = CacheStats()
    out = _run(DeepCache(cond_unet, interval=2), cond=cond, hooks=[stats])
    assert stats.reused == 5 and out.shape == base.shape and not torch.equal(out, base)
    out = _run(EncoderPropagation(cond_unet, interval=2, schedule="uniform"), cond=cond)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("method", "solver", "steps"), [("deepcache", "ddim", 10), ("encoder", "dpmpp_2m", 12)])
def test_reuse_happens_exactly_on_the_scheduled_steps(unet, method, solver, steps):
    stats = CacheStats()
    if method == "deepcache":
        den, full = DeepCache(unet, interval=3), set(range(0, steps, 3))
    else:
        den, full = EncoderPropagation(unet, interval=3), set(full_steps(steps, 3, "nonuniform"))
    _run(den, solver, steps, hooks=[stats])
    expected_reused = sorted(set(range(steps)) - full)
    assert stats.reused_steps == expected_reused
    per_step = make_solver(solver).nfe_schedule(steps, to_zero=True)
    assert stats.reused == sum(per_step[s] for s in expected_reused)
    assert stats.full + stats.reused == sum(per_step)


def test_reuse_goes_by_the_grid_time_of_each_evaluation(unet):
    """Heun evaluates at t_i and t_{i+1}: with full steps {0, 3} of 6, the evaluations at grid times 1, 2, 4, 5
    reuse (twice each: as a step's start and the previous step's end)."""
    stats = CacheStats()
    _run(DeepCache(unet, interval=3), "heun", 6, hooks=[stats])
    assert stats.reused_steps == [1, 2, 4, 5] and stats.reused == 8 and stats.full == 3


def test_nonuniform_schedule_is_denser_early():
    full = full_steps(50, 5, "nonuniform")
    assert full[0] == 0 and len(full) == 10
    gaps = [b - a for a, b in zip(full, full[1:], strict=False)]
    assert gaps[0] < gaps[-1]
    assert full_steps(10, 3) == [0, 3, 6, 9]


@pytest.mark.parametrize("make", [lambda u, d: DeepCache(u, interval=3), lambda u, d: EncoderPropagation(u),
                                  lambda u, d: BlockCache(d, threshold=0.3)])
def test_back_to_back_and_threaded_runs_are_identical(unet, dit, make):
    den = make(unet, dit)
    first, second = _run(den), _run(den)
    assert torch.equal(first, second)
    outs = {}

    def worker(k):
        outs[k] = _run(den)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert torch.equal(outs[0], first) and torch.equal(outs[1], first)


def test_block_cache_decides_per_sample(dit):
    cache = BlockCache(dit, threshold=0.3)
    full = _run(cache, seeds="0-5")
    part = _run(cache, seeds="2-3")
    assert float((full[2:4] - part).abs().max() / part.abs().max()) < 1e-5  # float32 batch round-off
    stats = CacheStats()
    _run(cache, hooks=[stats])
    assert 0 < stats.work / (stats.full + stats.reused) < 1


def test_calibration_meets_its_target_on_held_out_seeds(unet):
    target = 0.05
    cal = calibrate_cache(unet, "ddim", 20, shape=(1, 8, 8), target_error=target)
    assert cal.error <= cal.error_upper <= target and cal.work < 1.0
    den = DeepCache(unet, **cal.knobs)
    held = sample(den, "ddim", 20, shape=(1, 8, 8), seeds="0-255", grid="time_quadratic")
    exact = sample(unet, "ddim", 20, shape=(1, 8, 8), seeds="0-255", grid="time_quadratic")
    err = float(cache_error(held, exact).mean())
    assert err <= target, (cal, err)


def test_block_cache_calibration_meets_its_target(dit):
    target = 0.02
    cal = calibrate_cache(dit, "dpmpp_2m", 20, shape=(1, 8, 8), target_error=target)
    assert cal.method == "block" and cal.error_upper <= target
    held = _run(BlockCache(dit, **cal.knobs), "dpmpp_2m", 20, seeds="0-255")
    exact = _run(dit, "dpmpp_2m", 20, seeds="0-255")
    assert float(cache_error(held, exact).mean()) <= target


def test_clear_errors(unet, dit):
    with pytest.raises(TypeError, match="UNet2DModel"):
        DeepCache(dit)
    with pytest.raises(TypeError, match="ModelDenoiser"):
        DeepCache(AnalyticDenoiser(gaussian_mixture(dim=4, components=2, std=0.3), SCHED))
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        BlockCache(unet)
    with pytest.raises(ValueError, match="branch"):
        DeepCache(unet, branch=5)
    with pytest.raises(ValueError, match="interval"):
        DeepCache(unet, interval=0)
    with pytest.raises(ValueError, match="threshold"):
        BlockCache(dit, threshold=-1)
    with pytest.raises(TypeError, match="sample"):
        DeepCache(unet)(torch.zeros(1, 1, 8, 8), 0.5)


def test_bench_and_cli_learn_caches(tmp_path, capsys):
    from fewstep.bench import Experiment, ResultStore, run_sweep, sweep
    from fewstep.cli import main

    assert "cache" not in Experiment("unet_s", "ddim", 10).to_dict()  # keys of uncached results unchanged
    exps = sweep(["unet_s"], ["ddim"], [10], seeds="0-7", caches=["none", "deepcache:interval=2"])
    assert [e.label for e in exps] == ["ddim", "ddim+deepcache:interval=2"]
    store = ResultStore(tmp_path / "r.sqlite")
    assert run_sweep(exps, store) == 2
    cached = [r for r in store.rows() if r.get("cache_work") is not None]
    assert len(cached) == 1 and 0 < cached[0]["cache_work"] < 1 and cached[0]["cache_reused"] == 5
    assert cached[0]["label"] == "ddim+deepcache:interval=2"
    code = main(["sample", "--model", "unet_s", "--solver", "ddim", "--steps", "10", "--seeds", "0-3", "--quiet",
                 "--cache", "deepcache:interval=2", "--out", str(tmp_path / "x.npz")])
    assert code == 0 and "cache reused 5 of 10" in capsys.readouterr().out
    code = main(["sample", "--model", "unet_s", "--steps", "10", "--seeds", "0-3", "--quiet", "--cache", "dep",
                 "--out", str(tmp_path / "y.npz")])
    assert code == 2 and "unknown cache 'dep'" in capsys.readouterr().err


def test_bench_runs_diffusers_cache_hooks_as_peer_rows(tmp_path):
    """``diffusers:<cache>`` rows: diffusers' own hook on the same network, noise and solver, its work counted."""
    from fewstep.bench import ResultStore, run_sweep, sweep

    exps = sweep(["dit_s"], ["ddim"], [6], seeds="0-7",
                 caches=["none", "diffusers:fbcache:threshold=0.5", "taylorseer:interval=2"])
    store = ResultStore(tmp_path / "r.sqlite")
    assert run_sweep(exps, store) == 3
    rows = {r["label"]: r for r in store.rows()}
    assert set(rows) == {"ddim", "ddim+diffusers:fbcache:threshold=0.5", "ddim+taylorseer:interval=2"}
    for label in ("ddim+diffusers:fbcache:threshold=0.5", "ddim+taylorseer:interval=2"):
        assert 0 < rows[label]["cache_work"] < 1 and rows[label]["cache_reused"] > 0
    from fewstep.bench import write_report

    text = write_report(store, tmp_path / "report").read_text()
    assert "Caches: work is the share of a full evaluation's multiply-accumulates" in text
    for label in rows:  # one table, one unit: the uncached row at work 1, both cached rows below it
        work = rows[label].get("cache_work", 1.0)
        assert f"| {label} | 6 | {work:.3f} |" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--models", "unet_s", "--steps", "5", "--cache", "diffusers:fbcache"], "--cache diffusers:fbcache on "
                                                                                      "unet_s"),
    (["bench", "--models", "unet_s", "--steps", "5", "--cache", "magcache"], "for a UNet2DModel use"),
    (["bench", "--models", "unet_s", "--steps", "5", "--cache", "auto:target_error=-1"], "target_error must be"),
    (["sample", "--model", "unet_s", "--cache", "taylorseer:intervall=2"], "intervall"),
    (["sample", "--model", "unet_s", "--cache", "auto:target_error=0"], "target_error must be"),
])
def test_cli_checks_caches_before_any_work(tmp_path, capsys, argv, message):
    from fewstep.cli import main

    db = tmp_path / "r.sqlite"
    extra = ["--db", str(db)] if argv[0] == "bench" else ["--out", str(tmp_path / "x.npz")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not db.exists() and not (tmp_path / "x.npz").exists()
