"""Adapt any callable or ``nn.Module`` that predicts eps, x0, v, flow velocity, the score or EDM's preconditioned
``F`` to a Denoiser.

This module is the only place that knows a network's prediction type and native time units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from fewstep.grids import suggest
from fewstep.hostfn import host
from fewstep.models.base import Cond, Denoiser
from fewstep.schedules import DiscreteVP, NoiseSchedule, RectifiedFlow
from fewstep.solvers.coeffs import lincomb

if TYPE_CHECKING:
    from fewstep.models.families import ModelFamily

__all__ = ["EDM_PREDICTIONS", "PREDICTIONS", "ModelDenoiser", "edm_noise_time", "native_time_default"]

PREDICTIONS = ("eps", "x0", "v", "flow", "score", "edm", "edm_v")

EDM_PREDICTIONS = ("edm", "edm_v")
"""Networks inside EDM's preconditioning (``c_in``, ``c_noise``, ``c_skip``, ``c_out``); see :class:`ModelDenoiser`."""


def edm_noise_time(schedule: NoiseSchedule) -> Callable[[float], float]:
    """EDM's noise conditioning ``c_noise = log(sbar) / 4`` with ``sbar = sigma / alpha``: the native time of a network
    with EDM preconditioning (diffusers' ``precondition_noise``), and of diffusers' Euler scheduler with
    ``timestep_type="continuous"``."""
    return lambda t: 0.25 * math.log(schedule.edm_sigma(t))


def native_time_default(schedule: NoiseSchedule) -> Callable[[float], float]:
    """The native time a network of this schedule usually takes.

    * :class:`DiscreteVP`: the training-step index ``N t - 1`` (0..N-1), snapped to the nearest integer when
      within 1e-6 of it, so integer grids feed integer timesteps exactly as diffusers does;
    * anything else: ``t`` itself.
    """
    if isinstance(schedule, DiscreteVP):
        return lambda t: snap_integer(schedule.index(t))
    return lambda t: t


def snap_integer(value: float) -> float:
    """``value`` rounded to the nearest integer when within 1e-6 of it (so grids on training steps feed the network
    exact integer timesteps, as diffusers does), else unchanged."""
    r = round(value)
    return float(r) if abs(value - r) < 1e-6 else value


class ModelDenoiser(Denoiser):
    """``x0_hat`` from a network ``model(x, native_t, **cond)``.

    Conversions (``x = alpha x0 + sigma eps``):

    * ``eps``: ``x0 = (x - sigma eps) / alpha``
    * ``x0``: the output itself
    * ``v`` (``v = alpha eps - sigma x0``, *Progressive Distillation*, Salimans & Ho, 2022):
      ``x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)``
    * ``flow`` (velocity ``u = eps - x0`` of rectified flow, shifted or not; needs :class:`RectifiedFlow`):
      ``x0 = x - sigma u``
    * ``score`` (``s = -eps / sigma``): ``x0 = (x + sigma^2 s) / alpha``
    * ``edm`` (``F`` of *Elucidating the Design Space of Diffusion-Based Generative Models*, Karras et al., 2022,
      with its preconditioning): in the EDM frame ``xbar = x / alpha``, ``sbar = sigma / alpha``, the network takes
      ``c_in xbar`` with ``c_in = 1 / sqrt(sbar^2 + sigma_data^2)`` and ``c_noise = log(sbar) / 4`` as its time
      (the default ``native_time``), and ``x0 = c_skip xbar + c_out F`` with ``c_skip = sigma_data^2 / (sbar^2 +
      sigma_data^2)``, ``c_out = sbar sigma_data / sqrt(sbar^2 + sigma_data^2)``: diffusers' ``EDMEulerScheduler``
      and ``EDMDPMSolverMultistepScheduler`` with ``prediction_type="epsilon"``.
    * ``edm_v``: the same with ``c_out`` negated (those schedulers' ``prediction_type="v_prediction"``).

    Args:
        model: callable ``(x, timestep_tensor, **cond) -> tensor`` (or an object with ``.sample``, as diffusers
            models return).
        schedule: the schedule the network was trained on.
        prediction: one of :data:`PREDICTIONS`.
        sigma_data: the data standard deviation of the ``edm``/``edm_v`` preconditioning; default: the schedule's
            (:class:`~fewstep.schedules.EDM` has one). Only for those predictions.
        native_time: maps continuous ``t`` to what the network takes; default :func:`native_time_default`.
        dtype: dtype the network runs in (inputs are cast to it, outputs cast back to the state's dtype);
            default: the dtype of the module's first parameter, else the input's.
        default_cond: keyword arguments passed to the network unless ``cond`` overrides them (e.g. the null class
            label of a class-conditional model, so it samples unconditionally by default).
        family: how the diffusers class of ``model`` is called (:mod:`fewstep.models.families`; ``from_diffusers``
            sets it): its keywords, latent packing, learned-sigma split, batch-1 conditioning broadcast, needed
            and default conditioning. ``None``: ``model(x, timestep, **cond)`` positionally.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        schedule: NoiseSchedule,
        *,
        prediction: str = "eps",
        native_time: Callable[[float], float] | None = None,
        dtype: torch.dtype | None = None,
        default_cond: Mapping[str, Any] | None = None,
        family: ModelFamily | None = None,
        sigma_data: float | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown prediction type {prediction!r}{suggest(prediction, PREDICTIONS)}; "
                f"expected one of {', '.join(PREDICTIONS)}"
            )
        if prediction == "flow" and not isinstance(schedule, RectifiedFlow):
            raise ValueError("prediction='flow' (rectified-flow velocity) needs a RectifiedFlow schedule")
        self.sigma_data = _check_sigma_data(prediction, schedule, sigma_data)
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        if native_time is None:
            native_time = edm_noise_time(schedule) if prediction in EDM_PREDICTIONS else native_time_default(schedule)
        self.native_time = native_time
        if dtype is None and isinstance(model, torch.nn.Module):
            params = next(iter(model.parameters()), None)
            dtype = None if params is None else params.dtype
        self.dtype = dtype
        self.family = family
        self.default_cond = dict(default_cond or {})
        self._needs: tuple[str, ...] = ()
        if family is not None:
            family.check(model)
            self.default_cond = {**family.default_cond(model), **self.default_cond}
            self._needs = family.required(model)
        # what every call must carry beyond the defaults (ClassifierFreeGuidance asks for uncond= when non-empty)
        self.required_cond = tuple(k for k in self._needs if k.partition(".")[0] not in self.default_cond)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the state this denoiser takes, read from the model config (Flux: the
        unpacked latent, ``in_channels / 4`` channels); known for diffusers model families only."""
        if self.family is None:
            raise ValueError(f"sample_shape is read from a diffusers model's config; this ModelDenoiser wraps a plain "
                             f"{type(self.model).__name__}: pass shape= yourself")
        return self.family.sample_shape(self.model)

    def network(self, x: torch.Tensor, native: float | torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """The network's own prediction (eps, v, velocity, ...) at its native time ``native`` (what a diffusers
        scheduler passes it), with the default conditioning merged under ``cond``."""
        x_in = x if self.dtype is None else x.to(self.dtype)
        if isinstance(native, torch.Tensor):  # differentiable in time
            timestep = native.to(device=x.device, dtype=torch.float64).expand(x.shape[0])
        else:
            timestep = torch.full((x.shape[0],), native, dtype=torch.float64, device=x.device)
        if self.dtype is not None and self.dtype != torch.float64:
            timestep = timestep.to(torch.float32)
        merged = {**self.default_cond, **dict(cond or {})}
        if self.family is not None:
            return self.family.call(self.model, x_in, timestep, merged, required=self._needs).to(x.dtype)
        out = self.model(x_in, timestep, **merged)
        if not isinstance(out, torch.Tensor):
            out = out.sample if hasattr(out, "sample") else out[0]
        return out.to(x.dtype)

    def input_scale(self, t: float) -> float:
        """The factor the network's input is multiplied by at ``t``: EDM's ``c_in / alpha`` (``c_in xbar`` with
        ``xbar = x / alpha``, ``c_in = 1 / sqrt(sbar^2 + sigma_data^2)``, ``sbar = sigma / alpha``), else 1."""
        if self.prediction not in EDM_PREDICTIONS:
            return 1.0
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        sbar = sigma / alpha
        return 1.0 / (alpha * math.sqrt(sbar * sbar + self.sigma_data * self.sigma_data))

    takes_tensor_time = True

    shift_size: tuple[int, int] | None = None
    """The latent size a dynamically shifted flow schedule was made for (``from_diffusers``); others are refused."""

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        """``x0_hat`` at ``t``. ``t`` may also be a 0-d float64 tensor: the prediction is then differentiable in
        ``t`` (through the schedule, the conversion and the network's time input; :mod:`fewstep.hostfn`)."""
        if isinstance(t, torch.Tensor):
            alpha, sigma = host(self.schedule.alpha, t), host(self.schedule.sigma, t)
            native: float | torch.Tensor = host(self.native_time, t)
            root = torch.sqrt
        else:
            root = math.sqrt
            alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)  # validates t (NaN, range) first
            native = self.native_time(t)
        if self.shift_size is not None and tuple(x.shape[-2:]) != self.shift_size:
            raise ValueError(f"this denoiser's flow shift is for {self.shift_size[0]}x{self.shift_size[1]} latents "
                             f"(use_dynamic_shifting); for {x.shape[-2]}x{x.shape[-1]} build it with "
                             "from_diffusers(..., image_seq_len=...)")
        edm = self.prediction in EDM_PREDICTIONS
        if edm:
            sbar, sd = sigma / alpha, self.sigma_data
            norm = sbar * sbar + sd * sd
            scale = 1.0 / (alpha * root(norm))  # input_scale(t)
        out = self.network(x * scale if edm else x, native, cond)
        if out.shape != x.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}")
        if self.prediction == "x0":
            return out
        if self.prediction == "eps":
            cx, co = 1.0 / alpha, -sigma / alpha
        elif self.prediction == "v":
            norm = alpha * alpha + sigma * sigma
            cx, co = alpha / norm, -sigma / norm
        elif self.prediction == "flow":
            cx, co = 1.0, -sigma
        elif edm:  # c_skip xbar + c_out F
            cx, co = sd * sd / (norm * alpha), sbar * sd / root(norm) * (1.0 if self.prediction == "edm" else -1.0)
        else:  # score
            cx, co = 1.0 / alpha, sigma * sigma / alpha
        if isinstance(t, torch.Tensor):
            return cx * x + co * out
        return lincomb([(cx, x), (co, out)])

    def __repr__(self) -> str:
        return f"ModelDenoiser({type(self.model).__name__}, {self.schedule!r}, prediction={self.prediction!r})"


def _check_sigma_data(prediction: str, schedule: NoiseSchedule, sigma_data: float | None) -> float | None:
    if prediction not in EDM_PREDICTIONS:
        if sigma_data is not None:
            raise ValueError(f"sigma_data is for the EDM-preconditioned predictions {EDM_PREDICTIONS}, "
                             f"not prediction={prediction!r}")
        return None
    if sigma_data is None:
        sigma_data = getattr(schedule, "sigma_data", None)
        if sigma_data is None:
            raise ValueError(f"prediction={prediction!r} needs sigma_data (the EDM schedule carries one; "
                             f"{schedule!r} does not)")
    if isinstance(sigma_data, bool) or not (isinstance(sigma_data, int | float) and sigma_data > 0
                                            and math.isfinite(sigma_data)):
        raise ValueError(f"sigma_data must be a positive number, got {sigma_data!r}")
    return float(sigma_data)
