"""Calibration: the most aggressive cache setting that keeps a run's samples within a target error, and the
command-line specs (``"deepcache:interval=3"``, ``"auto:target_error=0.05"``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fewstep.caching.adapters import adapter_of
from fewstep.caching.methods import METHODS, SpecContext, _Recorder, make_cache, model_denoiser, with_cache
from fewstep.caching.policies import MagnitudeCurve
from fewstep.caching.stats import CacheStats
from fewstep.models.adapter import ModelDenoiser
from fewstep.models.base import Cond, Denoiser
from fewstep.models.guidance import ClassifierFreeGuidance

__all__ = ["Calibration", "cache_error", "cache_from_spec", "calibrate_cache", "check_cache_spec", "curve_of",
           "magnitude_curve", "method_names", "pick"]


@dataclass
class Calibration:
    """What :func:`calibrate_cache` chose and measured."""

    method: str
    knobs: dict[str, Any]
    error: float  # mean per-sample relative error of the final samples vs the uncached model (calibration seeds)
    error_upper: float  # its bootstrap 90th percentile over the calibration samples (what the choice is held to)
    work: float  # mean fraction of the network computed per evaluation
    table: list[tuple[str, dict[str, Any], float, float, float]] = field(default_factory=list)
    # method, knobs, err, upper, work of every candidate

    @property
    def spec(self) -> str:
        """The chosen setting as a spec string (without a MagCache curve, which is recorded again)."""
        knobs = "".join(f":{k}={v}" for k, v in self.knobs.items() if k != "curve")
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


def _placed(net: ModelDenoiser) -> dict[str, Any]:
    """``sample()``'s ``device`` and ``dtype`` for runs of ``net``: its network's device, and the state dtype of a
    run in its dtype (float32 under half precisions, as :func:`fewstep.plan.state_dtype`)."""
    param = next(iter(net.model.parameters()), None) if isinstance(net.model, torch.nn.Module) else None
    if param is None:
        return {}
    return {"device": param.device, "dtype": torch.float64 if param.dtype == torch.float64 else torch.float32}


def _network(den: Denoiser, who: str) -> ModelDenoiser:
    """The ModelDenoiser under ``den``'s guidance."""
    while isinstance(den, ClassifierFreeGuidance):
        den = den.inner
    return model_denoiser(den, who)


def _check_target(target_error: Any) -> float:
    if isinstance(target_error, bool) or not isinstance(target_error, int | float) or not (
            math.isfinite(target_error) and target_error > 0):
        raise ValueError(f"target_error must be a number > 0 (a relative error such as 0.05), got {target_error!r}")
    return float(target_error)


def magnitude_curve(den: Denoiser, solver: Any, steps: int | torch.Tensor, *, shape: Sequence[int],
                    seeds: str = "1000-1127", grid: str = "time_quadratic", cond: Cond = None) -> MagnitudeCurve:
    """The magnitude curve MagCache reads (:class:`~fewstep.caching.policies.MagnitudeCurve`): the mean token norm
    of the transformer's block-chain residual at each evaluation of one uncached run of ``solver`` over ``steps``
    (on the calibration ``seeds``, for which ``cond`` is given; under guidance both branches, averaged per
    time)."""
    from fewstep.sample import sample

    record: list[tuple[float, float]] = []
    where = _placed(_network(den, "magnitude_curve"))  # the calibration runs where the network is
    sample(with_cache(den, lambda d: _Recorder(d, record=record)), solver, steps, shape=shape, seeds=seeds,
           grid=grid, cond=cond, **where)
    return curve_of(record)


def curve_of(record: Sequence[tuple[float, float]]) -> MagnitudeCurve:
    """The magnitude curve of recorded ``(clock, norm)`` pairs, norms at one clock (both guidance branches)
    averaged."""
    by_clock: dict[float, list[float]] = {}
    for clock, norm in record:
        by_clock.setdefault(clock, []).append(norm)
    clocks = sorted(by_clock)
    return MagnitudeCurve(tuple(clocks), tuple(sum(by_clock[c]) / len(by_clock[c]) for c in clocks))


def method_names(net: torch.nn.Module, method: str | None) -> list[str]:
    """The methods a calibration tries on ``net``: ``method``, every one that applies (``"all"``), or the default
    (DeepCache for U-Nets, the first-block cache for transformers)."""
    kind = adapter_of(net).kind
    if method is None:
        return ["deepcache" if kind == "unet" else "block"]
    if method == "all":
        return [n for n, c in METHODS.items() if kind in c.kinds]
    if method in METHODS:
        METHODS[method].adapter_for(net)  # refuses a method this network cannot use
        return [method]
    raise ValueError(f"unknown cache {method!r}; known: {', '.join(METHODS)}, all")


def pick(table: list[tuple[str, dict[str, Any], float, float, float]], target: float) -> Calibration:
    """The candidate with the least work whose error bound meets ``target`` (``none`` when no candidate does)."""
    ok = [row for row in table if row[3] <= target]
    if not ok:
        return Calibration("none", {}, 0.0, 0.0, 1.0, table)
    name, knobs, err, upper, work = min(ok, key=lambda row: (row[4], row[3]))
    return Calibration(name, knobs, err, upper, work, table)


def calibrate_cache(den: Denoiser, solver: Any, steps: int | torch.Tensor, *, shape: Sequence[int],
                    target_error: float,
                    seeds: str = "1000-1127", method: str | None = None, grid: str = "time_quadratic",
                    cond: Cond = None) -> Calibration:
    """Pick the most aggressive cache setting whose final samples stay within ``target_error`` (mean per-sample
    relative error, :func:`cache_error`) of the uncached model's, for this model (guided or not), solver and step
    count, measured on ``seeds`` and held to the bootstrap 90th percentile of that error (so it holds on other
    seeds, not just the calibration ones). ``cond``: the conditioning of the runs it will serve (class labels,
    prompt embeddings; batch 1 is broadcast).

    ``method``: one of :data:`~fewstep.caching.METHODS`, ``"all"`` (every method the network supports), or
    ``None``: DeepCache for U-Nets, the first-block cache for transformers. The work fraction is counted
    (:class:`CacheStats`); the returned setting is the one with the least work that meets the target (none:
    no caching — at few steps caching often cannot pay)."""
    from fewstep.sample import sample

    target = _check_target(target_error)
    inner = _network(den, "calibrate_cache")
    names = method_names(inner.model, method)
    where = _placed(inner)  # the calibration runs where the network is
    exact = sample(den, solver, steps, shape=shape, seeds=seeds, grid=grid, cond=cond, **where)
    ctx = SpecContext(solver, steps, tuple(shape), grid, cond)
    table = []
    for name in names:
        cls = METHODS[name]
        extra: dict[str, Any] = {}
        if name == "magcache":
            extra["curve"] = magnitude_curve(den, solver, steps, shape=shape, seeds=seeds, grid=grid, cond=cond)
        for knobs in cls.candidates(adapter_of(inner.model)):
            stats = CacheStats()
            cached = make_cache(den, name, context=ctx, **knobs, **extra)
            out = sample(cached, solver, steps, shape=shape, seeds=seeds, grid=grid, cond=cond, hooks=[stats],
                         **where)
            table.append((name, {**knobs, **extra}, *_rel_err(out, exact), stats.mean_work))
    return pick(table, target)


def cache_from_spec(den: Denoiser, spec: str, *, solver: Any, steps: int | torch.Tensor, shape: Sequence[int],
                    grid: str = "time_quadratic", cond: Cond = None) -> tuple[Denoiser, Calibration | None]:
    """The cache a command-line spec names around ``den`` (under its guidance): ``"deepcache:interval=3"``,
    ``"taylorseer:interval=4:order=1"``, ``"none"``, or ``"auto:target_error=0.05[:method=...]"``, which calibrates
    it (:func:`calibrate_cache`) for ``solver``, ``steps`` and ``grid`` and returns the calibration too.
    ``steps`` may be the grid's times themselves (then ``grid`` is not used)."""
    from fewstep.spec import parse_spec

    name, knobs = parse_spec(spec)
    if name != "auto":
        return make_cache(den, name, context=SpecContext(solver, steps, tuple(shape), grid, cond), **knobs), None
    target = _check_target(knobs.pop("target_error", 0.05))
    cal = calibrate_cache(den, solver, steps, shape=shape, target_error=target, grid=grid, cond=cond, **knobs)
    if cal.method == "none":
        return den, cal
    return make_cache(den, cal.method, **cal.knobs), cal


def check_cache_spec(den: Denoiser, spec: str) -> None:
    """Raise the error :func:`cache_from_spec` would, without running anything: an unknown method, a method this
    network cannot use, an unknown or bad knob, a non-positive ``target_error``. (A command line checks its caches
    before the first experiment runs.)"""
    from fewstep.spec import parse_spec

    name, knobs = parse_spec(spec)
    if name == "none":
        return
    inner = _network(den, "a cache")
    if name == "auto":
        _check_target(knobs.pop("target_error", 0.05))
        method = knobs.pop("method", None)
        if knobs:
            raise TypeError(f"auto takes target_error and method; got {sorted(knobs)}")
        method_names(inner.model, method)
        return
    if name not in METHODS:
        raise ValueError(f"unknown cache {name!r}; known: none, {', '.join(METHODS)}, auto")
    if name == "magcache" and "curve" not in knobs:
        knobs["curve"] = MagnitudeCurve((0.0, 1.0), (1.0, 1.0))  # recorded at run time; checked for the knobs
    METHODS[name](inner, **knobs)
