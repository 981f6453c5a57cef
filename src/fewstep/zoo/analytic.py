"""Data distributions with exact, closed-form denoisers: ground truth for every solver test.

All three models are Gaussian mixtures ``p(x0) = sum_k w_k N(mu_k, diag(s_k^2))``:

* :func:`gaussian` — one component: the probability-flow ODE has a closed-form solution;
* :func:`gaussian_mixture` — smooth, non-linear denoiser; the reference probability-flow solution is computed
  with torchdiffeq (dopri5, tight tolerances);
* :func:`digits` — the "ideal" denoiser of a finite data set (sklearn's bundled 8x8 digits): zero component
  variance, i.e. the exact minimiser of the denoising loss on that set. It memorises.

The denoiser is written once in the EDM frame, ``D(xbar, sbar) = E[x0 | x0 + sbar eps = xbar]`` with
``xbar = x / alpha`` and ``sbar = sigma / alpha``, so it serves every schedule unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fewstep.models.adapter import PREDICTIONS
from fewstep.models.base import Cond, Denoiser
from fewstep.schedules import DiscreteVP, NoiseSchedule

__all__ = ["AnalyticDenoiser", "GaussianMixture", "digits", "gaussian", "gaussian_mixture"]


class GaussianMixture:
    """A diagonal Gaussian mixture over samples of shape ``sample_shape`` (flattened to ``d`` dims).

    Args:
        means: ``(K, d)`` component means.
        stds: ``(K,)`` isotropic or ``(K, d)`` diagonal component standard deviations (0 allowed).
        weights: ``(K,)`` mixture weights (normalised here); uniform by default.
        sample_shape: shape of one sample; default ``(d,)``.
    """

    def __init__(
        self,
        means: torch.Tensor | np.ndarray,
        stds: torch.Tensor | np.ndarray | float,
        weights: torch.Tensor | np.ndarray | None = None,
        *,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        self.means = torch.as_tensor(np.asarray(means), dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(self.means.shape)}")
        k, d = self.means.shape
        stds_t = torch.as_tensor(np.asarray(stds, dtype=np.float64))
        if stds_t.ndim == 0:
            stds_t = stds_t.expand(k)
        if stds_t.shape not in ((k,), (k, d)) or bool((stds_t < 0).any()):
            raise ValueError(f"stds must be >= 0 with shape ({k},) or ({k}, {d}), got {tuple(stds_t.shape)}")
        self.isotropic = stds_t.ndim == 1
        self.stds = stds_t.clone()
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(
            np.asarray(weights), dtype=torch.float64)
        if w.shape != (k,) or bool((w <= 0).any()):
            raise ValueError(f"weights must be ({k},) and positive")
        self.log_weights = torch.log(w / w.sum())
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (d,)
        if math.prod(self.sample_shape) != d:
            raise ValueError(f"sample_shape {self.sample_shape} does not hold {d} values")
        self.dim = d

    def denoise(self, xbar: torch.Tensor, sbar: float) -> torch.Tensor:
        """``E[x0 | x0 + sbar eps = xbar]`` for a batch ``xbar`` of shape ``(B, *sample_shape)``."""
        b = xbar.shape[0]
        z = xbar.reshape(b, self.dim).to(torch.float64)
        var = self.stds**2 + sbar * sbar  # (K,) or (K, d)
        if self.isotropic:
            sq = (z * z).sum(1, keepdim=True) - 2 * z @ self.means.T + (self.means**2).sum(1)  # (B, K)
            logits = self.log_weights - 0.5 * sq / var - 0.5 * self.dim * torch.log(var)
            resp = torch.softmax(logits, dim=1)
            shrink = resp * (self.stds**2 / var)  # weight of xbar in each component's posterior mean
            x0 = resp @ self.means - shrink @ self.means + shrink.sum(1, keepdim=True) * z
        else:
            diff = z[:, None, :] - self.means[None]  # (B, K, d)
            logits = self.log_weights - 0.5 * ((diff * diff) / var + torch.log(var)).sum(-1)
            resp = torch.softmax(logits, dim=1)
            x0 = torch.einsum("bk,bkd->bd", resp, self.means[None] + (self.stds**2 / var) * diff)
        return x0.to(xbar.dtype).reshape(xbar.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact draws from the data distribution, float64, shape ``(n, *sample_shape)``."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        std = self.stds[k][:, None] if self.isotropic else self.stds[k]
        return (self.means[k] + std * noise).reshape(n, *self.sample_shape)

    def component(self, k: int) -> GaussianMixture:
        """Component ``k`` alone: the class-conditional distribution when components are classes."""
        if not 0 <= k < self.means.shape[0]:
            raise ValueError(f"component {k} out of range [0, {self.means.shape[0]})")
        return GaussianMixture(self.means[k:k + 1], self.stds[k:k + 1], sample_shape=self.sample_shape)

    def mean(self) -> torch.Tensor:
        return (self.log_weights.exp() @ self.means).reshape(self.sample_shape)

    def covariance(self) -> torch.Tensor:
        """Full ``(d, d)`` covariance of the data distribution."""
        w = self.log_weights.exp()
        var = (self.stds**2)[:, None].expand(-1, self.dim) if self.isotropic else self.stds**2
        mu = w @ self.means
        second = torch.einsum("k,kd,ke->de", w, self.means, self.means) + torch.diag(w @ var)
        return second - torch.outer(mu, mu)


class AnalyticDenoiser(Denoiser):
    """The exact denoiser of a :class:`GaussianMixture` under ``schedule``. ``cond=k`` (an int) conditions on
    component ``k`` (components as classes), ``cond=None`` is unconditional: with
    :class:`~fewstep.models.ClassifierFreeGuidance` this gives exact guided models, stiff at large scales."""

    def __init__(self, data: GaussianMixture, schedule: NoiseSchedule) -> None:
        self.data = data
        self.schedule = schedule
        self._components: dict[int, GaussianMixture] = {}

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        data = self.data
        if cond is not None:
            if isinstance(cond, bool) or not isinstance(cond, int):
                raise TypeError(f"AnalyticDenoiser's cond is a component index (int) or None, got {cond!r}")
            data = self._components.get(cond) or self._components.setdefault(cond, self.data.component(cond))
        return data.denoise(x / alpha, sigma / alpha)

    def as_model(self, prediction: str = "eps") -> torch.nn.Module:
        """A network ``net(x, native_t)`` predicting ``prediction`` in the schedule's native time (the
        training-step index for :class:`DiscreteVP`, ``t`` otherwise): exercises the adapter path and lets
        diffusers' schedulers drive the same exact model."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}")
        return _ExactNet(self, prediction)

    def reference(
        self, x_start: torch.Tensor, t_start: float, t_end: float, *, rtol: float = 1e-10, atol: float = 1e-10
    ) -> torch.Tensor:
        """The probability-flow ODE solution at ``t_end > 0`` from ``x_start`` at ``t_start``.

        Integrates ``d xbar / d lam = D(xbar, e^-lam) - xbar`` (the PF-ODE in the EDM frame, with the half
        log-SNR as time; smooth and non-stiff) with torchdiffeq's dopri5 in float64, then maps back to the
        schedule's frame.
        """
        if not t_end > 0:
            raise ValueError("the reference ends at t_end > 0; use reference_data for t = 0")
        s = self.schedule
        xbar1 = self._flow(x_start / s.alpha(t_start), s.lam(t_start), s.lam(t_end), rtol, atol)
        return (xbar1 * s.alpha(t_end)).to(x_start.dtype)

    def _flow(self, xbar: torch.Tensor, lam0: float, lam1: float, rtol: float, atol: float) -> torch.Tensor:
        """Integrate ``d xbar / d lam = D(xbar, e^-lam) - xbar`` from ``lam0`` to ``lam1`` (dopri5, float64)."""
        from torchdiffeq import odeint  # imported here: only references need it

        def rhs(lam: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
            return self.data.denoise(xb, math.exp(-float(lam))) - xb

        lams = torch.tensor([lam0, lam1], dtype=torch.float64)
        return odeint(rhs, xbar.to(torch.float64), lams, rtol=rtol, atol=atol, method="dopri5")[-1]

    def reference_data(self, x_start: torch.Tensor, t_start: float, *, lam_end: float = 14.0) -> torch.Tensor:
        """The probability-flow ODE's endpoint at ``t = 0`` from ``x_start``: integrated to ``lam_end`` (edm sigma
        ``e^-14 ~ 8e-7``) in the EDM frame, then denoised; frame-free, so it serves any schedule."""
        xbar1 = self._flow(x_start / self.schedule.alpha(t_start), self.schedule.lam(t_start), lam_end, 1e-10, 1e-10)
        return self.data.denoise(xbar1, math.exp(-lam_end)).to(x_start.dtype)

    def gaussian_flow(self, x_start: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
        """Closed-form PF-ODE solution for a one-component mixture: each coordinate keeps its standardised
        value, ``xbar_end - mu = sqrt((s^2 + sbar_end^2) / (s^2 + sbar_start^2)) (xbar_start - mu)``."""
        if self.data.means.shape[0] != 1:
            raise ValueError("the closed-form flow exists for a single Gaussian only")
        s = self.schedule
        mu = self.data.means[0].reshape(self.data.sample_shape)
        var = self.data.stds[0] ** 2
        if not self.data.isotropic:
            var = var.reshape(self.data.sample_shape)
        sb0, sb1 = s.edm_sigma(t_start), s.edm_sigma(t_end)
        xbar0 = x_start.to(torch.float64) / s.alpha(t_start)
        xbar1 = mu + torch.sqrt((var + sb1**2) / (var + sb0**2)) * (xbar0 - mu)
        return (xbar1 * s.alpha(t_end)).to(x_start.dtype)


class _ExactNet(torch.nn.Module):
    def __init__(self, den: AnalyticDenoiser, prediction: str) -> None:
        super().__init__()
        self.den = den
        self.prediction = prediction

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        s = self.den.schedule
        native = float(torch.as_tensor(timestep).reshape(-1)[0])
        t = s.time_of_index(native) if isinstance(s, DiscreteVP) else native
        alpha, sigma = s.alpha(t), s.sigma(t)
        x0 = self.den(x, t)
        eps = (x - alpha * x0) / sigma
        return {
            "eps": eps,
            "x0": x0,
            "v": alpha * eps - sigma * x0,
            "flow": eps - x0,
            "score": -eps / sigma,
        }[self.prediction]


def gaussian(dim: int = 4, *, mean: float = 0.3, std: float = 0.5) -> GaussianMixture:
    """An isotropic Gaussian ``N(mean, std^2 I)`` in ``dim`` dimensions."""
    return GaussianMixture(torch.full((1, dim), float(mean), dtype=torch.float64), float(std))


def gaussian_mixture(dim: int = 8, components: int = 4, *, std: float = 0.25, seed: int = 0) -> GaussianMixture:
    """A fixed random mixture: means uniform in [-1, 1]^dim, isotropic ``std``, unequal weights."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(components, dim, generator=g, dtype=torch.float64) * 2 - 1
    weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means, std, weights)


def digits(std: float = 0.0) -> GaussianMixture:
    """sklearn's bundled 8x8 digits (1797 images) scaled to [-1, 1], as a mixture of point masses (``std = 0``:
    the ideal denoiser of the finite data set) or of small Gaussians; samples have shape ``(1, 8, 8)``."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    data = load_digits().data.astype(np.float64) / 8.0 - 1.0
    return GaussianMixture(data, std, sample_shape=(1, 8, 8))
