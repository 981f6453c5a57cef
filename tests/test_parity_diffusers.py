"""Parity with diffusers 0.42 on the same exact model, grid and starting noise (float64).

Pinned diffusers settings (documented in docs/parity.md): ``timestep_spacing="trailing"`` (integer timesteps
from 999 down), ``clip_sample=False`` / no thresholding, ``set_alpha_to_one=True`` for DDIM, ``final_sigmas_type
="zero"`` (the default) for DPM-Solver++ and UniPC; diffusers' ``lower_order_final`` applies only below 15 steps
for DPM-Solver++ and DEIS, so ours is set to ``steps < 15`` too.
"""

import diffusers
import pytest
import torch
from tests.conftest import rel_err

from fewstep import make_solver, sample
from fewstep.models import ModelDenoiser, schedule_from_config
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def _setup(prediction: str):
    schedule, _ = schedule_from_config({**CONFIG, "prediction_type": "epsilon"})
    exact = AnalyticDenoiser(gaussian_mixture(dim=16, components=5, std=0.3, seed=3), schedule)
    ours = {"epsilon": "eps", "v_prediction": "v"}[prediction]
    net = exact.as_model(ours)
    den = ModelDenoiser(net, schedule, prediction=ours)
    return schedule, net, den


def _run_diffusers(scheduler, net, x_vp: torch.Tensor, steps: int, alpha_t: float, edm_frame: bool) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = x_vp / alpha_t if edm_frame else x_vp.clone()
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        x = scheduler.step(net(inp, t), t, x).prev_sample
    return x


def _grid(schedule, scheduler, final: float | None) -> list[float]:
    ts = [schedule.time_of_index(int(t)) for t in scheduler.timesteps]
    ts = list(dict.fromkeys(ts))  # Heun repeats its timesteps
    return ts + ([final] if final is not None else [])


CASES = {
    # name: (diffusers class, diffusers config, our solver, our knobs, final time: 0 or t_min, edm frame)
    "ddim": (diffusers.DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=True), "ddim", {}, 0.0, False),
    "ddim_eta0_as_euler": (diffusers.EulerDiscreteScheduler, {}, "euler", {}, 0.0, True),
    "heun": (diffusers.HeunDiscreteScheduler, {}, "heun", {}, 0.0, True),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, dict(solver_order=2), "dpmpp_2m", {}, 0.0, False),
    "dpmpp_3m_compat": (diffusers.DPMSolverMultistepScheduler, dict(solver_order=3), "dpmpp_3m_compat", {}, 0.0,
                        False),
    "unipc_bh2": (diffusers.UniPCMultistepScheduler, dict(solver_order=2, solver_type="bh2"), "unipc",
                  dict(solver_order=2, variant="bh2"), 0.0, False),
    # diffusers' bh1 returns NaN when the last sigma is 0 (B(h) = -h = -inf times a zero residual), so this case
    # ends at sigma_min, as diffusers' final_sigmas_type="sigma_min" does.
    "unipc_bh1_3": (diffusers.UniPCMultistepScheduler, dict(solver_order=3, solver_type="bh1",
                    final_sigmas_type="sigma_min"), "unipc", dict(solver_order=3, variant="bh1"), None, False),
    "deis": (diffusers.DEISMultistepScheduler, dict(solver_order=3), "deis",
             dict(solver_order=3, interpolate_in="logrho"), None, False),
}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, steps, prediction):
    cls, extra, name, knobs, final, edm_frame = CASES[case]
    schedule, net, den = _setup(prediction)
    scheduler = cls(**CONFIG, prediction_type=prediction, timestep_spacing="trailing", **extra)
    scheduler.set_timesteps(steps)
    if final is None:  # DEIS ends at the first training step, sigma(t_min) > 0
        final = schedule.t_min
    grid = _grid(schedule, scheduler, final)
    if "lower_order_final" in make_solver(name, **knobs).__dict__:
        knobs = {**knobs, "lower_order_final": steps < 15 or name == "unipc"}
    solver = make_solver(name, **knobs)
    x_t = torch.randn(6, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours = sample(den, solver, grid, x_init=x_t)
    theirs = _run_diffusers(scheduler, net, x_t, steps, schedule.alpha(grid[0]), edm_frame)
    assert rel_err(ours, theirs) <= 1e-4, (case, steps, prediction, rel_err(ours, theirs))


@pytest.mark.parametrize("steps", [10, 25])
def test_parity_ddpm_same_noise(steps, monkeypatch):
    schedule, net, den = _setup("epsilon")
    scheduler = diffusers.DDPMScheduler(**CONFIG, clip_sample=False, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    grid = _grid(schedule, scheduler, 0.0)
    seeds = list(range(5))
    ours = sample(den, make_solver("ddpm"), grid, shape=(16,), seeds=seeds, dtype=torch.float64)

    from fewstep.noise import SampleNoise

    source = SampleNoise(seeds, (16,), dtype=torch.float64)
    x_t = source.draw()
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: source.draw())
    theirs = _run_diffusers(scheduler, net, x_t, steps, 1.0, False)
    assert rel_err(ours, theirs) <= 1e-4


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize(("p", "c"), [(1, 1), (2, 2), (3, 3), (3, 4)])
def test_parity_sa_solver_ode(steps, p, c):
    """tau = 0 (diffusers: ``tau_func=lambda t: 0``). diffusers ends at sigma(t_min) without a final denoise and
    always applies the order-2 rescaling (our ``modified_order2=True``, off by default)."""
    schedule, net, den = _setup("epsilon")
    scheduler = diffusers.SASolverScheduler(**CONFIG, timestep_spacing="trailing", predictor_order=p,
                                            corrector_order=c, tau_func=lambda t: 0)
    scheduler.set_timesteps(steps)
    grid = _grid(schedule, scheduler, schedule.t_min)
    x_t = torch.randn(6, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    solver = make_solver("sa_solver", predictor_order=p, corrector_order=c, tau=0.0, modified_order2=True)
    ours = sample(den, solver, grid, x_init=x_t)
    theirs = _run_diffusers(scheduler, net, x_t, steps, 1.0, False)
    assert rel_err(ours, theirs) <= 1e-4


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize(("p", "c"), [(2, 2), (3, 4)])
def test_parity_sa_solver_sde_same_noise(steps, p, c, monkeypatch):
    """tau = 1 on every step, the same noise draws (diffusers' randn replaced by our per-sample source)."""
    schedule, net, den = _setup("epsilon")
    scheduler = diffusers.SASolverScheduler(**CONFIG, timestep_spacing="trailing", predictor_order=p,
                                            corrector_order=c, tau_func=lambda t: 1)
    scheduler.set_timesteps(steps)
    grid = _grid(schedule, scheduler, schedule.t_min)
    seeds = list(range(6))
    solver = make_solver("sa_solver", predictor_order=p, corrector_order=c, tau=1.0, tau_window=(0.0, 1.0),
                         modified_order2=True)
    ours = sample(den, solver, grid, shape=(16,), seeds=seeds, dtype=torch.float64)

    from fewstep.noise import SampleNoise

    source = SampleNoise(seeds, (16,), dtype=torch.float64)
    x_t = source.draw()
    import diffusers.schedulers.scheduling_sasolver as sa_module

    monkeypatch.setattr(sa_module, "randn_tensor", lambda *a, **k: source.draw())
    theirs = _run_diffusers(scheduler, net, x_t, steps, 1.0, False)
    assert rel_err(ours, theirs) <= 1e-4


@pytest.mark.parametrize("steps", [10, 20])
def test_parity_sa_solver_default_tau_window_same_noise(steps, monkeypatch):
    """diffusers' default ``tau_func`` (tau = 1 iff 200 <= timestep <= 800) against our default ``tau_window``
    at 10 and 20 trailing steps, whose grids include training step 199 (outside) and 799 (inside)."""
    schedule, net, den = _setup("epsilon")
    scheduler = diffusers.SASolverScheduler(**CONFIG, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert 199 in scheduler.timesteps.tolist() and 799 in scheduler.timesteps.tolist()
    grid = _grid(schedule, scheduler, schedule.t_min)
    seeds = list(range(6))
    solver = make_solver("sa_solver", modified_order2=True)
    ours = sample(den, solver, grid, shape=(16,), seeds=seeds, dtype=torch.float64)

    from fewstep.noise import SampleNoise

    source = SampleNoise(seeds, (16,), dtype=torch.float64)
    x_t = source.draw()
    import diffusers.schedulers.scheduling_sasolver as sa_module

    monkeypatch.setattr(sa_module, "randn_tensor", lambda *a, **k: source.draw())
    theirs = _run_diffusers(scheduler, net, x_t, steps, 1.0, False)
    assert rel_err(ours, theirs) <= 1e-4
