"""UniPC: the UniP predictor with the UniC corrector, data-prediction form, B(h) variants bh1 / bh2."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.solvers._history import History, multistep_order
from fewstep.solvers.base import Model, Solver, State, Step, check_choice
from fewstep.solvers.coeffs import data_phis, lincomb, uni_rhos

__all__ = ["UniPC"]


@dataclass(frozen=True)
class _UniPCState(State):
    hist: History = History()
    x_start: torch.Tensor | None = None  # start point of the previous step (the corrector restarts from it)
    sigma_start: float = 0.0
    last_order: int = 0


class UniPC(Solver):
    """UniPC-p (p = ``solver_order`` = 1, 2, 3) with ``B(h) = -h`` (``bh1``) or ``expm1(-h)`` (``bh2``).

    Step from ``s`` to ``t`` with history ``m_k`` at ``lam_k``, ``r_k = (lam_k - lam_s)/h``,
    ``D1_k = (m_k - m0)/r_k``:

    * UniP-p (predictor): ``x_t = (sigma_t/sigma_s) x_s - alpha_t expm1(-h) m0 - alpha_t B(h) sum_k rho_k D1_k``;
    * the one NFE of the step: ``m_t = x0_hat(x_t, t)``;
    * UniC-p (corrector, applied at the start of the next step from the same ``x_s``): the same update with
      ``rho^c`` over the history plus ``m_t``. ``m_t`` is kept as history; the corrected point is not
      re-evaluated, so NFE = steps. No corrector after the last step (nothing would use it).

    Warm-up orders 1, 2, ...; ``lower_order_final`` (always on in the reference code and diffusers) lowers the
    order on the final steps. Declared order ``p + 1`` with the corrector, ``p`` without.

    References: *UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models*
    (Zhao, Bai, Rao, Zhou, Lu, NeurIPS 2023).
    """

    name = "unipc"
    paper = "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"

    def __init__(
        self, *, solver_order: int = 2, variant: str = "bh2", corrector: bool = True, lower_order_final: bool = True
    ) -> None:
        check_choice("solver_order", solver_order, (1, 2, 3))
        check_choice("variant", variant, ("bh1", "bh2"))
        self.solver_order = solver_order
        self.variant = variant
        self.corrector = bool(corrector)
        self.lower_order_final = bool(lower_order_final)

    @property
    def order(self) -> int:
        return self.solver_order + (1 if self.corrector else 0)

    def init(self, x: torch.Tensor) -> State:
        return _UniPCState()

    def _update(
        self, x_s: torch.Tensor, sigma_s: float, step_h: float, alpha_t: float, sigma_t: float,
        hist: History, lam_s: float, order: int, m_new: torch.Tensor | None,
    ) -> torch.Tensor:
        """UniP (``m_new is None``) or UniC update from ``x_s`` at ``lam_s``; ``hist`` ends with ``m0`` at ``lam_s``."""
        m0 = hist.values[-1]
        phi1, _, _ = data_phis(step_h)
        n_hist = order - 1
        rks = [(hist.lams[-2 - k] - lam_s) / step_h for k in range(n_hist)]
        values = [hist.values[-2 - k] for k in range(n_hist)]
        if m_new is not None:  # corrector: the new value enters with r = 1
            rks.append(1.0)
            values.append(m_new)
        # x_t = (sigma_t/sigma_s) x_s - alpha_t phi1 m0 - alpha_t B(h) sum_k rho_k (m_k - m0)/r_k
        c_m0 = -alpha_t * phi1
        terms = [(sigma_t / sigma_s, x_s)]
        if values:
            b_h, rhos = uni_rhos(rks, step_h, order, bh2=self.variant == "bh2", data=True, corrector=m_new is not None)
            for rho, rk, value in zip(rhos, rks, values, strict=True):
                c = -alpha_t * b_h * rho / rk
                terms.append((c, value))
                c_m0 -= c
        terms.append((c_m0, m0))
        return lincomb(terms)

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        assert isinstance(state, _UniPCState)
        m_t = model(x, step.t_cur)
        if self.corrector and state.x_start is not None:
            # UniC for the previous step: restart from its start point with the new value m_t.
            prev = state.hist
            h_prev = step.lam_cur - prev.lams[-1]
            x = self._update(state.x_start, state.sigma_start, h_prev, step.alpha_cur, step.sigma_cur,
                             prev, prev.lams[-1], state.last_order, m_t)
        hist = state.hist.push(step.lam_cur, m_t, self.solver_order)
        order = multistep_order(self.solver_order, len(hist.lams), step, self.lower_order_final)
        x_next = self._update(x, step.sigma_cur, step.h, step.alpha_next, step.sigma_next, hist, step.lam_cur,
                              order, None)
        return x_next, _UniPCState(hist, x, step.sigma_cur, order)
