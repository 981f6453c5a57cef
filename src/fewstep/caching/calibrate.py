"""Calibration: the most aggressive cache setting that keeps a run's samples within a target error, and the caches
parsed specs build (``"deepcache:interval=3"``, ``"auto:target_error=0.05"``; :mod:`fewstep.caching.spec`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fewstep.caching.adapters import adapter_of
from fewstep.caching.magnitude import magnitude_curve
from fewstep.caching.methods import METHODS, _network, _placed, with_cache
from fewstep.caching.policies import MagnitudeCurve
from fewstep.caching.spec import ALL, NONE, CacheSpec, check_target, method_class, parse_cache
from fewstep.caching.stats import CacheStats
from fewstep.grids import DEFAULT_GRID
from fewstep.models.base import Cond, Denoiser

__all__ = ["Calibration", "SpecContext", "cache_error", "cache_from_spec", "calibrate_cache", "check_cache_spec",
           "make_cache", "method_names", "pick"]


@dataclass(frozen=True)
class SpecContext:
    """What a method that reads a magnitude curve (MagCache) needs to know about the runs it will serve, to record
    the curve on one like them."""

    solver: Any
    steps: int | torch.Tensor  # a step count on ``grid``, or the grid's times
    shape: tuple[int, ...]
    grid: str = DEFAULT_GRID
    cond: Cond = None
    seeds: str = "1000-1127"  # the calibration seeds: conditioning given per sample is built for them


@dataclass
class Calibration:
    """What :func:`calibrate_cache` chose and measured."""

    method: str
    knobs: dict[str, Any]
    error: float  # mean per-sample relative error of the final samples vs the uncached model (calibration seeds)
    error_upper: float  # its bootstrap 90th percentile over the calibration samples (what the choice is held to)
    work: float  # mean fraction of the network's multiply-accumulates computed per evaluation
    table: list[tuple[str, dict[str, Any], float, float, float]] = field(default_factory=list)
    # method, knobs, err, upper, work of every candidate

    @property
    def spec(self) -> str:
        """The chosen setting as a spec string (without a MagCache curve, which is recorded again)."""
        knobs = "".join(f":{k}={v}" for k, v in self.knobs.items() if not isinstance(v, MagnitudeCurve))
        return f"{self.method}{knobs}"


def cache_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample relative error ``|a_i - b_i| / |b_i|`` of cached samples ``a`` against uncached ``b``."""
    return (a - b).double().flatten(1).norm(dim=1) / b.double().flatten(1).norm(dim=1).clamp_min(1e-12)


def _rel_err(a: torch.Tensor, b: torch.Tensor, *, boot: int = 400) -> tuple[float, float]:
    """Mean per-sample relative error and the 90th percentile of its bootstrap over samples. (A batch-wide relative
    RMS is dominated by the few samples that switch mode — 30-75 % of it from 5 of 128 samples on the zoo UNet —
    and varies by 2x between seed sets; the per-sample mean varies by about 15 %.)"""
    r = cache_error(a, b)
    g = torch.Generator().manual_seed(0)
    reps = r[torch.randint(0, r.numel(), (boot, r.numel()), generator=g)].mean(1)
    return float(r.mean()), float(torch.quantile(reps, 0.9))


def method_names(net: torch.nn.Module, method: str | None) -> list[str]:
    """The methods a calibration tries on ``net``: ``method``, every one that applies (``"all"``), or the default
    for the network's kind (each method's ``default_for``: DeepCache for U-Nets, the first-block cache for
    transformers)."""
    kind = adapter_of(net).kind
    if method is None:
        return [n for n, c in METHODS.items() if kind in c.default_for]
    cls = method_class(method, after=(ALL,))
    if cls is None:
        return [n for n, c in METHODS.items() if kind in c.kinds]
    cls.adapter_for(net)  # refuses a method this network cannot use
    return [cls.name]


def pick(table: list[tuple[str, dict[str, Any], float, float, float]], target: float) -> Calibration:
    """The candidate with the least work whose error bound meets ``target`` (``none`` when no candidate does)."""
    ok = [row for row in table if row[3] <= target]
    if not ok:
        return Calibration(NONE, {}, 0.0, 0.0, 1.0, table)
    name, knobs, err, upper, work = min(ok, key=lambda row: (row[4], row[3]))
    return Calibration(name, knobs, err, upper, work, table)


def calibrate_cache(den: Denoiser, solver: Any, steps: int | torch.Tensor, *, shape: Sequence[int],
                    target_error: float,
                    seeds: str = "1000-1127", method: str | None = None, grid: str = DEFAULT_GRID,
                    cond: Cond = None) -> Calibration:
    """Pick the most aggressive cache setting whose final samples stay within ``target_error`` (mean per-sample
    relative error, :func:`cache_error`) of the uncached model's, for this model (guided or not), solver and step
    count, measured on ``seeds`` and held to the bootstrap 90th percentile of that error (so it holds on other
    seeds, not just the calibration ones). ``cond``: the conditioning of the runs it will serve (class labels,
    prompt embeddings; batch 1 is broadcast).

    ``method``: one of :data:`~fewstep.caching.METHODS`, ``"all"`` (every method the network supports), or
    ``None``: DeepCache for U-Nets, the first-block cache for transformers. The work fraction is counted
    (:class:`CacheStats`); the returned setting is the one with the least work that meets the target (none:
    no caching — at few steps caching often cannot pay). A method that reads a magnitude curve gets one recorded
    on ``den`` (guided: both branches) first."""
    from fewstep.sample import sample

    target = check_target(target_error)
    inner = _network(den, "calibrate_cache")
    names = method_names(inner.model, method)
    where = _placed(inner)  # the calibration runs where the network is
    exact = sample(den, solver, steps, shape=shape, seeds=seeds, grid=grid, cond=cond, **where)
    table = []
    for name in names:
        cls = METHODS[name]
        extra = cls.with_curve({}, lambda: magnitude_curve(den, solver, steps, shape=shape, seeds=seeds, grid=grid,
                                                           cond=cond))
        for knobs in cls.candidates(adapter_of(inner.model)):
            stats = CacheStats()
            cached = make_cache(den, name, **knobs, **extra)
            out = sample(cached, solver, steps, shape=shape, seeds=seeds, grid=grid, cond=cond, hooks=[stats],
                         **where)
            table.append((name, {**knobs, **extra}, *_rel_err(out, exact), stats.mean_work))
    return pick(table, target)


def _build(den: Denoiser, spec: CacheSpec, context: SpecContext | None) -> Denoiser:
    """The cache ``spec`` names around ``den``'s network (under its guidance): a curve it reads and does not give
    is recorded on that network (``context``: on a run like the ones it will serve)."""
    cls = spec.method
    if spec.is_search:
        raise ValueError(f"{spec.text!r} is a calibration search: build it with cache_from_spec(den, spec, solver=..., "
                         f"steps=..., shape=...) or calibrate_cache")
    if cls is None:
        return den
    if context is None and cls.needs_run(spec.knobs):
        raise ValueError(f"{cls.name} needs a calibration run: give the solver and steps it will serve")

    def make(inner: Denoiser) -> Denoiser:
        def record() -> MagnitudeCurve:
            assert context is not None  # checked above: only called when the method needs a run
            return magnitude_curve(inner, context.solver, context.steps, shape=context.shape, seeds=context.seeds,
                                   grid=context.grid, cond=context.cond)

        return cls(inner, **cls.with_curve(spec.knobs, record))

    return with_cache(den, make)


def make_cache(den: Denoiser, method: str, *, context: SpecContext | None = None, **knobs: Any) -> Denoiser:
    """``method`` (a method's name, or a spec such as ``"taylorseer:interval=3"``; ``"none"``: ``den`` itself) with
    ``knobs`` around ``den``'s network (under its guidance, if any); ``context`` lets a method that reads a
    magnitude curve (MagCache) record it on a run like the ones it will serve."""
    return _build(den, parse_cache(method, **knobs), context)


def cache_from_spec(den: Denoiser, spec: str, *, solver: Any, steps: int | torch.Tensor, shape: Sequence[int],
                    grid: str = DEFAULT_GRID, cond: Cond = None) -> tuple[Denoiser, Calibration | None]:
    """The cache a spec names around ``den`` (under its guidance): ``"deepcache:interval=3"``,
    ``"taylorseer:interval=4:order=1"``, ``"none"``, or ``"auto:target_error=0.05[:method=...]"``, which calibrates
    it (:func:`calibrate_cache`) for ``solver``, ``steps`` and ``grid`` and returns the calibration too.
    ``steps`` may be the grid's times themselves (then ``grid`` is not used)."""
    parsed = parse_cache(spec)
    if not parsed.is_search:
        return _build(den, parsed, SpecContext(solver, steps, tuple(shape), grid, cond)), None
    assert parsed.target_error is not None
    cal = calibrate_cache(den, solver, steps, shape=shape, target_error=parsed.target_error, method=parsed.search,
                          grid=grid, cond=cond)
    return make_cache(den, cal.method, **cal.knobs), cal


def check_cache_spec(den: Denoiser, spec: str) -> None:
    """Raise the error :func:`cache_from_spec` would, without running anything: an unknown method, a method this
    network cannot use, an unknown or bad knob, a non-positive ``target_error``. (A command line checks its caches
    before the first experiment runs.)"""
    parsed = parse_cache(spec)
    if parsed.is_none:
        return
    inner = _network(den, "a cache")
    cls = parsed.method
    if cls is None:  # a search
        method_names(inner.model, parsed.search)
        return
    # a curve is recorded at run time: a stand-in checks the other knobs
    cls(inner, **cls.with_curve(parsed.knobs, lambda: MagnitudeCurve((0.0, 1.0), (1.0, 1.0))))
