"""Equivalences that must hold exactly (up to float64 round-off)."""

import math

import pytest
import torch
from tests.conftest import rel_err

from fewstep import make_solver, sample
from fewstep.grids import logsnr
from fewstep.schedules import EDM, CosineVP, LinearVP, RectifiedFlow
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture


@pytest.mark.parametrize("steps", [3, 10])
def test_dpm_solver_1_equals_ddim_equals_euler(steps, gmm_problem):
    den, t0, t1, x, _ = gmm_problem
    grid = logsnr(den.schedule, steps, t_start=t0, t_end=t1)
    out = {name: sample(den, name, grid, x_init=x) for name in ("dpm_solver_1", "ddim", "euler")}
    assert rel_err(out["ddim"], out["dpm_solver_1"]) < 1e-12
    assert rel_err(out["euler"], out["ddim"]) < 1e-12


FRAME_SOLVERS = ["ddim", "euler", "heun", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"]


@pytest.mark.parametrize("solver", FRAME_SOLVERS + ["deis_logrho"])
@pytest.mark.parametrize("other", ["edm", "cosine", "flow"])
def test_schedule_reparametrisation_leaves_samples_unchanged(solver, other):
    """The same lam grid on a VP and on a VE/flow schedule gives the same samples in the EDM frame x/alpha."""
    data = gaussian_mixture(dim=4, components=3, std=0.3, seed=2)
    vp = LinearVP()
    lams = [-2.5 + 5.5 * i / 12 for i in range(13)]
    schedules = {"edm": EDM(sigma_min=1e-3, sigma_max=100.0), "cosine": CosineVP(), "flow": RectifiedFlow()}
    ve = schedules[other]
    make = (lambda: make_solver("deis", interpolate_in="logrho")) if solver == "deis_logrho" else (
        lambda: make_solver(solver))
    xbar = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * math.exp(-lams[0])
    outs = []
    for sched in (vp, ve):
        den = AnalyticDenoiser(data, sched)
        grid = [sched.inverse_lam(lam) for lam in lams]
        x = xbar * sched.alpha(grid[0])
        outs.append(sample(den, make(), grid, x_init=x) / sched.alpha(grid[-1]))
    assert rel_err(outs[1], outs[0]) < 1e-9


def test_deis_in_t_depends_on_the_time_variable():
    """tAB-DEIS interpolates in t, so it is *not* frame invariant (logrho is): a check that the test above can fail."""
    data = gaussian_mixture(dim=4, components=3, std=0.3, seed=2)
    lams = [-2.5 + 5.5 * i / 6 for i in range(7)]
    outs = []
    for sched in (LinearVP(), EDM(sigma_min=1e-3, sigma_max=100.0)):
        grid = [sched.inverse_lam(lam) for lam in lams]
        x = torch.ones(2, 4, dtype=torch.float64) * math.exp(-lams[0]) * sched.alpha(grid[0])
        outs.append(sample(AnalyticDenoiser(data, sched), make_solver("deis"), grid, x_init=x) / sched.alpha(grid[-1]))
    assert rel_err(outs[1], outs[0]) > 1e-6


def test_sde_solvers_with_eta_zero_are_the_ode_solvers(gmm_problem):
    den, t0, t1, x, _ = gmm_problem
    grid = logsnr(den.schedule, 12, t_start=t0, t_end=t1)
    a = sample(den, make_solver("dpmpp_2m_sde", eta=0.0), grid, x_init=x)
    b = sample(den, make_solver("dpmpp_2m"), grid, x_init=x)
    assert rel_err(a, b) < 1e-12


def test_ddim_eta_one_equals_ddpm_posterior(gmm_problem):
    den, t0, t1, x, _ = gmm_problem
    grid = logsnr(den.schedule, 12, t_start=t0, t_end=t1)
    a = sample(den, make_solver("ddim", eta=1.0), grid, x_init=x, seeds=range(64))
    b = sample(den, make_solver("ddpm"), grid, x_init=x, seeds=range(64))
    assert rel_err(a, b) < 1e-10


def test_unip2_bh2_without_corrector_is_dpmpp_2m(gmm_problem):
    """UniP-2 with B(h) = expm1(-h) and rho = 1/2 is DPM-Solver++(2M) (midpoint), term for term."""
    den, t0, t1, x, _ = gmm_problem
    grid = logsnr(den.schedule, 15, t_start=t0, t_end=t1)
    a = sample(den, make_solver("unipc", solver_order=2, variant="bh2", corrector=False), grid, x_init=x)
    b = sample(den, make_solver("dpmpp_2m"), grid, x_init=x)
    assert rel_err(a, b) < 1e-12
