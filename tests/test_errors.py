"""Bad input gets a clear ValueError / TypeError that names the problem."""

import math

import pytest
import torch

from fewstep import make_solver, sample
from fewstep.grids import explicit, karras, make_grid
from fewstep.models import ModelDenoiser
from fewstep.noise import parse_seeds
from fewstep.schedules import DiscreteVP, LinearVP
from fewstep.zoo import AnalyticDenoiser, gaussian

SCHED = LinearVP()
DEN = AnalyticDenoiser(gaussian(dim=3), SCHED)


def test_unknown_solver_suggests():
    with pytest.raises(ValueError, match=r"unknown solver 'dpmpp2m'.*did you mean 'dpmpp_2m'"):
        make_solver("dpmpp2m")


def test_unknown_solver_knob():
    with pytest.raises(TypeError, match="solver 'ddim'.*etta"):
        make_solver("ddim", etta=1.0)


def test_unknown_grid_suggests():
    with pytest.raises(ValueError, match=r"unknown grid 'karas'.*did you mean 'karras'"):
        make_grid("karas", SCHED, 10)


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one(steps):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        karras(SCHED, steps)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample(DEN, "ddim", steps, shape=(3,))


def test_steps_not_int():
    with pytest.raises(TypeError, match="steps must be an int"):
        karras(SCHED, 2.5)


def test_grid_not_decreasing():
    with pytest.raises(ValueError, match="strictly decreasing"):
        explicit(SCHED, [0.5, 0.7, 0.1])


def test_grid_outside_model_range():
    with pytest.raises(ValueError, match="leave the model's range"):
        sample(DEN, "ddim", [1.5, 0.5, 0.0], shape=(3,))
    with pytest.raises(ValueError, match="leave the model's range"):
        explicit(SCHED, [0.5, 1e-5, 0.0])


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="unknown prediction type 'epsilon'.*eps"):
        ModelDenoiser(lambda x, t: x, SCHED, prediction="epsilon")


def test_flow_needs_flow_schedule():
    with pytest.raises(ValueError, match="RectifiedFlow"):
        ModelDenoiser(lambda x, t: x, SCHED, prediction="flow")


def test_wrong_shape_names_the_step():
    den = ModelDenoiser(lambda x, t: x[:, :2], SCHED, prediction="eps")
    with pytest.raises(ValueError, match=r"shape \(4, 2\).*\(4, 3\)"):
        sample(den, "ddim", 5, shape=(3,), seeds=range(4))


def test_nan_names_the_step():
    def net(x, t):
        return torch.full_like(x, math.nan) if float(t[0]) < 500 else torch.zeros_like(x)

    den = ModelDenoiser(net, DiscreteVP.named("linear"), prediction="eps")
    with pytest.raises(ValueError, match=r"NaN or inf at step [1-9]"):
        sample(den, "dpmpp_2m", 10, shape=(3,), grid="time_uniform")


@pytest.mark.parametrize("knob", [{"eta": -0.1}, {"eta": "big"}])
def test_bad_solver_knobs(knob):
    with pytest.raises(ValueError, match="eta"):
        make_solver("ddim", **knob)


@pytest.mark.parametrize("name,knob", [("unipc", {"solver_order": 4}), ("unipc", {"variant": "bh3"}),
                                       ("deis", {"interpolate_in": "lam"}), ("dpm_solver_2", {"solver_order": 5})])
def test_bad_choices(name, knob):
    with pytest.raises((ValueError, TypeError)):
        make_solver(name, **knob)


@pytest.mark.parametrize("spec", ["3-1", "a-b", "", "1,,2"])
def test_bad_seed_ranges(spec):
    with pytest.raises(ValueError, match="seed"):
        parse_seeds(spec)


def test_seed_ranges():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds(3) == [0, 1, 2]


def test_seed_count_must_match_batch():
    with pytest.raises(ValueError, match="2 seeds for a batch of 4"):
        sample(DEN, "ddim", 4, x_init=torch.zeros(4, 3), seeds=[0, 1])


def test_missing_shape():
    with pytest.raises(ValueError, match="x_init or shape"):
        sample(DEN, "ddim", 4)


def test_schedule_bounds():
    with pytest.raises(ValueError, match="outside"):
        SCHED.alpha(2.0)
    with pytest.raises(ValueError, match="beta schedule"):
        DiscreteVP.named("cosine")
