"""Noise schedules: continuous time ``t`` -> ``(alpha, sigma)`` with ``x_t = alpha x_0 + sigma eps``.

Every schedule exposes, in float64 and for scalar ``t``:

* ``alpha(t)``, ``sigma(t)`` and ``lam(t) = log(alpha / sigma)`` (half log-SNR, increasing as noise falls);
* ``inverse_lam(lam)``, the time with that half log-SNR;
* ``t_min`` / ``t_max``, the interval on which the model may be evaluated.

``t = 0`` always means clean data (``alpha = 1``, ``sigma = 0``, ``lam = +inf``): a sampling step may land
there (the "denoise to zero" step) but a model is never evaluated there. Schedules know nothing of models,
steps or solvers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "BETA_SCHEDULES",
    "NoiseSchedule",
    "DiscreteVP",
    "LinearVP",
    "CosineVP",
    "EDM",
    "RectifiedFlow",
]


def _check_t(schedule: NoiseSchedule, t: float) -> float:
    t = float(t)
    if not (0.0 <= t <= schedule.t_max * (1 + 1e-12)) or math.isnan(t):
        raise ValueError(f"t={t} is outside [0, t_max={schedule.t_max}] of {schedule!r}")
    return t


class NoiseSchedule(ABC):
    """Base class. Subclasses implement ``_log_alpha_sigma(t)`` for ``t > 0`` and ``inverse_lam``."""

    t_min: float
    t_max: float

    @abstractmethod
    def _log_alpha_sigma(self, t: float) -> tuple[float, float]:
        """(log alpha, log sigma) at ``0 < t <= t_max``."""

    @abstractmethod
    def inverse_lam(self, lam: float) -> float:
        """The time ``t`` with ``lam(t) = lam``; ``+inf`` maps to 0."""

    def alpha(self, t: float) -> float:
        t = _check_t(self, t)
        return 1.0 if t == 0.0 else math.exp(self._log_alpha_sigma(t)[0])

    def sigma(self, t: float) -> float:
        t = _check_t(self, t)
        return 0.0 if t == 0.0 else math.exp(self._log_alpha_sigma(t)[1])

    def lam(self, t: float) -> float:
        t = _check_t(self, t)
        if t == 0.0:
            return math.inf
        log_alpha, log_sigma = self._log_alpha_sigma(t)
        return log_alpha - log_sigma

    @property
    def lam_min(self) -> float:
        return self.lam(self.t_max)

    @property
    def lam_max(self) -> float:
        return self.lam(self.t_min)

    def prior_std(self, t: float) -> float:
        """``sqrt(alpha^2 + sigma^2)``: the standard deviation of ``x_t`` for unit-variance data, used to scale the
        starting noise (1 for VP schedules, ~sigma_max for VE)."""
        return math.hypot(self.alpha(t), self.sigma(t))

    def edm_sigma(self, t: float) -> float:
        """``sigma / alpha = exp(-lam)``, the noise level in the EDM (variance-exploding) frame."""
        return math.exp(-self.lam(t)) if t > 0 else 0.0


def _alpha_bar_cosine(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _alpha_bar_laplace(s: float) -> float:
    lam = -0.5 * math.copysign(1, 0.5 - s) * math.log(1 - 2 * math.fabs(0.5 - s) + 1e-6)
    snr = math.exp(lam)
    return math.sqrt(snr / (1 + snr))


def _alpha_bar_exp(s: float) -> float:
    return math.exp(s * -12.0)


# alpha_bar(s) on [0, 1] of the beta schedules defined by it (betas_n = 1 - alpha_bar((n+1)/N) / alpha_bar(n/N))
_ALPHA_BAR = {"squaredcos_cap_v2": _alpha_bar_cosine, "laplace": _alpha_bar_laplace, "exp": _alpha_bar_exp}

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")
"""The beta schedule names of :meth:`DiscreteVP.named` (every ``beta_schedule`` diffusers 0.42 implements)."""


class DiscreteVP(NoiseSchedule):
    """Variance-preserving schedule of a discrete-time DDPM, from its ``alphas_cumprod`` table.

    Following *DPM-Solver* (Lu et al., 2022), training step ``n`` (0..N-1) sits at continuous time
    ``t_n = (n + 1) / N`` and ``log alpha`` is piecewise-linear between the table's values, so
    ``t`` ranges over ``[1/N, 1]``. The model's native time is the (fractional) index ``N t - 1``.

    Construct with :meth:`from_betas`, :meth:`from_alphas_cumprod` or :meth:`named`.
    """

    def __init__(self, alphas_cumprod: Sequence[float] | np.ndarray) -> None:
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or ac.size < 2:
            raise ValueError("alphas_cumprod must be a 1-D table with at least 2 entries")
        if not np.all((ac > 0) & (ac <= 1)) or np.any(np.diff(ac) > 0):
            raise ValueError("alphas_cumprod must lie in (0, 1] and be non-increasing")
        self.alphas_cumprod = ac
        self.num_train_timesteps = int(ac.size)
        self._log_alpha = 0.5 * np.log(ac)
        self._ts = (np.arange(ac.size, dtype=np.float64) + 1.0) / ac.size
        self.t_min = float(self._ts[0])
        self.t_max = float(self._ts[-1])
        lam = self._log_alpha - 0.5 * np.log1p(-ac)
        if np.any(np.diff(lam) >= 0):
            raise ValueError("alphas_cumprod must be strictly decreasing (lam must fall with t)")
        self._lam_table = lam

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Sequence[float] | np.ndarray) -> DiscreteVP:
        return cls(alphas_cumprod)

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray) -> DiscreteVP:
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or np.any((b <= 0) | (b >= 1)):
            raise ValueError("betas must be a 1-D table with values in (0, 1)")
        return cls(np.cumprod(1.0 - b))

    @classmethod
    def named(
        cls,
        name: str = "linear",
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        rescale_zero_snr: bool = False,
    ) -> DiscreteVP:
        """The beta schedules of DDPM/diffusers, by their diffusers names (:data:`BETA_SCHEDULES`):

        * ``linear``: betas equally spaced from ``beta_start`` to ``beta_end`` (*DDPM*, Ho et al., 2020);
        * ``scaled_linear``: equally spaced in ``sqrt(beta)`` (latent diffusion);
        * ``squaredcos_cap_v2``: the cosine ``alpha_bar`` of *Improved DDPM* (Nichol & Dhariwal, 2021), betas
          capped at 0.999;
        * ``sigmoid``: ``beta_start + (beta_end - beta_start) sigmoid(u)``, ``u`` equally spaced in [-6, 6] (GeoDiff);
        * ``laplace``: ``alpha_bar`` from a Laplace-distributed log-SNR, ``lam = -sign(1/2 - s) log(1 - |1 - 2s|
          + 1e-6) / 2``, ``alpha_bar = sqrt(sigmoid(lam))`` as diffusers writes it; betas capped at 0.999;
        * ``exp``: ``alpha_bar = exp(-12 s)``, betas capped at 0.999.

        The table is diffusers' ``alphas_cumprod`` bit for bit (see :meth:`from_betas_float32`): the betas are made in
        float32 (``torch.linspace`` in float32; the ``alpha_bar`` schedules in Python floats, then cast), exactly as
        diffusers does. A float64 product cast to float32 is not that table (1.3e-5 relative at the cosine table's
        last entry). ``rescale_zero_snr``: see :meth:`from_betas_float32`.
        """
        n = num_train_timesteps
        if n < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {n}")
        if name == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        elif name == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        elif name == "sigmoid":
            u = torch.linspace(-6, 6, n, dtype=torch.float32)
            betas = torch.sigmoid(u) * (beta_end - beta_start) + beta_start
        elif name in _ALPHA_BAR:
            f = _ALPHA_BAR[name]
            betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
        else:
            raise ValueError(f"unknown beta schedule {name!r}; expected one of {', '.join(BETA_SCHEDULES)}")
        return cls.from_betas_float32(betas, rescale_zero_snr=rescale_zero_snr)

    @classmethod
    def from_betas_float32(
        cls, betas: Sequence[float] | np.ndarray | torch.Tensor, *, rescale_zero_snr: bool = False
    ) -> DiscreteVP:
        """The table diffusers' schedulers build from ``betas``: cast to float32, ``alphas_cumprod`` by
        ``torch.cumprod`` in float32.

        ``rescale_zero_snr`` applies Algorithm 1 of *Common Diffusion Noise Schedules and Sample Steps are Flawed*
        (Lin et al., 2024) in float32 as diffusers' ``rescale_zero_terminal_snr`` does: ``sqrt(alpha_bar)`` is shifted
        so its last entry is 0 and scaled so its first is unchanged. A final ``alpha_bar = 0`` has ``lam = -inf``,
        which no solver can start from (fewstep's steps are written in ``x / alpha``), so that entry becomes
        ``2**-24`` (alpha = 2**-12, lam = -8.3), exactly as diffusers' Euler, DPM-Solver and UniPC schedulers set it.
        (DDIM and DDPM keep 0 and evaluate the network at alpha = 0; with the v-prediction these models use, the first
        ``x0_hat`` differs from theirs by 2.4e-4 times ``x``.)
        """
        b = torch.as_tensor(np.asarray(betas, dtype=np.float32) if not isinstance(betas, torch.Tensor) else betas)
        b = b.to(torch.float32)
        if b.ndim != 1 or b.numel() < 2:
            raise ValueError("betas must be a 1-D table with at least 2 entries")
        if rescale_zero_snr:
            root = torch.cumprod(1.0 - b, dim=0).sqrt()
            first, last = root[0].clone(), root[-1].clone()
            root = (root - last) * (first / (first - last))
            alpha_bar = root**2
            b = 1 - torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
        alphas_cumprod = torch.cumprod(1.0 - b, dim=0)
        if rescale_zero_snr:
            if not alphas_cumprod[-2] > 2**-24:
                raise ValueError(
                    f"rescaled to zero terminal SNR, this beta table has alpha_bar = {float(alphas_cumprod[-2]):.3g} "
                    "at its second-to-last step, below the 2**-24 that replaces the final 0 (as diffusers does): "
                    "the table would not decrease. Zero-SNR rescaling suits schedules that end less abruptly "
                    "(e.g. scaled_linear)")
            alphas_cumprod[-1] = 2**-24
        return cls(alphas_cumprod.double().numpy())

    def _log_alpha_sigma(self, t: float) -> tuple[float, float]:
        if t < self.t_min * (1 - 1e-12):
            # Below the first training step: interpolate log alpha linearly to 0 at t = 0.
            log_alpha = self._log_alpha[0] * t / self.t_min
        else:
            log_alpha = float(np.interp(t, self._ts, self._log_alpha))
        return log_alpha, 0.5 * math.log(-math.expm1(2.0 * log_alpha))

    def inverse_lam(self, lam: float) -> float:
        if lam == math.inf:
            return 0.0
        # log alpha from lam (VP): alpha^2 = sigmoid(2 lam); then invert the piecewise-linear table.
        log_alpha = -0.5 * float(np.logaddexp(0.0, -2.0 * lam))
        if log_alpha > self._log_alpha[0]:
            return float(self.t_min * log_alpha / self._log_alpha[0])
        return float(np.interp(-log_alpha, -self._log_alpha, self._ts))

    def index(self, t: float) -> float:
        """The native (fractional) training-step index ``N t - 1`` of time ``t``."""
        return self.num_train_timesteps * t - 1.0

    def time_of_index(self, n: float) -> float:
        """Inverse of :meth:`index`."""
        return (float(n) + 1.0) / self.num_train_timesteps

    def sigma_index(self, t: float) -> float:
        """The fractional training step whose noise level is that of ``t`` when the table is interpolated linearly
        in ``log(sigma / alpha)`` between steps, as diffusers' sigma-based schedulers do (``_sigma_to_t``); clamped
        to ``[0, N - 1]``. Equals :meth:`index` at every training step; between steps it is the timestep diffusers
        feeds the network at that noise level (:meth:`index` follows this schedule's interpolation of ``log alpha``
        in ``t``, which differs inside a step by a small fraction of a step)."""
        return float(np.interp(-self.lam(t), -self._lam_table, np.arange(self.num_train_timesteps, dtype=np.float64)))

    def time_of_sigma_index(self, n: float) -> float:
        """Inverse of :meth:`sigma_index` on ``[0, N - 1]``; exactly :meth:`time_of_index` at integer steps."""
        n = float(n)
        if not 0.0 <= n <= self.num_train_timesteps - 1:
            raise ValueError(f"training step {n} is outside [0, {self.num_train_timesteps - 1}]")
        if n == round(n):
            return self.time_of_index(n)
        lam = float(np.interp(n, np.arange(self.num_train_timesteps, dtype=np.float64), self._lam_table))
        return self.inverse_lam(lam)

    def __repr__(self) -> str:
        return f"DiscreteVP(N={self.num_train_timesteps}, lam=[{self.lam_min:.3f}, {self.lam_max:.3f}])"


class LinearVP(NoiseSchedule):
    """Continuous linear VP-SDE of *Score-Based Generative Modeling through SDEs* (Song et al., 2021):
    ``log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2`` on ``[t_min, 1]``."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, *, t_min: float = 1e-3) -> None:
        if not (0 <= beta_min < beta_max):
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        if not (0 < t_min < 1):
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), 1.0

    def _log_alpha_sigma(self, t: float) -> tuple[float, float]:
        log_alpha = -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return log_alpha, 0.5 * math.log(-math.expm1(2.0 * log_alpha))

    def inverse_lam(self, lam: float) -> float:
        if lam == math.inf:
            return 0.0
        # Solve -log alpha = c: (b1 - b0)/4 t^2 + b0/2 t - c = 0 for t >= 0.
        c = 0.5 * float(np.logaddexp(0.0, -2.0 * lam))
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        return 2.0 * c / (b + math.sqrt(b * b + 4.0 * a * c))

    def __repr__(self) -> str:
        return f"LinearVP(beta_min={self.beta_min}, beta_max={self.beta_max}, t_min={self.t_min})"


class CosineVP(NoiseSchedule):
    """Continuous cosine VP schedule of *Improved DDPM* (Nichol & Dhariwal, 2021):
    ``alpha_t = cos((t + s)/(1 + s) pi/2) / cos(s/(1 + s) pi/2)``; ``t_max`` stays below 1 where alpha
    vanishes (default 0.9946, as DPM-Solver does)."""

    def __init__(self, s: float = 0.008, *, t_min: float = 1e-3, t_max: float = 0.9946) -> None:
        if not (0 < t_min < t_max < 1):
            raise ValueError(f"need 0 < t_min < t_max < 1, got {t_min}, {t_max}")
        self.s = float(s)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._log_alpha0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))

    def _log_alpha_sigma(self, t: float) -> tuple[float, float]:
        log_alpha = math.log(math.cos((t + self.s) / (1 + self.s) * math.pi / 2)) - self._log_alpha0
        return log_alpha, 0.5 * math.log(-math.expm1(2.0 * log_alpha))

    def inverse_lam(self, lam: float) -> float:
        if lam == math.inf:
            return 0.0
        log_alpha = -0.5 * float(np.logaddexp(0.0, -2.0 * lam))
        return 2.0 * (1 + self.s) / math.pi * math.acos(math.exp(log_alpha + self._log_alpha0)) - self.s

    def __repr__(self) -> str:
        return f"CosineVP(s={self.s}, t=[{self.t_min}, {self.t_max}])"


class EDM(NoiseSchedule):
    """Variance-exploding schedule in the parametrisation of *Elucidating the Design Space of
    Diffusion-Based Generative Models* (Karras et al., 2022): ``t = sigma``, ``alpha = 1``.

    ``sigma_data`` is the data's standard deviation that the network's preconditioning assumes (EDM's ``c_in``,
    ``c_skip``, ``c_out``; 0.5 in the paper and in diffusers): the default of a ``ModelDenoiser`` with the ``edm``
    prediction on this schedule. It does not change ``alpha`` or ``sigma``.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, *, sigma_data: float = 0.5) -> None:
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not (sigma_data > 0 and math.isfinite(sigma_data)):
            raise ValueError(f"sigma_data must be a positive number, got {sigma_data}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)
        self.sigma_data = float(sigma_data)

    def _log_alpha_sigma(self, t: float) -> tuple[float, float]:
        return 0.0, math.log(t)

    def inverse_lam(self, lam: float) -> float:
        return 0.0 if lam == math.inf else math.exp(-lam)

    def __repr__(self) -> str:
        data = "" if self.sigma_data == 0.5 else f", sigma_data={self.sigma_data}"
        return f"EDM(sigma=[{self.t_min}, {self.t_max}]{data})"


class RectifiedFlow(NoiseSchedule):
    """Rectified flow / flow matching, optionally time-shifted: ``sigma = s t / (1 + (s - 1) t)``,
    ``alpha = 1 - sigma`` on ``[t_min, t_max]``.

    With ``shift = 1`` (the default) this is ``alpha = 1 - t``, ``sigma = t``. A shift ``s > 1`` spends more of the
    time interval at high noise: the resolution-dependent shift of *Scaling Rectified Flow Transformers for
    High-Resolution Image Synthesis* (Esser et al., 2024), which diffusers' ``FlowMatchEulerDiscreteScheduler``
    applies to its sigmas (``shift``, or ``exp(mu)`` with dynamic shifting). It is a warp of time only, so the
    half log-SNR is ``lam = log((1 - t) / t) - log(s)`` and equal-``t`` grids on this schedule are diffusers'
    shifted sigmas. Flow networks take ``sigma * N`` as their timestep (see
    :func:`fewstep.models.scheduler_config.native_time_from_config`).
    """

    def __init__(self, shift: float = 1.0, *, t_min: float = 1e-3, t_max: float = 1.0 - 1e-4) -> None:
        if not (0 < t_min < t_max < 1):
            raise ValueError(f"need 0 < t_min < t_max < 1, got {t_min}, {t_max}")
        if not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"shift must be a positive number, got {shift}")
        self.shift = float(shift)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def _log_alpha_sigma(self, t: float) -> tuple[float, float]:
        log_den = math.log1p((self.shift - 1.0) * t)
        return math.log1p(-t) - log_den, math.log(self.shift * t) - log_den

    def alpha(self, t: float) -> float:
        t = _check_t(self, t)
        return (1.0 - t) / (1.0 + (self.shift - 1.0) * t)

    def sigma(self, t: float) -> float:
        t = _check_t(self, t)
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def inverse_lam(self, lam: float) -> float:
        if lam == math.inf:
            return 0.0
        lam = lam + math.log(self.shift)  # the unshifted flow's lam = log((1 - t) / t)
        return 1.0 / (1.0 + math.exp(lam)) if lam > 0 else math.exp(-lam) / (1.0 + math.exp(-lam))

    def time_of_sigma(self, sigma: float) -> float:
        """The time with ``sigma(t) = sigma`` for ``0 <= sigma <= 1`` (the inverse of the shift warp)."""
        sigma = float(sigma)
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"a flow sigma lies in [0, 1], got {sigma}")
        return sigma / (self.shift - (self.shift - 1.0) * sigma)

    def __repr__(self) -> str:
        shift = "" if self.shift == 1.0 else f"shift={self.shift}, "
        return f"RectifiedFlow({shift}t=[{self.t_min}, {self.t_max}])"
