"""Schedules (alpha, sigma, lam, inverse_lam) and grids as pure functions."""

import math

import numpy as np
import pytest
import torch

from fewstep.grids import GRIDS, karras, logsnr, time_quadratic, time_uniform, trailing
from fewstep.models import schedule_from_config
from fewstep.schedules import EDM, CosineVP, DiscreteVP, LinearVP, RectifiedFlow

SCHEDULES = [DiscreteVP.named("linear"), DiscreteVP.named("scaled_linear", beta_start=0.00085, beta_end=0.012),
             DiscreteVP.named("squaredcos_cap_v2"), LinearVP(), CosineVP(), EDM(), RectifiedFlow()]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_lam_round_trip_and_monotone(schedule):
    ts = np.linspace(schedule.t_min, schedule.t_max, 57)
    lams = [schedule.lam(t) for t in ts]
    assert all(b < a for a, b in zip(lams, lams[1:], strict=False))
    for t, lam in zip(ts, lams, strict=False):
        assert math.isclose(schedule.inverse_lam(lam), t, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(lam, math.log(schedule.alpha(t) / schedule.sigma(t)), rel_tol=1e-12, abs_tol=1e-12)
    assert schedule.alpha(0.0) == 1.0 and schedule.sigma(0.0) == 0.0 and schedule.lam(0.0) == math.inf
    assert schedule.inverse_lam(math.inf) == 0.0


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if not isinstance(s, EDM | RectifiedFlow)], ids=repr)
def test_vp_is_variance_preserving(schedule):
    for t in np.linspace(schedule.t_min, schedule.t_max, 11):
        assert math.isclose(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, 1.0, rel_tol=1e-12)


def test_discrete_vp_hits_the_table_at_integer_indices():
    import diffusers

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                    beta_start=0.00085, beta_end=0.012)
    ours, _ = schedule_from_config(sched.config)
    for n in (0, 1, 250, 999):
        t = ours.time_of_index(n)
        assert math.isclose(ours.alpha(t) ** 2, float(sched.alphas_cumprod[n]), rel_tol=1e-6)
        assert ours.index(t) == pytest.approx(n, abs=1e-9)


@pytest.mark.parametrize("fn", list(GRIDS.values()))
@pytest.mark.parametrize("to_zero", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 10])
def test_grid_shape_and_ends(fn, to_zero, steps):
    s = LinearVP()
    if fn is trailing and not to_zero:
        with pytest.raises(ValueError, match="always ends at t = 0"):
            fn(s, steps, to_zero=to_zero)
        return
    g = fn(s, steps, to_zero=to_zero)
    assert g.dtype == torch.float64 and g.shape == (steps + 1,)
    assert g[0] == s.t_max
    assert (g[-1] == 0.0) if to_zero else (g[-1] == s.t_min)
    assert bool((g[1:] < g[:-1]).all())


def test_grid_rules():
    s = LinearVP()
    lam = np.array([s.lam(t) for t in logsnr(s, 8, to_zero=False).tolist()])
    assert np.allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)
    assert np.allclose(np.diff(time_uniform(s, 8, to_zero=False).numpy()), -(1 - 1e-3) / 8)
    assert np.allclose(np.diff(np.sqrt(time_quadratic(s, 8, to_zero=False).numpy())),
                       (math.sqrt(1e-3) - 1) / 8)
    # Karras on EDM: the closed form of eq. (5), rho = 7, sigma in [0.002, 80]
    e = EDM()
    ramp = np.linspace(0, 1, 10)
    expected = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert np.allclose(karras(e, 10).numpy()[:-1], expected, rtol=1e-12)


def test_bad_grid_bounds():
    with pytest.raises(ValueError, match="grid bounds"):
        logsnr(LinearVP(), 5, t_start=0.1, t_end=0.5)
    with pytest.raises(ValueError, match="rho"):
        karras(EDM(), 5, rho=0)


def test_trailing_matches_diffusers_and_refuses_too_many_steps():
    import diffusers

    sched = DiscreteVP.named("linear")
    for steps in (5, 13, 50):
        d = diffusers.DDIMScheduler(timestep_spacing="trailing")
        d.set_timesteps(steps)
        ours = [round(sched.index(t)) for t in trailing(sched, steps).tolist()[:-1]]
        assert ours == d.timesteps.tolist()
    with pytest.raises(ValueError, match="below t_min"):
        trailing(sched, 2000)
