"""diffusers scheduler configs read exactly: the noise schedule, the network's native time and the time grid.

A diffusers scheduler config mixes three kinds of fields. Each is handled in one place here, and a field that
changes the noise schedule or the timesteps is either honoured or refused with a ``ValueError`` that names it:

* fields of the **noise schedule** (betas, zero terminal SNR, the flow shift, EDM's sigmas and ``sigma_data``,
  the prediction type): :func:`schedule_from_config` builds the schedule from them;
* fields of the **timesteps** (``timestep_spacing``, ``steps_offset``, ``use_karras_sigmas`` and the other sigma
  spacings, ``final_sigmas_type``, ``shift_terminal``, ``sigma_schedule``, ...): :func:`diffusers_grid` runs the
  scheduler's own ``set_timesteps`` and converts what it gives to fewstep times, so every such field, present or
  future, means exactly what diffusers makes of it;
* fields of the **solver or the network call** (``solver_order``, ``thresholding``, ``clip_sample``,
  ``variance_type``, ...): neither changes the schedule nor the times; they are the solver's business.

Only the fields of the scheduler class named in the config (``_class_name``) count, with that class's defaults for
the missing ones, because that is what diffusers itself reads (a ``rescale_betas_zero_snr`` left in the config of a
``HeunDiscreteScheduler``, which has no such field, changes nothing in diffusers either). A config without a class
name is read by its keys: ``sigma_data`` makes it EDM, ``shift`` without ``beta_schedule`` a flow-matching config,
anything else a DDPM-family (beta table) config.

:func:`native_time_from_config` / :func:`time_from_native` map fewstep's time to the timestep the network is fed
and back. :func:`config_of` reads a scheduler or its config as a plain dict, and :func:`fresh_scheduler` makes a new
scheduler of its class, for code that runs diffusers' own ``set_timesteps``. See ``docs/design.md`` for the table of
fields.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fewstep.grids import check_steps, validate_grid
from fewstep.models.adapter import edm_noise_time, native_time_default, snap_integer
from fewstep.schedules import BETA_SCHEDULES, EDM, DiscreteVP, NoiseSchedule, RectifiedFlow

__all__ = [
    "EDM_SCHEDULERS",
    "FLOW_SCHEDULERS",
    "VP_SCHEDULERS",
    "config_of",
    "diffusers_grid",
    "dynamic_shift",
    "fresh_scheduler",
    "native_time_from_config",
    "schedule_from_config",
    "time_from_native",
]

_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}

VP_SCHEDULERS = frozenset({
    "DDPMScheduler", "DDPMParallelScheduler", "DDIMScheduler", "DDIMParallelScheduler", "PNDMScheduler",
    "LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
    "SASolverScheduler", "LCMScheduler", "TCDScheduler",
})
"""diffusers schedulers whose noise schedule is a beta table (a :class:`DiscreteVP`), or shifted flow sigmas with
``use_flow_sigmas=True``."""

FLOW_SCHEDULERS = frozenset({"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"})
"""diffusers flow-matching schedulers (a :class:`RectifiedFlow`, shifted by ``shift`` or dynamically)."""

EDM_SCHEDULERS = frozenset({"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"})
"""diffusers EDM schedulers (an :class:`EDM` schedule and EDM-preconditioned networks)."""

# Beta schedules beyond linear/scaled_linear/squaredcos_cap_v2 exist in a few classes only; others raise in diffusers.
_EXTRA_BETAS = {"DDPMScheduler": ("sigmoid", "laplace"), "DDPMParallelScheduler": ("sigmoid", "laplace"),
                "HeunDiscreteScheduler": ("exp",)}
# These classes turn mu into flow_shift = exp(mu) and assert time_shift_type == "exponential".
_EXPONENTIAL_SHIFT_ONLY = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler")
# These classes step from timestep t to t - N // steps, whatever their next timestep is.
_STEPS_BY_RATIO = ("DDIMScheduler", "DDIMParallelScheduler", "PNDMScheduler")

SCHEDULE_FIELDS = frozenset({
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
    "prediction_type", "timestep_type", "use_flow_sigmas", "flow_shift", "shift", "use_dynamic_shifting",
    "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type", "invert_sigmas",
    "sigma_data", "sigma_min", "sigma_max",  # the last two: EDM's schedule; the Karras bounds of VP schedulers
})
GRID_FIELDS = frozenset({
    "timestep_spacing", "steps_offset", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "use_lu_lambdas", "final_sigmas_type", "interpolation_type", "lambda_min_clipped", "shift_terminal",
    "set_alpha_to_one", "skip_prk_steps", "original_inference_steps", "sigma_schedule", "rho", "sigma_min",
    "sigma_max",
})
OTHER_FIELDS = frozenset({
    "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value", "clip_sample", "clip_sample_range", "variance_type",
    "predict_x0", "disable_corrector", "solver_p", "predictor_order", "corrector_order", "tau_func",
    "stochastic_sampling", "noise_sampler_seed", "timestep_scaling",
})
"""Fields of the solver or of the network call: they change neither the schedule nor the times."""

# The values the schedule fields take when a class has no such field (its neutral value) or a class-less config
# leaves them out: diffusers' own defaults.
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "rescale_betas_zero_snr": False, "prediction_type": "epsilon", "timestep_type": "discrete",
    "use_flow_sigmas": False, "flow_shift": 1.0, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential",
    "invert_sigmas": False, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
}

FLOW_T_MAX = 1.0 - 1e-6
"""The first time of flow schedules read from a config. diffusers starts flow sampling at sigma = 1 (alpha = 0,
lam = -inf), which fewstep's solvers, written in ``x / alpha``, cannot start from; :func:`diffusers_grid` puts a
sigma of exactly 1 here (one part in a million from it, in the model's input and the first step)."""


# ---------------------------------------------------------------------------------------------- reading a config

def config_of(config: Any) -> dict[str, Any]:
    """A new config dict from a dict, a scheduler's ``.config`` or a scheduler (whose class name it adds as
    ``_class_name``); anything else raises ``TypeError``."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "config") and isinstance(config.config, Mapping):
        return {"_class_name": type(config).__name__, **dict(config.config)}
    raise TypeError(f"expected a diffusers scheduler or its config, got {type(config).__name__}")


def _family(name: str | None, cfg: Mapping[str, Any]) -> str:
    if name is None:
        if "sigma_data" in cfg and "beta_schedule" not in cfg:
            return "edm"
        return "flow" if "shift" in cfg and "beta_schedule" not in cfg else "vp"
    for family, names in (("vp", VP_SCHEDULERS), ("flow", FLOW_SCHEDULERS), ("edm", EDM_SCHEDULERS)):
        if name in names:
            return family
    known = ", ".join(sorted(VP_SCHEDULERS | FLOW_SCHEDULERS | EDM_SCHEDULERS))
    raise ValueError(f"fewstep does not read the noise schedule of diffusers' {name} (its schedule or time "
                     f"convention differs from the schedulers it reads exactly: {known})")


def _effective(config: Any) -> tuple[str | None, str, dict[str, Any]]:
    """(class name, family, the schedule fields as that class reads them: its defaults, then the config's values)."""
    cfg = config_of(config)
    name = cfg.get("_class_name") or None
    family = _family(name, cfg)
    params = _init_params(name)
    if params is None:  # no class name, or a class whose signature is hidden (a missing optional dependency)
        return name, family, {**_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    unknown = sorted(set(params) - SCHEDULE_FIELDS - GRID_FIELDS - OTHER_FIELDS)
    if unknown:
        raise ValueError(f"diffusers' {name} has field(s) {unknown} that fewstep does not know; it cannot tell "
                         "whether they change the noise schedule or the timesteps")
    return name, family, {**_DEFAULTS, **{k: cfg.get(k, default) for k, default in params.items()}}


def _init_params(name: str | None) -> dict[str, Any] | None:
    """``{parameter: default}`` of a diffusers scheduler's ``__init__``; ``None`` when it cannot be read."""
    if name is None:
        return None
    import diffusers  # imported here: only configs that name a class need it

    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type):
        return None
    params = inspect.signature(cls.__init__).parameters
    out = {k: p.default for k, p in params.items() if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}
    return out or None


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"diffusers scheduler config {field}={value!r}: {why}")


def _prediction(eff: Mapping[str, Any], allowed: tuple[str, ...], why: str = "") -> str:
    prediction = eff["prediction_type"]
    if prediction not in allowed:
        raise _refuse("prediction_type", prediction, why or f"expected one of {list(allowed)} here")
    return prediction


def _shift_of(eff: Mapping[str, Any], image_seq_len: int | None, mu: float | None, static: float) -> float:
    """The flow shift: ``static`` or, with dynamic shifting, ``exp(mu)`` / ``mu`` with mu from the sequence length."""
    if not eff["use_dynamic_shifting"]:
        return float(static)
    kind = eff["time_shift_type"]
    if kind not in ("exponential", "linear"):
        raise _refuse("time_shift_type", kind, "expected 'exponential' or 'linear'")
    if mu is None:
        if image_seq_len is None:
            raise ValueError("diffusers scheduler config use_dynamic_shifting=True: the flow shift depends on the "
                             "latent size; pass image_seq_len= (the number of latent tokens) or mu=")
        if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int | np.integer) or image_seq_len < 1:
            raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}")
        for key in ("base_shift", "max_shift"):
            if eff[key] is None:
                raise _refuse(key, None, "dynamic shifting interpolates between base_shift and max_shift")
        x0, x1 = float(eff["base_image_seq_len"]), float(eff["max_image_seq_len"])
        if x1 == x0:
            raise _refuse("max_image_seq_len", eff["max_image_seq_len"], "must differ from base_image_seq_len")
        # diffusers' pipelines: mu linear in the sequence length through (base_len, base_shift), (max_len, max_shift)
        m = (float(eff["max_shift"]) - float(eff["base_shift"])) / (x1 - x0)
        mu = int(image_seq_len) * m + (float(eff["base_shift"]) - m * x0)
    elif image_seq_len is not None:
        raise ValueError("pass image_seq_len= or mu=, not both")
    shift = math.exp(mu) if kind == "exponential" else float(mu)
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"dynamic shifting gives the flow shift {shift} (mu={mu}, time_shift_type={kind!r}); "
                         "it must be positive")
    return shift


def schedule_from_config(
    config: Any, image_seq_len: int | None = None, *, mu: float | None = None
) -> tuple[NoiseSchedule, str]:
    """(schedule, prediction type) from a diffusers scheduler config (a dict, a scheduler's ``.config``, or a
    scheduler).

    * DDPM-family classes (:data:`VP_SCHEDULERS`): a :class:`DiscreteVP` with diffusers' float32 table bit for bit:
      ``trained_betas``, or ``beta_schedule`` (every name diffusers implements, each only in the classes that
      implement it), ``beta_start``/``beta_end``, ``num_train_timesteps``; ``rescale_betas_zero_snr`` (the final
      ``alpha_bar`` becomes ``2**-24``, as in diffusers' Euler/DPM-Solver/UniPC, see
      :meth:`DiscreteVP.from_betas_float32`). With ``use_flow_sigmas=True`` the schedule is instead
      ``RectifiedFlow(shift=flow_shift)`` (SANA's ``DPMSolverMultistepScheduler``), dynamically shifted when
      ``use_dynamic_shifting`` is on. Predictions: ``epsilon``, ``sample``, ``v_prediction``;
      ``flow_prediction`` with flow sigmas only.
    * Flow matching (:data:`FLOW_SCHEDULERS`): ``RectifiedFlow(shift=shift)`` whose ``t_min`` is diffusers'
      ``sigma_min`` (so equal-``t`` grids are diffusers' sigmas), or, with ``use_dynamic_shifting``, the shift
      ``exp(mu)`` (``time_shift_type="exponential"``) or ``mu`` (``"linear"``) of :func:`dynamic_shift`;
      ``invert_sigmas=True`` is refused. Prediction ``flow``.
    * EDM (:data:`EDM_SCHEDULERS`): ``EDM(sigma_min, sigma_max, sigma_data=sigma_data)``, prediction ``edm``
      (``epsilon``) or ``edm_v`` (``v_prediction``): the network sits inside EDM's preconditioning.

    ``image_seq_len`` (or ``mu``) is needed when the config has dynamic shifting and ignored otherwise. Timestep
    fields do not change the schedule; :func:`diffusers_grid` honours them. Any other scheduler class is refused.
    """
    name, family, eff = _effective(config)
    n = eff["num_train_timesteps"]
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
        raise _refuse("num_train_timesteps", n, "must be an int >= 2")
    if family == "edm":
        prediction = _prediction(eff, ("epsilon", "v_prediction"),
                                 "diffusers' EDM preconditioning (precondition_outputs) takes epsilon or v_prediction")
        try:
            schedule = EDM(float(eff["sigma_min"]), float(eff["sigma_max"]), sigma_data=float(eff["sigma_data"]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"diffusers EDM scheduler config: {err}") from None
        return schedule, {"epsilon": "edm", "v_prediction": "edm_v"}[prediction]
    if family == "flow":
        if eff["invert_sigmas"]:
            raise _refuse("invert_sigmas", True, "sigmas that rise towards 1 (Mochi) are not a denoising schedule")
        if eff["use_dynamic_shifting"]:
            shift, t_min = _shift_of(eff, image_seq_len, mu, 1.0), _float32_sigma_min(n, None)
        else:
            shift = _positive("shift", eff["shift"])
            t_min = _float32_sigma_min(n, shift)
        return RectifiedFlow(shift, t_min=t_min, t_max=FLOW_T_MAX), "flow"
    if eff["use_flow_sigmas"]:
        prediction = _prediction(eff, ("flow_prediction", "epsilon", "sample"),
                                 "with use_flow_sigmas diffusers converts v_prediction as if alpha^2 + sigma^2 = 1, "
                                 "which flow sigmas are not; expected flow_prediction, epsilon or sample")
        if eff["use_dynamic_shifting"] and name in _EXPONENTIAL_SHIFT_ONLY and eff["time_shift_type"] != "exponential":
            raise _refuse("time_shift_type", eff["time_shift_type"], f"{name} shifts by exp(mu) only")
        shift = _shift_of(eff, image_seq_len, mu, _positive("flow_shift", eff["flow_shift"]))
        return RectifiedFlow(shift, t_min=1.0 / n, t_max=FLOW_T_MAX), _PREDICTION[prediction]
    prediction = _prediction(eff, ("epsilon", "sample", "v_prediction"),
                             "flow_prediction needs use_flow_sigmas=True (a beta table has no flow velocity)"
                             if eff["prediction_type"] == "flow_prediction" else "")
    zero_snr = bool(eff["rescale_betas_zero_snr"])
    beta_schedule = eff["beta_schedule"]
    allowed = BETA_SCHEDULES if name is None else BETA_SCHEDULES[:3] + _EXTRA_BETAS.get(name, ())
    if eff["trained_betas"] is None and beta_schedule not in allowed:
        where = "diffusers" if name is None else f"diffusers' {name}"
        raise _refuse("beta_schedule", beta_schedule, f"{where} implements {list(allowed)}")
    try:
        if eff["trained_betas"] is not None:  # diffusers: trained betas win over beta_schedule
            schedule = DiscreteVP.from_betas_float32(eff["trained_betas"], rescale_zero_snr=zero_snr)
        else:
            schedule = DiscreteVP.named(beta_schedule, num_train_timesteps=int(n), beta_start=float(eff["beta_start"]),
                                        beta_end=float(eff["beta_end"]), rescale_zero_snr=zero_snr)
    except ValueError as err:
        field = "rescale_betas_zero_snr" if zero_snr else "trained_betas" if eff["trained_betas"] is not None else (
            "beta_schedule")
        raise _refuse(field, eff[field] if field != "trained_betas" else "[...]", str(err)) from None
    return schedule, _PREDICTION[prediction]


def _positive(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        raise _refuse(field, value, "must be a positive number")
    return float(value)


def _float32_sigma_min(n: int, shift: float | None) -> float:
    """diffusers' ``FlowMatchEulerDiscreteScheduler.sigma_min``: ``1/N`` in float32, shifted in float32 when the
    shift is static. Its ``set_timesteps`` spaces times equally from 1 down to this value and shifts them (again),
    so it is the ``t_min`` under which equal-``t`` grids on the shifted schedule are its sigmas."""
    sigma = torch.tensor([1.0], dtype=torch.float32) / n
    if shift is not None:
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return float(sigma.item())


def dynamic_shift(config: Any, image_seq_len: int | None = None, *, mu: float | None = None) -> RectifiedFlow:
    """The schedule of a config with ``use_dynamic_shifting=True`` for latents of ``image_seq_len`` tokens.

    ``mu = image_seq_len * m + b`` is the line through ``(base_image_seq_len, base_shift)`` and
    ``(max_image_seq_len, max_shift)`` (diffusers' pipelines' ``calculate_shift``, with the config's values or
    diffusers' defaults 256, 4096, 0.5, 1.15), and the shift is ``exp(mu)`` (``time_shift_type="exponential"``) or
    ``mu`` (``"linear"``). Pipelines that compute mu their own way can pass ``mu=`` instead.
    """
    _, _, eff = _effective(config)
    if not eff["use_dynamic_shifting"]:
        raise _refuse("use_dynamic_shifting", eff["use_dynamic_shifting"], "dynamic_shift needs it on")
    schedule, _ = schedule_from_config(config, image_seq_len, mu=mu)
    if not isinstance(schedule, RectifiedFlow):  # pragma: no cover - dynamic shifting only shifts flow schedules
        raise ValueError(f"dynamic shifting has no effect on {schedule!r} (use_flow_sigmas is off)")
    return schedule


# -------------------------------------------------------------------------------------------------- native time

def _check_family(family: str, schedule: NoiseSchedule, eff: Mapping[str, Any]) -> None:
    expected = {"edm": EDM, "flow": RectifiedFlow}.get(family)
    if family == "vp":
        expected = RectifiedFlow if eff["use_flow_sigmas"] else DiscreteVP
    if not isinstance(schedule, expected):
        raise ValueError(f"{schedule!r} is not the schedule of this scheduler config (a {expected.__name__} is); "
                         "build it with schedule_from_config")


def native_time_from_config(config: Any, schedule: NoiseSchedule) -> Callable[[float], float]:
    """What the network configured by ``config`` is fed at time ``t`` (the timestep diffusers gives it):

    * flow schedules: ``sigma(t) * N``, the shifted sigma times ``num_train_timesteps`` (diffusers'
      ``DPMSolverMultistepScheduler`` and the other DDPM-family classes with ``use_flow_sigmas`` cast these to
      int64, a truncation of up to one unit that fewstep does not copy);
    * EDM schedulers, and ``EulerDiscreteScheduler`` with ``timestep_type="continuous"`` and ``v_prediction``:
      ``c_noise = log(sigma / alpha) / 4``;
    * beta tables: the fractional training step of the noise level at ``t``, interpolated in ``log sigma`` as
      diffusers' sigma-based schedulers do (:meth:`DiscreteVP.sigma_index`), integers at the training steps
      (``N t - 1``). diffusers' ``DPMSolverMultistepScheduler`` rounds its Karras timesteps to integers; fewstep
      feeds the exact ones.
    """
    _, family, eff = _effective(config)
    _check_family(family, schedule, eff)
    if isinstance(schedule, RectifiedFlow):
        n = int(eff["num_train_timesteps"])
        return lambda t: schedule.sigma(t) * n
    if family == "edm" or (eff["timestep_type"] == "continuous" and eff["prediction_type"] == "v_prediction"):
        return edm_noise_time(schedule)
    if isinstance(schedule, DiscreteVP):
        return lambda t: snap_integer(schedule.sigma_index(t))
    return native_time_default(schedule)  # pragma: no cover - every family is handled above


def time_from_native(config: Any, schedule: NoiseSchedule) -> Callable[[float], float]:
    """The inverse of :func:`native_time_from_config`: the fewstep time of a timestep diffusers feeds the network.
    (A flow timestep of ``N``, sigma = 1, gives ``t = 1``, beyond every flow schedule's ``t_max``.)"""
    _, family, eff = _effective(config)
    _check_family(family, schedule, eff)
    if isinstance(schedule, RectifiedFlow):
        n = int(eff["num_train_timesteps"])
        return lambda v: schedule.time_of_sigma(float(v) / n)
    if family == "edm" or (eff["timestep_type"] == "continuous" and eff["prediction_type"] == "v_prediction"):
        return lambda v: schedule.inverse_lam(-4.0 * float(v))
    if isinstance(schedule, DiscreteVP):
        return schedule.time_of_sigma_index
    return lambda v: float(v)  # pragma: no cover


# --------------------------------------------------------------------------------------------------------- grid

def fresh_scheduler(scheduler_or_config: Any) -> Any:
    """A fresh diffusers scheduler of the class named by a scheduler or config (never the caller's object), made
    with ``from_config``. Refused with a ``ValueError``: a config without ``_class_name``, a name that is not a
    diffusers scheduler, and a class whose noise schedule fewstep does not read."""
    import diffusers

    cfg = config_of(scheduler_or_config)
    name = cfg.get("_class_name")
    if not name:
        raise ValueError("diffusers_grid runs the scheduler's own set_timesteps: pass the scheduler, or a config "
                         "with its _class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"_class_name {name!r} is not a diffusers scheduler")
    _family(str(name), cfg)  # refuses the classes fewstep does not read
    return cls.from_config({k: v for k, v in cfg.items() if k != "_class_name"})


def _matches(expected: NoiseSchedule, schedule: NoiseSchedule) -> bool:
    if type(expected) is not type(schedule):
        return False
    if isinstance(schedule, DiscreteVP):
        return np.array_equal(expected.alphas_cumprod, schedule.alphas_cumprod)
    if isinstance(schedule, RectifiedFlow):
        return math.isclose(expected.shift, schedule.shift, rel_tol=1e-12)
    return True  # EDM: t = sigma whatever the bounds


def diffusers_grid(
    scheduler_or_config: Any, schedule: NoiseSchedule, steps: int | None, **set_timesteps_kwargs: Any
) -> torch.Tensor:
    """The times at which diffusers' scheduler evaluates the network, as a fewstep grid (float64, decreasing).

    A fresh scheduler of the class named by ``scheduler_or_config`` (a scheduler or a config with ``_class_name``;
    nothing is downloaded) runs its own ``set_timesteps(steps, **set_timesteps_kwargs)``, so every timestep field
    (``timestep_spacing``, ``steps_offset``, Karras/exponential/beta/Lu sigmas, ``final_sigmas_type``,
    ``shift_terminal``, ``sigma_schedule``, ``rho``, ``interpolation_type``, custom ``timesteps=``/``sigmas=``, ...)
    means what diffusers makes of it. Its timesteps are converted exactly:

    * sigma-based schedulers (``.sigmas``): ``t`` from each sigma through ``schedule`` (``lam = -log sigma`` in the
      EDM frame for beta tables, a training step exactly when the sigma is the table's, ``t = sigma`` for EDM, the
      inverse of the shift warp for flow sigmas); repeated sigmas (Heun, KDPM2) appear once. A final sigma 0 is
      ``t = 0``; ``final_sigmas_type="sigma_min"`` gives a last time > 0. A flow sigma of exactly 1 becomes
      :data:`FLOW_T_MAX`, and sigmas rounded to float32 past a schedule bound (by less than 1e-6) sit on it;
    * integer-timestep schedulers (DDIM, DDPM, PNDM, LCM, TCD): ``t = (n + 1) / N``, then ``t = 0``, or ``t_min``
      where diffusers ends on ``alphas_cumprod[0]`` (``set_alpha_to_one=False``). DDIM and PNDM step from timestep
      ``n`` to ``n - N // steps``; where that is not their next timestep no grid holds their steps, and it is
      refused.

    ``schedule`` must be the config's (from :func:`schedule_from_config`; checked). With dynamic shifting, ``mu``
    is taken from the schedule's shift unless given.
    """
    sched = fresh_scheduler(scheduler_or_config)
    name = type(sched).__name__
    cfg = {"_class_name": name, **dict(sched.config)}
    kwargs = dict(set_timesteps_kwargs)
    mu = kwargs.get("mu")
    if cfg.get("use_dynamic_shifting") and mu is None and isinstance(schedule, RectifiedFlow):
        exponential = cfg.get("time_shift_type", "exponential") == "exponential"
        mu = kwargs["mu"] = math.log(schedule.shift) if exponential else schedule.shift
    if not cfg.get("use_dynamic_shifting"):
        mu = None
    expected, _ = schedule_from_config(cfg, mu=mu)
    if not _matches(expected, schedule):
        raise ValueError(f"{schedule!r} is not the schedule of this {name} config ({expected!r}); build it with "
                         "schedule_from_config")
    if steps is not None:
        steps = check_steps(steps)
    if steps is None:
        sched.set_timesteps(**kwargs)
    else:
        sched.set_timesteps(steps, **kwargs)
    sigmas = getattr(sched, "sigmas", None)
    if isinstance(sigmas, torch.Tensor):
        times = times_of_sigmas(schedule, _once(sigmas.double().tolist()), name)
    else:
        times = _times_of_timesteps(sched, schedule, name)
    grid = torch.tensor(_onto_bounds(schedule, times), dtype=torch.float64)
    validate_grid(schedule, grid)
    return grid


def _once(values: list[float]) -> list[float]:
    """Consecutive repeats removed (Heun-type schedulers list each inner sigma twice)."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def times_of_sigmas(schedule: NoiseSchedule, sigmas: list[float], name: str = "scheduler") -> list[float]:
    """Fewstep times of diffusers sigmas (flow sigmas; ``sigma / alpha`` of a beta table, a training step exactly
    where the sigma is the table's; EDM sigmas as they are); 0 stays 0."""
    if isinstance(schedule, RectifiedFlow):
        bad = [s for s in sigmas if not 0.0 <= s <= 1.0]
        if bad:
            raise ValueError(f"diffusers' {name} gives flow sigmas outside [0, 1] ({bad[:3]}) with this config: it "
                             "reads sigmas of another kind as flow sigmas (e.g. use_karras_sigmas with "
                             "use_flow_sigmas); no schedule holds them")
        return [schedule.t_max if s == 1.0 else schedule.time_of_sigma(s) for s in sigmas]
    if isinstance(schedule, EDM):
        return sigmas
    assert isinstance(schedule, DiscreteVP)
    ac = schedule.alphas_cumprod
    table = np.sqrt((1.0 - ac) / ac)  # sigma / alpha of each training step
    log_table = np.log(table)
    times = []
    for s in sigmas:
        if s == 0.0:
            times.append(0.0)
            continue
        n = int(round(float(np.interp(math.log(s), log_table, np.arange(table.size)))))
        # diffusers' sigma of a training step, rounded to float32: that step exactly
        on_step = abs(s / table[n] - 1.0) < 1e-6
        times.append(schedule.time_of_index(n) if on_step else schedule.inverse_lam(-math.log(s)))
    return times


def _times_of_timesteps(sched: Any, schedule: NoiseSchedule, name: str) -> list[float]:
    if not isinstance(schedule, DiscreteVP):  # pragma: no cover - integer schedulers are all beta-table ones
        raise ValueError(f"diffusers' {name} has integer timesteps of a beta table, not of {schedule!r}")
    ts = _once([float(v) for v in sched.timesteps.tolist()])
    if any(v != round(v) for v in ts):
        raise ValueError(f"diffusers' {name} gave fractional timesteps {ts[:3]} without sigmas")
    final_alpha = getattr(sched, "final_alpha_cumprod", None)
    final = 0.0 if final_alpha is None or float(final_alpha) == 1.0 else schedule.t_min
    if name in _STEPS_BY_RATIO:
        ratio = schedule.num_train_timesteps // sched.num_inference_steps
        for a, b in zip(ts, ts[1:], strict=False):
            if a - ratio != b:
                raise ValueError(
                    f"diffusers' {name} steps from timestep {a:g} to {a - ratio:g} (t - N // steps), not to its next "
                    f"timestep {b:g}: no grid of times holds those steps (spacing {sched.config.timestep_spacing!r} "
                    f"with {sched.num_inference_steps} steps of {schedule.num_train_timesteps}, or PNDM's "
                    "Runge-Kutta warm-up); choose a step count that divides num_train_timesteps")
        if ts[-1] - ratio >= 0:
            final = schedule.time_of_index(ts[-1] - ratio)
    times = [schedule.time_of_index(v) for v in ts]
    return times if final == times[-1] else [*times, final]


def _onto_bounds(schedule: NoiseSchedule, times: list[float]) -> list[float]:
    """Times past a bound by float32 rounding only (relative 1e-6) put on the bound; others left for validation."""
    lo, hi = schedule.t_min, schedule.t_max
    out = []
    for t in times:
        if hi < t <= hi * (1 + 1e-6):
            t = hi
        elif 0.0 < t < lo and t >= lo * (1 - 1e-6):
            t = lo
        out.append(t)
    return out
