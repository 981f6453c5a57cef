"""The research solvers: SA-Solver's tau = 0 reduction, momentum's stability, the forward-value sign flip, EVODiff,
and exact inversion with BDIA (orders are in test_orders.py, diffusers parity in test_parity_diffusers.py)."""

import pytest
import torch
from tests.conftest import rel_err, rmse

from fewstep import ClassifierFreeGuidance, invert, make_solver, regenerate, sample
from fewstep.grids import logsnr
from fewstep.schedules import EDM, DiscreteVP, LinearVP
from fewstep.zoo import AnalyticDenoiser, gaussian, gaussian_mixture


def _run(den, name, steps, x, **knobs):
    return sample(den, make_solver(name, **knobs), steps, x_init=x)


# SA-Solver --------------------------------------------------------------------------------------------------------

def test_sa_solver_tau0_predictor_is_exact_exponential_adams(gmm_problem):
    """tau = 0, no corrector: the predictor integrates the Lagrange polynomial exactly, which is DPM-Solver++(3M)
    with the correct 2 phi3 coefficient (our dpmpp_3m_sde at eta = 0: same Taylor-form warm-up)."""
    den, t0, t1, x, _ = gmm_problem
    grid = logsnr(den.schedule, 12, to_zero=False, t_start=t0, t_end=t1)
    sa = sample(den, make_solver("sa_solver", predictor_order=3, corrector_order=0, tau=0.0, modified_order2=False),
                grid, x_init=x)
    pp = sample(den, make_solver("dpmpp_3m_sde", eta=0.0), grid, x_init=x)
    assert rel_err(sa, pp) < 1e-12


def test_sa_solver_tau0_first_order_is_ddim(gmm_problem):
    den, t0, t1, x, _ = gmm_problem
    grid = logsnr(den.schedule, 9, to_zero=True, t_start=t0)
    sa = sample(den, make_solver("sa_solver", predictor_order=1, corrector_order=0, tau=0.0), grid, x_init=x)
    assert rel_err(sa, sample(den, "ddim", grid, x_init=x)) < 1e-12


def test_sa_solver_tau_window_decides_stochasticity():
    assert not make_solver("sa_solver", tau=0.0).stochastic
    assert not make_solver("sa_solver", tau=1.0, tau_window=(0.5, 0.5)).stochastic
    assert make_solver("sa_solver").stochastic and make_solver("sa_solver").order == 1
    assert make_solver("sa_solver", tau=0.0).order == 2
    assert make_solver("sa_solver", predictor_order=3, corrector_order=4, tau=0.0).order == 4


def test_sa_solver_tau1_matches_the_data_distribution():
    """tau = 1 throughout is the reverse SDE: 200 steps reproduce the mixture's mean and covariance."""
    sched = LinearVP()
    data = gaussian_mixture(dim=2, components=2, std=0.4, seed=5)
    den = AnalyticDenoiser(data, sched)
    out = sample(den, make_solver("sa_solver", tau=1.0, tau_window=(0.0, 1.0)), 200, shape=(2,), seeds="0-3999",
                 dtype=torch.float64)
    assert (out.mean(0) - data.mean()).abs().max() < 0.05
    assert (torch.cov(out.T) - data.covariance()).abs().max() < 0.06


# Momentum ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [2, 3, 4])
def test_ghvb_beta1_is_adams_bashforth(order, gmm_problem):
    den, t0, t1, x, _ = gmm_problem
    grid = logsnr(den.schedule, 10, to_zero=True, t_start=t0)
    ghvb = sample(den, make_solver("ghvb", solver_order=order, beta=1.0), grid, x_init=x)
    hb = sample(den, make_solver("hb", base="plms", solver_order=order, beta=1.0, lower_order_final=False), grid,
                x_init=x)
    ab = sample(den, make_solver("ipndm", solver_order=order), grid, x_init=x)
    assert rel_err(ghvb, ab) < 1e-12 and rel_err(hb, ab) < 1e-12


def test_hb_beta1_is_dpmpp_2m(gmm_problem):
    den, t0, t1, x, _ = gmm_problem
    grid = logsnr(den.schedule, 10, to_zero=True, t_start=t0)
    assert rel_err(sample(den, make_solver("hb", beta=1.0), grid, x_init=x),
                   sample(den, "dpmpp_2m", grid, x_init=x)) < 1e-12


@pytest.fixture(scope="module")
def guided():
    """A stiff problem: an exact 5-class mixture with classifier-free guidance at scale 15, class 1."""
    den = AnalyticDenoiser(gaussian_mixture(dim=16, components=5, std=0.3, seed=3), DiscreteVP.named("linear"))
    model = ClassifierFreeGuidance(den, 15.0)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample(model, make_solver("dpmpp_3m"), 1000, x_init=x, cond=1, grid="logsnr")
    return model, x, ref


@pytest.mark.parametrize("steps", [8, 10])
def test_momentum_avoids_the_divergence_of_plain_multistep(guided, steps):
    """Measured (docs/results.md): Adams-Bashforth 3/4 (PLMS, = ghvb with beta = 1) blow up at 8-10 steps under
    strong guidance; heavy ball on PLMS-4 and GHVB 2.5 (r = 3, beta = 0.5) stay accurate."""
    model, x, ref = guided

    def err(name: str, **knobs: object) -> float:
        out = sample(model, make_solver(name, **knobs), steps, x_init=x, cond=1, grid="time_quadratic", check=False)
        return rmse(out, ref)

    ab3, ab4 = err("ghvb", solver_order=3, beta=1.0), err("ghvb", solver_order=4, beta=1.0)
    ghvb, hb = err("ghvb", solver_order=3, beta=0.5), err("hb", base="plms", solver_order=4, beta=0.8)
    assert ab3 > 0.3 and ab4 > 1.0, (ab3, ab4)
    assert ghvb < ab3 / 5 and hb < ab4 / 5, (ghvb, ab3, hb, ab4)


# Forward value ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [LinearVP(), EDM()], ids=["vp", "edm"])
@pytest.mark.parametrize("steps", [5, 10, 40])
def test_forward_value_error_has_the_opposite_sign_to_ddim(schedule, steps):
    """On a Gaussian the flow is linear; project the end-point error on the exact end point: DDIM contracts too
    much (negative), F-DDIM too little (positive)."""
    den = AnalyticDenoiser(gaussian(dim=4, mean=0.0, std=0.5), schedule)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * schedule.prior_std(schedule.t_max)
    t1 = schedule.inverse_lam(3.0)
    grid = logsnr(schedule, steps, to_zero=False, t_end=t1)
    exact = den.gaussian_flow(x, float(grid[0]), t1)

    def signed(name: str) -> float:
        out = sample(den, name, grid, x_init=x)
        return float(((out - exact) * exact).sum() / (exact * exact).sum())

    assert signed("ddim") < 0 < signed("f_ddim")
    assert signed("f_dpmsolver") > 0
    assert abs(signed("f_ddim")) < abs(signed("ddim"))


# EVODiff ----------------------------------------------------------------------------------------------------------

def test_evodiff_beats_ddim_and_converges(gmm_problem):
    den, t0, _, x, _ = gmm_problem
    ref = den.reference_data(x, t0)
    errs = {n: rmse(_run(den, "evodiff", logsnr(den.schedule, n, to_zero=True, t_start=t0), x), ref)
            for n in (10, 20, 40)}
    ddim = rmse(_run(den, "ddim", logsnr(den.schedule, 20, to_zero=True, t_start=t0), x), ref)
    assert errs[20] < ddim and errs[40] < errs[10]


# Inversion --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def to_invert():
    den = AnalyticDenoiser(gaussian_mixture(dim=16, components=5, std=0.3, seed=3), LinearVP())
    x0 = den.data.sample(8, generator=torch.Generator().manual_seed(2))
    return den, x0


@pytest.mark.parametrize("steps", [2, 5, 10, 50, 200])
def test_bdia_round_trip_is_exact(to_invert, steps):
    den, x0 = to_invert
    inv = invert(den, x0, solver="bdia", steps=steps)
    assert inv.nfe == steps
    assert rel_err(regenerate(den, inv), x0) <= 1e-6
    assert inv.x_T.std() < 3.0  # a sane latent, not a blown-up parasitic mode


@pytest.mark.parametrize("steps", [5, 20])
def test_bdia_gamma_half_is_exact_at_few_steps(to_invert, steps):
    den, x0 = to_invert
    inv = invert(den, x0, solver=make_solver("bdia", gamma=0.5), steps=steps)
    assert rel_err(regenerate(den, inv), x0) <= 1e-6


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_plain_inversion_is_not_exact(to_invert, solver):
    den, x0 = to_invert
    errs = [rel_err(regenerate(den, invert(den, x0, solver=solver, steps=n)), x0) for n in (10, 50)]
    assert errs[0] > 1e-2 and errs[1] > 1e-4


def test_ddim_inversion_of_a_single_gaussian_converges():
    """With a smooth (single-Gaussian) model DDIM inversion is consistent: the round trip error shrinks ~1/N."""
    den = AnalyticDenoiser(gaussian(dim=4, mean=0.3, std=0.5), LinearVP())
    x0 = den.data.sample(8, generator=torch.Generator().manual_seed(1))
    e = [rel_err(regenerate(den, invert(den, x0, solver="ddim", steps=n)), x0) for n in (20, 80)]
    assert e[1] < e[0] / 3


def test_regenerate_with_other_conditioning_changes_the_result(to_invert):
    den, x0 = to_invert
    inv = invert(den, x0, solver="bdia", steps=20)
    edited = regenerate(den, inv, cond=2)
    assert rmse(edited, x0) > 0.1


def test_inversion_errors(to_invert):
    den, x0 = to_invert
    with pytest.raises(ValueError, match="stochastic"):
        invert(den, x0, solver="ddpm", steps=10)
    with pytest.raises(ValueError, match="end at t > 0"):
        invert(den, x0, solver="ddim", steps=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="gamma"):
        make_solver("bdia", gamma=0.0)
    with pytest.raises(TypeError, match="Inversion"):
        regenerate(den, x0)


@pytest.mark.parametrize(("name", "knobs"), [
    ("hb", {"beta": 0.0}), ("hb", {"beta": 1.5}), ("ghvb", {"beta": -0.1}), ("ghvb", {"solver_order": 5}),
    ("hb", {"base": "dpmpp_2m", "solver_order": 3}), ("sa_solver", {"tau": -1.0}),
    ("sa_solver", {"corrector_order": 5}), ("sa_solver", {"tau_window": (0.8, 0.2)}), ("bdia", {"gamma": 1.5}),
])
def test_bad_research_knobs(name, knobs):
    with pytest.raises(ValueError):
        make_solver(name, **knobs)
