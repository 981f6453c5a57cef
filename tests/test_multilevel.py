"""ML-EM (Multilevel) and trajectory stitching (Stitch)."""

import math

import pytest
import torch

from fewstep import CostMeter, NFECounter, sample
from fewstep.models import Run
from fewstep.multilevel import Multilevel, Stitch, calibrate, optimal_probs
from fewstep.schedules import LinearVP
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

SCHED = LinearVP()


def _family(k: int = 3) -> list[AnalyticDenoiser]:
    """Exact denoisers of mixtures that approach the finest one (component std 0.3 + 0.2 * 2^-l)."""
    return [AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.3 + 0.2 * 2.0 ** -(level + 1), seed=2),
                             SCHED) for level in range(k)]


def test_estimator_is_unbiased():
    levels = _family()
    ml = Multilevel(levels, [1.0, 0.3, 0.1])
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = 0.5
    draws = 4000
    bound = ml.for_run(Run(tuple(range(draws * 4)), (1.0, 0.0)))
    xs = x.repeat(draws, 1)
    est = bound(xs, t).view(draws, 4, 4)
    mean, std = est.mean(0), est.std(0) / math.sqrt(draws)
    target = levels[-1](x, t)
    assert bool(((mean - target).abs() <= 4 * std + 1e-12).all())
    assert float(std.max()) > 0  # the estimator is random


def test_single_finest_level_is_plain_euler_maruyama_bit_for_bit():
    fine = _family()[-1]
    a = sample(Multilevel([fine], [1.0]), "euler_maruyama", 20, shape=(4,), seeds="0-15", dtype=torch.float64)
    b = sample(fine, "euler_maruyama", 20, shape=(4,), seeds="0-15", dtype=torch.float64)
    assert torch.equal(a, b)


def test_all_probabilities_one_telescope_to_the_finest_level():
    levels = _family()
    a = sample(Multilevel(levels, [1.0, 1.0, 1.0]), "euler_maruyama", 20, shape=(4,), seeds="0-15",
               dtype=torch.float64)
    b = sample(levels[-1], "euler_maruyama", 20, shape=(4,), seeds="0-15", dtype=torch.float64)
    assert float((a - b).abs().max()) < 1e-12


def test_counted_cost_matches_the_probabilities_in_expectation():
    levels = _family()
    ml = Multilevel(levels, [1.0, 0.4, 0.2], costs=[0.1, 0.3, 1.0])
    meter, nfe = CostMeter(), NFECounter()
    sample(ml, "euler_maruyama", 50, shape=(4,), seeds="0-399", hooks=[meter, nfe], dtype=torch.float64)
    calls = nfe.nfe
    expected = ml.expected_cost() * calls  # P(level 1) = 1, P(2) = 1-(0.6)(0.8), P(3) = 0.2
    assert ml.expected_cost() == pytest.approx((0.1 + 0.3 * 0.52 + 0.2) / 1.0)
    assert meter.cost == pytest.approx(expected, rel=0.05)
    per_call = {level: n / (400 * calls) for level, n in meter.evaluations.items()}
    assert per_call[0] == 1.0
    assert per_call[1] == pytest.approx(0.52, abs=0.02) and per_call[2] == pytest.approx(0.2, abs=0.02)


def test_batch_size_invariance_and_reproducibility():
    ml = Multilevel(_family(), [1.0, 0.5, 0.25])
    full = sample(ml, "euler_maruyama", 15, shape=(4,), seeds="0-7", dtype=torch.float64)
    again = sample(ml, "euler_maruyama", 15, shape=(4,), seeds="0-7", dtype=torch.float64)
    part = sample(ml, "euler_maruyama", 15, shape=(4,), seeds="3-5", dtype=torch.float64)
    assert torch.equal(full, again)
    assert float((full[3:6] - part).abs().max()) < 1e-12


def test_multilevel_needs_a_run():
    ml = Multilevel(_family(), [1.0, 0.5, 0.25])
    with pytest.raises(TypeError, match="sample"):
        ml(torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="probability"):
        Multilevel(_family(), [1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="cost"):
        Multilevel(_family(), [1.0, 0.5, 0.5], costs=[1.0, 2.0])


def test_optimal_probs_meet_the_budget_and_favour_cheap_variance():
    v, c = [1.0, 0.04, 0.01], [0.1, 0.3, 1.0]
    p = optimal_probs(v, c, budget=0.5)
    q = [*p, 0.0]
    cost = sum(cl * (1 - (1 - q[i]) * (1 - q[i + 1])) for i, cl in enumerate(c))
    assert p[0] == 1.0 and cost == pytest.approx(0.5, rel=1e-6)
    assert p[1] / p[2] == pytest.approx(math.sqrt(0.04 / 0.3) / math.sqrt(0.01 / 1.0), rel=1e-6)
    with pytest.raises(ValueError, match="budget"):
        optimal_probs(v, c, budget=0.01)


def test_calibration_sees_converging_levels():
    cal = calibrate(_family(), 20, shape=(4,), seeds=8, costs=[0.25, 0.5, 1.0])
    assert cal.errors[-1] == 0.0 and cal.errors[0] > cal.errors[1] > 0
    assert cal.variances[1] > cal.variances[2] > 0


# Stitching --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "unipc", "heun"])
def test_stitching_a_model_with_itself_is_the_model(solver):
    den = _family()[-1]
    stitched = Stitch([den, den], [0.4])
    a = sample(stitched, solver, 12, shape=(4,), seeds="0-7", dtype=torch.float64)
    b = sample(den, solver, 12, shape=(4,), seeds="0-7", dtype=torch.float64)
    assert torch.equal(a, b)


def test_stitch_routes_the_scheduled_steps_and_counts_cost():
    small, large = _family()[0], _family()[-1]
    meter = CostMeter()
    sample(Stitch([small, large], [0.4], costs=[0.1, 1.0]), "ddim", 10, shape=(4,), seeds="0-3", hooks=[meter])
    assert meter.evaluations == {0: 4 * 4, 1: 4 * 6}  # steps 0-3 small (i/10 < 0.4), steps 4-9 large
    assert meter.cost == pytest.approx(4 * 0.1 + 6 * 1.0)


@pytest.mark.parametrize("by", ["fraction", "time", "logsnr"])
def test_stitch_extremes_are_the_single_models(by):
    small, large = _family()[0], _family()[-1]
    first, last = {"fraction": (0.0, 1.0), "time": (2.0, -1.0), "logsnr": (-100.0, 100.0)}[by]
    for switch, expect in ((first, large), (last, small)):
        a = sample(Stitch([small, large], [switch], by=by), "dpmpp_2m", 8, shape=(4,), seeds="0-3")
        assert torch.equal(a, sample(expect, "dpmpp_2m", 8, shape=(4,), seeds="0-3"))


def test_stitch_errors():
    small, large = _family()[0], _family()[-1]
    with pytest.raises(ValueError, match="switch point"):
        Stitch([small, large], [0.2, 0.5])
    with pytest.raises(ValueError, match="along the trajectory"):
        Stitch([small, large, large], [0.6, 0.2])
    with pytest.raises(ValueError, match="by must be"):
        Stitch([small, large], [0.5], by="steps")
    with pytest.raises(TypeError, match="sample"):
        Stitch([small, large], [0.5])(torch.zeros(2, 4), 0.5)
