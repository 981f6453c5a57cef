"""A plan's times in diffusers' own schedulers (``diffusers_kwargs``), and a plan with decoupled network times
(``model_times``, LD3) in ``FewstepScheduler.from_plan``.

Parity is on an exact model (a Gaussian mixture's denoiser) fed diffusers' timesteps in diffusers' own time
convention, so both sides evaluate the same function: a diffusers scheduler driven by ``diffusers_kwargs(plan, ...)``
in a pipeline's loop lands where fewstep's solver of the same kind lands on the same times from the same noise.
"""

import diffusers
import pytest
import torch
from tests.conftest import rel_err

from fewstep.grids import make_grid
from fewstep.models import ModelDenoiser, schedule_from_config
from fewstep.models.scheduler_config import native_time_from_config, time_from_native
from fewstep.plan import Plan
from fewstep.scheduler import FewstepScheduler, diffusers_kwargs
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DIM = 16


class ExactNet(torch.nn.Module):
    """The mixture's exact ``eps`` (or flow velocity) at the time diffusers' timestep stands for in ``config``."""

    def __init__(self, config: dict, prediction: str) -> None:
        super().__init__()
        self.schedule, _ = schedule_from_config(config)
        self.exact = AnalyticDenoiser(gaussian_mixture(dim=DIM, components=5, std=0.3, seed=3), self.schedule)
        self.from_native = time_from_native(config, self.schedule)
        self.config, self.prediction = config, prediction

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        s = self.schedule
        t = self.from_native(float(torch.as_tensor(timestep).reshape(-1)[0]))
        x0 = self.exact(x, t)
        eps = (x - s.alpha(t) * x0) / s.sigma(t)
        return eps if self.prediction == "eps" else eps - x0

    def denoiser(self) -> ModelDenoiser:
        """The same network as fewstep calls it."""
        return ModelDenoiser(self, self.schedule, prediction=self.prediction,
                             native_time=native_time_from_config(self.config, self.schedule))


def noise(seed: int = 7) -> torch.Tensor:
    return torch.randn(6, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def loop(scheduler, net, x: torch.Tensor, **set_timesteps) -> torch.Tensor:
    """A diffusers pipeline's denoising loop (flow schedulers have no scale_model_input: flow pipelines skip it)."""
    scheduler.set_timesteps(**set_timesteps)
    scale = getattr(type(scheduler), "scale_model_input", lambda _, x, t: x)
    for t in scheduler.timesteps:
        x = scheduler.step(net(scale(scheduler, x, t), t), t, x).prev_sample
    return x


def tuned_times(schedule, steps: int = 6) -> list[float]:
    """A grid no name makes, off the training steps, as a tuner returns it."""
    times = make_grid("time_quadratic", schedule, steps).tolist()
    times[1] = 0.8 * times[1] + 0.2 * times[2]
    times[3] = 0.6 * times[3] + 0.4 * times[4]
    return times


# ---------------------------------------------------------------- diffusers' own schedulers on a plan's times


@pytest.mark.parametrize("named", [False, True])
def test_euler_discrete_on_the_plans_sigmas_is_fewsteps_euler(named):
    """k-diffusion sigmas, the final 0 in the list; diffusers' Euler runs in the EDM frame x / alpha."""
    net = ExactNet({"_class_name": "EulerDiscreteScheduler", **SD}, "eps")
    schedule = net.schedule
    plan = (Plan(model="gmm", solver="euler", grid="logsnr", steps=7, dtype="float64") if named else
            Plan(model="gmm", solver="euler", grid="explicit", times=tuned_times(schedule), dtype="float64"))
    base = diffusers.EulerDiscreteScheduler(**SD)
    kwargs = diffusers_kwargs(plan, base)
    sampler = plan.build(net.denoiser(), shape=(DIM,))
    times = sampler.times.tolist()
    assert list(kwargs) == ["sigmas"] and len(kwargs["sigmas"]) == len(times) and kwargs["sigmas"][-1] == 0.0
    assert kwargs["sigmas"][:-1] == pytest.approx([schedule.sigma(t) / schedule.alpha(t) for t in times[:-1]])
    x = noise()
    ours = sampler.sample(x_init=x)
    theirs = loop(base, net, x / schedule.alpha(times[0]), **kwargs)
    assert rel_err(theirs, ours) < 1e-5


@pytest.mark.parametrize(("cls", "solver", "edm_frame"), [
    (diffusers.DPMSolverMultistepScheduler, "dpmpp_2m", False),
    (diffusers.HeunDiscreteScheduler, "heun", True),
])
def test_integer_timestep_schedulers_run_the_times_rounded_to_training_steps(cls, solver, edm_frame):
    """DPM-Solver++(2M) and Heun take integer timesteps only: the plan's times rounded to training steps, without
    the final 0 (they append it), give diffusers' solver the grid fewstep's runs on those rounded times."""
    net = ExactNet({"_class_name": cls.__name__, **SD}, "eps")
    schedule = net.schedule
    times = tuned_times(schedule)
    base = cls(**SD)
    kwargs = diffusers_kwargs(Plan(model="gmm", solver=solver, grid="explicit", times=times), base)
    steps = kwargs["timesteps"]
    assert list(kwargs) == ["timesteps"] and all(isinstance(n, int) for n in steps) and len(steps) == len(times) - 1
    rounded = [schedule.time_of_index(n) for n in steps] + [0.0]
    assert rounded != times
    assert all(abs(schedule.sigma_index(t) - n) <= 0.5 for t, n in zip(times[:-1], steps, strict=True))
    x = noise()
    ours = Plan(model="gmm", solver=solver, grid="explicit", times=rounded, dtype="float64").build(
        net.denoiser(), shape=(DIM,)).sample(x_init=x)
    theirs = loop(base, net, x / schedule.alpha(rounded[0]) if edm_frame else x, **kwargs)
    assert rel_err(theirs, ours) < 1e-5


def test_flow_match_euler_takes_the_unshifted_sigmas():
    """FlowMatchEuler shifts the sigmas it is given and appends the final 0: the plan's times are those sigmas."""
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    net = ExactNet(config, "flow")
    times = tuned_times(net.schedule, 5)
    plan = Plan(model="gmm", solver="euler", grid="explicit", times=times, dtype="float64")
    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    kwargs = diffusers_kwargs(plan, base)
    assert kwargs == {"sigmas": times[:-1]}
    x = noise()
    ours = plan.build(net.denoiser(), shape=(DIM,)).sample(x_init=x)
    assert rel_err(loop(base, net, x.float(), **kwargs).double(), ours) < 1e-5  # diffusers' flow Euler is float32


def test_explicit_times_hold_under_any_dynamic_shift():
    """With dynamic shifting the pipeline passes mu; the unshifted sigmas of explicit times mean the same times on
    the schedule of any shift. A named grid depends on the shift: it needs mu."""
    base = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    schedule = schedule_from_config(base, mu=1.2)[0]
    times = tuned_times(schedule, 5)
    kwargs = diffusers_kwargs(Plan(model="gmm", grid="explicit", times=times), base)
    base.set_timesteps(**kwargs, mu=1.2)
    assert base.sigmas.tolist() == pytest.approx([schedule.sigma(t) for t in times[:-1]] + [0.0], rel=1e-6)
    with pytest.raises(ValueError, match="pass mu="):
        diffusers_kwargs(Plan(model="gmm", grid="logsnr", steps=5), base)
    named = diffusers_kwargs(Plan(model="gmm", grid="logsnr", steps=5), base, mu=1.2)
    assert named["sigmas"] == pytest.approx(make_grid("logsnr", schedule, 5).tolist()[:-1])


def test_a_plan_ending_at_t_min_needs_a_scheduler_ending_there():
    """Euler takes its end in the list; DPM-Solver ends where final_sigmas_type says, so only "sigma_min" runs a
    plan that ends at t_min (and "zero" one that ends at 0), with one network evaluation per step."""
    schedule = schedule_from_config(SD)[0]
    times = tuned_times(schedule)[:-1]
    assert times[-1] == schedule.t_min
    plan = Plan(model="gmm", grid="explicit", times=times)
    sigmas = diffusers_kwargs(plan, diffusers.EulerDiscreteScheduler(**SD))["sigmas"]
    assert len(sigmas) == len(times) and sigmas[-1] == pytest.approx(schedule.sigma(times[-1]) / schedule.alpha(
        times[-1]))
    ending = diffusers.DPMSolverMultistepScheduler(**SD, final_sigmas_type="sigma_min")
    assert len(diffusers_kwargs(plan, ending)["timesteps"]) == len(times) - 1
    with pytest.raises(ValueError, match="does not sample on the plan's times"):
        diffusers_kwargs(plan, diffusers.DPMSolverMultistepScheduler(**SD))
    with pytest.raises(ValueError, match="does not sample on the plan's times"):
        diffusers_kwargs(Plan(model="gmm", grid="explicit", times=[*times, 0.0]), ending)


def test_errors():
    schedule = schedule_from_config(SD)[0]
    times = tuned_times(schedule)
    plan = Plan(model="gmm", grid="explicit", times=times)
    euler = diffusers.EulerDiscreteScheduler(**SD)
    retimed = Plan(model="gmm", grid="explicit", times=times, model_times=[0.98 * t for t in times[:-1]])
    with pytest.raises(ValueError, match="model_times cannot be exported.*from_plan"):
        diffusers_kwargs(retimed, euler)
    for cls in (diffusers.DDIMScheduler, diffusers.DEISMultistepScheduler, diffusers.PNDMScheduler):
        with pytest.raises(ValueError, match="takes neither sigmas= nor timesteps="):
            diffusers_kwargs(plan, cls(**SD))
    with pytest.raises(ValueError, match="use_flow_sigmas=True"):  # UniPC takes sigmas of flow schedules only
        diffusers_kwargs(plan, diffusers.UniPCMultistepScheduler(**SD))
    with pytest.raises(ValueError, match="ramp"):
        diffusers_kwargs(plan, diffusers.EDMEulerScheduler())
    with pytest.raises(ValueError, match="from_plan"):
        diffusers_kwargs(plan, FewstepScheduler.from_config(euler.config))
    with pytest.raises(ValueError, match="_class_name"):
        diffusers_kwargs(plan, dict(SD))
    with pytest.raises(ValueError, match="no use_dynamic_shifting"):
        diffusers_kwargs(plan, euler, mu=1.0)
    close = [1.0, 0.5004, 0.5, 0.2, 0.0]  # 0.5004 and 0.5 are one training step
    with pytest.raises(ValueError, match="integer timesteps only.*0.5004 and 0.5 fall on the same step"):
        diffusers_kwargs(Plan(model="gmm", grid="explicit", times=close), diffusers.DPMSolverMultistepScheduler(**SD))
    assert len(diffusers_kwargs(Plan(model="gmm", grid="explicit", times=close), euler)["sigmas"]) == 5  # sigmas: fine
    flow_dpm = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                     prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="integer training steps of a beta table"):  # it would ignore timesteps=
        diffusers_kwargs(Plan(model="gmm", grid="logsnr", steps=5), flow_dpm)


# ---------------------------------------------------------------- FewstepScheduler.from_plan with model_times


def _plan(times, model_times, solver):
    return Plan(model="gmm", solver=solver, grid="explicit", times=times, model_times=model_times, dtype="float64")


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "dpm_solver_2"])
@pytest.mark.parametrize("retime", [False, True])
def test_from_plan_with_model_times_is_the_plans_sampler(solver, retime):
    """The pipeline feeds the network the native times of model_times; the solver steps over times. Multi-stage
    solvers (Heun at the next grid time, DPM-Solver-2 at a midpoint) evaluate where Retimed maps their stages."""
    net = ExactNet({"_class_name": "DDIMScheduler", **SD}, "eps")
    schedule = net.schedule
    times = tuned_times(schedule)
    model_times = [min(1.0, t * (1.04 if i % 2 else 0.97)) for i, t in enumerate(times[:-1])] if retime else None
    plan = _plan(times, model_times, solver)
    base = diffusers.DDIMScheduler(**SD, clip_sample=False)
    scheduler = FewstepScheduler.from_plan(plan, base)
    x = noise()
    got = loop(scheduler, net, x, num_inference_steps=plan.steps)
    sampler = plan.build(net.denoiser(), shape=(DIM,))
    want = sampler.sample(x_init=x)
    assert rel_err(got, want) < 1e-5
    to_native = native_time_from_config(base.config, schedule)
    evaluated = [to_native(sampler.denoiser.time_of(t) if retime else t) for t in scheduler._plan.eval_times]
    assert scheduler.timesteps.tolist() == pytest.approx(evaluated, rel=1e-6)
    if retime:  # the decoupled times change the result
        assert rel_err(got, _plan(times, None, solver).build(net.denoiser(), shape=(DIM,)).sample(x_init=x)) > 1e-3


def test_model_times_survive_the_config_and_are_checked():
    schedule = schedule_from_config(SD)[0]
    times = tuned_times(schedule)
    model_times = [0.98 * t for t in times[:-1]]
    base = diffusers.DDIMScheduler(**SD, clip_sample=False)
    scheduler = FewstepScheduler.from_plan(_plan(times, model_times, "dpmpp_2m"), base)
    assert dict(scheduler.config["solver_options"]) == {}  # the grid's options stay the grid's
    again = FewstepScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(6)
    again.set_timesteps(6)
    assert torch.equal(again.timesteps, scheduler.timesteps)
    assert scheduler.timesteps[0] < 999  # the network's first time, not the solver's t = 1
    with pytest.raises(ValueError, match="model_times needs one time per nonzero grid time"):
        FewstepScheduler.from_config(base.config, grid="explicit",
                                     grid_options={"times": times, "model_times": model_times[1:]})
    with pytest.raises(ValueError, match="grid_options=\\{'times'"):
        FewstepScheduler.from_config(base.config, grid="explicit", grid_options={"times": times, "bogus": 1})
