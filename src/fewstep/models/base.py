"""The ``Denoiser`` noun: a pretrained network seen as ``x0_hat = denoiser(x, t, cond)``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from fewstep.schedules import NoiseSchedule

__all__ = ["Cond", "Denoiser"]

Cond = Mapping[str, Any] | None


class Denoiser(ABC):
    """Maps a noisy sample ``x`` at continuous time ``t`` to the data prediction ``x0_hat``.

    ``x`` is in the schedule's own frame (``x = alpha x0 + sigma eps``); ``t`` is one float for the whole
    batch. Subclasses hold a ``schedule``; wrappers (guidance, caching, stitching) are Denoisers that wrap
    Denoisers, so solvers never hear of them.
    """

    schedule: NoiseSchedule

    @property
    def t_min(self) -> float:
        return self.schedule.t_min

    @property
    def t_max(self) -> float:
        return self.schedule.t_max

    @abstractmethod
    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        """Return ``x0_hat`` with the shape and dtype of ``x``."""
