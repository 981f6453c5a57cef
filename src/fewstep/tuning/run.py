"""One ``fewstep tune`` at one NFE, as a small class: its teachers, its candidate rows (measured on the calibration
and the held-out seeds, stored as they finish), and the plan it chooses.

:func:`tune` is the entry point; :class:`Tune` holds what one call shares (the network, the noise, the teachers,
the store) so each kind of row is one method: :meth:`Tune.fixed_rows` (every fixed grid), :meth:`Tune.tuned_row`
(the search of :mod:`fewstep.tuning.search`, refined), :meth:`Tune.decoupled_row` (learned network times) and
:meth:`Tune.diffusers_rows` (diffusers' own schedulers at the same NFE, :mod:`fewstep.bench.peers`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fewstep.bench.peers import DETERMINISTIC_PEERS, applicable, run_diffusers
from fewstep.conditioning import detached
from fewstep.differentiable import DIFFERENTIABLE
from fewstep.grids import DEFAULT_GRID, GRIDS, make_grid
from fewstep.models import ClassifierFreeGuidance, ModelDenoiser
from fewstep.models.base import Cond, Denoiser
from fewstep.models.retime import Retimed
from fewstep.noise import SampleNoise
from fewstep.plan import Plan, check_placed, cut_cond, placement, state_dtype
from fewstep.sample import sample
from fewstep.solvers import SOLVERS, Solver, make_solver
from fewstep.tuning.rows import TUNED, Row, best_row, choose
from fewstep.tuning.search import refine_by_gradient, refine_steps, rmse, search_steps, teacher_states
from fewstep.tuning.store import TuneStore, fingerprint

__all__ = ["COMPARE", "DIFFUSERS_PEERS", "FIXED_GRIDS", "NOT_COMPARED", "NOT_FIXED", "Tune", "Tuned", "tune"]

NOT_FIXED: dict[str, str] = {}
"""Registered grids a tune does not measure as fixed grids, each with the reason (none today)."""
FIXED_GRIDS = tuple(g for g in GRIDS if g not in NOT_FIXED)
"""The fixed grids every tuned solver is measured on: every registered grid (:data:`fewstep.grids.GRIDS`, in its
order) that does not opt out in :data:`NOT_FIXED`."""

DEFAULT_SOLVERS = ("ddim", "dpmpp_2m")
"""The solvers a tune searches the times of by default (``fewstep tune --solvers``)."""
NOT_COMPARED: dict[str, str] = {
    "ddim": "searched by default (--solvers)",
    "dpmpp_2m": "searched by default (--solvers)",
    "euler": "Euler in the EDM frame is DDIM (equal in the tests)",
    "dpm_solver_1": "DPM-Solver-1 is DDIM (equal in the tests)",
    "dpm_solver_3": "3 evaluations a step: at 4-8 NFE at most two steps and the final denoising",
    "dpmpp_3m_compat": "diffusers' coefficient, measured order 2; dpmpp_3m is the row",
    "hb": "momentum made for large guidance scales (beta = 1, its default, is its base method itself)",
    "ghvb": "momentum made for large guidance scales; at beta = 1 an Adams-type method, which ipndm stands for",
    "evodiff": "its difference weights are fitted to each run's own states, not a fixed-coefficient method",
    "bdia": "made for exact inversion (bidirectional integration), not for few-step accuracy",
}
"""Registered deterministic solvers a tune does not compare on the fixed grids by default, each with the reason
(stochastic solvers have no fixed end point to measure against the teacher, so none is compared)."""
COMPARE = tuple(n for n in SOLVERS if n not in NOT_COMPARED and not make_solver(n).stochastic)
"""The solvers ``fewstep tune`` also runs on the fixed grids, by default: the best fixed configuration a tuned
plan must beat (every deterministic solver of :data:`fewstep.solvers.SOLVERS`, in its order, that does not opt out
in :data:`NOT_COMPARED`)."""
DIFFUSERS_PEERS = DETERMINISTIC_PEERS
"""diffusers' deterministic schedulers, the rows a tune is compared with (stochastic ones have no fixed end
point)."""


@dataclass
class Tuned:
    """What :func:`tune` chose at one NFE: the plan; every candidate's end-point error (mean per-sample RMSE
    against the teacher) on the calibration and the held-out seeds (``rows``; diffusers' schedulers held-out
    only), with its held-out FD when asked; the seconds spent on teacher solves and on the search; and the first
    held-out samples of the chosen plan, the best fixed grid, the best diffusers scheduler and the teacher (for a
    report)."""

    nfe: int
    plan: Any
    rows: list[Row]
    teacher_seconds: float = 0.0
    search_seconds: float = 0.0
    samples: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def fell_back(self) -> bool:
        return self.plan.grid != "explicit"

    @property
    def chosen(self) -> Row:
        if self.fell_back:
            grid = self.plan.grid
        else:
            grid = "tuned_decoupled" if self.plan.model_times is not None else "tuned"
        return next(r for r in self.rows if r.kind == "fewstep" and r.solver == self.plan.solver and r.grid == grid)

    def result(self) -> dict[str, Any]:
        """This NFE as :func:`fewstep.tuning.report.write_tune_report` takes it."""
        row = self.chosen
        return {"nfe": self.nfe, "rows": [r.to_dict() for r in self.rows], "teacher_seconds": self.teacher_seconds,
                "search_seconds": self.search_seconds,
                "chosen": {"solver": row.solver, "grid": row.grid, "times": row.times, "model_times": row.model_times}}


def steps_for(solver: Solver, nfe: int) -> int | None:
    """Grid steps that cost exactly ``nfe`` evaluations when the grid ends at 0 (the last step denoises in one
    evaluation), or ``None`` when no step count does."""
    for steps in range(1, nfe + 1):
        if sum(solver.nfe_schedule(steps, to_zero=True)) == nfe:
            return steps
    return None


def peer_net(den: Denoiser, cond: Cond, guidance: float | None, uncond: Cond = None) -> Any:
    """The network as diffusers' schedulers call it, ``net(x, timestep) -> prediction``, with ``cond`` bound and
    classifier-free guidance applied to the prediction against ``uncond`` (the model's default null condition when
    ``None``; affine in the prediction, so this is the same guidance as fewstep's on ``x0_hat``)."""
    if not isinstance(den, ModelDenoiser):
        raise ValueError("diffusers' schedulers need a network with a scheduler config (a ModelDenoiser)")

    def net(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        native = float(timestep)
        out = den.network(x, native, cond)
        if guidance is None:
            return out
        negative = den.network(x, native, uncond)
        return negative + guidance * (out - negative)

    return net


class Tune:
    """One tune of ``den`` (named ``model`` in the plans) on the calibration ``seeds`` and the ``holdout`` seeds:
    the teachers are solved (or found in ``store``, or in the ``teachers`` dict kept across NFEs) when it is made;
    :meth:`at` measures every row at one NFE and chooses its plan (once: the search time counts from the making).
    The knobs are :func:`tune`'s."""

    def __init__(self, den: Denoiser, model: str, *, solvers: Sequence[str], shape: Sequence[int],
                 seeds: Sequence[int], holdout: Sequence[int], cond: Cond, holdout_cond: Cond,
                 guidance: float | None, uncond: Cond, candidates: int, fixed: Sequence[str], compare: Sequence[str],
                 decouple: bool, iterations: int, minutes: float | None, diffusers: bool, dtype: str, device: str,
                 fd: Any, store: TuneStore | None, teachers: dict[str, Any] | None) -> None:
        net_dtype, where = placement(dtype, device)
        check_placed(den, where, net_dtype)
        self.started = time.perf_counter()
        self.deadline = None if minutes is None else self.started + 60.0 * minutes
        self.den, self.model, self.solvers, self.shape = den, model, list(solvers), tuple(shape)
        # conditioning with an autograd graph (embeddings encoded outside no_grad) is detached: runs never reach it
        cond, holdout_cond, uncond = detached(cond), detached(holdout_cond), detached(uncond)
        if uncond is not None and guidance is None:
            raise ValueError("uncond= is the negative conditioning of guidance: give guidance= too")
        self.net: Denoiser = den if guidance is None else ClassifierFreeGuidance(den, float(guidance), uncond=uncond)
        self.seeds, self.holdout = list(seeds), list(holdout)
        self.cond, self.holdout_cond, self.guidance, self.uncond = cond, holdout_cond, guidance, uncond
        self.fixed, self.compare, self.decouple, self.iterations = list(fixed), list(compare), decouple, iterations
        self.diffusers, self.dtype, self.device, self.fd, self.store = diffusers, dtype, device, fd, store
        self.candidates = make_grid(DEFAULT_GRID, den.schedule, candidates)
        context: dict[str, Any] = {"model": model, "schedule": repr(den.schedule), "shape": list(shape),
                                   "seeds": self.seeds, "holdout": self.holdout, "cond": cond,
                                   "holdout_cond": holdout_cond, "guidance": guidance, "candidates": candidates}
        for knob, value, default in (("dtype", dtype, "float32"), ("device", device, "cpu")):
            if value != default:  # float32 on the CPU keeps the keys of tune stores made before these knobs existed
                context[knob] = value
        if uncond is not None:  # likewise: guidance against the model's own null condition keeps its keys
            context["uncond"] = uncond
        self.key = fingerprint(context)
        self.teacher_seconds = self._teachers({} if teachers is None else teachers)
        self.samples: dict[str, torch.Tensor] = {}

    def _noise(self, ids: Sequence[int]) -> torch.Tensor:
        z = SampleNoise(list(ids), self.shape, device=self.device, dtype=state_dtype(self.dtype)).draw()
        return self.den.schedule.prior_std(float(self.candidates[0])) * z

    def _teachers(self, teachers: dict[str, Any]) -> float:
        """Solve (or load) the calibration teacher's states and the held-out teacher's end point; their seconds."""
        seconds = 0.0
        if teachers.get("key") != self.key:
            teachers.clear()
            t1 = time.perf_counter()
            x_cal, x_hold = self._noise(self.seeds), self._noise(self.holdout)
            loaded = None if self.store is None else self.store.states(self.key)
            if loaded is None:
                cal_states = teacher_states(self.net, self.candidates, x_init=x_cal, seeds=self.seeds, cond=self.cond)
                hold_ref = teacher_states(self.net, self.candidates, x_init=x_hold, seeds=self.holdout,
                                          cond=self.holdout_cond)[-1]
                if self.store is not None:
                    self.store.put_states(self.key, [*cal_states, hold_ref])
            else:
                loaded = [s.to(self.device) for s in loaded]  # stored on the CPU
                cal_states, hold_ref = loaded[:-1], loaded[-1]
            teachers.update(key=self.key, x_cal=x_cal, x_hold=x_hold, cal_states=cal_states, hold_ref=hold_ref)
            seconds = time.perf_counter() - t1
        self.x_cal, self.x_hold, self.cal_states, self.hold_ref = (
            teachers[k] for k in ("x_cal", "x_hold", "cal_states", "hold_ref"))
        self.target = self.cal_states[-1]
        return seconds

    # -- one run, one row ------------------------------------------------------------------------------------------

    def _run(self, solver: Solver, times: Sequence[float], model_times: Sequence[float] | None, x: torch.Tensor,
             ids: Sequence[int], cond: Cond) -> torch.Tensor:
        model = self.net if model_times is None else Retimed(self.net, times, model_times)
        return sample(model, solver, list(times), x_init=x, seeds=list(ids), cond=cond)

    def _calibration(self, solver: Solver, times: Sequence[float], model_times: Sequence[float] | None = None) -> float:
        return rmse(self._run(solver, times, model_times, self.x_cal, self.seeds, self.cond), self.target)

    def _measured(self, row: Row, key: str) -> Row:
        """``row`` with its held-out error (and FD), stored under ``key``; its held-out samples kept."""
        out = self._run(make_solver(row.solver), row.times or [], row.model_times, self.x_hold, self.holdout,
                        self.holdout_cond)
        row.holdout = rmse(out, self.hold_ref)
        row.fd = None if self.fd is None else float(self.fd(out.cpu()))
        self.samples[row.label] = out[:8].cpu()
        if self.store is not None:
            self.store.put_row(key, row.to_dict())
        return row

    def _stored(self, key: str) -> Row | None:
        """The row stored under ``key``, if any; a fewstep row's report samples are remade from the same noise."""
        data = None if self.store is None else self.store.row(key)
        if data is None:
            return None
        row = Row.from_dict(data)
        if row.kind == "fewstep":
            head = cut_cond(self.holdout_cond, len(self.holdout), 0, 8)
            self.samples[row.label] = self._run(make_solver(row.solver), row.times or [], row.model_times,
                                                self.x_hold[:8], self.holdout[:8], head).cpu()
        return row

    def _key(self, nfe: int, name: str, grid: str) -> str:
        return fingerprint([self.key, nfe, name, grid, self.fixed, self.iterations, self.decouple])

    # -- the rows --------------------------------------------------------------------------------------------------

    def fixed_rows(self, nfe: int, name: str, solver: Solver, steps: int) -> list[Row]:
        """``name`` on every fixed grid of ``steps`` steps."""
        rows = []
        for grid in self.fixed:
            key = self._key(nfe, name, grid)
            row = self._stored(key)
            if row is None:
                times = make_grid(grid, self.den.schedule, steps).tolist()
                row = self._measured(Row(name, grid, "fewstep", times, None, self._calibration(solver, times)), key)
            rows.append(row)
        return rows

    def tuned_row(self, nfe: int, name: str, solver: Solver, steps: int, fixed: Sequence[Row]) -> Row:
        """The DP search's times, and the best fixed grid's, refined on the real run; the better of the two."""
        key = self._key(nfe, name, "tuned")
        row = self._stored(key)
        if row is not None:
            return row
        dp = search_steps(self.net, solver, steps, shape=self.shape, seeds=self.seeds, cond=self.cond,
                          candidates=len(self.candidates) - 1, states=self.cal_states, x_init=self.x_cal).times
        best_fixed = min(fixed, key=lambda r: float(r.calibration or 0.0)).times or []
        found: list[tuple[list[float], float]] = []
        for start in (dp, best_fixed):
            if self._by_gradient(name):
                got = refine_by_gradient(self.net, name, start, x_init=self.x_cal, target=self.target, cond=self.cond,
                                         iterations=max(1, self.iterations // 2), deadline=self.deadline)
                found.append((got.times, got.error))
            else:
                found.append(refine_steps(self.net, solver, start, x_init=self.x_cal, seeds=self.seeds,
                                          target=self.target, cond=self.cond, deadline=self.deadline))
        times = min(found, key=lambda f: f[1])[0]
        return self._measured(Row(name, "tuned", "fewstep", times, None, self._calibration(solver, times)), key)

    def decoupled_row(self, nfe: int, name: str, solver: Solver, tuned: Row) -> Row | None:
        """The tuned row refined once more with free network times (LD3's decoupling), if the refinement finds
        any."""
        key = self._key(nfe, name, "tuned_decoupled")
        row = self._stored(key)
        if row is not None:
            return row
        got = refine_by_gradient(self.net, name, tuned.times or [], x_init=self.x_cal, target=self.target,
                                 cond=self.cond, decouple=True, iterations=self.iterations, deadline=self.deadline)
        if got.model_times is None:
            return None
        cal = self._calibration(solver, got.times, got.model_times)
        return self._measured(Row(name, "tuned_decoupled", "fewstep", got.times, got.model_times, cal), key)

    def diffusers_rows(self, nfe: int) -> list[Row]:
        """diffusers' deterministic schedulers (``timestep_spacing="trailing"``, pinned settings of
        :data:`fewstep.bench.peers.PEERS`) at exactly ``nfe`` counted evaluations on the held-out noise."""
        config = json.loads(json.dumps(dict(self.den.scheduler_config)))  # type: ignore[attr-defined]
        net = peer_net(self.den, self.holdout_cond, self.guidance, self.uncond)
        rows = []
        for label in applicable(config):
            if label not in DIFFUSERS_PEERS:
                continue
            key = fingerprint([self.key, nfe, "diffusers", label])
            data = None if self.store is None else self.store.row(key)
            if data is None:
                found = None
                for steps in dict.fromkeys((nfe, (nfe + 1) // 2, nfe // 2)):  # Heun: 2 evaluations a step
                    if steps < 1:
                        continue
                    out, calls = run_diffusers(label, net, config, self.x_hold, steps)
                    if calls == nfe:
                        found = out
                        break
                if found is None:
                    continue
                name = "Euler (FlowMatch)" if config.get("_class_name", "").startswith("FlowMatch") else label
                row = Row(name, name, "diffusers", None, None, None, rmse(found, self.hold_ref),
                          None if self.fd is None else float(self.fd(found.cpu())))
                self.samples[row.label] = found[:8].cpu()
                if self.store is not None:
                    self.store.put_row(key, row.to_dict())
            else:
                row = Row.from_dict(data)
                # the report's samples: the first 8 held-out seeds, with their conditioning
                head = peer_net(self.den, cut_cond(self.holdout_cond, self.x_hold.shape[0], 0, 8), self.guidance,
                                self.uncond)
                out, _ = run_diffusers(label, head, config, self.x_hold[:8], nfe if label != "Heun" else (nfe + 1) // 2)
                self.samples[row.label] = out.cpu()
            rows.append(row)
        return rows

    def _by_gradient(self, name: str) -> bool:
        return name in DIFFERENTIABLE and bool(getattr(self.net, "takes_tensor_time", False))

    # -- one NFE ---------------------------------------------------------------------------------------------------

    def at(self, nfe: int) -> Tuned:
        """Every row at ``nfe`` evaluations and the plan :func:`~fewstep.tuning.rows.choose` picks."""
        self.samples = {}
        rows: list[Row] = []
        for name in self.solvers:
            solver = make_solver(name)
            steps = steps_for(solver, nfe)
            if steps is None:
                continue
            fixed = self.fixed_rows(nfe, name, solver, steps)
            tuned = self.tuned_row(nfe, name, solver, steps, fixed)
            rows += [*fixed, tuned]
            if self.decouple and self._by_gradient(name):
                decoupled = self.decoupled_row(nfe, name, solver, tuned)
                rows += [] if decoupled is None else [decoupled]
        if not rows:
            raise ValueError(f"none of the solvers {self.solvers} runs in exactly {nfe} evaluations")
        for name in self.compare:  # fixed grids only: the best fixed configuration a tuned plan must beat
            solver = make_solver(name)
            steps = steps_for(solver, nfe)
            if name not in self.solvers and steps is not None and not solver.stochastic:
                rows += self.fixed_rows(nfe, name, solver, steps)
        if self.diffusers and getattr(self.den, "scheduler_config", None):
            rows += self.diffusers_rows(nfe)
        got = Tuned(nfe, self.plan_of(choose(rows)), rows, self.teacher_seconds,
                    time.perf_counter() - self.started - self.teacher_seconds)
        keep = {"chosen": got.chosen, "best fixed": best_row(rows, "fewstep", fixed=True),
                "best diffusers": best_row(rows, "diffusers")}
        got.samples = {label: self.samples[r.label] for label, r in keep.items()
                       if r is not None and r.label in self.samples}
        got.samples["teacher"] = self.hold_ref[:8].detach().cpu()
        return got

    def plan_of(self, row: Row) -> Plan:
        """The plan of a chosen row: its explicit times (and network times) for a tuned grid, else the fixed grid."""
        where = {"guidance": self.guidance, "dtype": self.dtype, "device": self.device}
        if row.grid in TUNED:
            return Plan(model=self.model, solver=row.solver, grid="explicit", times=tuple(row.times or ()),
                        model_times=None if row.model_times is None else tuple(row.model_times), **where)
        return Plan(model=self.model, solver=row.solver, grid=row.grid, steps=len(row.times or ()) - 1, **where)


def tune(den: Denoiser, model: str, nfe: int, *, solvers: Sequence[str] = DEFAULT_SOLVERS,
         shape: Sequence[int], seeds: Sequence[int] = tuple(range(1000, 1032)),
         holdout: Sequence[int] = tuple(range(2000, 2064)), cond: Cond = None, holdout_cond: Cond = None,
         guidance: float | None = None, uncond: Cond = None, candidates: int = 40,
         fixed: Sequence[str] = FIXED_GRIDS,
         compare: Sequence[str] = (), decouple: bool = True, iterations: int = 150, minutes: float | None = None,
         diffusers: bool = True, dtype: str = "float32", device: str = "cpu",
         fd: Any = None, store: TuneStore | None = None, teachers: dict[str, Any] | None = None) -> Tuned:
    """The best plan for ``nfe`` network evaluations of ``den`` (named ``model`` in the plan).

    For each solver: every fixed grid; the DP search (:func:`~fewstep.tuning.search.search_steps`) against a teacher
    solve; refinement of the DP result and of the best fixed grid on the real run's end-point error — by gradient
    through a differentiable run (:func:`~fewstep.tuning.search.refine_by_gradient`, ``iterations / 2`` Adam steps
    from each start, ``iterations`` for the decoupled one) for the solvers of
    :data:`fewstep.differentiable.DIFFERENTIABLE` on denoisers that take tensor times (``takes_tensor_time``),
    else by coordinate descent (:func:`~fewstep.tuning.search.refine_steps`) — giving the ``tuned`` row; with
    ``decouple``, the tuned row refined once more with free network times (``tuned_decoupled``). Every row is
    measured on the calibration ``seeds`` (with ``cond``) and the ``holdout`` seeds (with ``holdout_cond``);
    diffusers' deterministic schedulers at the same NFE on the held-out seeds (``diffusers``); ``fd``: a callable
    giving the FD of held-out samples. :func:`~fewstep.tuning.rows.choose` picks the plan: a tuned grid that loses to
    a fixed one on held-out data gives way to it.

    ``guidance``: classifier-free guidance scale; ``uncond``: its negative conditioning (a negative or empty
    prompt's embeddings, :meth:`fewstep.conditioning.Prompts.negative_cond`; default: the model's own null
    condition). Conditioning that carries an autograd graph is detached first.
    ``minutes``: the search's time budget for this NFE (refinements stop early; teacher solves not counted).
    ``dtype``, ``device``: where the runs go, as :attr:`fewstep.plan.Plan.dtype` says (the network in ``dtype`` on
    ``device``, where ``den``'s must already be: :func:`fewstep.plan.place`; the teacher, the noise and every state
    there too, in float32 under half precisions); the rows are plain floats and the plan carries both.
    ``store``: a :class:`fewstep.tuning.store.TuneStore`; teachers and rows found there are not recomputed (an
    interrupted tune resumes). ``teachers``: a dict kept across calls, the same in memory.
    """
    return Tune(den, model, solvers=solvers, shape=shape, seeds=seeds, holdout=holdout, cond=cond,
                holdout_cond=holdout_cond, guidance=guidance, uncond=uncond, candidates=candidates, fixed=fixed,
                compare=compare, decouple=decouple, iterations=iterations, minutes=minutes, diffusers=diffusers,
                dtype=dtype, device=device, fd=fd, store=store, teachers=teachers).at(nfe)
