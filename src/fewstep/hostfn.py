"""Host functions differentiable in a tensor time: a schedule's ``alpha(t)``, ``sigma(t)`` or a model's native time
are plain float64 functions on the host; :func:`host` makes ``fn(t)`` a 0-d tensor whose derivative in ``t`` is a
central difference, so autograd reaches the time steps through them (:mod:`fewstep.differentiable`, and the
:class:`~fewstep.models.ModelDenoiser` called with a tensor time).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["host"]


class _Host(torch.autograd.Function):
    """``fn(t)`` for a host float function, with ``dfn/dt`` by a central difference of step ``1e-7 max(1, |t|)``
    (one-sided where ``t +- h`` leaves ``fn``'s domain)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, fn: Callable[[float], float]) -> torch.Tensor:  # noqa: ANN001
        v = float(t)
        ctx.fn, ctx.v = fn, v
        return torch.tensor(fn(v), dtype=torch.float64, device=t.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        fn, v = ctx.fn, ctx.v
        h = 1e-7 * max(1.0, abs(v))
        try:
            hi = fn(v + h)
            up = h
        except ValueError:  # past the end of the schedule
            hi, up = fn(v), 0.0
        try:
            lo = fn(v - h)
            down = h
        except ValueError:
            lo, down = fn(v), 0.0
        return grad * ((hi - lo) / (up + down)), None


def host(fn: Callable[[float], float], t: torch.Tensor) -> torch.Tensor:
    """``fn(t)`` as a float64 0-d tensor differentiable in the 0-d tensor ``t``."""
    return _Host.apply(t, fn)
