"""Time steps tuned for one model: a dynamic-programming search over a fine candidate grid against a teacher
trajectory (the first stage of ``fewstep tune``).

The teacher is a high-accuracy solve from the calibration noise, recorded at every candidate time. The cost of
an edge ``i -> j`` is the mean squared distance between one step of the solver from the teacher's state at
candidate ``i`` to candidate ``j`` and the teacher's state there; the tuned grid is the path of ``steps`` edges
from the first candidate to the last with the least total cost (:func:`dp_path`). This is the search of GITS
(local errors from teacher states, summed) on the candidate grid of OSS.

References: *On the Trajectory Regularity of ODE-based Diffusion Sampling* (Chen et al., ICML 2024; GITS);
*Optimal Stepsize for Diffusion Sampling* (Pei et al., 2025; OSS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fewstep.grids import make_grid
from fewstep.hooks import TrajectoryRecorder
from fewstep.models.base import Cond, Denoiser
from fewstep.sample import sample
from fewstep.solvers import Solver, make_solver

__all__ = ["FIXED_GRIDS", "StepSearch", "Tuned", "choose", "dp_path", "edge_costs", "refine_steps", "search_steps",
           "teacher_states", "tune"]


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
        from fewstep.noise import SampleNoise

        x_init = den.schedule.prior_std(float(cand[0])) * SampleNoise(seeds, tuple(shape)).draw()
    if states is None:
        states = teacher_states(den, cand, x_init=x_init, seeds=seeds, cond=cond, substeps=teacher_substeps)
    edges = edge_costs(den, solver, cand, states, seeds=seeds, cond=cond, max_jump=max_jump)
    path, total = dp_path(edges, steps)
    c = cand.tolist()
    return StepSearch([c[i] for i in path], c, path, total, edges)


def _rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean per-sample RMSE of ``x`` against ``ref`` (the harness's measure)."""
    from fewstep.bench.metrics import rmse_per_sample  # scipy behind it: not at import time

    return float(rmse_per_sample(x, ref).mean())


def refine_steps(den: Denoiser, solver: Solver, times: Sequence[float], *, x_init: torch.Tensor,
                 seeds: Sequence[int], target: torch.Tensor, cond: Cond = None,
                 rounds: int = 4) -> tuple[list[float], float]:
    """Coordinate descent on the end-point error of the real run (the solver's own multistep history included,
    which the DP's one-step edges leave out): each interior time moves by a quarter of the span to its neighbours,
    up or down, and stays where the error falls; the move halves after a sweep without gain, ``rounds`` times.
    Returns the times and their error (RMSE against ``target``); never worse than the start."""

    def err(ts: Sequence[float]) -> float:
        out = sample(den, solver, list(ts), x_init=x_init, seeds=list(seeds), cond=cond, check=False)
        return _rmse(out, target)

    best = [float(t) for t in times]
    best_err = err(best)
    scale = 0.25
    for _ in range(rounds):
        improved = True
        while improved:
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


FIXED_GRIDS = ("time_quadratic", "trailing", "logsnr", "karras", "time_uniform")


@dataclass
class Tuned:
    """What :func:`tune` chose at one NFE: the plan, and every candidate's end-point error (mean per-sample RMSE
    against the teacher) on the calibration and the held-out seeds."""

    nfe: int
    plan: Any
    rows: list[dict[str, Any]]

    @property
    def fell_back(self) -> bool:
        return self.plan.grid != "explicit"


def _steps_for(solver: Solver, nfe: int) -> int | None:
    """Grid steps that cost exactly ``nfe`` evaluations when the grid ends at 0 (the last step denoises in one
    evaluation), or ``None`` when no step count does."""
    for steps in range(1, nfe + 1):
        if sum(solver.nfe_schedule(steps, to_zero=True)) == nfe:
            return steps
    return None


def tune(den: Denoiser, model: str, nfe: int, *, solvers: Sequence[str] = ("ddim", "dpmpp_2m"),
         shape: Sequence[int], seeds: Sequence[int] = tuple(range(1000, 1032)),
         holdout: Sequence[int] = tuple(range(2000, 2064)), cond: Cond = None, holdout_cond: Cond = None,
         candidates: int = 40, fixed: Sequence[str] = FIXED_GRIDS,
         teachers: dict[str, Any] | None = None) -> Tuned:
    """The best plan for ``nfe`` network evaluations: for each solver, tuned times (the DP search,
    :func:`search_steps`, and the best fixed grid, each refined by :func:`refine_steps` on the real run; the better
    of the two) and every fixed grid, each measured by its end-point error against the teacher on the
    calibration ``seeds`` and on the ``holdout`` seeds (:func:`choose`: a tuner never returns a tuned grid that
    loses to a fixed configuration on held-out data). ``teachers``: a dict kept across calls with the same model,
    seeds, conditioning and candidates; the teacher solves are made once and kept there."""
    from fewstep.noise import SampleNoise
    from fewstep.plan import Plan

    cand = make_grid("time_quadratic", den.schedule, candidates)
    t0 = float(cand[0])

    def noise(ids: Sequence[int]) -> torch.Tensor:
        return den.schedule.prior_std(t0) * SampleNoise(list(ids), tuple(shape)).draw()

    teachers = {} if teachers is None else teachers
    if not teachers:  # the teachers do not depend on the NFE: one solve serves every NFE
        x_cal, x_hold = noise(seeds), noise(holdout)
        teachers.update(x_cal=x_cal, x_hold=x_hold,
                        cal_states=teacher_states(den, cand, x_init=x_cal, seeds=seeds, cond=cond),
                        hold_ref=teacher_states(den, cand, x_init=x_hold, seeds=holdout, cond=holdout_cond)[-1])
    x_cal, x_hold, cal_states, hold_ref = (teachers[k] for k in ("x_cal", "x_hold", "cal_states", "hold_ref"))

    def err(solver: Solver, times: Sequence[float], x: torch.Tensor, ids: Sequence[int], c: Cond,
            ref: torch.Tensor) -> float:
        out = sample(den, solver, list(times), x_init=x, seeds=list(ids), cond=c)
        return _rmse(out, ref)

    rows: list[dict[str, Any]] = []
    for name in solvers:
        solver = make_solver(name)
        steps = _steps_for(solver, nfe)
        if steps is None:
            continue
        options = {g: make_grid(g, den.schedule, steps).tolist() for g in fixed}
        dp = search_steps(den, solver, steps, shape=shape, seeds=seeds, cond=cond, candidates=candidates,
                          states=cal_states, x_init=x_cal).times
        starts = [dp, min(options.values(), key=lambda ts: err(solver, ts, x_cal, seeds, cond, cal_states[-1]))]
        refined = [refine_steps(den, solver, ts, x_init=x_cal, seeds=seeds, target=cal_states[-1], cond=cond)
                   for ts in starts]
        options["tuned"] = min(refined, key=lambda r: r[1])[0]
        for grid, times in options.items():
            rows.append({"solver": name, "grid": grid, "times": list(times),
                         "calibration": err(solver, times, x_cal, seeds, cond, cal_states[-1])})
    if not rows:
        raise ValueError(f"none of the solvers {list(solvers)} runs in exactly {nfe} evaluations")
    for row in rows:
        row["holdout"] = err(make_solver(row["solver"]), row["times"], x_hold, holdout, holdout_cond, hold_ref)
    chosen = choose(rows)
    if chosen["grid"] == "tuned":
        plan = Plan(model=model, solver=chosen["solver"], grid="explicit", times=tuple(chosen["times"]))
    else:
        plan = Plan(model=model, solver=chosen["solver"], grid=chosen["grid"], steps=len(chosen["times"]) - 1)
    return Tuned(nfe, plan, rows)


def choose(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row with the least calibration error; but a tuned grid whose held-out error is above the best fixed
    grid's held-out error gives way to that fixed grid."""
    chosen = min(rows, key=lambda r: r["calibration"])
    fixed = [r for r in rows if r["grid"] != "tuned"]
    if chosen["grid"] == "tuned" and fixed:
        best_fixed = min(fixed, key=lambda r: r["holdout"])
        if chosen["holdout"] > best_fixed["holdout"]:
            return best_fixed
    return chosen
