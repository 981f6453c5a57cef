"""Euler, Heun (EDM) and Euler-Maruyama, in the EDM frame ``xbar = x/alpha``, ``sbar = sigma/alpha``.

In that frame the probability-flow ODE is ``dxbar/dsbar = (xbar - D)/sbar`` with ``D = x0_hat`` and the
reverse SDE is ``dxbar = 2 (xbar - D)/sbar dsbar + sqrt(2 sbar) dw`` (both for any VP/VE/flow schedule).
"""

from __future__ import annotations

import math

import torch

from fewstep.schedules import NoiseSchedule
from fewstep.solvers.base import Model, Solver, State, Step, check_range
from fewstep.solvers.coeffs import lincomb

__all__ = ["Euler", "EulerMaruyama", "Heun"]


class _Churn:
    """EDM's stochastic churn (Algorithm 2, lines 4-6): raise the noise level of the current point from
    ``sbar`` to ``sbar (1 + gamma)`` by adding fresh noise before the step."""

    def __init__(self, churn: float, churn_min: float, churn_max: float, s_noise: float) -> None:
        check_range("churn", churn, 0.0)
        check_range("churn_min", churn_min, 0.0)
        check_range("churn_max", churn_max, churn_min)
        check_range("s_noise", s_noise, 0.0)
        self.churn, self.churn_min, self.churn_max, self.s_noise = churn, churn_min, churn_max, s_noise

    def apply(
        self, s: NoiseSchedule, x: torch.Tensor, step: Step, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, float, float, float]:
        """(xbar_hat, sbar_hat, t_hat, alpha_hat) after churn (no churn: the current point)."""
        sbar = step.sbar_cur
        xbar = x / step.alpha_cur
        gamma = 0.0
        if self.churn > 0 and self.churn_min <= sbar <= self.churn_max:
            gamma = min(self.churn / step.count, math.sqrt(2.0) - 1.0)
        if gamma == 0.0 or noise is None:
            return xbar, sbar, step.t_cur, step.alpha_cur
        sbar_hat = min(sbar * (1.0 + gamma), s.edm_sigma(s.t_max))
        t_hat = s.inverse_lam(-math.log(sbar_hat))
        xbar_hat = xbar + math.sqrt(max(sbar_hat**2 - sbar**2, 0.0)) * self.s_noise * noise
        return xbar_hat, sbar_hat, t_hat, s.alpha(t_hat)


class Euler(Solver):
    """Euler on the probability-flow ODE in the EDM frame:
    ``d = (xbar - D(xbar; sbar))/sbar``, ``xbar_next = xbar + (sbar_next - sbar) d``.

    Identical in exact arithmetic to DDIM(eta=0) and DPM-Solver-1 (the exponential integrator integrates the
    linear part exactly, which is what the EDM frame removes). Optional EDM churn makes it stochastic.
    Order 1; 1 NFE per step.

    References: *Elucidating the Design Space of Diffusion-Based Generative Models* (Karras et al., 2022).
    """

    name = "euler"
    paper = "Elucidating the Design Space of Diffusion-Based Generative Models"

    def __init__(
        self, *, churn: float = 0.0, churn_min: float = 0.0, churn_max: float = math.inf, s_noise: float = 1.0
    ) -> None:
        self._churn = _Churn(churn, churn_min, churn_max, s_noise)
        self.churn, self.churn_min, self.churn_max, self.s_noise = churn, churn_min, churn_max, s_noise

    @property
    def order(self) -> int:
        return 1

    @property
    def stochastic(self) -> bool:
        return self.churn > 0

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        xbar, sbar, t_hat, alpha_hat = self._churn.apply(model.schedule, x, step, noise)
        x0 = model(xbar * alpha_hat, t_hat)
        # xbar + (sbar_next - sbar)(xbar - x0)/sbar, mapped back to the schedule's frame
        ratio = step.sbar_next / sbar
        return lincomb([(step.alpha_next * ratio, xbar), (step.alpha_next * (1.0 - ratio), x0)]), state


class Heun(Solver):
    """Heun's second-order method on the PF-ODE in the EDM frame (Algorithm 2 of the EDM paper):

    ``d = (xbar - D(xbar; sbar))/sbar``; Euler predictor ``xbar' = xbar + (sbar_next - sbar) d``;
    corrector ``xbar_next = xbar + (sbar_next - sbar)(d + d')/2`` with ``d'`` evaluated at ``xbar'``.
    Optional churn (``churn`` = S_churn, ``churn_min``/``churn_max`` = S_tmin/S_tmax, ``s_noise``).
    The denoise-to-zero last step is Euler (1 NFE), as in the paper. Order 2; 2 NFE per step.

    References: *Elucidating the Design Space of Diffusion-Based Generative Models* (Karras et al., 2022).
    """

    name = "heun"
    paper = "Elucidating the Design Space of Diffusion-Based Generative Models"
    nfe_per_step = 2

    def __init__(
        self, *, churn: float = 0.0, churn_min: float = 0.0, churn_max: float = math.inf, s_noise: float = 1.0
    ) -> None:
        self._churn = _Churn(churn, churn_min, churn_max, s_noise)
        self.churn, self.churn_min, self.churn_max, self.s_noise = churn, churn_min, churn_max, s_noise

    @property
    def order(self) -> int:
        return 2

    @property
    def stochastic(self) -> bool:
        return self.churn > 0

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        xbar, sbar, t_hat, alpha_hat = self._churn.apply(model.schedule, x, step, noise)
        dt = step.sbar_next - sbar
        a = step.alpha_next
        x0 = model(xbar * alpha_hat, t_hat)
        # Euler predictor xbar' = xbar + dt d, d = (xbar - x0)/sbar, mapped to the schedule's frame
        x_pred = lincomb([(a * (1.0 + dt / sbar), xbar), (-a * dt / sbar, x0)])
        x0_pred = model(x_pred, step.t_next)
        # trapezoidal corrector xbar + dt (d + d')/2, d' = (x_pred/a - x0_pred)/sbar_next
        k, k_next = 0.5 * dt / sbar, 0.5 * dt / step.sbar_next
        return lincomb([(a * (1.0 + k), xbar), (-a * k, x0), (k_next, x_pred), (-a * k_next, x0_pred)]), state


class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse-time SDE in the EDM frame:

    ``xbar_next = xbar + 2 (sbar_next - sbar) (xbar - D)/sbar + sqrt(2 sbar (sbar - sbar_next)) z``.

    This is the reverse SDE of *Score-Based Generative Modeling through SDEs* (Song et al., 2021) — the same
    process for VP and VE schedules, ``beta(t) = sbar'/sbar`` in EDM's eq. (6) — discretised uniformly in
    ``sbar``. The drift is affine in ``D``, so multilevel drift estimators can telescope it. Strong order 1/2,
    weak order 1; 1 NFE per step.

    References: *Score-Based Generative Modeling through Stochastic Differential Equations* (Song et al., 2021).
    """

    name = "euler_maruyama"
    paper = "Score-Based Generative Modeling through Stochastic Differential Equations"

    @property
    def order(self) -> int:
        return 1

    @property
    def stochastic(self) -> bool:
        return True

    @staticmethod
    def coefficients(step: Step) -> tuple[float, float, float]:
        """``(c_x, c_x0, c_z)`` of ``x_next = c_x x + c_x0 x0_hat + c_z z`` (the multilevel calibration weighs
        drift differences by ``c_x0``)."""
        sbar, sbar_next = step.sbar_cur, step.sbar_next
        a = step.alpha_next
        k = 2.0 * (sbar_next - sbar) / sbar  # drift 2 (sbar_next - sbar)(xbar - D)/sbar
        return a * (1.0 + k) / step.alpha_cur, -a * k, a * math.sqrt(2.0 * sbar * (sbar - sbar_next))

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        c_x, c_x0, c_z = self.coefficients(step)
        terms = [(c_x, x), (c_x0, model(x, step.t_cur))]
        if noise is not None:
            terms.append((c_z, noise))
        return lincomb(terms), state
