"""The ``Denoiser`` noun: a pretrained network seen as ``x0_hat = denoiser(x, t, cond)``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fewstep.schedules import NoiseSchedule

__all__ = ["Cond", "Denoiser", "Run"]

Cond = Mapping[str, Any] | None


@dataclass(frozen=True)
class Run:
    """What a run tells the denoisers it binds (``Denoiser.for_run``): the per-sample ``seeds``, the time grid,
    and the run's hooks (wrappers report their model cost or cache hits to hooks with ``on_cost`` /
    ``on_cache``)."""

    seeds: tuple[int, ...]
    times: tuple[float, ...]
    hooks: tuple[Any, ...] = ()

    def step_of(self, t: float) -> int:
        """Index of grid time ``t`` (the step that starts at ``t``); nearest grid time for off-grid ``t``."""
        return min(range(len(self.times)), key=lambda i: abs(self.times[i] - t))

    def report(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            fn = getattr(hook, event, None)
            if fn is not None:
                fn(*args)


class Denoiser(ABC):
    """Maps a noisy sample ``x`` at continuous time ``t`` to the data prediction ``x0_hat``.

    ``x`` is in the schedule's own frame (``x = alpha x0 + sigma eps``); ``t`` is one float for the whole
    batch. Subclasses hold a ``schedule``; wrappers (guidance, caching, stitching) are Denoisers that wrap
    Denoisers, so solvers never hear of them.
    """

    schedule: NoiseSchedule
    #: conditioning keys every call must carry (a text model's prompt embeddings); empty when the denoiser runs
    #: without any (an unconditional model, or one with a default null condition such as a class-conditional DiT)
    required_cond: tuple[str, ...] = ()
    #: whether ``t`` may be a 0-d float64 tensor, the prediction then differentiable in it (a differentiable run
    #: of :mod:`fewstep.differentiable`); float times always work
    takes_tensor_time: bool = False

    @property
    def t_min(self) -> float:
        return self.schedule.t_min

    @property
    def t_max(self) -> float:
        return self.schedule.t_max

    @abstractmethod
    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        """Return ``x0_hat`` with the shape and dtype of ``x``."""

    def for_run(self, run: Run) -> Denoiser:
        """The denoiser one run uses. Stateless denoisers return themselves; wrappers with per-run state (caches,
        random level draws) return a fresh bound copy, so state never leaks between runs or threads.
        ``sample()`` calls this once per run."""
        return self
