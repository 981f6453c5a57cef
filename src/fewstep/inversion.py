"""Inversion: data -> the noise that regenerates it, for deterministic solvers; exact for BDIA."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fewstep.grids import DEFAULT_GRID, explicit, make_grid
from fewstep.models.base import Cond, Denoiser, Run
from fewstep.sample import BoundModel, integrate
from fewstep.solvers import Solver, State, Step, make_solver
from fewstep.solvers.bdia import BDIA, BDIAState

__all__ = ["Inversion", "invert", "regenerate"]


@dataclass(frozen=True)
class Inversion:
    """The result of :func:`invert`.

    Attributes:
        x_T: the latent at the first (noisiest) grid time.
        times: the sampling grid (decreasing, ending at ``t_end > 0``, where the input was placed).
        solver: the solver that inverted (and must regenerate).
        start: the point sampling resumes from (``x_T``, or ``z_{N-1}`` for BDIA).
        start_index: the first sampling step to take (0, or 1 for BDIA: its first step is replaced by the pair).
        state: the solver state to resume with.
        nfe: network evaluations the inversion took.
    """

    x_T: torch.Tensor
    times: torch.Tensor
    solver: Solver
    start: torch.Tensor
    start_index: int
    state: State
    nfe: int


def _times(denoiser: Denoiser, steps: int | Sequence[float] | np.ndarray | torch.Tensor, grid: str) -> torch.Tensor:
    if isinstance(steps, bool):
        raise TypeError("steps must be a step count or a list of times")
    if isinstance(steps, int | np.integer):
        times = make_grid(grid, denoiser.schedule, int(steps), to_zero=False)
    else:
        times = explicit(denoiser.schedule, steps)
    if float(times[-1]) == 0.0:
        raise ValueError("an inversion grid must end at t > 0 (the input is placed at the last grid time)")
    return times


def invert(
    denoiser: Denoiser,
    x0: torch.Tensor,
    *,
    solver: Solver | str = "ddim",
    steps: int | Sequence[float] | np.ndarray | torch.Tensor = 50,
    grid: str = DEFAULT_GRID,
    cond: Cond = None,
    hooks: Sequence[Any] = (),
    check: bool = True,
) -> Inversion:
    """Map data ``x0`` to the latent ``x_T`` from which ``solver`` regenerates it.

    ``x0`` is placed at the last time of the sampling grid (``t_end > 0``, where ``alpha ~ 1``) and integrated
    backwards to the first. Any deterministic solver inverts by running its own steps over the reversed grid
    (``h < 0``): for DDIM this is the usual DDIM inversion, which is *not* exact (it evaluates the model at the
    start of each reversed step, so the round trip errs by O(h) per step, more with guidance). ``bdia``
    inverts exactly: its sampling step is affine in the previous point, and solving it backwards from the pair
    ``(z_0, z_1)`` (``z_1`` by one DDIM-inversion step) yields the pair ``(z_N, z_{N-1})``; :func:`regenerate`
    restarts from that pair and reproduces ``x0`` to round-off.

    Returns an :class:`Inversion`; regenerate with :func:`regenerate` (optionally with other conditioning).
    """
    if isinstance(solver, str):
        solver = make_solver(solver)
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a Solver or a solver name, got {type(solver).__name__}")
    if solver.stochastic:
        raise ValueError(f"{solver.name} is stochastic; inversion needs a deterministic solver (ddim, bdia, ...)")
    if not isinstance(x0, torch.Tensor) or x0.ndim < 1:
        raise TypeError("x0 must be a tensor of shape (batch, *sample_shape)")
    times = _times(denoiser, steps, grid)
    g = times.tolist()
    n = len(g) - 1
    sched = denoiser.schedule
    run = Run(tuple(range(x0.shape[0])), tuple(reversed(g)), tuple(hooks))
    model = BoundModel(denoiser.for_run(run), cond, check, hooks)
    # Reversed steps: from g[n - i] (cleaner) to g[n - i - 1] (noisier); h < 0.
    back = [Step.of(sched, i, n, g[n - i], g[n - i - 1]) for i in range(n)]
    x = x0.clone()
    with torch.no_grad():
        if isinstance(solver, BDIA):
            if n < 2:
                raise ValueError("BDIA inversion needs at least 2 steps")
            model.step_index = 0
            z_clean, z = x, solver.step(model, x, back[0], solver.init(x), None)[0]  # z_1: one DDIM step
            for i in range(1, n):
                model.step_index = i
                z_clean, z = z, solver.invert_step(model, z, z_clean, back[i], back[i - 1].alpha_cur,
                                                   back[i - 1].sigma_cur)
            # Sampling resumes at step 1 from z_{N-1} with z_N as the previous point.
            state = BDIAState(z, sched.alpha(g[0]), sched.sigma(g[0]))
            return Inversion(z, times, solver, z_clean, 1, state, model.calls)
    x = integrate(model, solver, back, x, solver.init(x), torch.flip(times, [0]), hooks)
    return Inversion(x, times, solver, x, 0, solver.init(x), model.calls)


def regenerate(
    denoiser: Denoiser, inversion: Inversion, *, cond: Cond = None, hooks: Sequence[Any] = (), check: bool = True
) -> torch.Tensor:
    """Sample from an :class:`Inversion` with its solver and grid (resuming from its stored pair for BDIA);
    with the same ``cond`` as the inversion this reproduces the input (exactly for BDIA)."""
    if not isinstance(inversion, Inversion):
        raise TypeError(f"expected an Inversion from fewstep.invert, got {type(inversion).__name__}")
    g = inversion.times.tolist()
    n = len(g) - 1
    sched = denoiser.schedule
    steps = [Step.of(sched, i, n, g[i], g[i + 1]) for i in range(inversion.start_index, n)]
    run = Run(tuple(range(inversion.x_T.shape[0])), tuple(g), tuple(hooks))
    model = BoundModel(denoiser.for_run(run), cond, check, hooks)
    return integrate(model, inversion.solver, steps, inversion.start, inversion.state, inversion.times, hooks)
