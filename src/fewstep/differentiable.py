"""A differentiable run of a solver: the end point as a function of the time steps (and of decoupled network time
inputs), for the gradient-based refinement of ``fewstep tune``.

The solvers themselves compute their coefficients on the host in float64 (``Step``); here the two solvers a tuner
refines by gradient, DDIM (DPM-Solver-1) and DPM-Solver++(2M), are written once more with the grid as a tensor, so
autograd reaches the steps through the coefficients, the network's input and its time input. Their values equal
:func:`fewstep.sample`'s on the same grid (tested); the schedule's scalar functions are differentiated by central
differences on the host (:func:`fewstep.hostfn.host`), everything else by autograd.

References: *Learning to Discretize Denoising Diffusion ODEs* (Tong et al., ICLR 2025; LD3), whose refinement
backpropagates the end-point distance to a teacher through the sampler; *DPM-Solver++* (Lu et al., 2022) for the
updates.
"""

from __future__ import annotations

import torch

from fewstep.hostfn import host
from fewstep.models.base import Cond, Denoiser

__all__ = ["DIFFERENTIABLE", "run"]

DIFFERENTIABLE = ("ddim", "dpmpp_2m")
"""The solvers :func:`run` differentiates (deterministic, with default knobs)."""


def run(den: Denoiser, solver: str, times: torch.Tensor, *, x_init: torch.Tensor, cond: Cond = None,
        model_times: torch.Tensor | None = None) -> torch.Tensor:
    """The end point of ``solver`` (one of :data:`DIFFERENTIABLE`) over ``times`` (1-d float64, strictly
    decreasing, the last one 0 or the smallest time) from ``x_init``, differentiable in ``times`` and
    ``model_times`` (the network's time for each nonzero grid time; default ``times`` themselves). ``den`` must
    take tensor times (a :class:`~fewstep.models.ModelDenoiser`, or guidance around one)."""
    if not getattr(den, "takes_tensor_time", False):
        raise ValueError(f"a differentiable run needs a denoiser that takes tensor times (a ModelDenoiser, or "
                         f"guidance around one), not {type(den).__name__}")
    if solver not in DIFFERENTIABLE:
        raise ValueError(f"a differentiable run exists for {', '.join(DIFFERENTIABLE)}, not {solver!r}")
    if times.ndim != 1 or len(times) < 2:
        raise ValueError("times must be a 1-d tensor of at least 2 times")
    ts = times.to(torch.float64)
    to_zero = float(ts[-1].detach()) == 0.0
    nonzero = len(ts) - int(to_zero)
    ms = ts[:nonzero] if model_times is None else model_times.to(torch.float64)
    if len(ms) != nonzero:
        raise ValueError(f"model_times needs {nonzero} times, got {len(ms)}")
    sched = den.schedule
    lam = [host(sched.lam, ts[i]) for i in range(nonzero)]
    alpha = [host(sched.alpha, ts[i]) for i in range(nonzero)]
    sigma = [host(sched.sigma, ts[i]) for i in range(nonzero)]
    count = len(ts) - 1
    x = x_init
    prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (lam, x0_hat) of the previous step
    for i in range(nonzero - 1):
        m0 = den(x, ms[i], cond)
        h = lam[i + 1] - lam[i]
        c_x = sigma[i + 1] / sigma[i]
        c_m = -alpha[i + 1] * torch.expm1(-h)
        remaining = count - i
        order = 1 if solver == "ddim" or prev is None or remaining < 2 else 2
        if order == 1:
            x = c_x * x + c_m * m0
        else:
            r0 = (lam[i] - prev[0]) / h
            k0 = 0.5 * alpha[i + 1] * torch.expm1(-h) * -1.0  # the midpoint form: x += k0 (m0 - m1) / r0
            x = c_x * x + (c_m + k0 / r0) * m0 - (k0 / r0) * prev[1]
        prev = (lam[i], m0)
    if to_zero:
        x = den(x, ms[nonzero - 1], cond)
    return x
