"""Decoupled time inputs: the denoiser evaluated at a learned time in place of the solver's.

*Learning to Discretize Denoising Diffusion ODEs* (Tong et al., ICLR 2025; LD3) learns, besides the time steps
``t_i`` a solver integrates over, the time ``s_i`` the network is evaluated at in their place: a per-step
correction of the network's own bias at few steps. :class:`Retimed` is that as a Denoiser wrapper, so every solver,
cache and hook runs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fewstep.models.base import Cond, Denoiser, Run

__all__ = ["Retimed", "check_model_times"]


def check_model_times(times: Sequence[float], model_times: Sequence[float]) -> tuple[float, ...]:
    """``model_times`` as floats, checked against the grid ``times``: one positive time per nonzero grid time.
    They need not decrease: a learned first network time often lies below the second (LD3 finds the same)."""
    nonzero = [t for t in times if t > 0]
    out = tuple(float(s) for s in model_times)
    if len(out) != len(nonzero):
        raise ValueError(f"model_times needs one time per nonzero grid time ({len(nonzero)}), got {len(out)}")
    if not all(np.isfinite(out)) or any(s <= 0 for s in out):
        raise ValueError(f"model_times must be positive numbers, got {list(out)}")
    return out


class Retimed(Denoiser):
    """``inner`` evaluated at ``s(t)`` where a solver asks for ``t``: ``s(times[i]) = model_times[i]`` at the grid
    times, linear in between (the intermediate stages of multi-stage solvers), ``s(0) = 0``.

    ``t`` may be a 0-d tensor (a differentiable run): the map is then applied in torch.
    """

    def __init__(self, inner: Denoiser, times: Sequence[float], model_times: Sequence[float]) -> None:
        if not isinstance(inner, Denoiser):
            raise TypeError(f"inner must be a Denoiser, got {type(inner).__name__}")
        self.model_times = check_model_times(times, model_times)
        self.times = tuple(float(t) for t in times if t > 0)
        for s in self.model_times:
            inner.schedule.alpha(s)  # outside [0, t_max] raises here, before any run
        self.inner = inner
        self.schedule = inner.schedule
        self.required_cond = inner.required_cond
        # np.interp needs increasing knots: the grid reversed
        self._knots = np.array((0.0,) + self.times[::-1])
        self._values = np.array((0.0,) + self.model_times[::-1])

    def time_of(self, t: float) -> float:
        """The network time for solver time ``t``."""
        return float(np.interp(t, self._knots, self._values))  # below the last grid time: linear to s(0) = 0

    def for_run(self, run: Run) -> Denoiser:
        mapped = Run(run.seeds, tuple(self.time_of(t) if t > 0 else 0.0 for t in run.times), run.hooks)
        inner = self.inner.for_run(mapped)
        if inner is self.inner:
            return self
        bound = Retimed.__new__(Retimed)
        bound.__dict__.update(self.__dict__)
        bound.inner = inner
        return bound

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            raise TypeError("a Retimed denoiser takes float times; differentiable runs pass model times themselves")
        return self.inner(x, self.time_of(t), cond)
