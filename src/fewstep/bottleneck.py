"""Bottleneck sampling: the middle steps at reduced resolution (high - low - high)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fewstep.grids import DEFAULT_GRID, make_grid
from fewstep.models.base import Cond, Denoiser
from fewstep.noise import SampleNoise, parse_seeds
from fewstep.sample import sample
from fewstep.solvers import Solver, make_solver

__all__ = ["BottleneckResult", "bottleneck_sample"]


@dataclass(frozen=True)
class BottleneckResult:
    samples: torch.Tensor
    nfe: int  # network evaluations (every resolution)
    cost: float  # evaluations weighted by pixel count relative to full resolution


def bottleneck_sample(
    denoiser: Denoiser,
    solver: Solver | str,
    steps: int,
    *,
    shape: Sequence[int],
    seeds: str | int | Sequence[int] = 1,
    factor: int = 2,
    stages: tuple[float, float] = (0.2, 0.8),
    shift: float = 2.0,
    grid: str = DEFAULT_GRID,
    cond: Cond = None,
    hooks: Sequence[Any] = (),
    dtype: torch.dtype = torch.float32,
) -> BottleneckResult:
    """High - low - high resolution sampling for convolutional models.

    The ``steps``-step grid is cut at the fractions ``stages = (a, b)``: steps ``[0, a)`` run at full resolution,
    ``[a, b)`` at ``1/factor`` resolution, ``[b, 1]`` at full resolution again.

    * Down (no NFE): ``x_low = avgpool(x) + sigma_t sqrt(1 - 1/factor^2) z``. Average pooling keeps the data part
      and shrinks the noise's std by ``factor``; fresh noise restores the marginal ``alpha x0 + sigma eps``.
    * Up (1 NFE at low resolution): predict ``x0_low``, upsample it (bilinear), and re-noise with fresh noise to a
      higher noise level, EDM sigma ``shift * sbar(t_b)``: the upsampled image lacks high frequencies that the last
      stage must recreate (the paper's timestep shift at the high-resolution re-entry). The final stage runs from
      that level along a grid of the remaining steps.

    Each stage starts the solver afresh (a multistep history cannot cross a change of resolution). Cost counts
    evaluations weighted by their pixel share (``1/factor^2`` at low resolution). Fresh noise comes from
    per-sample generators (offset seeds), so sample ``k`` is the same in any batch.

    References: *Training-free Diffusion Acceleration with Bottleneck Sampling* (Tian et al., 2025).
    """
    if isinstance(solver, str):
        solver = make_solver(solver)
    a, b = (float(v) for v in stages)
    if not 0.0 < a < b < 1.0:
        raise ValueError(f"stages must be fractions 0 < a < b < 1, got {stages}")
    if factor < 2 or any(int(s) % factor for s in shape[-2:]):
        raise ValueError(f"factor must be >= 2 and divide the spatial size {tuple(shape[-2:])}")
    if not shift >= 1.0:
        raise ValueError(f"shift must be >= 1, got {shift}")
    sched = denoiser.schedule
    times = make_grid(grid, sched, steps).tolist()
    i_a, i_b = max(1, round(a * steps)), min(steps - 1, round(b * steps))
    if not 0 < i_a < i_b < steps:
        raise ValueError(f"{steps} steps are too few for stages {stages}")
    seed_list = parse_seeds(seeds)
    noise_low = SampleNoise([s + 50_000 for s in seed_list], (shape[0], shape[1] // factor, shape[2] // factor),
                            dtype=dtype)
    noise_high = SampleNoise([s + 60_000 for s in seed_list], tuple(shape), dtype=dtype)
    kw = {"seeds": seed_list, "cond": cond, "hooks": hooks, "dtype": dtype}

    x = sample(denoiser, solver, times[: i_a + 1], shape=shape, **kw)
    t_a = times[i_a]
    x_low = F.avg_pool2d(x, factor) + sched.sigma(t_a) * math.sqrt(1 - 1 / factor**2) * noise_low.draw()
    x_low = sample(denoiser, solver, times[i_a: i_b + 1], x_init=x_low, **kw)
    t_b = times[i_b]
    with torch.no_grad():
        x0_low = denoiser(x_low, t_b, cond)
    x0 = F.interpolate(x0_low, scale_factor=factor, mode="bilinear", align_corners=False)
    sbar = min(shift * sched.edm_sigma(t_b), sched.edm_sigma(times[0]))
    t_re = sched.inverse_lam(-math.log(sbar))
    x = sched.alpha(t_re) * x0 + sched.sigma(t_re) * noise_high.draw()
    final = make_grid(grid, sched, steps - i_b, t_start=t_re).tolist()
    x = sample(denoiser, solver, final, x_init=x, **kw)
    nfe_high = solver.nfe(i_a, to_zero=False) + solver.nfe(steps - i_b, to_zero=final[-1] == 0.0)
    nfe_low = solver.nfe(i_b - i_a, to_zero=False) + 1
    return BottleneckResult(x, nfe_high + nfe_low, nfe_high + nfe_low / factor**2)
