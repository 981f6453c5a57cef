"""MagCache's magnitude curve: the mean token norm of a transformer's block-chain residual at each evaluation of one
uncached run, recorded by a cache that never reuses (:class:`_Recorder`).

:func:`magnitude_curve` records it on a fewstep run; :func:`fewstep.caching.pipeline.pipeline_magnitude_curve` on a
diffusers pipeline's run, with the same recorder. A method that reads a curve says so as data
(:attr:`~fewstep.caching.methods.FeatureCache.curve_knob`); specs and calibration call these to record it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fewstep.caching.adapters import BlockAdapter
from fewstep.caching.engines import ChainRecipe, Recipe
from fewstep.caching.methods import FeatureCache, _network, _placed, with_cache
from fewstep.caching.policies import MagnitudeCurve, Scheduled
from fewstep.grids import DEFAULT_GRID
from fewstep.models.base import Cond, Denoiser

__all__ = ["curve_of", "magnitude_curve"]


class _Recorder(FeatureCache):
    """Records the chain residual's magnitude on every evaluation; never reuses (for :func:`magnitude_curve`)."""

    name = "record"
    kinds = ("chain",)

    @classmethod
    def make_recipe(cls, adapter: BlockAdapter, net: torch.nn.Module, *,
                    record: list[tuple[float, float]]) -> Recipe:
        return ChainRecipe(schedule=Scheduled(1, "uniform", 0), record=record)


def magnitude_curve(den: Denoiser, solver: Any, steps: int | torch.Tensor, *, shape: Sequence[int],
                    seeds: str = "1000-1127", grid: str = DEFAULT_GRID, cond: Cond = None) -> MagnitudeCurve:
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
