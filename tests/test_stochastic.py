"""Distributional checks of the stochastic solvers against the exact data distribution.

Data: N(0.3, 0.5^2) in 4000 independent coordinates, exact denoiser, 8 seeds (32,000 scalar samples; the
Monte-Carlo standard error of the relative variance is ~0.8 %). Weak error = relative error of the sample
variance; weak order 1 means the error falls ~4x from 40 to 160 steps.
"""

import pytest
import torch

from fewstep import make_solver, sample
from fewstep.schedules import LinearVP
from fewstep.zoo import AnalyticDenoiser, GaussianMixture, gaussian

DEN = AnalyticDenoiser(gaussian(dim=4000, mean=0.3, std=0.5), LinearVP())


def _moments(name, knobs, steps):
    # on the log-SNR grid these thresholds were measured on (sample()'s default grid until there was one default)
    out = sample(DEN, make_solver(name, **knobs), steps, grid="logsnr", shape=(4000,), seeds=range(8),
                 dtype=torch.float64)
    return abs(out.mean().item() - 0.3), abs(out.var().item() / 0.25 - 1.0)


WEAK_ORDER_ONE = {
    "ddpm": ("ddpm", {}),
    "ddpm_large": ("ddpm", {"variance": "large"}),
    "ddim_eta1": ("ddim", {"eta": 1.0}),
    "euler_maruyama": ("euler_maruyama", {}),
}


@pytest.mark.parametrize("case", list(WEAK_ORDER_ONE))
def test_weak_convergence(case):
    name, knobs = WEAK_ORDER_ONE[case]
    mean40, var40 = _moments(name, knobs, 40)
    mean160, var160 = _moments(name, knobs, 160)
    assert mean40 < 0.01 and mean160 < 0.01
    assert var160 < 0.1, var160
    # ~4 for weak order 1; the Monte-Carlo floor (~0.008) and the large-variance start make it 2.6-5 here
    assert var40 / var160 > 2.0, (var40, var160)


@pytest.mark.parametrize("name,knobs,tol", [("dpmpp_2m_sde", {}, 0.03), ("dpmpp_3m_sde", {}, 0.03),
                                            ("heun", {"churn": 20.0}, 0.08), ("euler", {"churn": 20.0}, 0.3)])
def test_other_stochastic_solvers_match_the_data_distribution(name, knobs, tol):
    """SDE-DPM-Solver++ and EDM churn (whose SDE changes with the step count, gamma = churn/steps, so it has no
    fixed weak-order sequence) at 40 steps."""
    mean, var = _moments(name, knobs, 40)
    assert mean < 0.01 and var < tol, (mean, var)


CORRELATED = AnalyticDenoiser(GaussianMixture([[-1.0, -0.5], [1.0, 0.5]], 0.3, [0.4, 0.6]), LinearVP())


@pytest.mark.parametrize("name,knobs,steps", [("ddpm", {}, 200), ("euler_maruyama", {}, 200),
                                              ("dpmpp_2m_sde", {}, 40), ("dpmpp_2m", {}, 40), ("unipc", {}, 40)])
def test_mean_and_full_covariance(name, knobs, steps):
    """2-D, two-component mixture with correlated coordinates: the sample mean and the full covariance match the
    exact ones (Monte-Carlo standard error with 4,000 samples ~0.02 on these entries)."""
    out = sample(CORRELATED, make_solver(name, **knobs), steps, shape=(2,), seeds=range(4000), dtype=torch.float64)
    mean, cov = out.mean(0), torch.cov(out.T)
    assert torch.allclose(mean, CORRELATED.data.mean(), atol=0.04), mean
    assert torch.allclose(cov, CORRELATED.data.covariance(), atol=0.06), (cov, CORRELATED.data.covariance())
