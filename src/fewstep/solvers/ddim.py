"""DDIM (any eta) and DDPM ancestral sampling, written in the general (alpha, sigma, lam) frame."""

from __future__ import annotations

import math

import torch

from fewstep.solvers.base import Model, Solver, State, Step, check_choice, check_range
from fewstep.solvers.coeffs import lincomb

__all__ = ["DDIM", "DDPM"]


class DDIM(Solver):
    """DDIM step with stochasticity ``eta``:

    ``x_next = alpha_next x0_hat + sqrt(sigma_next^2 - s^2) eps_hat + s z``,
    ``s = eta sigma_next sqrt(1 - e^{-2h})``, ``eps_hat = (x - alpha x0_hat)/sigma``.

    For VP schedules ``s`` is the paper's ``sigma_eta = eta sqrt((1-a')/(1-a)) sqrt(1-a/a')``. ``eta = 0`` is
    deterministic and equals DPM-Solver-1 and Euler in the EDM frame; ``eta = 1`` is DDPM with the posterior
    ("fixed small") variance. Order 1; 1 NFE per step.

    References: *Denoising Diffusion Implicit Models* (Song, Meng, Ermon, ICLR 2021).
    """

    name = "ddim"
    paper = "Denoising Diffusion Implicit Models"

    def __init__(self, *, eta: float = 0.0) -> None:
        check_range("eta", eta, 0.0)
        self.eta = float(eta)

    @property
    def order(self) -> int:
        return 1

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        x0 = model(x, step.t_cur)
        s = self.eta * step.sigma_next * math.sqrt(-math.expm1(-2.0 * step.h)) if self.eta > 0 else 0.0
        c = math.sqrt(max(step.sigma_next**2 - s * s, 0.0))
        # alpha_next x0 + c eps with eps = (x - alpha x0)/sigma, as one combination of x and x0
        terms = [(c / step.sigma_cur, x), (step.alpha_next - c * step.alpha_cur / step.sigma_cur, x0)]
        if noise is not None and s > 0:
            terms.append((s, noise))
        return lincomb(terms), state


class DDPM(Solver):
    """Ancestral sampling of the (strided) DDPM posterior ``q(x_next | x, x0_hat)``:

    mean ``alpha_next (1 - e^{-2h}) x0_hat + (sigma_next/sigma) e^{-h} x`` (for VP this is
    ``sqrt(a') beta/(1-a) x0 + sqrt(1-beta)(1-a')/(1-a) x`` with ``beta = 1 - a/a'``); variance
    ``sigma_next^2 (1 - e^{-2h})`` (``"small"``, the posterior variance, diffusers' default) or
    ``sigma^2 (1 - e^{-2h})`` (``"large"``, which is ``beta`` for VP). Weak order 1; 1 NFE per step; no noise
    on the denoise-to-zero step.

    References: *Denoising Diffusion Probabilistic Models* (Ho, Jain, Abbeel, NeurIPS 2020).
    """

    name = "ddpm"
    paper = "Denoising Diffusion Probabilistic Models"

    def __init__(self, *, variance: str = "small") -> None:
        check_choice("variance", variance, ("small", "large"))
        self.variance = variance

    @property
    def order(self) -> int:
        return 1

    @property
    def stochastic(self) -> bool:
        return True

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        x0 = model(x, step.t_cur)
        decay = math.exp(-step.h)
        frac = -math.expm1(-2.0 * step.h)
        std = (step.sigma_next if self.variance == "small" else step.sigma_cur) * math.sqrt(frac)
        terms = [(step.alpha_next * frac, x0), ((step.sigma_next / step.sigma_cur) * decay, x)]  # posterior mean
        if noise is not None:
            terms.append((std, noise))
        return lincomb(terms), state
