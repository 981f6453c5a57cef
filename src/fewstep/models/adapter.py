"""Adapt any callable or ``nn.Module`` that predicts eps, x0, v, flow velocity or the score to a Denoiser.

This module is the only place that knows a network's prediction type and native time units.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fewstep.grids import suggest
from fewstep.models.base import Cond, Denoiser
from fewstep.schedules import DiscreteVP, NoiseSchedule, RectifiedFlow
from fewstep.solvers._coeffs import lincomb

__all__ = ["PREDICTIONS", "ModelDenoiser", "native_time_default"]

PREDICTIONS = ("eps", "x0", "v", "flow", "score")


def native_time_default(schedule: NoiseSchedule) -> Callable[[float], float]:
    """The native time a network of this schedule usually takes.

    * :class:`DiscreteVP`: the training-step index ``N t - 1`` (0..N-1), snapped to the nearest integer when
      within 1e-6 of it, so integer grids feed integer timesteps exactly as diffusers does;
    * anything else: ``t`` itself.
    """
    if isinstance(schedule, DiscreteVP):

        def index(t: float) -> float:
            n = schedule.index(t)
            r = round(n)
            return float(r) if abs(n - r) < 1e-6 else n

        return index
    return lambda t: t


class ModelDenoiser(Denoiser):
    """``x0_hat`` from a network ``model(x, native_t, **cond)``.

    Conversions (``x = alpha x0 + sigma eps``):

    * ``eps``: ``x0 = (x - sigma eps) / alpha``
    * ``x0``: the output itself
    * ``v`` (``v = alpha eps - sigma x0``, *Progressive Distillation*, Salimans & Ho, 2022):
      ``x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)``
    * ``flow`` (velocity ``u = eps - x0`` of rectified flow; needs :class:`RectifiedFlow`): ``x0 = x - t u``
    * ``score`` (``s = -eps / sigma``): ``x0 = (x + sigma^2 s) / alpha``

    Args:
        model: callable ``(x, timestep_tensor, **cond) -> tensor`` (or an object with ``.sample``, as diffusers
            models return).
        schedule: the schedule the network was trained on.
        prediction: one of :data:`PREDICTIONS`.
        native_time: maps continuous ``t`` to what the network takes; default :func:`native_time_default`.
        dtype: dtype the network runs in (inputs are cast to it, outputs cast back to the state's dtype);
            default: the dtype of the module's first parameter, else the input's.
        default_cond: keyword arguments passed to the network unless ``cond`` overrides them (e.g. the null class
            label of a class-conditional model, so it samples unconditionally by default).
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
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.native_time = native_time or native_time_default(schedule)
        if dtype is None and isinstance(model, torch.nn.Module):
            params = next(iter(model.parameters()), None)
            dtype = None if params is None else params.dtype
        self.dtype = dtype
        self.default_cond = dict(default_cond or {})

    def _call_model(self, x: torch.Tensor, t: float, cond: Cond) -> torch.Tensor:
        x_in = x if self.dtype is None else x.to(self.dtype)
        timestep = torch.full((x.shape[0],), self.native_time(t), dtype=torch.float64, device=x.device)
        if self.dtype is not None and self.dtype != torch.float64:
            timestep = timestep.to(torch.float32)
        out = self.model(x_in, timestep, **{**self.default_cond, **dict(cond or {})})
        if not isinstance(out, torch.Tensor):
            out = out.sample if hasattr(out, "sample") else out[0]
        return out.to(x.dtype)

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)  # validates t (NaN, range) before the network
        out = self._call_model(x, t, cond)
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
            cx, co = 1.0, -t
        else:  # score
            cx, co = 1.0 / alpha, sigma * sigma / alpha
        return lincomb([(cx, x), (co, out)])

    def __repr__(self) -> str:
        return f"ModelDenoiser({type(self.model).__name__}, {self.schedule!r}, prediction={self.prediction!r})"
