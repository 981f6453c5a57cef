"""DEIS (exponential Adams-Bashforth with a polynomial in t, rho or log rho) and iPNDM."""

from __future__ import annotations

import math

import torch

from fewstep.solvers._history import History, multistep_order
from fewstep.solvers.base import Model, Solver, State, Step, check_choice
from fewstep.solvers.coeffs import eps_of, lagrange_integrals, lincomb

__all__ = ["DEIS", "IPNDM"]

_DEIS = "Fast Sampling of Diffusion Models with Exponential Integrator"


class DEIS(Solver):
    """DEIS-AB-r: ``xbar_next = xbar + sum_j C_j eps_hat_j`` in the EDM frame (``xbar = x/alpha``,
    ``rho = sigma/alpha``, where ``dxbar/drho = eps_hat`` holds exactly), with
    ``C_j = int_{rho_cur}^{rho_next} l_j(u(rho)) drho`` for the Lagrange basis ``l_j`` through the last
    ``solver_order`` evaluation points in the variable ``u``:

    * ``interpolate_in="t"``: tAB-DEIS, the paper's recommended variant (polynomial in the schedule's time);
    * ``"rho"``: rhoAB-DEIS;
    * ``"logrho"``: the variant diffusers' ``DEISMultistepScheduler`` implements.

    Warm-up orders 1, 2, ...; ``lower_order_final`` lowers the order on the final steps. Order
    ``solver_order`` (1-3); 1 NFE per step. Coefficients by 48-point Gauss-Legendre quadrature per step (float64).

    References: *Fast Sampling of Diffusion Models with Exponential Integrator* (Zhang & Chen, ICLR 2023).
    """

    name = "deis"
    paper = _DEIS

    def __init__(self, *, solver_order: int = 3, interpolate_in: str = "t", lower_order_final: bool = True) -> None:
        check_choice("solver_order", solver_order, (1, 2, 3))
        check_choice("interpolate_in", interpolate_in, ("t", "rho", "logrho"))
        self.solver_order = solver_order
        self.interpolate_in = interpolate_in
        self.lower_order_final = bool(lower_order_final)

    @property
    def order(self) -> int:
        return self.solver_order

    def init(self, x: torch.Tensor) -> State:
        return History()

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        assert isinstance(state, History)
        sched = model.schedule
        eps = eps_of(x, model(x, step.t_cur), step.alpha_cur, step.sigma_cur)
        hist = state.push(step.lam_cur, eps, self.solver_order)
        order = multistep_order(self.solver_order, len(hist.lams), step, self.lower_order_final)
        lams = hist.lams[-order:]
        if self.interpolate_in == "t":
            nodes = [sched.inverse_lam(lam) for lam in lams]

            def u_of(rho: float) -> float:
                return sched.inverse_lam(-math.log(rho))
        elif self.interpolate_in == "rho":
            nodes = [math.exp(-lam) for lam in lams]

            def u_of(rho: float) -> float:
                return rho
        else:
            nodes = [-lam for lam in lams]
            u_of = math.log
        coeffs = lagrange_integrals(nodes, u_of, step.sbar_cur, step.sbar_next)
        # x_next = alpha_next (x/alpha + sum_j C_j eps_j)
        terms = [(step.alpha_next / step.alpha_cur, x)]
        terms += [(step.alpha_next * c, e) for c, e in zip(coeffs, hist.values[-order:], strict=True)]
        return lincomb(terms), hist


class IPNDM(Solver):
    """Improved PNDM: fixed-coefficient Adams-Bashforth on ``d = eps_hat`` in the EDM frame,
    ``xbar_next = xbar + (sbar_next - sbar) e``, with ``e`` = ``d0``, ``(3 d0 - d1)/2``,
    ``(23 d0 - 16 d1 + 5 d2)/12``, ``(55 d0 - 59 d1 + 37 d2 - 9 d3)/24`` as history allows (up to ``solver_order``).

    The weights are those of Adams-Bashforth of order ``solver_order`` (default 4) for equal steps in ``sbar``. They
    ignore step-size ratios, and the warm-up starts with an Euler step, so the global convergence order is 2
    (declared; measured in ``tests/test_orders.py``) for ``solver_order >= 2``. It is nevertheless among the best
    solvers at 3-10 steps on the Karras grid (see the iPNDM tables of the DEIS and diff-sampler works).
    1 NFE per step.

    References: *Fast Sampling of Diffusion Models with Exponential Integrator* (Zhang & Chen, ICLR 2023);
    *Pseudo Numerical Methods for Diffusion Models on Manifolds* (Liu et al., ICLR 2022).
    """

    name = "ipndm"
    paper = _DEIS
    _weights = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))

    def __init__(self, *, solver_order: int = 4) -> None:
        check_choice("solver_order", solver_order, (1, 2, 3, 4))
        self.solver_order = solver_order

    @property
    def order(self) -> int:
        return min(self.solver_order, 2)

    def init(self, x: torch.Tensor) -> State:
        return History()

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        assert isinstance(state, History)
        # d = (xbar - D)/sbar = eps_hat
        d = eps_of(x, model(x, step.t_cur), step.alpha_cur, step.sigma_cur)
        hist = state.push(step.lam_cur, d, self.solver_order)
        weights = self._weights[multistep_order(self.solver_order, len(hist.lams), step, False) - 1]
        # x_next = alpha_next (xbar + (sbar_next - sbar) sum_j w_j d_j)
        scale = step.alpha_next * (step.sbar_next - step.sbar_cur)
        terms = [(step.alpha_next / step.alpha_cur, x)]
        terms += [(scale * w, v) for w, v in zip(weights, reversed(hist.values), strict=False)]
        return lincomb(terms), hist
