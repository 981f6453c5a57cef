"""The step search's machinery: the dynamic program finds the optimum a brute force finds, teacher states are
the teacher's, and the tuned times are a path through the candidates."""

import itertools
import math

import pytest
import torch

from fewstep import make_solver, sample
from fewstep.grids import make_grid
from fewstep.schedules import DiscreteVP
from fewstep.tuning import dp_path, edge_costs, search_steps, teacher_states
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

SCHED = DiscreteVP.named("linear")


@pytest.mark.parametrize("seed", range(5))
def test_dp_finds_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    n = 9
    cost = torch.rand(n, n, generator=g, dtype=torch.float64)
    cost[torch.rand(n, n, generator=g) < 0.2] = math.inf  # some edges missing
    for steps in range(1, n):
        paths = [(0, *mid, n - 1) for mid in itertools.combinations(range(1, n - 1), steps - 1)]
        totals = [sum(float(cost[a, b]) for a, b in zip(p, p[1:], strict=False)) for p in paths]
        best = min(totals)
        if not math.isfinite(best):
            with pytest.raises(ValueError, match="no path"):
                dp_path(cost, steps)
            continue
        path, total = dp_path(cost, steps)
        assert total == pytest.approx(best, rel=1e-12) and len(path) == steps + 1
        assert path[0] == 0 and path[-1] == n - 1 and all(a < b for a, b in zip(path, path[1:], strict=False))
        assert sum(float(cost[a, b]) for a, b in zip(path, path[1:], strict=False)) == pytest.approx(total)


def test_dp_refuses_impossible_step_counts():
    cost = torch.ones(4, 4)
    for steps in (0, 4, 2.0):
        with pytest.raises(ValueError, match="steps must be an int in \\[1, 3\\]"):
            dp_path(cost, steps)


def test_search_on_an_exact_model():
    """An analytic Gaussian-mixture denoiser: teacher states are a fine solve's states at the candidates, edges go
    forward only, and the tuned times are a path through the candidates whose cost is the DP's."""
    den = AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.3), SCHED)
    shape, seeds = (4,), list(range(8))
    cand = make_grid("time_quadratic", SCHED, 10)
    x_init = SCHED.prior_std(float(cand[0])) * torch.randn(8, 4, generator=torch.Generator().manual_seed(0),
                                                          dtype=torch.float64)
    states = teacher_states(den, cand, x_init=x_init, seeds=seeds, substeps=4)
    direct = sample(den, "dpmpp_3m", [t for a, b in zip(cand.tolist(), cand.tolist()[1:], strict=False)
                                      for t in ([a] if b == 0 else [a + (b - a) * k / 4 for k in range(4)])] + [0.0],
                    x_init=x_init, seeds=seeds)
    assert torch.equal(states[-1], direct) and torch.equal(states[0], x_init)
    edges = edge_costs(den, make_solver("ddim"), cand, states, seeds=seeds)
    forward = torch.triu(torch.ones(11, 11, dtype=torch.bool), diagonal=1)
    assert torch.isfinite(edges[forward]).all() and torch.isinf(edges[~forward]).all()
    found = search_steps(den, "ddim", 3, shape=shape, seeds=seeds, candidates=10, states=states, x_init=x_init)
    assert found.times[0] == float(cand[0]) and found.times[-1] == 0.0 and len(found.times) == 4
    assert set(found.times) <= set(cand.tolist())
    assert found.cost == pytest.approx(dp_path(edges, 3)[1])


def test_a_tuned_grid_that_loses_on_held_out_seeds_gives_way():
    from fewstep.tuning import choose

    rows = [{"solver": "ddim", "grid": "tuned", "calibration": 0.10, "holdout": 0.30},
            {"solver": "ddim", "grid": "karras", "calibration": 0.20, "holdout": 0.25},
            {"solver": "dpmpp_2m", "grid": "logsnr", "calibration": 0.15, "holdout": 0.22}]
    assert choose(rows)["grid"] == "logsnr"  # the best fixed grid on held-out data
    rows[0]["holdout"] = 0.2
    assert choose(rows)["grid"] == "tuned"
    rows[0]["calibration"] = 0.5
    assert choose(rows)["grid"] == "logsnr"


def test_tune_writes_a_plan_that_builds():
    from fewstep.tuning import tune

    den = AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.3), SCHED)
    got = tune(den, "gmm", 4, solvers=("ddim", "dpmpp_2m"), shape=(4,), seeds=range(8), holdout=range(100, 116),
               candidates=12)
    assert {r["solver"] for r in got.rows} == {"ddim", "dpmpp_2m"} and all("holdout" in r for r in got.rows)
    assert got.plan.model == "gmm" and got.plan.build(den, shape=(4,)).times.numel() == 5
    best_fixed = min(r["holdout"] for r in got.rows if r["grid"] != "tuned")
    chosen = next(r for r in got.rows if r["solver"] == got.plan.solver and
                  (r["grid"] == got.plan.grid or (r["grid"] == "tuned" and got.plan.grid == "explicit")))
    assert chosen["grid"] != "tuned" or chosen["holdout"] <= best_fixed


def test_cli_tune_writes_plans_that_sample_runs(tmp_path, capsys):
    from fewstep.cli import main
    from fewstep.plan import Plan

    argv = ["tune", "--model", "unet_s", "--nfe", "3,4", "--solvers", "ddim,dpmpp_2m", "--seeds", "1000-1003",
            "--holdout", "2000-2003", "--candidates", "8", "--iterations", "3", "--out", str(tmp_path / "plans")]
    (tmp_path / "plans").mkdir()
    assert main(argv) == 0, capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "plans").iterdir())
    assert written == ["error_vs_nfe.png", "grid.png", "plan_nfe3.json", "plan_nfe4.json", "report.md", "steps.png",
                       "tune.sqlite"]
    plan = Plan.load(tmp_path / "plans" / "plan_nfe4.json")
    assert plan.build().solver.nfe(plan.steps, to_zero=True) == 4
    assert main(["sample", "--plan", str(tmp_path / "plans" / "plan_nfe4.json"), "--seeds", "0-1", "--quiet",
                 "--out", str(tmp_path / "x.npz")]) == 0
    assert "2 samples, 4 NFE" in capsys.readouterr().out
    assert main([*argv[:6], "ddimm", *argv[7:]]) == 2
    assert "ddim" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "nowhere" / "deeper")]) == 2


def test_refinement_never_makes_the_run_worse():
    from fewstep.tuning import refine_steps

    den = AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.3), SCHED)
    seeds = list(range(8))
    start = make_grid("time_uniform", SCHED, 4).tolist()
    x_init = SCHED.prior_std(start[0]) * torch.randn(8, 4, generator=torch.Generator().manual_seed(0),
                                                     dtype=torch.float64)
    target = sample(den, "dpmpp_3m", 200, x_init=x_init, seeds=seeds, grid="time_quadratic")
    solver = make_solver("dpmpp_2m")
    before = float((sample(den, solver, start, x_init=x_init, seeds=seeds) - target).flatten(1).pow(2).mean(1)
                   .sqrt().mean())
    times, after = refine_steps(den, solver, start, x_init=x_init, seeds=seeds, target=target)
    assert after < before and times[0] == start[0] and times[-1] == 0.0
    assert all(b < a for a, b in zip(times, times[1:], strict=False))


def test_teachers_are_solved_once_for_every_nfe(monkeypatch):
    import fewstep.tuning.run as tuning

    calls = []
    real = tuning.teacher_states
    monkeypatch.setattr(tuning, "teacher_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    den = AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.3), SCHED)
    teachers = {}
    kw = {"solvers": ("ddim",), "shape": (4,), "seeds": range(4), "holdout": range(100, 104), "candidates": 8,
          "teachers": teachers}
    first = tuning.tune(den, "gmm", 3, **kw)
    tuning.tune(den, "gmm", 4, **kw)
    assert len(calls) == 2  # calibration and held-out teachers, once
    assert first.rows == tuning.tune(den, "gmm", 3, **{**kw, "teachers": None}).rows


def test_a_tune_made_to_lose_on_held_out_seeds_returns_the_fixed_grid(monkeypatch):
    """The calibration teacher is made to mislead (its end point is a coarse 3-step DDIM run on an odd grid): the
    tuned grid fits it best on the calibration seeds and loses on the held-out ones, so the best fixed grid on
    held-out data is the plan."""
    import fewstep.tuning.run as tuning

    den = AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.3), SCHED)
    real = tuning.teacher_states
    calibration = list(range(4))

    def misleading(den_, cand, *, x_init, seeds, cond=None, **kw):
        states = real(den_, cand, x_init=x_init, seeds=seeds, cond=cond, **kw)
        if list(seeds) == calibration:
            c = cand.tolist()
            states[-1] = sample(den_, "ddim", [c[0], c[1], c[-2], 0.0], x_init=x_init, seeds=seeds)
        return states

    monkeypatch.setattr(tuning, "teacher_states", misleading)
    got = tuning.tune(den, "gmm", 3, solvers=("ddim",), shape=(4,), seeds=calibration, holdout=range(100, 132),
                      candidates=10, diffusers=False)
    tuned = next(r for r in got.rows if r["grid"] == "tuned")
    fixed = [r for r in got.rows if r["grid"] != "tuned"]
    assert tuned["calibration"] < min(r["calibration"] for r in fixed)  # it wins where it was fitted
    best = min(fixed, key=lambda r: r["holdout"])
    assert tuned["holdout"] > best["holdout"]  # and loses on held-out data
    assert got.fell_back and got.plan.grid == best["grid"] and got.plan.steps == 3 and got.chosen is best


def test_an_interrupted_tune_resumes_from_its_store(tmp_path, monkeypatch):
    import fewstep.tuning.run as tuning
    from fewstep.tuning.store import TuneStore

    den = AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.3), SCHED)
    kw = {"solvers": ("ddim", "dpmpp_2m"), "shape": (4,), "seeds": range(4), "holdout": range(100, 108),
          "candidates": 8, "diffusers": False}
    fresh = tuning.tune(den, "gmm", 3, **kw)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    real_search = tuning.search_steps
    monkeypatch.setattr(tuning, "search_steps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(den, "gmm", 3, store=TuneStore(tmp_path / "tune.sqlite"), **kw)
    assert TuneStore(tmp_path / "tune.sqlite").count() == (1, len(tuning.FIXED_GRIDS))  # teachers, ddim's grids
    monkeypatch.setattr(tuning, "search_steps", real_search)
    resumed = tuning.tune(den, "gmm", 3, store=TuneStore(tmp_path / "tune.sqlite"), **kw)
    assert resumed.rows == fresh.rows and resumed.plan == fresh.plan
    for name in ("search_steps", "teacher_states", "refine_steps", "refine_by_gradient"):
        monkeypatch.setattr(tuning, name, interrupted)
    again = tuning.tune(den, "gmm", 3, store=TuneStore(tmp_path / "tune.sqlite"), **kw)  # nothing recomputed
    assert again.rows == fresh.rows and again.plan == fresh.plan


def test_tune_by_gradient_with_decoupled_times_and_diffusers_rows():
    """A zoo network takes tensor times: the tuned rows come from gradient refinement, a decoupled row is there,
    and diffusers' DDIM (trailing) is fewstep's DDIM on the trailing grid, from the same noise."""
    from fewstep import zoo
    from fewstep.tuning import tune

    den = zoo.load("unet_s")
    got = tune(den, "unet_s", 4, solvers=("ddim",), shape=den.sample_shape, seeds=range(1000, 1004),
               holdout=range(4), candidates=8, iterations=4)
    grids = [r["grid"] for r in got.rows if r["kind"] == "fewstep"]
    assert grids == [*["time_quadratic", "trailing", "logsnr", "karras", "time_uniform"], "tuned", "tuned_decoupled"]
    decoupled = next(r for r in got.rows if r["grid"] == "tuned_decoupled")
    assert len(decoupled["model_times"]) == 4 and decoupled["model_times"] != decoupled["times"][:-1]
    peers = {r["solver"]: r for r in got.rows if r["kind"] == "diffusers"}
    assert {"DDIM", "DPM++2M", "UniPC", "DEIS", "Euler"} <= set(peers) and "Heun" not in peers  # Heun: odd NFE only
    trailing = next(r for r in got.rows if r["grid"] == "trailing")
    assert peers["DDIM"]["holdout"] == pytest.approx(trailing["holdout"], abs=1e-5)
    assert got.plan.build(den).solver.nfe(got.plan.steps, to_zero=True) == 4
    assert set(got.samples) >= {"chosen", "best fixed", "best diffusers"}


def test_a_conditional_guided_tune_resumes(tmp_path):
    """dit_s tuned on labels 0-1 with guidance, held out on 2-3; the rerun reads every row (diffusers' too) from
    the store and remakes the report's samples with the held-out labels of the first seeds."""
    import torch

    from fewstep import zoo
    from fewstep.tuning import tune
    from fewstep.tuning.store import TuneStore

    den = zoo.load("dit_s")
    held_out = {"class_labels": torch.arange(10) % 2 + 2}
    kw = {"solvers": ("ddim",), "shape": den.sample_shape, "seeds": range(1000, 1004), "holdout": range(10),
          "cond": {"class_labels": torch.tensor([0, 1, 0, 1])}, "holdout_cond": held_out, "guidance": 2.0,
          "candidates": 6, "iterations": 2}
    first = tune(den, "dit_s", 3, store=TuneStore(tmp_path / "t.sqlite"), **kw)
    again = tune(den, "dit_s", 3, store=TuneStore(tmp_path / "t.sqlite"), **kw)
    assert again.rows == first.rows and again.plan == first.plan and first.plan.guidance == 2.0
    assert any(r["kind"] == "diffusers" for r in first.rows)
    for label in first.samples:
        torch.testing.assert_close(again.samples[label], first.samples[label])
