"""Heavy-ball (HB) and generalized heavy-ball (GHVB) momentum for diffusion sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.solvers._history import History, multistep_order
from fewstep.solvers.base import Model, Solver, State, Step, check_choice
from fewstep.solvers.coeffs import data_phis, eps_of, lincomb

__all__ = ["GHVB", "HeavyBall"]

_MOM = "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts"

# Adams-Bashforth weights for equal steps, newest value first (PLMS / iPNDM).
_AB = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@dataclass(frozen=True)
class _MomentumState(State):
    hist: History = History()  # past evaluations (lam, value)
    velocities: tuple[torch.Tensor, ...] = ()  # past velocities v, oldest first


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be a number in (0, 1] (1 = no momentum), got {beta!r}")
    return float(beta)


def _heavy_ball(velocities: tuple[torch.Tensor, ...], value: torch.Tensor, beta: float) -> torch.Tensor:
    """``v_{n+1} = (1 - beta) v_n + beta value``; the first velocity is the value itself."""
    return value if not velocities else lincomb([(1.0 - beta, velocities[-1]), (beta, value)])


def _edm_step(x: torch.Tensor, direction: torch.Tensor, step: Step) -> torch.Tensor:
    """``x_next = alpha_next (x/alpha + (sbar_next - sbar) direction)``."""
    return lincomb([(step.alpha_next / step.alpha_cur, x),
                    (step.alpha_next * (step.sbar_next - step.sbar_cur), direction)])


class HeavyBall(Solver):
    """Polyak's heavy-ball momentum on a multistep method (``beta = 1``: the method itself):

    ``v_{n+1} = (1 - beta) v_n + beta sum_i b_i f_{n-i}``, ``x_{n+1} = x_n + delta v_{n+1}`` (``v`` starts at the
    first combination), where the base method is

    * ``base="dpmpp_2m"``: DPM-Solver++(2M) in data form, ``f = x0_hat``, the combination ``m0 + D1/2`` and the
      step ``x_t = (sigma_t/sigma_s) x - alpha_t expm1(-h) v`` (the paper's ADM experiments, HB 0.8);
    * ``base="plms"``: Adams-Bashforth of order ``solver_order`` on ``f = eps_hat`` in the EDM frame
      (``dxbar/dsbar = eps_hat``, fixed equal-step weights as PLMS / iPNDM, ``delta = sbar_next - sbar``).

    Momentum damps the oscillation that makes multistep methods diverge at few steps with large guidance (it
    enlarges the stability region), at the price of accuracy: any ``beta < 1`` gives **order 1** (the paper's
    Theorem 1; measured in ``tests/test_research_solvers.py``). Use :class:`GHVB` to keep a higher order.
    1 NFE per step.

    References: *Diffusion Sampling with Momentum for Mitigating Divergence Artifacts* (Wizadwongsa,
    Chinchuthakun, Khungurn, Raj, Suwajanakorn, ICLR 2024).
    """

    name = "hb"
    paper = _MOM

    def __init__(self, *, beta: float = 0.8, base: str = "dpmpp_2m", solver_order: int = 2,
                 lower_order_final: bool = True) -> None:
        self.beta = _check_beta(beta)
        check_choice("base", base, ("dpmpp_2m", "plms"))
        check_choice("solver_order", solver_order, (1, 2, 3, 4))
        if base == "dpmpp_2m" and solver_order != 2:
            raise ValueError("base='dpmpp_2m' is second order; solver_order applies to base='plms'")
        self.base = base
        self.solver_order = solver_order
        self.lower_order_final = bool(lower_order_final)

    @property
    def order(self) -> int:
        return 1 if self.beta < 1.0 else self.solver_order

    def init(self, x: torch.Tensor) -> State:
        return _MomentumState()

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        assert isinstance(state, _MomentumState)
        x0 = model(x, step.t_cur)
        value = x0 if self.base == "dpmpp_2m" else eps_of(x, x0, step.alpha_cur, step.sigma_cur)
        hist = state.hist.push(step.lam_cur, value, self.solver_order)
        order = multistep_order(self.solver_order, len(hist.lams), step, self.lower_order_final)
        if self.base == "dpmpp_2m":
            if order == 2:  # m0 + D1/2, D1 = (m0 - m1) h / h_prev
                half_r = 0.5 * step.h / (hist.lams[-1] - hist.lams[-2])
                combo = lincomb([(1.0 + half_r, hist.values[-1]), (-half_r, hist.values[-2])])
            else:
                combo = hist.values[-1]
        else:
            combo = lincomb([(w, v) for w, v in zip(_AB[order - 1], reversed(hist.values), strict=False)])
        vel = _heavy_ball(state.velocities, combo, self.beta)
        if self.base == "dpmpp_2m":
            phi1, _, _ = data_phis(step.h)
            x_next = lincomb([(step.sigma_next / step.sigma_cur, x), (-step.alpha_next * phi1, vel)])
        else:
            x_next = _edm_step(x, vel, step)
        return x_next, _MomentumState(hist, (vel,))


# GHVB's weights on (v_{n+1}, v_n, v_{n-1}, ...) as (a, b) pairs meaning (a + b beta) / (denominator beta).
_GHVB = (
    (1, ((0, 1),)),
    (2, ((2, 1), (-2, 1))),
    (12, ((18, 5), (-24, 8), (6, -1))),
    (24, ((46, 9), (-78, 19), (42, -5), (-10, 1))),
)


class GHVB(Solver):
    """Generalized heavy ball of order ``r`` (1-4; the knob ``solver_order``), "GHVB (r - 1 + beta)":

    ``v_{n+1} = (1 - beta) v_n + beta eps_hat(x_n)`` (``v`` starts at the first ``eps_hat``), then an
    Adams-Bashforth-like combination of the velocities with ``beta``-dependent weights (``c = min(r, n)``):
    ``e = v_{n+1}`` (c = 1), ``((2 + beta) v_{n+1} - (2 - beta) v_n)/(2 beta)`` (c = 2),
    ``((18 + 5 beta) v_{n+1} - (24 - 8 beta) v_n + (6 - beta) v_{n-1})/(12 beta)`` (c = 3),
    ``((46 + 9 beta) v_{n+1} - (78 - 19 beta) v_n + (42 - 5 beta) v_{n-1} - (10 - beta) v_{n-2})/(24 beta)``
    (c = 4); ``xbar_{n+1} = xbar_n + (sbar_{n+1} - sbar_n) e`` in the EDM frame. ``beta = 1`` is
    Adams-Bashforth of order ``r`` (PLMS-r); ``beta -> 0`` tends to order ``r - 1``. The ``-(2 - beta)`` sign
    follows the paper's stability polynomial and code (its eq. 19 misprints it).

    Order ``r`` (Theorem 2) on grids uniform in ``sbar`` with exact starting values. The weights assume equal
    steps and the warm-up starts with one Euler step, so on other grids, and from the usual cold start, the
    global order is at most 2 for ``r >= 3`` (the same caveat as iPNDM; measured). 1 NFE per step.

    References: *Diffusion Sampling with Momentum for Mitigating Divergence Artifacts* (Wizadwongsa,
    Chinchuthakun, Khungurn, Raj, Suwajanakorn, ICLR 2024).
    """

    name = "ghvb"
    paper = _MOM

    def __init__(self, *, solver_order: int = 2, beta: float = 0.8) -> None:
        check_choice("solver_order", solver_order, (1, 2, 3, 4))
        self.solver_order = solver_order
        self.beta = _check_beta(beta)

    @property
    def order(self) -> int:
        return min(self.solver_order, 2)

    def init(self, x: torch.Tensor) -> State:
        return _MomentumState()

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        assert isinstance(state, _MomentumState)
        eps = eps_of(x, model(x, step.t_cur), step.alpha_cur, step.sigma_cur)
        b = self.beta
        vel = _heavy_ball(state.velocities, eps, b)
        velocities = (*state.velocities, vel)[-self.solver_order:]
        c = min(self.solver_order, len(velocities))
        denom, weights = _GHVB[c - 1]
        if c == 1:
            direction = vel
        else:
            direction = lincomb([((p + q * b) / (denom * b), v) for (p, q), v in zip(weights, reversed(velocities),
                                                                                   strict=False)])
        return _edm_step(x, direction, step), _MomentumState(velocities=velocities)
