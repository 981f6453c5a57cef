"""The ``Solver`` noun: numerics only, no hidden state.

A solver advances ``x`` from ``t_cur`` to ``t_next``::

    state = solver.init(x)
    x, state = solver.step(model, x, step, state, noise)

``model(x, t) -> x0_hat`` is the denoiser with its conditioning bound (``sample()`` does that and counts the
calls); ``step`` carries the per-step scalars, computed once per run in float64; ``noise`` is a standard normal
tensor shaped like ``x`` for stochastic solvers and ``None`` otherwise. ``State`` is a frozen dataclass; a solver
never assigns to ``self`` after ``__init__``, so one instance serves any number of runs and threads.

A step that lands on ``t = 0`` (clean data) is taken by ``sample()`` itself: ``x <- x0_hat(x, t_cur)``. This is
the limit of every solver's last step (DDIM/DPM-Solver++ with ``alpha = 1``, Euler to ``sigma = 0``, DDPM
without noise), so solvers only ever see ``t_next > 0``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from fewstep.schedules import NoiseSchedule

__all__ = ["Model", "Solver", "State", "Step"]


class Model(Protocol):
    """The denoiser as a solver sees it: ``model(x, t) -> x0_hat`` (conditioning bound, calls counted) and the
    schedule it lives on (for solvers that place intermediate points)."""

    schedule: NoiseSchedule

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor: ...


@dataclass(frozen=True)
class State:
    """Empty state of one-step solvers; multistep solvers subclass it."""


@dataclass(frozen=True)
class Step:
    """Scalars of step ``index`` (0-based) of a grid with ``count`` steps, the final denoise-to-zero step (if
    any) included."""

    index: int
    count: int
    t_cur: float
    t_next: float
    alpha_cur: float
    sigma_cur: float
    lam_cur: float
    alpha_next: float
    sigma_next: float
    lam_next: float
    to_zero: bool = False  # the grid ends with a denoise-to-zero step (taken by ``sample()``, not the solver)

    @property
    def h(self) -> float:
        """``lam_next - lam_cur`` (> 0)."""
        return self.lam_next - self.lam_cur

    @property
    def remaining(self) -> int:
        """Steps left including this one (the denoise-to-zero step included)."""
        return self.count - self.index

    @property
    def last(self) -> bool:
        """Whether this is the last step the solver takes (the denoise-to-zero step, if any, follows it)."""
        return self.remaining == (2 if self.to_zero else 1)

    @property
    def sbar_cur(self) -> float:
        """EDM-frame noise level ``sigma / alpha`` at ``t_cur``."""
        return self.sigma_cur / self.alpha_cur

    @property
    def sbar_next(self) -> float:
        return self.sigma_next / self.alpha_next

    @classmethod
    def of(cls, schedule: NoiseSchedule, index: int, count: int, t_cur: float, t_next: float, *,
           to_zero: bool = False) -> Step:
        s = schedule
        return cls(index, count, t_cur, t_next, s.alpha(t_cur), s.sigma(t_cur), s.lam(t_cur), s.alpha(t_next),
                   s.sigma(t_next), s.lam(t_next), to_zero)


class Solver(ABC):
    """Base class. Subclasses set ``name``, ``paper``, and implement :meth:`step`.

    Class attributes (the registry, the CLI and the docs read them):
        name: public name (``ddim``, ``dpmpp_2m``, ...).
        paper: the reference's title.
        nfe_per_step: network evaluations per (non-final) step.
    Properties: ``order`` (declared convergence order; weak order for stochastic solvers) and ``stochastic``.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    nfe_per_step: ClassVar[int] = 1

    @property
    @abstractmethod
    def order(self) -> int:
        """Declared order of convergence."""

    @property
    def stochastic(self) -> bool:
        return False

    def init(self, x: torch.Tensor) -> State:
        return State()

    @abstractmethod
    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        """Advance ``x`` from ``step.t_cur`` to ``step.t_next``."""

    def nfe_schedule(self, steps: int, *, to_zero: bool) -> list[int]:
        """Exact network evaluations of each step of a ``steps``-step grid (``to_zero``: the last step lands on 0
        and costs one evaluation)."""
        return [self.nfe_per_step] * (steps - 1) + [1 if to_zero else self.nfe_per_step]

    def nfe(self, steps: int, *, to_zero: bool) -> int:
        """Exact network evaluations for a grid of ``steps`` steps (``to_zero``: the last step lands on 0)."""
        return sum(self.nfe_schedule(steps, to_zero=to_zero))

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({knobs})"


def check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_range(name: str, value: float, lo: float, hi: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
