"""The differentiable run behind the gradient refinement of ``fewstep tune``: it is ``sample()`` on the same grid,
its gradient with respect to the steps and the network times is the finite-difference one, decoupled network
times are ``Retimed`` runs, and refinement never makes the calibration error worse."""

import pytest
import torch

from fewstep import sample
from fewstep.differentiable import run
from fewstep.grids import make_grid
from fewstep.hostfn import host
from fewstep.models import ClassifierFreeGuidance, ModelDenoiser
from fewstep.models.retime import Retimed
from fewstep.plan import Plan
from fewstep.schedules import DiscreteVP, LinearVP
from fewstep.tuning import refine_by_gradient
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture


def tiny_unet(dtype=torch.float64):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4)
    return net.to(dtype).eval()


@pytest.fixture(scope="module")
def den():
    """A random-weight diffusers UNet2DModel in float64 on a smooth schedule (finite differences are exact to
    ~1e-8 there; a DiscreteVP table is piecewise linear in t)."""
    return ModelDenoiser(tiny_unet(), LinearVP(), prediction="eps")


def noise(n=3, t0=1.0, sched=None):
    g = torch.Generator().manual_seed(0)
    return (sched or LinearVP()).prior_std(t0) * torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("to_zero", [True, False])
def test_the_run_is_sample_on_the_same_grid(den, solver, to_zero):
    times = make_grid("time_quadratic", den.schedule, 5)
    if not to_zero:
        times = torch.cat([times[:-1][:-1], torch.tensor([den.schedule.t_min], dtype=times.dtype)])
    x = noise(t0=float(times[0]))
    want = sample(den, solver, times, x_init=x, seeds=range(3))
    got = run(den, solver, times.double(), x_init=x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_decoupled_network_times_are_a_retimed_run(den, solver):
    times = make_grid("logsnr", den.schedule, 4).tolist()
    model_times = [0.9, 0.5, 0.3, 0.02]
    x = noise(t0=times[0])
    want = sample(Retimed(den, times, model_times), solver, times, x_init=x, seeds=range(3))
    got = run(den, solver, torch.tensor(times, dtype=torch.float64), x_init=x,
              model_times=torch.tensor(model_times, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    plan = Plan(model="m", solver=solver, grid="explicit", times=tuple(times), model_times=tuple(model_times),
                dtype="float64")
    assert torch.equal(plan.build(den, shape=(1, 8, 8)).sample(x_init=x, seeds=range(3)), want)
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_the_gradient_in_the_steps_is_the_finite_difference_one(den, solver):
    times = torch.tensor([0.95, 0.6, 0.3, 0.12, 0.03, 0.0], dtype=torch.float64)
    model_times = torch.tensor([0.9, 0.62, 0.28, 0.1, 0.035], dtype=torch.float64)
    x = noise(t0=0.95)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(ts, ms):
        return (run(den, solver, ts, x_init=x, model_times=ms) * w).sum()

    ts, ms = times.clone().requires_grad_(True), model_times.clone().requires_grad_(True)
    loss(ts, ms).backward()
    eps = 1e-6
    for grad, base, which in ((ts.grad, times, 0), (ms.grad, model_times, 1)):
        for i in range(1 if which == 0 else 0, len(base) - (1 if which == 0 else 0)):  # interior steps; all ms
            up, down = base.clone(), base.clone()
            up[i] += eps
            down[i] -= eps
            args_up = (up, model_times) if which == 0 else (times, up)
            args_down = (down, model_times) if which == 0 else (times, down)
            with torch.no_grad():
                fd = (float(loss(*args_up)) - float(loss(*args_down))) / (2 * eps)
            assert float(grad[i]) == pytest.approx(fd, rel=1e-4, abs=1e-7), (which, i)
    assert all(float(g) != 0.0 for g in ts.grad[1:-1]) and all(float(g) != 0.0 for g in ms.grad)


def test_guidance_is_differentiable_too(den):
    guided = ClassifierFreeGuidance(den, 2.0)
    times = torch.tensor([0.9, 0.4, 0.1, 0.0], dtype=torch.float64, requires_grad=True)
    x = noise(t0=0.9)
    out = run(guided, "dpmpp_2m", times, x_init=x)
    torch.testing.assert_close(out, sample(guided, "dpmpp_2m", times.detach(), x_init=x, seeds=range(3)))
    out.sum().backward()
    assert torch.isfinite(times.grad).all() and float(times.grad[1].abs()) > 0


def test_host_functions_differentiate_by_central_differences():
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    sched = LinearVP()
    host(sched.lam, t).backward()
    h = 1e-5
    assert float(t.grad) == pytest.approx((sched.lam(0.4 + h) - sched.lam(0.4 - h)) / (2 * h), rel=1e-6)
    t_end = torch.tensor(sched.t_max, dtype=torch.float64, requires_grad=True)
    host(sched.alpha, t_end).backward()  # one-sided at the end of the schedule
    assert torch.isfinite(t_end.grad)


def test_refused():
    analytic = AnalyticDenoiser(gaussian_mixture(dim=4), DiscreteVP.named("linear"))
    with pytest.raises(ValueError, match="takes tensor times"):
        run(analytic, "ddim", torch.tensor([0.9, 0.0], dtype=torch.float64), x_init=torch.zeros(1, 4))
    den = ModelDenoiser(tiny_unet(), LinearVP(), prediction="eps")
    with pytest.raises(ValueError, match="differentiable run exists for ddim, dpmpp_2m"):
        run(den, "unipc", torch.tensor([0.9, 0.0], dtype=torch.float64), x_init=noise())
    with pytest.raises(ValueError, match="model_times needs 2 times"):
        run(den, "ddim", torch.tensor([0.9, 0.2, 0.0], dtype=torch.float64), x_init=noise(),
            model_times=torch.tensor([0.5], dtype=torch.float64))


@pytest.mark.parametrize("decouple", [False, True])
@pytest.mark.parametrize("grid", ["time_uniform", "time_quadratic"])  # the second ends at t_min before its 0
def test_refinement_lowers_the_error_and_keeps_a_valid_grid(decouple, grid):
    from fewstep import zoo

    den = zoo.load("unet_s")  # a trained model: a random network's end points are chaotic in its times
    times = make_grid(grid, den.schedule, 4).tolist()
    x = den.schedule.prior_std(times[0]) * torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = sample(den, "dpmpp_3m", 60, x_init=x, seeds=range(8), grid="time_quadratic")

    def error(model, ts):
        out = sample(model, "dpmpp_2m", ts, x_init=x, seeds=range(8))
        return float((out - target).flatten(1).pow(2).mean(1).sqrt().mean())

    start = error(den, times)
    got = refine_by_gradient(den, "dpmpp_2m", times, x_init=x, target=target, decouple=decouple, iterations=10)
    assert got.error < start and got.iterations > 0
    assert got.times[0] == times[0] and got.times[-1] == 0.0
    assert all(b < a for a, b in zip(got.times, got.times[1:], strict=False)) and got.times[-2] >= den.schedule.t_min
    assert (got.times[-2] == den.schedule.t_min) == (times[-2] == den.schedule.t_min)
    assert (got.model_times is not None) == decouple
    model = den if not decouple else Retimed(den, got.times, got.model_times)
    assert error(model, got.times) == pytest.approx(got.error, rel=1e-4)  # what it reports is what sample() runs


def test_retimed_is_checked():
    den = ModelDenoiser(tiny_unet(), LinearVP(), prediction="eps")
    with pytest.raises(ValueError, match="one time per nonzero grid time \\(2\\)"):
        Retimed(den, [0.9, 0.5, 0.0], [0.8])
    with pytest.raises(ValueError, match="positive numbers"):
        Retimed(den, [0.9, 0.5, 0.0], [0.8, -0.1])
    with pytest.raises(ValueError, match="outside"):
        Retimed(den, [0.9, 0.5, 0.0], [1.5, 0.4])
    with pytest.raises(ValueError, match="model_times are for grid='explicit'"):
        Plan(model="m", steps=3, model_times=(0.5, 0.2, 0.1))
