"""Sampling with a family of networks of growing cost: multilevel Euler-Maruyama (ML-EM) and trajectory stitching.

Both are :class:`~fewstep.models.Denoiser` wrappers, so every solver and the one ``sample()`` loop work unchanged:

* :class:`Multilevel` returns the randomized telescoping estimate of the finest level's ``x0_hat``; with
  ``euler_maruyama`` this is ML-EM (the drift is affine in ``x0_hat``, so telescoping ``x0_hat`` telescopes the
  drift). :func:`calibrate` measures per-level costs and increment variances and :func:`optimal_probs` turns them
  into level probabilities.
* :class:`Stitch` routes each step to one model of the family by step fraction, time or logSNR (T-Stitch).

Both report their compute to :class:`~fewstep.hooks.CostMeter` in units of one finest-level evaluation.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fewstep.grids import DEFAULT_GRID
from fewstep.models.base import Cond, Denoiser, Run
from fewstep.solvers import EulerMaruyama, Step

__all__ = ["Calibration", "Multilevel", "Stitch", "calibrate", "measure_costs", "optimal_probs"]


def _expected_cost(probs: Sequence[float], costs: Sequence[float]) -> float:
    """Expected cost per call in finest-level units: level ``l`` runs when ``B_l`` or ``B_{l+1}`` is drawn,
    ``sum_l C_l (1 - (1 - p_l)(1 - p_{l+1})) / C_k``."""
    p = [*probs, 0.0]
    return sum(c * (1 - (1 - p[i]) * (1 - p[i + 1])) for i, c in enumerate(costs)) / costs[-1]


def _check_family(levels: Sequence[Denoiser], costs: Sequence[float] | None) -> tuple[list[Denoiser], list[float]]:
    levels = list(levels)
    if not levels or not all(isinstance(d, Denoiser) for d in levels):
        raise TypeError("levels must be a non-empty sequence of fewstep Denoisers")
    sched = levels[0].schedule
    if any(d.schedule != sched and repr(d.schedule) != repr(sched) for d in levels[1:]):
        raise ValueError("all levels must share one noise schedule (the same parameterisation and time)")
    costs = [1.0] * len(levels) if costs is None else [float(c) for c in costs]
    if len(costs) != len(levels) or any(not c > 0 for c in costs):
        raise ValueError(f"need one positive cost per level, got {costs}")
    return levels, costs


class Multilevel(Denoiser):
    """Randomized multilevel estimate of the finest level's data prediction.

    With levels ``D^1..D^k`` (coarse to fine, same schedule), ``D^0 = 0`` and independent ``B_l ~ Bernoulli(p_l)``
    drawn afresh at every call and for every sample:

    ``D~ = sum_l (B_l / p_l) (D^l - D^{l-1})``,   ``E[D~] = D^k`` for any ``p_l`` in (0, 1].

    Each level is evaluated at most once per call, only on the samples that need it (level ``l`` is needed when
    ``B_l`` or ``B_{l+1}`` is drawn), and reused by both increments it enters. The Bernoullis come from one
    generator per sample seeded from the run's seeds, so sample ``k`` is the same in any batch. With
    ``euler_maruyama`` this is multilevel Euler-Maruyama: the reverse-SDE drift is affine in ``x0_hat``.

    Cost, in units of one evaluation of the finest level (``costs[-1]``), is reported per call to hooks with
    ``on_cost`` (:class:`~fewstep.hooks.CostMeter`): ``sum_l costs[l] * (samples evaluated at l) / batch``.

    References: *Polynomial Speedup in Diffusion Models with the Multilevel Euler-Maruyama Method* (Jacot, 2026;
    only the abstract was available to us); the estimator as defined in *Convex Optimization Is Free When
    Accuracy Is Expensive* (Paing, Jacot), Prop. 3.
    """

    def __init__(self, levels: Sequence[Denoiser], probs: Sequence[float], *, costs: Sequence[float] | None = None,
                 seed_offset: int = 7919) -> None:
        self.levels, self.costs = _check_family(levels, costs)
        probs = [float(p) for p in probs]
        if len(probs) != len(self.levels) or any(not 0.0 < p <= 1.0 for p in probs):
            raise ValueError(f"need one probability in (0, 1] per level, got {probs}")
        self.probs = probs
        self.schedule = self.levels[0].schedule
        self.seed_offset = int(seed_offset)

    def for_run(self, run: Run) -> Denoiser:
        return _MultilevelRun(self, run)

    def expected_cost(self) -> float:
        """Expected cost per call, in finest-level units: ``sum_l C_l P(B_l or B_{l+1})``."""
        return _expected_cost(self.probs, self.costs)

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        raise TypeError("Multilevel draws per-sample random levels; call it through fewstep.sample() (or bind it "
                        "with .for_run(Run(seeds, times)))")


class _MultilevelRun(Denoiser):
    """One run's :class:`Multilevel`: per-sample Bernoulli generators and cost reporting."""

    def __init__(self, family: Multilevel, run: Run) -> None:
        self.family, self.run = family, run
        self.schedule = family.schedule
        self.generators = [torch.Generator().manual_seed(int(s) + family.seed_offset) for s in run.seeds]

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        fam = self.family
        k = len(fam.levels)
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} for a run with {len(self.generators)} seeds")
        u = torch.stack([torch.rand(k, generator=g, dtype=torch.float64) for g in self.generators])  # (B, k)
        drawn = u < torch.tensor(fam.probs, dtype=torch.float64)  # B_l per sample
        need = drawn.clone()
        need[:, :-1] |= drawn[:, 1:]  # level l also serves increment l + 1
        batch = x.shape[0]
        out = torch.zeros_like(x)
        prev: torch.Tensor | None = None  # D^{l-1} on the samples that need it, scattered to full batch
        cost, evaluations = 0.0, {}
        for level in range(k):
            idx = need[:, level].nonzero().flatten()
            value = torch.zeros_like(x)
            if idx.numel() == batch:
                value = fam.levels[level](x, t, cond)
            elif idx.numel() > 0:
                value[idx] = fam.levels[level](x[idx], t, cond)
            if idx.numel() > 0:
                cost += fam.costs[level] * idx.numel() / batch
                evaluations[level] = int(idx.numel())
            weight = drawn[:, level].to(x.dtype) / fam.probs[level]  # (B,)
            if bool(drawn[:, level].any()):
                increment = value if prev is None else value - prev
                out += weight.view(-1, *[1] * (x.ndim - 1)) * increment
            prev = value
        self.run.report("on_cost", cost / fam.costs[-1], evaluations)
        return out


def optimal_probs(variances: Sequence[float], costs: Sequence[float], *, budget: float) -> list[float]:
    """Level probabilities ``p_l = min(1, c sqrt(V_l / C_l))`` with ``c`` chosen (by bisection) so that the expected
    cost per step, ``sum_l C_l P(level l evaluated)``, equals ``budget`` (in finest-level units). ``p_1 = 1``
    always: the coarsest level carries the mean. The minimiser of ``sum_l (1/p_l - 1) V_l`` at fixed cost (the
    randomized-multilevel rule; the increment's cost is charged to its own level, as the levels are reused)."""
    v = [float(a) for a in variances]
    c = [float(a) for a in costs]
    if len(v) != len(c) or not v:
        raise ValueError("need one variance and one cost per level")
    if budget < c[0] / c[-1] or budget > sum(c) / c[-1] + 1e-12:
        raise ValueError(f"budget must be in [{c[0] / c[-1]:.3g}, {sum(c) / c[-1]:.3g}] finest-level units "
                         f"(coarsest level alone .. every level), got {budget}")

    def probs(scale: float) -> list[float]:
        return [1.0] + [min(1.0, max(scale * math.sqrt(max(vl, 0.0) / cl), 1e-6)) for vl, cl in zip(v[1:], c[1:],
                                                                                                  strict=True)]

    lo, hi = 0.0, 1.0
    while _expected_cost(probs(hi), c) < budget and hi < 1e12:
        hi *= 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _expected_cost(probs(mid), c) < budget else (lo, mid)
    return probs(hi)


def measure_costs(levels: Sequence[Denoiser], x: torch.Tensor, t: float, *, repeats: int = 5) -> list[float]:
    """Median wall time of one evaluation of each level on ``x`` at ``t``, divided by the finest level's."""
    times = []
    with torch.no_grad():
        for d in levels:
            d(x, t)  # warm-up
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                d(x, t)
                runs.append(time.perf_counter() - t0)
            times.append(statistics.median(runs))
    return [s / times[-1] for s in times]


@dataclass(frozen=True)
class Calibration:
    """Per-level statistics along finest-level Euler-Maruyama trajectories (see :func:`calibrate`).

    ``variances[l]``: ``sum_n c_n^2 E|D^l - D^{l-1}|^2 / d`` (``D^0 = 0``), the increment's contribution to the
    terminal variance of ML-EM per unit ``(1/p_l - 1)``; ``c_n`` is the coefficient of ``x0_hat`` in step ``n``.
    ``errors[l]``: the same weighted RMS of ``D^l - D^k`` (the drift error relative to the finest level)."""

    costs: tuple[float, ...]
    variances: tuple[float, ...]
    errors: tuple[float, ...]

    def probs(self, budget: float) -> list[float]:
        return optimal_probs(self.variances, self.costs, budget=budget)


def calibrate(levels: Sequence[Denoiser], steps: int, *, shape: Sequence[int], seeds: str | int = 16,
              costs: Sequence[float] | None = None, grid: str = DEFAULT_GRID,
              reference: Denoiser | None = None) -> Calibration:
    """Run Euler-Maruyama with the finest level on a few seeds and, at every step, evaluate every level at the
    current state: increment variances and drift errors weighted by the step's ``x0_hat`` coefficient. ``costs``
    default to :func:`measure_costs` at mid-trajectory on a batch of 256. ``reference`` (e.g. an exact denoiser)
    replaces the finest level as the truth for ``errors``."""
    from fewstep.hooks import TrajectoryRecorder
    from fewstep.sample import sample

    levels, _ = _check_family(levels, costs)
    rec = TrajectoryRecorder()
    sample(levels[-1], "euler_maruyama", steps, shape=shape, seeds=seeds, hooks=[rec], grid=grid)
    sched = levels[0].schedule
    n_steps = len(rec.times) - 1
    times = rec.times
    pairs = [(times[i], times[i + 1], rec.states[i]) for i in range(len(times) - 1) if times[i + 1] > 0]
    if costs is None:  # timed on a batch of 256 (small batches time the overhead, not the network)
        t_mid, _, x_mid = pairs[len(pairs) // 2]
        reps = -(-256 // x_mid.shape[0])
        costs = measure_costs(levels, x_mid.repeat(reps, *[1] * (x_mid.ndim - 1))[:256], t_mid)
    k = len(levels)
    var, err = [0.0] * k, [0.0] * k
    with torch.no_grad():
        for t, t_next, x in pairs:
            c2 = EulerMaruyama.coefficients(Step.of(sched, 0, n_steps, t, t_next))[1] ** 2
            values = [d(x, t).double() for d in levels]
            truth = values[-1] if reference is None else reference(x.double(), t).double()
            for level in range(k):
                inc = values[level] - (values[level - 1] if level else 0.0)
                var[level] += c2 * float(inc.pow(2).mean())
                err[level] += c2 * float((values[level] - truth).pow(2).mean())
    return Calibration(tuple(float(c) for c in costs), tuple(var), tuple(math.sqrt(e) for e in err))


class Stitch(Denoiser):
    """Trajectory stitching: each model of a family (cheap first) serves one contiguous part of the trajectory.

    ``switch`` has one value per boundary (``len(models) - 1``), increasing along the trajectory, in the unit
    ``by``:

    * ``"fraction"``: fraction of the run's steps (step ``i`` of ``n`` goes to model ``j`` while
      ``i / n < switch[j]``; T-Stitch's rule for step-indexed pipelines); ``switch=[0.4]`` gives the first 40 %
      of the steps to the small model;
    * ``"time"``: the schedule's ``t`` (model ``j`` while ``t >= switch[j]``; DiT's ``t/T >= 1 - r`` rule);
    * ``"logsnr"``: ``lam = log(alpha/sigma)`` (model ``j`` while ``lam < switch[j]``).

    Multistep solvers keep their history across the switch (values from the small model stay in it, as T-Stitch
    does): the models share one schedule and parameterisation, so their ``x0_hat`` are interchangeable, and a
    history reset would cost accuracy for nothing. Cost (``costs``, relative; default: all 1) is reported per
    call to :class:`~fewstep.hooks.CostMeter` in units of the last model's evaluation.

    References: *T-Stitch: Accelerating Sampling in Pre-trained Diffusion Models with Trajectory Stitching* (Pan,
    Zhuang, Huang, Nie, Yu, Xiao, Cai, Anandkumar, 2024).
    """

    def __init__(self, models: Sequence[Denoiser], switch: Sequence[float], *, by: str = "fraction",
                 costs: Sequence[float] | None = None) -> None:
        self.models, self.costs = _check_family(models, costs)
        if by not in ("fraction", "time", "logsnr"):
            raise ValueError(f"by must be 'fraction', 'time' or 'logsnr', got {by!r}")
        switch = [float(s) for s in switch]
        if len(switch) != len(self.models) - 1:
            raise ValueError(f"need {len(self.models) - 1} switch point(s) for {len(self.models)} models")
        ordered = switch if by != "time" else [-s for s in switch]
        if any(b < a for a, b in zip(ordered, ordered[1:], strict=False)):
            raise ValueError(f"switch points must go along the trajectory, got {switch}")
        if by == "fraction" and any(not 0.0 <= s <= 1.0 for s in switch):
            raise ValueError(f"fractions must be in [0, 1], got {switch}")
        self.switch, self.by = switch, by
        self.schedule = self.models[0].schedule

    def route(self, t: float, run: Run | None = None) -> int:
        """Index of the model that serves time ``t``."""
        if self.by == "fraction":
            if run is None:
                raise TypeError("by='fraction' needs the run's grid: call through fewstep.sample()")
            steps = max(len(run.times) - 1, 1)
            pos = run.step_of(t) / steps
            return next((j for j, s in enumerate(self.switch) if pos < s), len(self.models) - 1)
        if self.by == "time":
            return next((j for j, s in enumerate(self.switch) if t >= s), len(self.models) - 1)
        lam = self.schedule.lam(t)
        return next((j for j, s in enumerate(self.switch) if lam < s), len(self.models) - 1)

    def for_run(self, run: Run) -> Denoiser:
        return _StitchRun(self, run, [m.for_run(run) for m in self.models])

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        return self.models[self.route(t)](x, t, cond)


class _StitchRun(Denoiser):
    def __init__(self, family: Stitch, run: Run, models: list[Denoiser]) -> None:
        self.family, self.run, self.models = family, run, models
        self.schedule = family.schedule

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        j = self.family.route(t, self.run)
        self.run.report("on_cost", self.family.costs[j] / self.family.costs[-1], {j: int(x.shape[0])})
        return self.models[j](x, t, cond)
