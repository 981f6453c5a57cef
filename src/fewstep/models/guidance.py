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

    ``uncond`` is the conditioning of the negative (or empty) prompt: its embeddings, and for SDXL, SD3 and Flux
    its pooled embeddings too; tensors of batch 1 are broadcast to the batch. It may be left out only when the
    denoiser needs no conditioning (``inner.required_cond`` empty: an unconditional model, or one with a default
    null condition such as a class-conditional DiT's null label).
    """

    def __init__(self, inner: Denoiser, scale: float, *, uncond: Cond = None) -> None:
        if not isinstance(inner, Denoiser):
            raise TypeError(f"inner must be a Denoiser, got {type(inner).__name__}")
        if uncond is None and inner.required_cond:
            raise ValueError(f"ClassifierFreeGuidance needs uncond=: this denoiser has no default null condition and "
                             f"needs {list(inner.required_cond)} on every call; pass the negative (or empty) prompt's "
                             f"conditioning with those keys (its embeddings, and for SDXL/SD3/Flux its pooled "
                             f"embeddings too)")
        self.inner = inner
        self.scale = float(scale)
        self.uncond = uncond
        self.schedule = inner.schedule
        self.required_cond = inner.required_cond
        self.takes_tensor_time = inner.takes_tensor_time

    def for_run(self, run: Run) -> Denoiser:
        """One per-run copy of the inner denoiser per branch: a cache inside keeps the conditional and the
        unconditional branch's features apart (one shared state would hand the unconditional branch the
        conditional branch's features)."""
        cond_branch, uncond_branch = self.inner.for_run(run), self.inner.for_run(run)
        if cond_branch is self.inner and uncond_branch is self.inner:
            return self
        return _GuidedRun(self, cond_branch, uncond_branch)

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        return _guide(self.inner, self.inner, self.scale, self.uncond, x, t, cond)


def _guide(cond_branch: Denoiser, uncond_branch: Denoiser, scale: float, uncond: Cond, x: torch.Tensor, t: float,
           cond: Cond) -> torch.Tensor:
    x0_u = uncond_branch(x, t, uncond)
    if scale == 0.0:
        return x0_u
    x0_c = cond_branch(x, t, cond)
    return x0_u + scale * (x0_c - x0_u)


class _GuidedRun(Denoiser):
    """A run's guidance with a bound inner denoiser per branch."""

    def __init__(self, guidance: ClassifierFreeGuidance, cond_branch: Denoiser, uncond_branch: Denoiser) -> None:
        self.guidance, self.cond_branch, self.uncond_branch = guidance, cond_branch, uncond_branch
        self.schedule, self.required_cond = guidance.schedule, guidance.required_cond

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        g = self.guidance
        return _guide(self.cond_branch, self.uncond_branch, g.scale, g.uncond, x, t, cond)
