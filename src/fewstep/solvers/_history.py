"""History of past model values for multistep solvers, carried in the (frozen) state."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.solvers.base import State, Step


@dataclass(frozen=True)
class History(State):
    """The last few ``(lam, value)`` pairs, oldest first."""

    lams: tuple[float, ...] = ()
    values: tuple[torch.Tensor, ...] = ()

    def push(self, lam: float, value: torch.Tensor, keep: int) -> History:
        return History((*self.lams, lam)[-keep:], (*self.values, value)[-keep:])


def multistep_order(order: int, available: int, step: Step, lower_order_final: bool) -> int:
    """Order of this step: warm-up ``min(order, available)``; with ``lower_order_final`` also at most the number
    of steps left (so the last step before the end is first order), as DPM-Solver and UniPC do."""
    o = min(order, available)
    return min(o, step.remaining) if lower_order_final else o
