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
