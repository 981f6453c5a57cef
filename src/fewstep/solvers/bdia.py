"""BDIA-DDIM: DDIM with bi-directional integration approximation, exactly invertible."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.solvers.base import Model, Solver, State, Step, check_range
from fewstep.solvers.coeffs import lincomb

__all__ = ["BDIA"]


@dataclass(frozen=True)
class BDIAState(State):
    """The previous (noisier) point ``z_{i+1}`` and its ``(alpha, sigma)``; empty before the first step."""

    prev: torch.Tensor | None = None
    alpha_prev: float = 0.0
    sigma_prev: float = 0.0


def ddim_delta(alpha: float, sigma: float, alpha_to: float, sigma_to: float) -> tuple[float, float]:
    """Coefficients ``(c_x, c_x0)`` of ``Delta(t -> t_to | x) = alpha_to x0 + sigma_to eps - x`` with
    ``eps = (x - alpha x0)/sigma``: the DDIM increment from ``x`` at ``t`` to ``t_to`` (either direction)."""
    return sigma_to / sigma - 1.0, alpha_to - sigma_to * alpha / sigma


class BDIA(Solver):
    """BDIA-DDIM with mixing ``gamma`` in (0, 1]. From ``z_i`` (one evaluation ``x0_hat(z_i)``) and the previous,
    noisier point ``z_{i+1}``:

    ``z_{i-1} = z_i + gamma (z_{i+1} - z_i - Delta(t_i -> t_{i+1} | z_i)) + Delta(t_i -> t_{i-1} | z_i)``

    where ``Delta(t_i -> t' | z_i) = alpha' x0_hat + sigma' eps_hat - z_i`` is the DDIM increment (backward to
    ``t_{i+1}`` or forward to ``t_{i-1}``). The first step has no ``z_{i+1}`` and is plain DDIM. ``gamma = 0`` would
    be DDIM (not invertible, so refused). The update is affine in ``z_{i+1}`` with coefficient ``gamma``, so it can
    be solved for ``z_{i+1}``: :func:`fewstep.invert` runs that backward recursion and returns the last *pair*,
    from which sampling reproduces the input to round-off.

    ``gamma = 1`` (default) is the symmetric, leapfrog-like scheme: **order 2** (measured) and neutrally stable
    backwards, so the round trip is exact to ~1e-12 at any step count. ``gamma < 1`` (the paper's Stable Diffusion
    examples use 0.5) is order 1 and its backward recursion amplifies a parasitic mode by ~``1/gamma`` per step:
    exact in exact arithmetic, but the latent blows up (``gamma = 0.5``: latent std 1e9 after 50 steps, overflow by
    1000; ``gamma = 0.9``: std 136 after 200 steps; table in docs/results.md). Use ``gamma < 1`` for few steps
    only. 1 NFE per step.

    References: *Exact Diffusion Inversion via Bi-directional Integration Approximation* (Zhang, Lewis, Kleijn,
    ECCV 2024).
    """

    name = "bdia"
    paper = "Exact Diffusion Inversion via Bi-directional Integration Approximation"

    def __init__(self, *, gamma: float = 1.0) -> None:
        check_range("gamma", gamma, 0.0, 1.0)
        if gamma == 0.0:
            raise ValueError("gamma must be in (0, 1]: gamma = 0 is DDIM, which is not exactly invertible")
        self.gamma = float(gamma)

    @property
    def order(self) -> int:
        return 2 if self.gamma == 1.0 else 1

    def init(self, x: torch.Tensor) -> State:
        return BDIAState()

    def step(
        self, model: Model, x: torch.Tensor, step: Step, state: State, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        assert isinstance(state, BDIAState)
        x0 = model(x, step.t_cur)
        a, s = step.alpha_cur, step.sigma_cur
        fx, f0 = ddim_delta(a, s, step.alpha_next, step.sigma_next)
        terms = [(1.0 + fx, x), (f0, x0)]
        if state.prev is not None:
            bx, b0 = ddim_delta(a, s, state.alpha_prev, state.sigma_prev)
            g = self.gamma
            # + gamma (z_prev - z - Delta_back)
            terms = [(1.0 + fx - g - g * bx, x), (f0 - g * b0, x0), (g, state.prev)]
        return lincomb(terms), BDIAState(x, a, s)

    def invert_step(self, model: Model, z: torch.Tensor, z_clean: torch.Tensor, step: Step,
                    alpha_clean: float, sigma_clean: float) -> torch.Tensor:
        """Solve the sampling step for the noisier point: given ``z_i`` (at ``step.t_cur``) and ``z_{i-1}`` (at the
        cleaner time with ``alpha_clean, sigma_clean``), return ``z_{i+1}`` at ``step.t_next`` (noisier):
        ``z_{i+1} = z_i + Delta(t_i -> t_{i+1}) + (z_{i-1} - z_i - Delta(t_i -> t_{i-1}))/gamma``."""
        x0 = model(z, step.t_cur)
        a, s = step.alpha_cur, step.sigma_cur
        bx, b0 = ddim_delta(a, s, step.alpha_next, step.sigma_next)
        fx, f0 = ddim_delta(a, s, alpha_clean, sigma_clean)
        g = self.gamma
        return lincomb([(1.0 + bx - (1.0 + fx) / g, z), (b0 - f0 / g, x0), (1.0 / g, z_clean)])
