"""Classifier-free guidance as a Denoiser wrapping a Denoiser."""

from __future__ import annotations

import torch

from fewstep.models.base import Cond, Denoiser, Run

__all__ = ["ClassifierFreeGuidance"]


class ClassifierFreeGuidance(Denoiser):
    """``x0_hat = x0_u + scale (x0_c - x0_u)`` with ``x0_c = inner(x, t, cond)``, ``x0_u = inner(x, t, uncond)``.

    *Classifier-Free Diffusion Guidance* (Ho & Salimans, 2022) combines eps predictions; at fixed ``(x, t)``
    the map eps -> x0 (and v -> x0) is affine, so combining in x0 gives bit-for-bit the same update up to
    round-off. Counts as one NFE per call (the usual convention) although it runs the network twice.
    """

    def __init__(self, inner: Denoiser, scale: float, *, uncond: Cond = None) -> None:
        if not isinstance(inner, Denoiser):
            raise TypeError(f"inner must be a Denoiser, got {type(inner).__name__}")
        self.inner = inner
        self.scale = float(scale)
        self.uncond = uncond
        self.schedule = inner.schedule

    def for_run(self, run: Run) -> Denoiser:
        inner = self.inner.for_run(run)
        return self if inner is self.inner else ClassifierFreeGuidance(inner, self.scale, uncond=self.uncond)

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        x0_u = self.inner(x, t, self.uncond)
        if self.scale == 0.0:
            return x0_u
        x0_c = self.inner(x, t, cond)
        return x0_u + self.scale * (x0_c - x0_u)
