"""Time grids: pure functions ``(schedule, steps, **knobs) -> float64 tensor of steps + 1 decreasing times``.

Every grid spaces its points between ``t_start`` (default ``schedule.t_max``) and ``t_end`` (default
``schedule.t_min``) by its own rule. With ``to_zero=True`` (the default, like k-diffusion's and diffusers'
``final_sigmas_type="zero"``) the first ``steps`` points are spaced that way and a last point ``t = 0`` is
appended: the final step denoises to clean data (``x <- x0_hat``). With ``to_zero=False`` all ``steps + 1``
points are spaced between ``t_start`` and ``t_end``, as in the original DPM-Solver code. ``trailing`` is the
exception: like diffusers' ``"trailing"`` spacing it spaces ``steps + 1`` points from ``t_start`` to 0 itself.

Grids are registered by name in :data:`GRIDS`; :func:`make_grid` looks one up with a close-match hint.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fewstep.schedules import NoiseSchedule

__all__ = [
    "DEFAULT_GRID",
    "GRIDS",
    "check_steps",
    "explicit",
    "karras",
    "logsnr",
    "make_grid",
    "time_quadratic",
    "time_uniform",
    "trailing",
    "validate_grid",
]

GridFn = Callable[..., torch.Tensor]

MAX_STEPS = 100_000
"""The most steps a grid takes (a 1000-step DDPM run is the usual maximum; far more is a typo, not a plan)."""


def _bounds(schedule: NoiseSchedule, t_start: float | None, t_end: float | None) -> tuple[float, float]:
    t_start = schedule.t_max if t_start is None else float(t_start)
    t_end = schedule.t_min if t_end is None else float(t_end)
    if not (schedule.t_min * (1 - 1e-12) <= t_end < t_start <= schedule.t_max * (1 + 1e-12)):
        raise ValueError(
            f"grid bounds must satisfy t_min={schedule.t_min} <= t_end={t_end} < t_start={t_start} "
            f"<= t_max={schedule.t_max}"
        )
    return t_start, t_end


def check_steps(steps: int) -> int:
    """``steps`` as an ``int``, checked: an integer (not a bool) from 1 to :data:`MAX_STEPS`, else ``TypeError`` /
    ``ValueError``. Every grid checks its step count with it, and so does anything that hands a step count on."""
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be <= {MAX_STEPS:,}, got {steps:,}")
    return int(steps)


def _finish(points: np.ndarray, to_zero: bool) -> torch.Tensor:
    if to_zero:
        points = np.concatenate([points, [0.0]])
    return torch.tensor(points, dtype=torch.float64)


def _spaced(
    schedule: NoiseSchedule,
    steps: int,
    to_zero: bool,
    t_start: float | None,
    t_end: float | None,
    warp: Callable[[np.ndarray, float, float], np.ndarray],
) -> torch.Tensor:
    steps = check_steps(steps)
    t_start, t_end = _bounds(schedule, t_start, t_end)
    n = steps if to_zero else steps + 1
    if n == 1:
        points = np.array([t_start])
    else:
        points = warp(np.linspace(0.0, 1.0, n), t_start, t_end)
        points[0], points[-1] = t_start, t_end
    return _finish(points, to_zero)


def time_uniform(
    schedule: NoiseSchedule,
    steps: int,
    *,
    to_zero: bool = True,
    t_start: float | None = None,
    t_end: float | None = None,
) -> torch.Tensor:
    """Points equally spaced in ``t`` (diffusers' ``"trailing"``/``"linspace"`` spacing in continuous time)."""
    return _spaced(schedule, steps, to_zero, t_start, t_end, lambda u, a, b: a + u * (b - a))


def time_quadratic(
    schedule: NoiseSchedule,
    steps: int,
    *,
    to_zero: bool = True,
    t_start: float | None = None,
    t_end: float | None = None,
) -> torch.Tensor:
    """Points equally spaced in ``sqrt(t)`` (DDIM's ``quad`` and DPM-Solver's ``time_quadratic``)."""
    def warp(u: np.ndarray, a: float, b: float) -> np.ndarray:
        return (math.sqrt(a) + u * (math.sqrt(b) - math.sqrt(a))) ** 2

    return _spaced(schedule, steps, to_zero, t_start, t_end, warp)


def logsnr(
    schedule: NoiseSchedule,
    steps: int,
    *,
    to_zero: bool = True,
    t_start: float | None = None,
    t_end: float | None = None,
) -> torch.Tensor:
    """Points equally spaced in ``lam = log(alpha/sigma)`` (DPM-Solver's ``logSNR`` skip type)."""

    def warp(u: np.ndarray, a: float, b: float) -> np.ndarray:
        lam_a, lam_b = schedule.lam(a), schedule.lam(b)
        return np.array([schedule.inverse_lam(lam_a + v * (lam_b - lam_a)) for v in u])

    return _spaced(schedule, steps, to_zero, t_start, t_end, warp)


def karras(
    schedule: NoiseSchedule,
    steps: int,
    *,
    rho: float = 7.0,
    to_zero: bool = True,
    t_start: float | None = None,
    t_end: float | None = None,
) -> torch.Tensor:
    """Points equally spaced in ``edm_sigma^(1/rho)`` with ``edm_sigma = sigma/alpha``.

    The schedule of *Elucidating the Design Space of Diffusion-Based Generative Models* (Karras et al., 2022),
    eq. (5); ``rho = 7`` is the paper's default, ``rho = 1`` is uniform in ``edm_sigma``.
    """
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")

    def warp(u: np.ndarray, a: float, b: float) -> np.ndarray:
        s_a, s_b = schedule.edm_sigma(a) ** (1 / rho), schedule.edm_sigma(b) ** (1 / rho)
        return np.array([schedule.inverse_lam(-rho * math.log(s_a + v * (s_b - s_a))) for v in u])

    return _spaced(schedule, steps, to_zero, t_start, t_end, warp)


def trailing(
    schedule: NoiseSchedule,
    steps: int,
    *,
    to_zero: bool = True,
    t_start: float | None = None,
    t_end: float | None = None,
) -> torch.Tensor:
    """diffusers' ``"trailing"`` spacing in continuous time: ``steps + 1`` points equally spaced in ``t`` from
    ``t_start`` down to 0 itself, so the last model evaluation is at ``t_start / steps`` rather than at ``t_min``
    (no evaluation is spent on the almost-clean end). Always denoises to zero; needs ``t_start / steps >= t_min``.
    """
    steps = check_steps(steps)
    if not to_zero or t_end is not None:
        raise ValueError("trailing spacing always ends at t = 0 (use time_uniform for other end points)")
    t_start, _ = _bounds(schedule, t_start, None)
    points = t_start * (1.0 - np.arange(steps + 1) / steps)
    points[-1] = 0.0
    if points[-2] < schedule.t_min * (1 - 1e-9):
        raise ValueError(f"{steps} trailing steps put a model evaluation below t_min={schedule.t_min}; "
                         "use fewer steps or time_uniform")
    return torch.tensor(points, dtype=torch.float64)


def explicit(schedule: NoiseSchedule, times: Sequence[float] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A user-given list of times (e.g. converted from a diffusers scheduler's ``timesteps``), validated."""
    grid = torch.as_tensor(np.asarray(times, dtype=np.float64))
    validate_grid(schedule, grid)
    return grid


def validate_grid(schedule: NoiseSchedule, grid: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``grid`` is 1-D, strictly decreasing, inside ``[t_min, t_max]`` and
    optionally ends at exactly 0."""
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"a grid needs at least 2 times (1 step) in a 1-D tensor, got shape {tuple(grid.shape)}")
    g = grid.tolist()
    if any(math.isnan(v) for v in g):
        raise ValueError("grid contains NaN")
    if any(b >= a for a, b in zip(g, g[1:], strict=False)):
        raise ValueError(f"grid must be strictly decreasing, got {g}")
    model_times = g[:-1] if g[-1] == 0.0 else g
    lo, hi = schedule.t_min * (1 - 1e-9), schedule.t_max * (1 + 1e-9)
    bad = [v for v in model_times if not lo <= v <= hi]
    if bad:
        raise ValueError(
            f"grid times {bad} leave the model's range [t_min={schedule.t_min}, t_max={schedule.t_max}] "
            "(only the last time may be 0)"
        )


GRIDS: dict[str, GridFn] = {
    "time_quadratic": time_quadratic,
    "trailing": trailing,
    "logsnr": logsnr,
    "karras": karras,
    "time_uniform": time_uniform,
}
"""The registered grids, the default first (the order ``fewstep tune`` measures them in)."""

DEFAULT_GRID = "time_quadratic"
"""The one default grid of every run description (:class:`fewstep.plan.Plan`, :func:`fewstep.sample`, the bench's
experiments, calibration runs): the most accurate at 10-20 NFE on the zoo models."""


def make_grid(name: str, schedule: NoiseSchedule, steps: int, **knobs: float | bool | None) -> torch.Tensor:
    """Look up grid ``name`` in :data:`GRIDS` and call it; unknown names get a close-match suggestion.

    ``"diffusers"`` (a diffusers scheduler's own timesteps) is not a function of ``(schedule, steps)`` alone: it
    needs the scheduler config, so it is :func:`fewstep.models.diffusers_grid`, not a registered grid.
    """
    if name == "diffusers":
        raise ValueError("the 'diffusers' grid is a diffusers scheduler's own timesteps and needs its config: call "
                         "fewstep.models.diffusers_grid(scheduler_or_config, schedule, steps)")
    try:
        fn = GRIDS[name]
    except KeyError:
        raise ValueError(f"unknown grid {name!r}{suggest(name, GRIDS)}; known grids: {', '.join(GRIDS)}") from None
    return fn(schedule, steps, **knobs)


def suggest(name: str, known: Sequence[str] | dict) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or an empty string."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
