"""diffusers scheduler configs read exactly: every field that shapes the noise schedule or the timesteps is honoured
(proved against the diffusers scheduler's own ``alphas_cumprod`` / ``sigmas`` / ``timesteps``) or refused with an
error that names it; EDM preconditioning recovers the exact denoiser; fewstep's Euler on ``diffusers_grid`` matches
diffusers' EDM and flow-matching Euler loops on the same network and noise."""

import math
import warnings

import diffusers
import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from tests.conftest import rel_err

from fewstep import sample
from fewstep.grids import make_grid, time_uniform
from fewstep.models import ModelDenoiser, from_diffusers, schedule_from_config
from fewstep.models.scheduler_config import (
    FLOW_T_MAX,
    diffusers_grid,
    dynamic_shift,
    native_time_from_config,
    time_from_native,
)
from fewstep.schedules import BETA_SCHEDULES, EDM, DiscreteVP, RectifiedFlow
from fewstep.zoo import gaussian, gaussian_mixture

diffusers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 on diffusers' np.array(tensor)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _scheduler(name: str, **config):
    return getattr(diffusers, name)(**config)


def _config(name: str, **config) -> dict:
    return {"_class_name": name, **config}


def _scheduler_of(config: dict):  # noqa: ANN202
    name = config.pop("_class_name")
    return _scheduler(name, **config)


def _once(values: list[float]) -> list[float]:
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


# ------------------------------------------------------------------------------------------------ the schedule

BETA_CASES = [("DDPMScheduler", b) for b in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")]
BETA_CASES += [("HeunDiscreteScheduler", "exp")]
BETA_CASES += [(c, b) for c in ("EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                                "UniPCMultistepScheduler", "LMSDiscreteScheduler", "PNDMScheduler")
               for b in ("linear", "scaled_linear", "squaredcos_cap_v2")]


@pytest.mark.parametrize(("name", "beta_schedule"), BETA_CASES)
def test_beta_table_is_diffusers_bit_for_bit(name, beta_schedule):
    config = dict(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    schedule, prediction = schedule_from_config(_config(name, **config))
    theirs = _scheduler(name, **config).alphas_cumprod.double().numpy()
    assert isinstance(schedule, DiscreteVP) and prediction == "eps"
    assert np.array_equal(schedule.alphas_cumprod, theirs)


def test_every_diffusers_beta_schedule_is_known():
    # the names diffusers 0.42's schedulers implement (grep of `beta_schedule == "..."` in diffusers/schedulers)
    assert set(BETA_SCHEDULES) == {"linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp"}
    for name in BETA_SCHEDULES:  # a config without a class name may use any of them
        schedule, _ = schedule_from_config({"beta_schedule": name})
        assert np.array_equal(schedule.alphas_cumprod, DiscreteVP.named(name).alphas_cumprod)


def test_trained_betas_win_over_beta_schedule():
    betas = np.linspace(2e-4, 0.03, 500).tolist()
    config = dict(num_train_timesteps=500, trained_betas=betas, beta_schedule="scaled_linear")
    schedule, _ = schedule_from_config(_config("DDIMScheduler", **config))
    theirs = _scheduler("DDIMScheduler", **config).alphas_cumprod.double().numpy()
    assert np.array_equal(schedule.alphas_cumprod, theirs)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_zero_terminal_snr_is_diffusers_table(name):
    config = dict(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    schedule, prediction = schedule_from_config(_config(name, **config))
    theirs = _scheduler(name, **config).alphas_cumprod.double().numpy()
    assert np.array_equal(schedule.alphas_cumprod, theirs)  # final alpha_bar = 2**-24, as these schedulers set it
    assert schedule.alphas_cumprod[-1] == 2**-24 and math.isfinite(schedule.lam(1.0)) and prediction == "v"


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler"])
def test_zero_terminal_snr_keeps_lam_finite_where_diffusers_keeps_zero(name):
    config = dict(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    schedule, _ = schedule_from_config(_config(name, **config))
    theirs = _scheduler(name, **config).alphas_cumprod.double().numpy()
    assert theirs[-1] == 0.0 and schedule.alphas_cumprod[-1] == 2**-24
    assert np.array_equal(schedule.alphas_cumprod[:-1], theirs[:-1])
    assert -9 < schedule.lam(schedule.t_max) < -8  # alpha = 2**-12


def test_zero_terminal_snr_refused_where_the_table_cannot_decrease():
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True.*second-to-last"):
        schedule_from_config(_config("DDIMScheduler", rescale_betas_zero_snr=True))  # linear 1e-4..0.02 is too abrupt


def test_fields_a_class_does_not_have_change_nothing_as_in_diffusers():
    # HeunDiscreteScheduler has no rescale_betas_zero_snr (diffusers ignores it) and its own default betas
    config = _config("HeunDiscreteScheduler", rescale_betas_zero_snr=True, use_flow_sigmas=True)
    schedule, _ = schedule_from_config(config)
    assert np.array_equal(schedule.alphas_cumprod, _scheduler("HeunDiscreteScheduler").alphas_cumprod.double().numpy())


@pytest.mark.parametrize(("config", "field", "image_seq_len"), [
    (_config("EulerDiscreteScheduler", beta_schedule="sigmoid"), "beta_schedule='sigmoid'", None),
    (_config("DDPMScheduler", beta_schedule="exp"), "beta_schedule='exp'", None),
    ({"beta_schedule": "cosine"}, "beta_schedule='cosine'", None),
    (_config("EulerDiscreteScheduler", prediction_type="flow_prediction"), "prediction_type='flow_prediction'", None),
    (_config("DDIMScheduler", prediction_type="score"), "prediction_type='score'", None),
    (_config("DPMSolverMultistepScheduler", use_flow_sigmas=True, prediction_type="v_prediction"),
     "prediction_type='v_prediction'", None),
    (_config("DPMSolverMultistepScheduler", use_flow_sigmas=True, use_dynamic_shifting=True,
             time_shift_type="linear", prediction_type="flow_prediction"), "time_shift_type='linear'", 1024),
    (_config("FlowMatchEulerDiscreteScheduler", invert_sigmas=True), "invert_sigmas=True", None),
    (_config("FlowMatchEulerDiscreteScheduler", shift=0.0), "shift=0.0", None),
    (_config("FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True), "use_dynamic_shifting=True", None),
    (_config("FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True, time_shift_type="cubic"),
     "time_shift_type='cubic'", 1024),
    (_config("FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True, max_shift=None), "max_shift=None", 1024),
    (_config("DDIMScheduler", num_train_timesteps=1), "num_train_timesteps=1", None),
    (_config("EDMEulerScheduler", prediction_type="sample"), "prediction_type='sample'", None),
    (_config("EDMDPMSolverMultistepScheduler", prediction_type="sample"), "prediction_type='sample'", None),
    (_config("EDMEulerScheduler", sigma_min=100.0), "sigma_min < sigma_max", None),
    (_config("CosineDPMSolverMultistepScheduler"), "CosineDPMSolverMultistepScheduler", None),
    (_config("CogVideoXDDIMScheduler"), "CogVideoXDDIMScheduler", None),
    (_config("DDIMInverseScheduler"), "DDIMInverseScheduler", None),
    (_config("ScoreSdeVeScheduler"), "ScoreSdeVeScheduler", None),
])
def test_refused_fields_are_named(config, field, image_seq_len):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace("[", r"\[")):
        schedule_from_config(config, image_seq_len)


def test_flow_shift_is_the_schedule_and_time_uniform_is_diffusers_default_grid():
    config = _config("FlowMatchEulerDiscreteScheduler", shift=3.0)
    schedule, prediction = schedule_from_config(config)
    assert isinstance(schedule, RectifiedFlow) and schedule.shift == 3.0 and prediction == "flow"
    for t in (0.1, 0.5, 0.9):  # a warp of time: sigma = s t / (1 + (s - 1) t), alpha = 1 - sigma
        assert schedule.sigma(t) == pytest.approx(3 * t / (1 + 2 * t), rel=1e-15)
        assert schedule.alpha(t) + schedule.sigma(t) == pytest.approx(1.0, rel=1e-15)
        assert schedule.inverse_lam(schedule.lam(t)) == pytest.approx(t, rel=1e-13)
    theirs = _scheduler("FlowMatchEulerDiscreteScheduler", shift=3.0)
    for steps in (4, 10, 28):
        theirs.set_timesteps(steps)
        grid = time_uniform(schedule, steps).tolist()
        ours = [schedule.sigma(t) for t in grid]
        # the first time is FLOW_T_MAX (sigma = 1 has alpha = 0), one part in a million from diffusers' u = 1
        np.testing.assert_allclose(ours, theirs.sigmas.double().numpy(), rtol=1e-6, atol=0)


def test_dynamic_shift_follows_the_sequence_length():
    config = _config("FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
    for seq, exponential in ((256, True), (1024, True), (4096, False)):
        cfg = {**config, "time_shift_type": "exponential" if exponential else "linear"}
        mu = 0.5 + (seq - 256) * (1.15 - 0.5) / (4096 - 256)
        schedule = dynamic_shift(cfg, seq)
        assert schedule.shift == pytest.approx(math.exp(mu) if exponential else mu, rel=1e-14)
        assert schedule_from_config(cfg, seq)[0].shift == schedule.shift
        theirs = _scheduler_of(dict(cfg))
        theirs.set_timesteps(12, mu=mu)
        grid = diffusers_grid(cfg, schedule, 12)
        np.testing.assert_allclose([schedule.sigma(t) for t in grid.tolist()], theirs.sigmas.double().numpy(),
                                   rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="use_dynamic_shifting=False: dynamic_shift needs it on"):
        dynamic_shift(_config("FlowMatchEulerDiscreteScheduler"), 1024)
    with pytest.raises(ValueError, match="image_seq_len must be a positive int"):
        schedule_from_config(config, 0)


def test_sana_style_dpm_solver_flow_config():
    config = _config("DPMSolverMultistepScheduler", use_flow_sigmas=True, flow_shift=3.0,
                     prediction_type="flow_prediction")
    schedule, prediction = schedule_from_config(config)
    assert isinstance(schedule, RectifiedFlow) and schedule.shift == 3.0 and prediction == "flow"
    dynamic = {**config, "use_dynamic_shifting": True}
    mu = math.log(2.0)
    assert schedule_from_config(dynamic, mu=mu)[0].shift == pytest.approx(2.0, rel=1e-14)


def test_edm_schedule():
    config = _config("EDMEulerScheduler", sigma_min=0.02, sigma_max=40.0, sigma_data=0.8,
                     prediction_type="v_prediction")
    schedule, prediction = schedule_from_config(config)
    assert isinstance(schedule, EDM) and (schedule.t_min, schedule.t_max, schedule.sigma_data) == (0.02, 40.0, 0.8)
    assert prediction == "edm_v"
    assert schedule_from_config(_config("EDMDPMSolverMultistepScheduler"))[1] == "edm"


def test_configs_without_a_class_name_are_read_by_their_keys():
    assert isinstance(schedule_from_config(_scheduler("EDMEulerScheduler").config)[0], EDM)
    flow, _ = schedule_from_config(_scheduler("FlowMatchEulerDiscreteScheduler", shift=2.0).config)
    assert isinstance(flow, RectifiedFlow) and flow.shift == 2.0
    vp, _ = schedule_from_config(_scheduler("EulerDiscreteScheduler", **SD).config)
    assert np.array_equal(vp.alphas_cumprod, _scheduler("EulerDiscreteScheduler", **SD).alphas_cumprod.double())
    # a scheduler object gives its class
    assert isinstance(schedule_from_config(_scheduler("FlowMatchHeunDiscreteScheduler", shift=3.0))[0], RectifiedFlow)


# ---------------------------------------------------------------------------------------------------- the grid

GRID_CASES = {
    # name: (class, config); each grid is checked against the scheduler's own sigmas or integer timesteps
    "euler_leading_offset": ("EulerDiscreteScheduler", dict(**SD, timestep_spacing="leading", steps_offset=1)),
    "euler_linspace": ("EulerDiscreteScheduler", dict(**SD, timestep_spacing="linspace")),
    "euler_trailing": ("EulerDiscreteScheduler", dict(**SD, timestep_spacing="trailing")),
    "euler_karras": ("EulerDiscreteScheduler", dict(**SD, use_karras_sigmas=True)),
    "euler_exponential": ("EulerDiscreteScheduler", dict(**SD, use_exponential_sigmas=True)),
    "euler_beta": ("EulerDiscreteScheduler", dict(**SD, use_beta_sigmas=True)),
    "euler_log_linear": ("EulerDiscreteScheduler", dict(**SD, interpolation_type="log_linear")),
    "euler_sigma_min": ("EulerDiscreteScheduler", dict(**SD, final_sigmas_type="sigma_min",
                                                       timestep_spacing="trailing")),
    "euler_zero_snr": ("EulerDiscreteScheduler", dict(**SD, rescale_betas_zero_snr=True,
                                                      timestep_spacing="trailing", prediction_type="v_prediction")),
    "euler_continuous_v": ("EulerDiscreteScheduler", dict(**SD, timestep_type="continuous",
                                                          prediction_type="v_prediction", use_karras_sigmas=True)),
    "heun": ("HeunDiscreteScheduler", dict(**SD, timestep_spacing="trailing")),
    "kdpm2": ("KDPM2DiscreteScheduler", dict(**SD)),
    "lms_karras": ("LMSDiscreteScheduler", dict(**SD, use_karras_sigmas=True)),
    "dpmpp_karras": ("DPMSolverMultistepScheduler", dict(**SD, use_karras_sigmas=True)),
    "dpmpp_lu": ("DPMSolverMultistepScheduler", dict(**SD, use_lu_lambdas=True)),
    "dpmpp_sigma_min": ("DPMSolverMultistepScheduler", dict(**SD, final_sigmas_type="sigma_min")),
    "dpmpp_flow_sana": ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=3.0,
                                                            prediction_type="flow_prediction")),
    "unipc_flow_terminal": ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=3.0,
                                                            shift_terminal=0.05, prediction_type="flow_prediction")),
    "deis": ("DEISMultistepScheduler", dict(**SD)),
    "ddim_leading": ("DDIMScheduler", dict(**SD, steps_offset=1, set_alpha_to_one=False)),
    "ddim_trailing": ("DDIMScheduler", dict(**SD, timestep_spacing="trailing")),
    "pndm_plms": ("PNDMScheduler", dict(**SD, skip_prk_steps=True, steps_offset=1)),
    "ddpm": ("DDPMScheduler", dict(**SD, timestep_spacing="trailing")),
    "lcm": ("LCMScheduler", dict(**SD)),
    "flow_shift": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    "flow_karras_terminal": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, use_karras_sigmas=True,
                                                                     shift_terminal=0.1)),
    "flow_exponential": ("FlowMatchEulerDiscreteScheduler", dict(shift=2.0, use_exponential_sigmas=True)),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0)),
    "edm_karras": ("EDMEulerScheduler", dict()),
    "edm_exponential_sigma_min": ("EDMEulerScheduler", dict(sigma_schedule="exponential", rho=5.0,
                                                            final_sigmas_type="sigma_min")),
    "edm_dpm": ("EDMDPMSolverMultistepScheduler", dict(sigma_min=0.0292, sigma_max=14.6146)),
}
# where the timestep diffusers feeds the network is exactly fewstep's native time (elsewhere diffusers rounds or
# truncates it, or interpolates sigma linearly: see native_time_from_config)
EXACT_NATIVE = {"euler_leading_offset", "euler_trailing", "euler_karras", "euler_exponential", "euler_beta",
                "euler_sigma_min", "euler_zero_snr", "euler_continuous_v", "heun", "lms_karras", "dpmpp_sigma_min",
                "deis", "ddim_leading", "ddim_trailing", "pndm_plms", "ddpm", "lcm", "flow_shift",
                "flow_karras_terminal", "flow_exponential", "flow_heun", "edm_karras", "edm_exponential_sigma_min",
                "edm_dpm"}


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("case", list(GRID_CASES))
def test_diffusers_grid_is_the_schedulers_own(case, steps):
    name, config = GRID_CASES[case]
    schedule, _ = schedule_from_config(_config(name, **config))
    grid = diffusers_grid(_config(name, **config), schedule, steps)
    assert grid.dtype == torch.float64
    theirs = _scheduler(name, **config)
    theirs.set_timesteps(steps)
    times = grid.tolist()
    if hasattr(theirs, "sigmas"):
        sigmas = _once(theirs.sigmas.double().tolist())
        flow = isinstance(schedule, RectifiedFlow)
        ours = [schedule.sigma(t) if flow else schedule.edm_sigma(t) for t in times]
        assert len(ours) == len(sigmas)
        if flow and sigmas[0] == 1.0:  # alpha = 0 is no schedule's time: the first time is FLOW_T_MAX
            assert times[0] == FLOW_T_MAX
            ours, sigmas = ours[1:], sigmas[1:]
        np.testing.assert_allclose(ours, sigmas, rtol=1e-6, atol=0)
        assert (times[-1] == 0.0) == (sigmas[-1] == 0.0)
    else:  # integer training steps n at t = (n + 1) / N, then t = 0 or t_min where diffusers ends on alpha_bar[0]
        n = schedule.num_train_timesteps
        expected = [(v + 1) / n for v in _once(theirs.timesteps.tolist())]
        final = 0.0 if float(getattr(theirs, "final_alpha_cumprod", 1.0)) == 1.0 else 1 / n
        assert times == (expected if final == expected[-1] else [*expected, final])
    if case in EXACT_NATIVE:
        native = native_time_from_config(_config(name, **config), schedule)
        timesteps = list(dict.fromkeys(theirs.timesteps.double().tolist()))
        model_times = [t for t in times if t > 0][: len(timesteps)]
        np.testing.assert_allclose([native(t) for t in model_times], timesteps, rtol=1e-6, atol=1e-6)


def test_diffusers_grid_honours_set_timesteps_arguments():
    config = _config("EulerDiscreteScheduler", **SD)
    schedule, _ = schedule_from_config(config)
    grid = diffusers_grid(config, schedule, None, timesteps=[999, 500, 250, 10])
    assert grid.tolist()[:4] == [1.0, 0.501, 0.251, 0.011] and grid.tolist()[-1] == 0.0


def test_native_time_round_trips():
    for name, config in (("EulerDiscreteScheduler", SD), ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
                         ("EDMEulerScheduler", {}),
                         ("EulerDiscreteScheduler", dict(**SD, timestep_type="continuous",
                                                         prediction_type="v_prediction"))):
        schedule, _ = schedule_from_config(_config(name, **config))
        to_native = native_time_from_config(_config(name, **config), schedule)
        back = time_from_native(_config(name, **config), schedule)
        for u in (0.05, 0.3, 0.77, 0.999):
            t = schedule.t_min + u * (schedule.t_max - schedule.t_min)
            assert back(to_native(t)) == pytest.approx(t, rel=1e-9)
    vp, _ = schedule_from_config(_config("DDIMScheduler", **SD))
    assert native_time_from_config(_config("DDIMScheduler", **SD), vp)(vp.time_of_index(417)) == 417.0
    with pytest.raises(ValueError, match="not the schedule of this scheduler config"):
        native_time_from_config(_config("FlowMatchEulerDiscreteScheduler"), vp)


@pytest.mark.parametrize(("name", "config", "steps", "match"), [
    ("DDIMScheduler", dict(timestep_spacing="trailing"), 3, "steps from timestep 666 to 333"),
    ("PNDMScheduler", dict(skip_prk_steps=False), 10, "Runge-Kutta"),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, use_karras_sigmas=True,
                                         prediction_type="flow_prediction"), 10, "flow sigmas outside"),
])
def test_diffusers_grid_refuses_steps_no_grid_holds(name, config, steps, match):
    schedule, _ = schedule_from_config(_config(name, **config))
    with pytest.raises(ValueError, match=match):
        diffusers_grid(_config(name, **config), schedule, steps)


def test_diffusers_grid_errors():
    config = _config("FlowMatchEulerDiscreteScheduler", shift=3.0)
    with pytest.raises(ValueError, match="is not the schedule of this FlowMatchEulerDiscreteScheduler config"):
        diffusers_grid(config, RectifiedFlow(), 4)
    with pytest.raises(ValueError, match="_class_name"):
        diffusers_grid({"shift": 3.0}, RectifiedFlow(3.0), 4)
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        diffusers_grid(_config("UNet2DModel"), RectifiedFlow(3.0), 4)
    with pytest.raises(ValueError, match="needs its config: call fewstep.models.diffusers_grid"):
        make_grid("diffusers", RectifiedFlow(3.0), 4)
    with pytest.raises(TypeError, match="steps must be an int"):
        diffusers_grid(config, schedule_from_config(config)[0], 4.0)
    # the caller's scheduler is never touched
    theirs = _scheduler("FlowMatchEulerDiscreteScheduler", shift=3.0)
    theirs.set_timesteps(7)
    diffusers_grid(theirs, schedule_from_config(theirs)[0], 3)
    assert len(theirs.timesteps) == 7


# ------------------------------------------------------------------------------------- EDM preconditioning

class _EDMNet(torch.nn.Module):
    """What an EDM-preconditioned network outputs for Gaussian data: it sees ``c_in xbar`` and ``c_noise`` only,
    recovers ``sbar = exp(4 c_noise)`` and returns ``F = (D - c_skip xbar) / c_out`` for the exact denoiser ``D``."""

    def __init__(self, data, sigma_data: float, sign: float = 1.0) -> None:  # noqa: ANN001
        super().__init__()
        self.data, self.sigma_data, self.sign = data, sigma_data, sign
        self.seen: list[tuple[torch.Tensor, float]] = []

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        c_noise = float(torch.as_tensor(c_noise).reshape(-1)[0])
        self.seen.append((x_in, c_noise))
        sbar, sd = math.exp(4.0 * c_noise), self.sigma_data
        xbar = x_in * math.sqrt(sbar**2 + sd**2)
        c_skip, c_out = sd**2 / (sbar**2 + sd**2), self.sign * sbar * sd / math.sqrt(sbar**2 + sd**2)
        return (self.data.denoise(xbar, sbar) - c_skip * xbar) / c_out


@pytest.mark.parametrize("prediction", ["edm", "edm_v"])
@pytest.mark.parametrize("schedule", [EDM(sigma_data=0.7), DiscreteVP.named("scaled_linear", beta_start=0.00085,
                                                                               beta_end=0.012)], ids=repr)
def test_edm_adapter_recovers_the_exact_denoiser(schedule, prediction):
    data = gaussian(dim=5, mean=0.4, std=0.7)  # D(xbar, s) = mu + std^2 / (std^2 + s^2) (xbar - mu)
    net = _EDMNet(data, 0.7, 1.0 if prediction == "edm" else -1.0)
    den = ModelDenoiser(net, schedule, prediction=prediction, sigma_data=None if isinstance(schedule, EDM) else 0.7)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for u in (0.01, 0.3, 0.9):
        t = schedule.t_min + u * (schedule.t_max - schedule.t_min)
        alpha, sbar = schedule.alpha(t), schedule.edm_sigma(t)
        x_t = x * schedule.prior_std(t)
        exact = 0.4 + 0.49 / (0.49 + sbar**2) * (x_t / alpha - 0.4)
        assert rel_err(den(x_t, t), exact) < 1e-13
        x_in, c_noise = net.seen[-1]
        assert c_noise == pytest.approx(0.25 * math.log(sbar), rel=1e-14)  # c_noise is the native time
        assert rel_err(x_in, x_t / alpha / math.sqrt(sbar**2 + 0.49)) < 1e-15  # c_in xbar


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_euler_configured_denoiser_is_the_exact_denoiser(prediction_type):
    config = _config("EDMEulerScheduler", sigma_data=0.7, prediction_type=prediction_type)
    net = _EDMNet(gaussian(dim=4, mean=-0.2, std=0.7), 0.7, 1.0 if prediction_type == "epsilon" else -1.0)
    den = _denoiser_from_config(net, config)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sigma in (0.002, 0.5, 3.0, 80.0):
        x_t = x * math.hypot(0.7, sigma)
        exact = -0.2 + 0.49 / (0.49 + sigma**2) * (x_t + 0.2)  # E[x0 | x0 + sigma eps = x_t], x0 ~ N(-0.2, 0.49)
        assert rel_err(den(x_t, sigma), exact) < 1e-13


def test_edm_adapter_errors():
    net = _EDMNet(gaussian(), 0.5)
    with pytest.raises(ValueError, match="needs sigma_data"):
        ModelDenoiser(net, RectifiedFlow(), prediction="edm")
    with pytest.raises(ValueError, match="sigma_data is for the EDM-preconditioned"):
        ModelDenoiser(net, EDM(), prediction="eps", sigma_data=0.5)
    with pytest.raises(ValueError, match="sigma_data must be a positive number"):
        ModelDenoiser(net, EDM(), prediction="edm", sigma_data=-1.0)


def _denoiser_from_config(net: torch.nn.Module, config: dict) -> ModelDenoiser:
    """What from_diffusers builds from a scheduler config (its model-family wiring aside)."""
    schedule, prediction = schedule_from_config(config)
    return ModelDenoiser(net, schedule, prediction=prediction, native_time=native_time_from_config(config, schedule))


def _run_diffusers(scheduler, net: torch.nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:  # noqa: ANN001
    scheduler.set_timesteps(steps)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow matching has none
    for t in scheduler.timesteps:
        x = scheduler.step(net(scale(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [6, 18])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_parity_edm_euler(prediction_type, steps):
    data = gaussian_mixture(dim=6, components=3, std=0.4, seed=2)
    config = _config("EDMEulerScheduler", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                     prediction_type=prediction_type)
    net = _EDMNet(data, 0.5, 1.0 if prediction_type == "epsilon" else -1.0)
    den = _denoiser_from_config(net, config)
    assert den.prediction == ("edm" if prediction_type == "epsilon" else "edm_v")
    x_t = 80.0 * torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = diffusers_grid(config, den.schedule, steps)
    ours = sample(den, "euler", grid, x_init=x_t)
    theirs = _run_diffusers(_scheduler_of(dict(config)), net, x_t, steps)
    assert rel_err(ours, theirs) < 1e-5


class _FlowNet(torch.nn.Module):
    """The exact flow velocity ``eps - x0`` of a Gaussian mixture, fed ``sigma * N`` as diffusers does."""

    def __init__(self, data) -> None:  # noqa: ANN001
        super().__init__()
        self.data = data

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sigma = float(torch.as_tensor(timestep).reshape(-1)[0]) / 1000
        if sigma == 1.0:  # pure noise: x0_hat is the data mean
            return x - self.data.mean().reshape(x.shape[1:])
        x0 = self.data.denoise(x / (1 - sigma), sigma / (1 - sigma))
        return (x - x0) / sigma  # eps - x0 with eps = (x - (1 - sigma) x0) / sigma


@pytest.mark.parametrize("steps", [6, 20])
def test_parity_flow_match_euler_shift_3(steps):
    data = gaussian_mixture(dim=6, components=3, std=0.3, seed=4)
    config = _config("FlowMatchEulerDiscreteScheduler", shift=3.0)
    net = _FlowNet(data)
    den = _denoiser_from_config(net, config)
    x_t = torch.randn(5, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    theirs = _run_diffusers(_scheduler_of(dict(config)), net, x_t, steps)
    on_theirs = sample(den, "euler", diffusers_grid(config, den.schedule, steps), x_init=x_t)
    on_uniform = sample(den, "euler", time_uniform(den.schedule, steps), x_init=x_t)
    assert rel_err(on_theirs, theirs) < 1e-5
    assert rel_err(on_uniform, theirs) < 1e-5


class _VPNet(torch.nn.Module):
    """The exact v-prediction of a Gaussian mixture on a beta table, reading the time diffusers feeds."""

    def __init__(self, data, schedule: DiscreteVP, from_native) -> None:  # noqa: ANN001
        super().__init__()
        self.data, self.schedule, self.from_native = data, schedule, from_native

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = self.from_native(float(torch.as_tensor(timestep).reshape(-1)[0]))
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        x0 = self.data.denoise(x / alpha, sigma / alpha)
        return alpha * (x - alpha * x0) / sigma - sigma * x0


@pytest.mark.parametrize("config", [dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
                                    dict(use_karras_sigmas=True)], ids=["zero_snr", "karras"])
def test_parity_euler_discrete_v_prediction(config):
    config = _config("EulerDiscreteScheduler", **SD, **config, prediction_type="v_prediction")
    schedule, _ = schedule_from_config(config)
    net = _VPNet(gaussian_mixture(dim=6, components=3, std=0.4, seed=6), schedule, time_from_native(config, schedule))
    den = _denoiser_from_config(net, config)
    steps = 12
    x_vp = torch.randn(5, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grid = diffusers_grid(config, schedule, steps)
    ours = sample(den, "euler", grid, x_init=x_vp)
    theirs = _run_diffusers(_scheduler_of(dict(config)), net, x_vp / schedule.alpha(grid[0].item()), steps)
    assert rel_err(ours, theirs) < 1e-5


def test_from_diffusers_reads_the_schedule_fields():
    pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    den = from_diffusers(unet, _config("EDMEulerScheduler", sigma_data=0.6))
    assert isinstance(den.schedule, EDM) and den.prediction == "edm" and den.sigma_data == 0.6
    assert den.native_time(2.0) == pytest.approx(0.25 * math.log(2.0))
    den = from_diffusers(unet, _config("FlowMatchEulerDiscreteScheduler", shift=3.0))
    assert den.schedule.shift == 3.0 and den.native_time(0.5) == pytest.approx(1000 * 1.5 / 2.0)
