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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fewstep.grids import make_grid
from fewstep.hooks import TrajectoryRecorder
from fewstep.models.base import Cond, Denoiser
from fewstep.sample import sample
from fewstep.solvers import Solver, make_solver

__all__ = ["FIXED_GRIDS", "StepSearch", "Tuned", "best_row", "choose", "dp_path", "edge_costs", "refine_steps",
           "search_steps", "teacher_states", "tune"]


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
                 seeds: Sequence[int], target: torch.Tensor, cond: Cond = None, rounds: int = 4,
                 deadline: float | None = None) -> tuple[list[float], float]:
    """Coordinate descent on the end-point error of the real run (the solver's own multistep history included,
    which the DP's one-step edges leave out): each interior time moves by a quarter of the span to its neighbours,
    up or down, and stays where the error falls; the move halves after a sweep without gain, ``rounds`` times.
    Returns the times and their error (RMSE against ``target``); never worse than the start. ``deadline`` (a
    ``time.perf_counter()`` value) ends the search early."""

    def err(ts: Sequence[float]) -> float:
        out = sample(den, solver, list(ts), x_init=x_init, seeds=list(seeds), cond=cond, check=False)
        return _rmse(out, target)

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
    from fewstep.bench.metrics import rmse_per_sample
    from fewstep.differentiable import run

    ts = [float(t) for t in times]
    f64 = {"dtype": torch.float64, "device": x_init.device}  # the times live beside the state: one device for autograd
    if ts[-1] != 0.0 or len(ts) < 3:
        err = _rmse(run(den, solver, torch.tensor(ts, **f64), x_init=x_init, cond=cond), target)
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


FIXED_GRIDS = ("time_quadratic", "trailing", "logsnr", "karras", "time_uniform")
COMPARE = ("dpmpp_3m", "unipc", "deis", "ipndm", "f_ddim", "f_dpmsolver", "heun", "dpm_solver_2")
"""The solvers ``fewstep tune`` also runs on the fixed grids, by default: the best fixed configuration."""
TUNED = ("tuned", "tuned_decoupled")
"""Grid labels of searched times (``tuned_decoupled``: with learned network times)."""

# diffusers' deterministic schedulers, the rows a tune is compared with (stochastic ones have no fixed end point)
DIFFUSERS_PEERS = ("DDIM", "Euler", "Heun", "DPM++2M", "DPM++3M", "UniPC", "DEIS")


@dataclass
class Tuned:
    """What :func:`tune` chose at one NFE: the plan; every candidate's end-point error (mean per-sample RMSE
    against the teacher) on the calibration and the held-out seeds (``rows``; diffusers' schedulers held-out
    only), with its held-out FD when asked; the seconds spent on teacher solves and on the search; and the first
    held-out samples of the chosen plan, the best fixed grid, the best diffusers scheduler and the teacher (for a
    report)."""

    nfe: int
    plan: Any
    rows: list[dict[str, Any]]
    teacher_seconds: float = 0.0
    search_seconds: float = 0.0
    samples: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def fell_back(self) -> bool:
        return self.plan.grid != "explicit"

    @property
    def chosen(self) -> dict[str, Any]:
        if self.fell_back:
            grid = self.plan.grid
        else:
            grid = "tuned_decoupled" if self.plan.model_times is not None else "tuned"
        return next(r for r in self.rows if r["kind"] == "fewstep" and r["solver"] == self.plan.solver
                    and r["grid"] == grid)

    def result(self) -> dict[str, Any]:
        """This NFE as :func:`fewstep.bench.tune_report.write_tune_report` takes it."""
        row = self.chosen
        return {"nfe": self.nfe, "rows": self.rows, "teacher_seconds": self.teacher_seconds,
                "search_seconds": self.search_seconds,
                "chosen": {"solver": row["solver"], "grid": row["grid"], "times": row["times"],
                           "model_times": row.get("model_times")}}


def _steps_for(solver: Solver, nfe: int) -> int | None:
    """Grid steps that cost exactly ``nfe`` evaluations when the grid ends at 0 (the last step denoises in one
    evaluation), or ``None`` when no step count does."""
    for steps in range(1, nfe + 1):
        if sum(solver.nfe_schedule(steps, to_zero=True)) == nfe:
            return steps
    return None


def _peer_net(den: Denoiser, cond: Cond, guidance: float | None) -> Any:
    """The network as diffusers' schedulers call it, ``net(x, timestep) -> prediction``, with ``cond`` bound and
    classifier-free guidance applied to the prediction (affine in it, so this is the same guidance as fewstep's
    on ``x0_hat``)."""
    from fewstep.models import ModelDenoiser

    if not isinstance(den, ModelDenoiser):
        raise ValueError("diffusers' schedulers need a network with a scheduler config (a ModelDenoiser)")

    def net(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        native = float(timestep)
        out = den.network(x, native, cond)
        if guidance is None:
            return out
        uncond = den.network(x, native, None)
        return uncond + guidance * (out - uncond)

    return net


def tune(den: Denoiser, model: str, nfe: int, *, solvers: Sequence[str] = ("ddim", "dpmpp_2m"),
         shape: Sequence[int], seeds: Sequence[int] = tuple(range(1000, 1032)),
         holdout: Sequence[int] = tuple(range(2000, 2064)), cond: Cond = None, holdout_cond: Cond = None,
         guidance: float | None = None, candidates: int = 40, fixed: Sequence[str] = FIXED_GRIDS,
         compare: Sequence[str] = (), decouple: bool = True, iterations: int = 150, minutes: float | None = None,
         diffusers: bool = True, dtype: str = "float32", device: str = "cpu",
         fd: Any = None, store: Any = None, teachers: dict[str, Any] | None = None) -> Tuned:
    """The best plan for ``nfe`` network evaluations of ``den`` (named ``model`` in the plan).

    For each solver: every fixed grid; the DP search (:func:`search_steps`) against a teacher solve; refinement
    of the DP result and of the best fixed grid on the real run's end-point error — by gradient through a
    differentiable run (:func:`refine_by_gradient`, ``iterations / 2`` Adam steps from each start, ``iterations``
    for the decoupled one) for the solvers of
    :data:`fewstep.differentiable.DIFFERENTIABLE` on denoisers that take tensor times (``takes_tensor_time``),
    else by coordinate descent (:func:`refine_steps`) — giving the
    ``tuned`` row; with ``decouple``, the tuned row refined once more with free network times
    (``tuned_decoupled``). Every row is measured on the calibration ``seeds`` (with ``cond``) and the ``holdout``
    seeds (with ``holdout_cond``); diffusers' deterministic schedulers at the same NFE on the held-out seeds
    (``diffusers``); ``fd``: a callable giving the FD of held-out samples. :func:`choose` picks the plan: a
    tuned grid that loses to a fixed one on held-out data gives way to it.

    ``guidance``: classifier-free guidance scale (the model's default null condition is the negative one).
    ``minutes``: the search's time budget for this NFE (refinements stop early; teacher solves not counted).
    ``dtype``, ``device``: where the runs go, as :attr:`fewstep.plan.Plan.dtype` says (the network in ``dtype`` on
    ``device``, where ``den``'s must already be: :func:`fewstep.plan.place`; the teacher, the noise and every state
    there too, in float32 under half precisions); the rows are plain floats and the plan carries both.
    ``store``: a :class:`fewstep.tune_store.TuneStore`; teachers and rows found there are not recomputed (an
    interrupted tune resumes). ``teachers``: a dict kept across calls, the same in memory.
    """
    from fewstep.differentiable import DIFFERENTIABLE
    from fewstep.models import ClassifierFreeGuidance
    from fewstep.models.retime import Retimed
    from fewstep.noise import SampleNoise
    from fewstep.plan import Plan, _check_placed, cut_cond, placement, state_dtype
    from fewstep.tune_store import fingerprint

    net_dtype, where = placement(dtype, device)
    _check_placed(den, where, net_dtype)
    started = time.perf_counter()
    deadline = None if minutes is None else started + 60.0 * minutes
    net: Denoiser = den if guidance is None else ClassifierFreeGuidance(den, float(guidance))
    seeds, holdout = list(seeds), list(holdout)
    cand = make_grid("time_quadratic", den.schedule, candidates)
    t0 = float(cand[0])
    context = {"model": model, "schedule": repr(den.schedule), "shape": list(shape), "seeds": seeds,
               "holdout": holdout, "cond": cond, "holdout_cond": holdout_cond, "guidance": guidance,
               "candidates": candidates}
    for knob, value, default in (("dtype", dtype, "float32"), ("device", device, "cpu")):
        if value != default:  # float32 on the CPU keeps the keys of tune stores made before these knobs existed
            context[knob] = value
    ckey = fingerprint(context)

    def noise(ids: Sequence[int]) -> torch.Tensor:
        z = SampleNoise(list(ids), tuple(shape), device=device, dtype=state_dtype(dtype)).draw()
        return den.schedule.prior_std(t0) * z

    teacher_seconds = 0.0
    teachers = {} if teachers is None else teachers
    if teachers.get("key") != ckey:
        teachers.clear()
        t1 = time.perf_counter()
        x_cal, x_hold = noise(seeds), noise(holdout)
        loaded = None if store is None else store.states(ckey)
        if loaded is None:
            cal_states = teacher_states(net, cand, x_init=x_cal, seeds=seeds, cond=cond)
            hold_ref = teacher_states(net, cand, x_init=x_hold, seeds=holdout, cond=holdout_cond)[-1]
            if store is not None:
                store.put_states(ckey, [*cal_states, hold_ref])
        else:
            loaded = [s.to(device) for s in loaded]  # stored on the CPU
            cal_states, hold_ref = loaded[:-1], loaded[-1]
        teachers.update(key=ckey, x_cal=x_cal, x_hold=x_hold, cal_states=cal_states, hold_ref=hold_ref)
        teacher_seconds = time.perf_counter() - t1
    x_cal, x_hold, cal_states, hold_ref = (teachers[k] for k in ("x_cal", "x_hold", "cal_states", "hold_ref"))
    target = cal_states[-1]

    def run_plan(solver: Solver, times: Sequence[float], model_times: Sequence[float] | None, x: torch.Tensor,
                 ids: Sequence[int], c: Cond) -> torch.Tensor:
        model_ = net if model_times is None else Retimed(net, times, model_times)
        return sample(model_, solver, list(times), x_init=x, seeds=list(ids), cond=c)

    samples: dict[str, torch.Tensor] = {}

    def measured(row: dict[str, Any], key: str) -> dict[str, Any]:
        """``row`` with its held-out error (and FD), stored under ``key``; its held-out samples kept."""
        solver = make_solver(row["solver"])
        out = run_plan(solver, row["times"], row.get("model_times"), x_hold, holdout, holdout_cond)
        row["holdout"] = _rmse(out, hold_ref)
        row["fd"] = None if fd is None else float(fd(out.cpu()))
        samples[f"{row['solver']} {row['grid']}"] = out[:8].cpu()
        if store is not None:
            store.put_row(key, row)
        return row

    def stored(key: str) -> dict[str, Any] | None:
        row = None if store is None else store.row(key)
        if row is not None and row.get("kind") == "fewstep":  # the samples of the report, from the same noise
            solver = make_solver(row["solver"])
            head = cut_cond(holdout_cond, len(holdout), 0, 8)
            samples[f"{row['solver']} {row['grid']}"] = run_plan(solver, row["times"], row.get("model_times"),
                                                                 x_hold[:8], holdout[:8], head).cpu()
        return row

    rows: list[dict[str, Any]] = []

    def row_key(name: str, grid: str) -> str:
        return fingerprint([ckey, nfe, name, grid, list(fixed), iterations, decouple])

    def fixed_rows(name: str, solver: Solver, steps: int) -> None:
        for grid in fixed:
            key = row_key(name, grid)
            row = stored(key)
            if row is None:
                times = make_grid(grid, den.schedule, steps).tolist()
                cal = _rmse(run_plan(solver, times, None, x_cal, seeds, cond), target)
                row = measured({"solver": name, "grid": grid, "kind": "fewstep", "times": times,
                                "model_times": None, "calibration": cal}, key)
            rows.append(row)

    for name in solvers:
        solver = make_solver(name)
        steps = _steps_for(solver, nfe)
        if steps is None:
            continue
        by_gradient = name in DIFFERENTIABLE and net.takes_tensor_time
        fixed_rows(name, solver, steps)
        key = row_key(name, "tuned")
        tuned = stored(key)
        if tuned is None:
            dp = search_steps(net, solver, steps, shape=shape, seeds=seeds, cond=cond, candidates=candidates,
                              states=cal_states, x_init=x_cal).times
            best_fixed = min((r for r in rows if r["solver"] == name), key=lambda r: r["calibration"])["times"]
            found: list[tuple[list[float], float]] = []
            for start in (dp, best_fixed):
                if by_gradient:
                    got = refine_by_gradient(net, name, start, x_init=x_cal, target=target, cond=cond,
                                             iterations=max(1, iterations // 2), deadline=deadline)
                    found.append((got.times, got.error))
                else:
                    found.append(refine_steps(net, solver, start, x_init=x_cal, seeds=seeds, target=target, cond=cond,
                                              deadline=deadline))
            times = min(found, key=lambda f: f[1])[0]
            cal = _rmse(run_plan(solver, times, None, x_cal, seeds, cond), target)
            tuned = measured({"solver": name, "grid": "tuned", "kind": "fewstep", "times": times,
                              "model_times": None, "calibration": cal}, key)
        rows.append(tuned)
        if decouple and by_gradient:
            key = row_key(name, "tuned_decoupled")
            row = stored(key)
            if row is None:
                got = refine_by_gradient(net, name, tuned["times"], x_init=x_cal, target=target, cond=cond,
                                         decouple=True, iterations=iterations, deadline=deadline)
                if got.model_times is not None:
                    cal = _rmse(run_plan(solver, got.times, got.model_times, x_cal, seeds, cond), target)
                    row = measured({"solver": name, "grid": "tuned_decoupled", "kind": "fewstep",
                                    "times": got.times, "model_times": got.model_times, "calibration": cal}, key)
            if row is not None:
                rows.append(row)
    if not rows:
        raise ValueError(f"none of the solvers {list(solvers)} runs in exactly {nfe} evaluations")
    for name in compare:  # fixed grids only: the best fixed configuration a tuned plan must beat
        solver = make_solver(name)
        steps = _steps_for(solver, nfe)
        if name not in solvers and steps is not None and not solver.stochastic:
            fixed_rows(name, solver, steps)
    if diffusers and getattr(den, "scheduler_config", None):
        rows.extend(_diffusers_rows(den, nfe, x_hold, hold_ref, holdout_cond, guidance, fd, samples,
                                    store, lambda label: fingerprint([ckey, nfe, "diffusers", label])))
    chosen = choose(rows)
    if chosen["grid"] in TUNED:
        plan = Plan(model=model, solver=chosen["solver"], grid="explicit", times=tuple(chosen["times"]),
                    model_times=None if chosen.get("model_times") is None else tuple(chosen["model_times"]),
                    guidance=guidance, dtype=dtype, device=device)
    else:
        plan = Plan(model=model, solver=chosen["solver"], grid=chosen["grid"], steps=len(chosen["times"]) - 1,
                    guidance=guidance, dtype=dtype, device=device)
    search_seconds = time.perf_counter() - started - teacher_seconds
    got = Tuned(nfe, plan, rows, teacher_seconds, search_seconds)
    keep = {"chosen": got.chosen, "best fixed": best_row(rows, "fewstep", fixed=True),
            "best diffusers": best_row(rows, "diffusers")}
    got.samples = {label: samples[f"{r['solver']} {r['grid']}"] for label, r in keep.items()
                   if r is not None and f"{r['solver']} {r['grid']}" in samples}
    got.samples["teacher"] = hold_ref[:8].detach().cpu()
    return got


def best_row(rows: Sequence[dict[str, Any]], kind: str, *, fixed: bool = False) -> dict[str, Any] | None:
    """The row of ``kind`` (``fewstep`` or ``diffusers``) with the least held-out error; with ``fixed``, among
    fixed grids only."""
    pool = [r for r in rows if r["kind"] == kind and not (fixed and r["grid"] in TUNED)]
    return min(pool, key=lambda r: r["holdout"]) if pool else None


def _diffusers_rows(den: Denoiser, nfe: int, x_hold: torch.Tensor, hold_ref: torch.Tensor, cond: Cond,
                    guidance: float | None, fd: Any, samples: dict[str, torch.Tensor], store: Any,
                    key_of: Any) -> list[dict[str, Any]]:
    """diffusers' deterministic schedulers (``timestep_spacing="trailing"``, pinned settings of
    :data:`fewstep.bench.peers.PEERS`) at exactly ``nfe`` counted evaluations on the held-out noise."""
    import json

    from fewstep.bench.peers import applicable, run_diffusers
    from fewstep.plan import cut_cond

    config = json.loads(json.dumps(dict(den.scheduler_config)))  # type: ignore[attr-defined]
    net = _peer_net(den, cond, guidance)
    rows = []
    for label in applicable(config):
        if label not in DIFFUSERS_PEERS:
            continue
        key = key_of(label)
        row = None if store is None else store.row(key)
        if row is None:
            found = None
            for steps in dict.fromkeys((nfe, (nfe + 1) // 2, nfe // 2)):  # Heun: 2 evaluations a step
                if steps < 1:
                    continue
                out, calls = run_diffusers(label, net, config, x_hold, steps)
                if calls == nfe:
                    found = out
                    break
            if found is None:
                continue
            label_name = "Euler (FlowMatch)" if config.get("_class_name", "").startswith("FlowMatch") else label
            row = {"solver": label_name, "grid": label_name, "kind": "diffusers", "times": None,
                   "model_times": None, "calibration": None, "holdout": _rmse(found, hold_ref),
                   "fd": None if fd is None else float(fd(found.cpu()))}
            samples[f"{row['solver']} {row['grid']}"] = found[:8].cpu()
            if store is not None:
                store.put_row(key, row)
        else:
            # the report's samples: the first 8 held-out seeds, with their conditioning
            head = _peer_net(den, cut_cond(cond, x_hold.shape[0], 0, 8), guidance)
            out, _ = run_diffusers(label, head, config, x_hold[:8], nfe if label != "Heun" else (nfe + 1) // 2)
            samples[f"{row['solver']} {row['grid']}"] = out.cpu()
        rows.append(row)
    return rows


def choose(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Among fewstep's rows, the one with the least calibration error; but a tuned grid whose held-out error is
    above the best fixed grid's held-out error gives way to that fixed grid."""
    ours = [r for r in rows if r.get("kind", "fewstep") == "fewstep"]
    chosen = min(ours, key=lambda r: r["calibration"])
    fixed = [r for r in ours if r["grid"] not in TUNED]
    if chosen["grid"] in TUNED and fixed:
        best_fixed = min(fixed, key=lambda r: r["holdout"])
        if chosen["holdout"] > best_fixed["holdout"]:
            return best_fixed
    return chosen
