"""``sample()``: the single loop over a time grid."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from fewstep.grids import DEFAULT_GRID, explicit, make_grid
from fewstep.models.base import Cond, Denoiser, Run
from fewstep.noise import SampleNoise, parse_seeds
from fewstep.solvers import Solver, Step, make_solver

__all__ = ["BoundModel", "integrate", "sample"]


class BoundModel:
    """The denoiser as solvers see it: ``model(x, t) -> x0_hat`` with ``cond`` bound, every call counted and
    (optionally) checked. Created per run, so counts never leak between runs or threads."""

    def __init__(self, denoiser: Denoiser, cond: Cond, check: bool, hooks: Sequence[Any],
                 noise: SampleNoise | None = None) -> None:
        self.denoiser, self.cond, self.check, self.noise = denoiser, cond, check, noise
        self.on_nfe = [fn for hook in hooks if (fn := getattr(hook, "on_nfe", None)) is not None]
        self.schedule = denoiser.schedule
        self.calls = 0
        self.step_index = 0

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.calls += 1
        out = self.denoiser(x, t, self.cond)
        if self.check:
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"denoiser returned {shape} for input of shape {tuple(x.shape)} "
                                 f"at step {self.step_index} (t={t:.6g})")
            # Element-wise, never a sum: a sum in float16 overflows on perfectly finite outputs.
            if not bool(torch.isfinite(out).all()):
                raise ValueError(f"denoiser returned NaN or inf at step {self.step_index} (t={t:.6g})")
        for fn in self.on_nfe:
            fn(self.calls)
        return out


def _fire(hooks: Iterable[Any], event: str, *args: Any) -> None:
    for hook in hooks:
        fn = getattr(hook, event, None)
        if fn is not None:
            fn(*args)


def sample(
    denoiser: Denoiser,
    solver: Solver | str,
    grid_or_steps: int | torch.Tensor | Sequence[float] | np.ndarray,
    *,
    x_init: torch.Tensor | None = None,
    shape: Sequence[int] | None = None,
    seeds: str | int | Sequence[int] | None = None,
    cond: Cond = None,
    hooks: Sequence[Any] = (),
    grid: str = DEFAULT_GRID,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Integrate from noise to data with ``solver`` over a time grid.

    Args:
        denoiser: any :class:`~fewstep.models.Denoiser`.
        solver: a :class:`~fewstep.solvers.Solver` or a registered name (default knobs).
        grid_or_steps: a number of steps (the grid is ``grid``, to zero) or an explicit decreasing list of
            times (validated; only the last may be 0).
        x_init: starting noise ``(B, *shape)``; default ``sqrt(alpha^2 + sigma^2) z`` at the first time with
            ``z`` drawn per sample from ``seeds``.
        shape: shape of one sample (needed when ``x_init`` is not given).
        seeds: per-sample seeds (``"0-63"``, an int n, a list); default ``0..B-1``. Also seed the noise of
            stochastic solvers, one generator per sample: sample k is identical whatever the batch size.
        cond: conditioning passed to the denoiser on every call.
        hooks: objects with optional ``on_start``, ``on_begin``, ``on_step``, ``on_nfe``, ``on_end``.
        grid: grid name used when ``grid_or_steps`` is an int (see :data:`fewstep.grids.GRIDS`).
        dtype: dtype of the state (default: ``x_init``'s, else float32). Models in float16/bfloat16 run in their
            dtype; the state stays in this one.
        device: device of the state (default: ``x_init``'s, else CPU).
        check: raise ``ValueError`` naming the step when the denoiser returns a wrong shape or NaN/inf (one
            device sync per evaluation; turn off for the last few percent of speed).

    Returns:
        The samples at the last grid time.
    """
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be a fewstep Denoiser, got {type(denoiser).__name__}")
    if isinstance(solver, str):
        solver = make_solver(solver)
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a Solver or a solver name, got {type(solver).__name__}")
    schedule = denoiser.schedule
    if isinstance(grid_or_steps, bool):
        raise TypeError("grid_or_steps must be a step count or a list of times")
    if isinstance(grid_or_steps, float | np.floating) or (
            isinstance(grid_or_steps, torch.Tensor | np.ndarray) and grid_or_steps.ndim == 0):
        raise TypeError(f"a step count must be an int, got {grid_or_steps!r} (or pass a list of times)")
    if isinstance(grid_or_steps, int | np.integer):
        times = make_grid(grid, schedule, int(grid_or_steps))
    else:
        times = explicit(schedule, grid_or_steps)
    g = times.tolist()
    to_zero = g[-1] == 0.0
    count = len(g) - 1

    if x_init is not None:
        if not isinstance(x_init, torch.Tensor) or x_init.ndim < 1:
            raise TypeError("x_init must be a tensor of shape (batch, *sample_shape)")
        dtype = dtype or x_init.dtype
        device = device or x_init.device
        batch, sample_shape = x_init.shape[0], tuple(x_init.shape[1:])
        seed_list = parse_seeds(seeds if seeds is not None else batch)
        if len(seed_list) != batch:
            raise ValueError(f"got {len(seed_list)} seeds for a batch of {batch}")
    else:
        if shape is None:
            raise ValueError("pass x_init or shape (the shape of one sample)")
        sample_shape = tuple(int(s) for s in shape)
        seed_list = parse_seeds(seeds if seeds is not None else 1)
    dtype = dtype or torch.float32
    device = device or "cpu"
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be floating point, got {dtype}")
    noise = SampleNoise(seed_list, sample_shape, device=device, dtype=dtype)
    if x_init is None:
        t0 = g[0]
        x = schedule.prior_std(t0) * noise.draw()
    else:
        x = x_init.to(device=device, dtype=dtype)

    run = Run(tuple(seed_list), tuple(g), tuple(hooks))
    model = BoundModel(denoiser.for_run(run), cond, check, hooks, noise)
    steps = [Step.of(schedule, i, count, g[i], g[i + 1], to_zero=to_zero) for i in range(count - int(to_zero))]
    return integrate(model, solver, steps, x, solver.init(x), times, hooks)


def integrate(
    model: BoundModel, solver: Solver, steps: Sequence[Step], x: torch.Tensor, state: Any, times: torch.Tensor,
    hooks: Sequence[Any],
) -> torch.Tensor:
    """The loop itself, from ``x`` and solver ``state`` over ``steps`` (then the denoise-to-zero step if the
    grid ends at 0). Shared by :func:`sample` and :func:`fewstep.regenerate` (which resumes mid-grid)."""
    g = times.tolist()
    _fire(hooks, "on_start", times)
    _fire(hooks, "on_begin", x)
    stochastic = solver.stochastic
    with torch.no_grad():
        for step in steps:
            model.step_index = step.index
            x, state = solver.step(model, x, step, state, model.noise.draw() if stochastic else None)
            _fire(hooks, "on_step", step.index, step.t_next, x)
        if g[-1] == 0.0:
            # Denoise to zero: the common limit of every solver's last step onto sigma = 0.
            model.step_index = len(g) - 2
            x = model(x, g[-2])
            _fire(hooks, "on_step", len(g) - 2, 0.0, x)
    _fire(hooks, "on_end", x)
    return x
