"""The search of ``fewstep tune``: time steps tuned for one model against a teacher.

A dynamic-programming search over a fine candidate grid against a teacher trajectory (:func:`search_steps`), then
refinement of the real run's end-point error, by coordinate descent (:func:`refine_steps`) or by gradient through
a differentiable run with optionally learned network times (:func:`refine_by_gradient`).

The teacher is a high-accuracy solve from the calibration noise, recorded at every candidate time. The cost of
an edge ``i -> j`` is the mean squared distance between one step of the solver from the teacher's state at
candidate ``i`` to candidate ``j`` and the teacher's state there; the tuned grid is the path of ``steps`` edges
from the first candidate to the last with the least total cost (:func:`dp_path`). This is the search of GITS
(local errors from teacher states, summed) on the candidate grid of OSS; the gradient refinement is LD3's.

References: *On the Trajectory Regularity of ODE-based Diffusion Sampling* (Chen et al., ICML 2024; GITS);
*Optimal Stepsize for Diffusion Sampling* (Pei et al., 2025; OSS); *Learning to Discretize Denoising Diffusion
ODEs* (Tong et al., ICLR 2025; LD3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fewstep.differentiable import run
from fewstep.grids import make_grid
from fewstep.hooks import TrajectoryRecorder
from fewstep.metrics import rmse_per_sample
from fewstep.models.base import Cond, Denoiser
from fewstep.noise import SampleNoise
from fewstep.sample import sample
from fewstep.solvers import Solver, make_solver

__all__ = ["Refined", "StepSearch", "dp_path", "edge_costs", "refine_by_gradient", "refine_steps", "rmse",
           "search_steps", "teacher_states"]


def dp_path(cost: torch.Tensor, steps: int) -> tuple[list[int], float]:
    """The path ``0 = i_0 < i_1 < ... < i_steps = M`` through the nodes of ``cost`` (``(M + 1, M + 1)``; entry
    ``[i, j]`` the cost of edge ``i -> j``, ``inf`` where there is none) with exactly ``steps`` edges and the least
    total cost; returns the path and its cost. Dynamic programming over (edges used, node): ``O(steps M^2)``."""
    n = cost.shape[0]
    last = n - 1
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= last:
        raise ValueError(f"steps must be an int in [1, {last}] for {n} candidates, got {steps!r}")
    c = cost.double()
    best = torch.full((steps + 1, n), math.inf, dtype=torch.float64)
    back = torch.zeros((steps + 1, n), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        total = best[k - 1][:, None] + c  # [i, j]: reach i with k-1 edges, then i -> j
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        total = torch.where(upper, total, torch.full_like(total, math.inf))
        best[k], back[k] = total.min(dim=0)
    if not math.isfinite(float(best[steps, last])):
        raise ValueError(f"no path of {steps} edges reaches the last candidate")
    path = [last]
    for k in range(steps, 0, -1):
        path.append(int(back[k, path[-1]]))
    return path[::-1], float(best[steps, last])


def teacher_states(den: Denoiser, candidates: torch.Tensor, *, x_init: torch.Tensor, seeds: Sequence[int],
                   cond: Cond = None, substeps: int = 8, solver: str = "dpmpp_3m") -> list[torch.Tensor]:
    """The teacher's states at every candidate time: one solve of ``solver`` from ``x_init`` through ``substeps``
    equal subdivisions (in time) of each candidate interval."""
    c = candidates.tolist()
    fine: list[float] = []
    for a, b in zip(c, c[1:], strict=False):
        if b == 0.0:  # the last step onto 0 denoises to zero from the smallest time; nothing lies between
            fine.append(a)
            continue
        fine.extend(a + (b - a) * k / substeps for k in range(substeps))
    fine.append(c[-1])
    rec = TrajectoryRecorder()
    sample(den, solver, fine, x_init=x_init, seeds=list(seeds), cond=cond, hooks=[rec])
    by_time = dict(zip(rec.times, rec.states, strict=True))
    return [by_time[t] for t in c]


def edge_costs(den: Denoiser, solver: Solver, candidates: torch.Tensor, states: Sequence[torch.Tensor], *,
               seeds: Sequence[int], cond: Cond = None, max_jump: int | None = None) -> torch.Tensor:
    """``cost[i, j]``: mean squared error of one ``solver`` step from the teacher's state at candidate ``i`` to
    candidate ``j`` against the teacher's state there (a step onto ``t = 0`` denoises to zero); ``inf`` for
    ``j <= i`` or jumps longer than ``max_jump``."""
    c = candidates.tolist()
    n = len(c)
    cost = torch.full((n, n), math.inf, dtype=torch.float64)
    for i in range(n - 1):
        top = n if max_jump is None else min(n, i + max_jump + 1)
        for j in range(i + 1, top):
            out = sample(den, solver, [c[i], c[j]], x_init=states[i], seeds=list(seeds), cond=cond, check=False)
            cost[i, j] = float((out - states[j]).double().pow(2).mean())
    return cost


@dataclass
class StepSearch:
    """What :func:`search_steps` found: the tuned times, the candidate grid, the edge costs and the path."""

    times: list[float]
    candidates: list[float]
    path: list[int]
    cost: float
    edges: torch.Tensor


def search_steps(den: Denoiser, solver: Solver | str, steps: int, *, shape: Sequence[int],
                 seeds: Sequence[int] = tuple(range(1000, 1032)), cond: Cond = None, candidates: int = 40,
                 grid: str = "time_quadratic", max_jump: int | None = None, teacher_substeps: int = 8,
                 states: Sequence[torch.Tensor] | None = None, x_init: torch.Tensor | None = None) -> StepSearch:
    """Tuned times for ``solver`` at ``steps`` steps on this model: the DP path (:func:`dp_path`) over a
    ``candidates``-step ``grid`` (its times are the candidates, ending at 0), against the teacher's states from
    the noise of ``seeds``."""
    if isinstance(solver, str):
        solver = make_solver(solver)
    cand = make_grid(grid, den.schedule, candidates)
    seeds = list(seeds)
    if x_init is None:
        x_init = den.schedule.prior_std(float(cand[0])) * SampleNoise(seeds, tuple(shape)).draw()
    if states is None:
        states = teacher_states(den, cand, x_init=x_init, seeds=seeds, cond=cond, substeps=teacher_substeps)
    edges = edge_costs(den, solver, cand, states, seeds=seeds, cond=cond, max_jump=max_jump)
    path, total = dp_path(edges, steps)
    c = cand.tolist()
    return StepSearch([c[i] for i in path], c, path, total, edges)


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean per-sample RMSE of ``x`` against ``ref`` (:func:`fewstep.metrics.rmse_per_sample`)."""
    return float(rmse_per_sample(x, ref).mean())


def refine_steps(den: Denoiser, solver: Solver, times: Sequence[float], *, x_init: torch.Tensor,
                 seeds: Sequence[int], target: torch.Tensor, cond: Cond = None, rounds: int = 4,
                 deadline: float | None = None) -> tuple[list[float], float]:
    """Coordinate descent on the end-point error of the real run (the solver's own multistep history included,
    which the DP's one-step edges leave out): each interior time moves by a quarter of the span to its neighbours,
    up or down, and stays where the error falls; the move halves after a sweep without gain, ``rounds`` times.
    Returns the times and their error (RMSE against ``target``); never worse than the start. ``deadline`` (a
    ``time.perf_counter()`` value) ends the search early."""

    def err(ts: Sequence[float]) -> float:
        out = sample(den, solver, list(ts), x_init=x_init, seeds=list(seeds), cond=cond, check=False)
        return rmse(out, target)

    best = [float(t) for t in times]
    best_err = err(best)
    scale = 0.25
    for _ in range(rounds):
        improved = True
        while improved and (deadline is None or time.perf_counter() < deadline):
            improved = False
            for k in range(1, len(best) - 1):
                span = best[k - 1] - best[k + 1]
                for sign in (-1.0, 1.0):
                    trial = list(best)
                    trial[k] = best[k] + sign * scale * span / 2
                    if not best[k + 1] < trial[k] < best[k - 1] or trial[k] < den.schedule.t_min:
                        continue
                    e = err(trial)
                    if e < best_err:
                        best, best_err, improved = trial, e, True
        scale /= 2
    return best, best_err


@dataclass
class Refined:
    """What :func:`refine_by_gradient` found: the times, the decoupled network times (or ``None``), the
    calibration error and the number of gradient steps taken."""

    times: list[float]
    model_times: list[float] | None
    error: float
    iterations: int


def refine_by_gradient(den: Denoiser, solver: str, times: Sequence[float], *, x_init: torch.Tensor,
                       target: torch.Tensor, cond: Cond = None, decouple: bool = False, iterations: int = 60,
                       lr: float = 0.05, deadline: float | None = None) -> Refined:
    """LD3-style refinement: Adam on the end-point error (mean per-sample RMSE against ``target``) of a
    differentiable run of ``solver`` (:func:`fewstep.differentiable.run`), from ``times`` (ending at 0).

    The first time stays (and a last nonzero time at ``t_min``); the others are the first time minus the
    cumulative sums of positive increments (a softmax of free logits times the span down to ``t_min``), so every
    iterate is a valid decreasing grid. With
    ``decouple``, each network time is also free: ``s_i = t_i exp(d_i)`` (capped at ``t_max``), from ``d = 0``.
    Returns the best iterate seen (never worse than the start); ``deadline`` (a ``time.perf_counter()`` value)
    ends the iterations early."""
    ts = [float(t) for t in times]
    f64 = {"dtype": torch.float64, "device": x_init.device}  # the times live beside the state: one device for autograd
    if ts[-1] != 0.0 or len(ts) < 3:
        err = rmse(run(den, solver, torch.tensor(ts, **f64), x_init=x_init, cond=cond), target)
        return Refined(ts, None, err, 0)
    sched = den.schedule
    first, floor = ts[0], sched.t_min
    nonzero = ts[:-1]
    gaps = [a - b for a, b in zip(nonzero, nonzero[1:], strict=False)] + [nonzero[-1] - floor]
    if gaps[-1] <= 1e-12 * (first - floor):  # the grid ends at t_min before its final 0: that time stays
        gaps = gaps[:-1]
        tail = [floor, 0.0]
    else:
        tail = [0.0]
    if min(gaps) <= 0:
        raise ValueError(f"times must be decreasing and stay above t_min={floor} before the final 0, got {ts}")
    logits = torch.tensor(gaps, **f64).log().requires_grad_(True)
    params = [logits]
    logscale = torch.zeros(len(nonzero), **f64, requires_grad=decouple)
    if decouple:
        params.append(logscale)
    opt = torch.optim.Adam(params, lr=lr)
    span = first - floor

    def grid() -> tuple[torch.Tensor, torch.Tensor]:
        inc = torch.softmax(logits, 0) * span
        inner = first - torch.cumsum(inc, 0)[:-1]
        t = torch.cat([torch.tensor([first], **f64), inner, torch.tensor(tail, **f64)])
        s = torch.clamp(t[:-1] * logscale.exp(), max=sched.t_max)
        return t, s

    best: Refined | None = None
    for k in range(iterations + 1):
        t, s = grid()
        out = run(den, solver, t, x_init=x_init, cond=cond, model_times=s if decouple else None)
        loss = rmse_per_sample(out, target).mean()
        value = loss.item()
        if best is None or value < best.error:
            best = Refined(t.detach().tolist(), s.detach().tolist() if decouple else None, value, k)
        if k == iterations or (deadline is not None and time.perf_counter() > deadline):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert best is not None
    return best
