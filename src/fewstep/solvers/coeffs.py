"""Shared coefficients of exponential integrators and multistep methods (one place, no copies).

``h > 0`` is the step in ``lam``. In data-prediction form the exact PF-ODE step is
``x_t = (sigma_t/sigma_s) x_s + sigma_t int_{lam_s}^{lam_t} e^lam x0_hat(lam) dlam`` and the Taylor terms of
``x0_hat`` in ``lam`` integrate to ``alpha_t h^k phi_{k+1}(-h)`` style coefficients computed here with ``expm1``
(no cancellation for small ``h``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["data_phis", "eps_of", "exp_lagrange_integrals", "lagrange_integrals", "lincomb", "noise_phis", "uni_rhos"]


def lincomb(terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``sum_i c_i T_i`` with one allocation: every solver update is a linear combination of tensors with float64
    coefficients computed on the host, so it costs one fused multiply-add per term."""
    (c0, t0), *rest = terms
    out = t0 * c0
    for c, t in rest:
        if c != 0.0:
            out.add_(t, alpha=c)
    return out


def eps_of(x: torch.Tensor, x0: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """The noise prediction ``(x - alpha x0_hat) / sigma`` (the EDM-frame slope ``dxbar/dsbar``)."""
    return lincomb([(1.0 / sigma, x), (-alpha / sigma, x0)])


def data_phis(h: float) -> tuple[float, float, float]:
    """``(phi1, phi2, phi3)`` of the data-prediction form (DPM-Solver++ notation):
    ``phi1 = expm1(-h)``, ``phi2 = phi1/h + 1``, ``phi3 = phi2/h - 1/2``.

    With ``x0_hat(lam_s + u) = m0 + u m' + u^2/2 m''`` the exact step is
    ``(sigma_t/sigma_s) x - alpha_t phi1 m0 + alpha_t phi2 h m' - alpha_t phi3 h^2 m''``.
    """
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1.0
    return phi1, phi2, phi2 / h - 0.5


def noise_phis(h: float) -> tuple[float, float, float]:
    """``(phi1, phi2, phi3)`` of the noise-prediction form: ``expm1(h)``, ``phi1/h - 1``, ``phi2/h - 1/2``."""
    phi1 = math.expm1(h)
    phi2 = phi1 / h - 1.0
    return phi1, phi2, phi2 / h - 0.5


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(48)


def lagrange_integrals(
    nodes: Sequence[float], u_of_rho: Callable[[float], float], rho_a: float, rho_b: float
) -> list[float]:
    """``int_{rho_a}^{rho_b} l_j(u(rho)) drho`` for the Lagrange basis ``l_j`` on ``nodes`` (in the variable u).

    The DEIS coefficients (*Fast Sampling of Diffusion Models with Exponential Integrator*, Zhang & Chen,
    2023): in the EDM frame ``dxbar/drho = eps_hat`` exactly, so interpolating ``eps_hat`` by a polynomial in
    ``u`` and integrating over ``rho`` is the whole method. 48-point Gauss-Legendre in ``rho``.
    """
    mid, half = 0.5 * (rho_a + rho_b), 0.5 * (rho_b - rho_a)
    us = np.array([u_of_rho(mid + half * z) for z in _GL_NODES])
    out = []
    for j, uj in enumerate(nodes):
        basis = np.ones_like(us)
        for k, uk in enumerate(nodes):
            if k != j:
                basis *= (us - uk) / (uj - uk)
        out.append(float(half * np.dot(_GL_WEIGHTS, basis)))
    return out


def exp_lagrange_integrals(nodes: Sequence[float], rate: float, lam_a: float, lam_b: float) -> list[float]:
    """``int_{lam_a}^{lam_b} e^{rate (lam - lam_b)} l_j(lam) dlam`` for the Lagrange basis ``l_j`` on ``nodes``.

    The weights of exponential Adams methods in ``lam``: ``rate = 1 + tau^2`` gives the data-prediction
    SA-Solver and DPM-Solver++ integrals (``rate = 1``), ``rate = -1`` the noise-prediction ones. Normalised at
    ``lam_b`` so the weight is O(1) whatever the sign of the step. 48-point Gauss-Legendre: exact to round-off
    for the polynomial-times-exponential integrands of steps with ``|rate h| < 10``.
    """
    mid, half = 0.5 * (lam_a + lam_b), 0.5 * (lam_b - lam_a)
    lams = mid + half * _GL_NODES
    weight = np.exp(rate * (lams - lam_b))
    out = []
    for j, lj in enumerate(nodes):
        basis = weight.copy()
        for k, lk in enumerate(nodes):
            if k != j:
                basis *= (lams - lk) / (lj - lk)
        out.append(float(half * np.dot(_GL_WEIGHTS, basis)))
    return out


def uni_rhos(rks: Sequence[float], h: float, order: int, *, bh2: bool, data: bool, corrector: bool) -> tuple[
    float, list[float]
]:
    """``(B(h), rho)`` of UniPC's UniP (predictor) or UniC (corrector) of order ``order``.

    From *UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models* (Zhao et al.,
    2023), Algorithm (B(h) variant): ``rks`` are ``r_k = (lam_k - lam_s)/h`` of the history points (and ``1`` for
    the new point when correcting); ``hh = -h`` in data form, ``+h`` in noise form; ``B(h) = hh`` (bh1) or
    ``expm1(hh)`` (bh2); ``rho`` solves ``R rho = b`` with ``R[i,k] = r_k^i`` and
    ``b_i = (i+1)! g_{i+1} / B(h)``, ``g_1 = expm1(hh)/hh - 1``, ``g_{i+1} = g_i/hh - 1/(i+1)!``.
    The paper's order-2 predictor and order-1 corrector use ``rho = 1/2`` (as its reference code does).
    """
    hh = -h if data else h
    b_h = math.expm1(hh) if bh2 else hh
    if (not corrector and order == 2) or (corrector and order == 1):
        return b_h, [0.5]
    n = order if corrector else order - 1
    if n == 0:
        return b_h, []
    g = math.expm1(hh) / hh - 1.0
    fact = 1.0
    b = []
    for i in range(1, n + 1):
        b.append(g * fact / b_h)
        fact *= i + 1
        g = g / hh - 1.0 / fact
    r = np.array([[rk ** (i - 1) for rk in rks[:n]] for i in range(1, n + 1)], dtype=np.float64)
    return b_h, [float(v) for v in np.linalg.solve(r, np.array(b))]
