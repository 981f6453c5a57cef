"""Hooks fired by ``sample()``: progress bar, NFE counter, trajectory recorder, timer.

A hook is any object with optional methods ``on_start(grid)``, ``on_step(index, t_next, x)`` and
``on_end(x)``; it is fresh per run unless the caller passes the same instance twice on purpose.
"""

from __future__ import annotations

import time

import torch

__all__ = ["CostMeter", "NFECounter", "ProgressBar", "Timer", "TrajectoryRecorder"]


class ProgressBar:
    """A tqdm bar over the steps (the CLI turns it on; library calls leave it off)."""

    def __init__(self, desc: str = "sampling", **tqdm_kwargs: object) -> None:
        self.desc, self.kwargs = desc, tqdm_kwargs
        self._bar = None

    def on_start(self, grid: torch.Tensor) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=grid.numel() - 1, desc=self.desc, leave=False, **self.kwargs)

    def on_step(self, index: int, t_next: float, x: torch.Tensor) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_end(self, x: torch.Tensor) -> None:
        if self._bar is not None:
            self._bar.close()


class NFECounter:
    """Network evaluations of the last run, counted by ``sample()`` (``nfe``) and per step (``per_step``)."""

    def __init__(self) -> None:
        self.nfe = 0
        self.per_step: list[int] = []
        self._at_last_step = 0

    def on_start(self, grid: torch.Tensor) -> None:
        self.nfe, self.per_step, self._at_last_step = 0, [], 0

    def on_nfe(self, count: int) -> None:
        self.nfe = count

    def on_step(self, index: int, t_next: float, x: torch.Tensor) -> None:
        self.per_step.append(self.nfe - self._at_last_step)
        self._at_last_step = self.nfe


class TrajectoryRecorder:
    """Keeps ``(t, x)`` after every step (``x`` detached and cloned), the starting point included."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.states: list[torch.Tensor] = []

    def on_start(self, grid: torch.Tensor) -> None:
        self.times, self.states = [float(grid[0])], []

    def on_begin(self, x: torch.Tensor) -> None:
        self.states.append(x.detach().clone())

    def on_step(self, index: int, t_next: float, x: torch.Tensor) -> None:
        self.times.append(t_next)
        self.states.append(x.detach().clone())


class Timer:
    """Wall time of the whole run (``seconds``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def on_start(self, grid: torch.Tensor) -> None:
        self._t0 = time.perf_counter()

    def on_end(self, x: torch.Tensor) -> None:
        self.seconds = time.perf_counter() - self._t0


class CostMeter:
    """Model compute of the last run in units of one evaluation of the reference (most expensive) network, as
    reported by cost-aware denoisers (:class:`~fewstep.multilevel.Multilevel`, :class:`~fewstep.multilevel.Stitch`)
    through ``on_cost(units, level_evaluations)``; ``evaluations[l]`` counts sample-evaluations of level ``l``.
    A plain denoiser reports nothing: its cost is the NFE."""

    def __init__(self) -> None:
        self.cost = 0.0
        self.evaluations: dict[int, int] = {}

    def on_start(self, grid: torch.Tensor) -> None:
        self.cost, self.evaluations = 0.0, {}

    def on_cost(self, units: float, level_evaluations: dict[int, int]) -> None:
        self.cost += units
        for level, n in level_evaluations.items():
            self.evaluations[level] = self.evaluations.get(level, 0) + n
