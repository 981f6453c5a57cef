"""Error-compensating weight rounding (GPTQ) with Hessians gathered over the sampling trajectory.

Rounding each weight to its nearest grid point minimizes the weight error, not the layer's output error. GPTQ
(*GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers*, Frantar et al., ICLR 2023;
after *Optimal Brain Compression*, Frantar & Alistarh, NeurIPS 2022) rounds the columns of ``W`` (one per input
feature) one at a time and moves the error of each onto the columns not yet rounded, so as to minimize

    || W X - Q X ||^2 = tr((W - Q) H (W - Q)^T),    H = X X^T / n

over the calibration inputs ``X`` of the layer. With ``H^-1 = U^T U`` (``U`` upper triangular Cholesky factor),
rounding column ``i`` to ``q_i`` and updating ``W[:, j] -= (w_i - q_i) / U_ii * U_ij`` for ``j > i`` is the
optimal compensation of the not-yet-rounded columns (the paper's Algorithm 1; we process blocks of columns with
lazy batch updates, and take columns in order of decreasing ``H_ii``, the paper's "act-order", since the grid is
fixed per output channel before rounding starts and the order changes no scale).

For a diffusion network ``X`` are the layer's inputs at every network evaluation of the float model's own sampling
run (:func:`fewstep.quant.calibrate`, ``hessians=True``): the same timestep-aware calibration set as the
activation ranges, so the rounding is compensated for the inputs of every time the sampler visits. A convolution's
columns are its unfolded input patches (``F.unfold``: channel-major, then kernel rows and columns, the order of
``weight.flatten(1)``).

The grid is given: per-element scales ``S`` (rows x columns, the per-output-channel and per-part scales expanded)
and a rounding function on ``(values, scales)``. So the scales, the format, and therefore the stored codes are
exactly those of round-to-nearest; only which grid point each weight takes changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DAMP", "gptq_round"]

DAMP = 0.01
"""Dampening of the Hessian's diagonal, as a fraction of its mean (the paper's default, for numerical stability)."""

BLOCK = 128
"""Columns rounded between two updates of the remaining columns (the paper's lazy batch size)."""


def gptq_round(w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor,
               rnd: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, damp: float = DAMP,
               act_order: bool = True) -> torch.Tensor:
    """``w`` (rows x columns, any float dtype) rounded by ``rnd(values, scales)`` column by column with GPTQ's error
    compensation under ``hessian`` (columns x columns, the mean ``x x^T`` of the layer's inputs); returned in
    ``w``'s dtype and shape. ``scales`` broadcasts to ``w`` (per element, or rows x 1).

    A column the calibration never fed (``H_ii = 0``) is rounded to nearest and moves no error. With a diagonal
    Hessian nothing moves, so the result equals round-to-nearest exactly.
    """
    if w.ndim != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"gptq_round needs a rows x columns weight and a columns x columns Hessian, got "
                         f"{tuple(w.shape)} and {tuple(hessian.shape)}")
    cols = w.shape[1]
    W = w.detach().double().clone()  # noqa: N806  (the paper's names)
    S = torch.broadcast_to(scales.detach().double(), W.shape).clone()  # noqa: N806
    H = hessian.detach().double().clone().to(W.device)  # noqa: N806
    diag = torch.diagonal(H)
    dead = diag <= 0
    diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(cols, device=W.device)
    W, S, H = W[:, perm], S[:, perm], H[perm][:, perm]  # noqa: N806
    H += damp * float(torch.diagonal(H).mean()) * torch.eye(cols, dtype=H.dtype, device=H.device)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # noqa: N806
    except torch.linalg.LinAlgError:  # not positive definite even dampened: nothing reliable to compensate with
        return rnd(w.detach().double(), torch.broadcast_to(scales.detach().double(), w.shape)).to(w.dtype)
    Q = torch.empty_like(W)  # noqa: N806
    for a in range(0, cols, BLOCK):
        b = min(a + BLOCK, cols)
        W1, U1 = W[:, a:b].clone(), U[a:b, a:b]  # noqa: N806
        E1 = torch.empty_like(W1)  # noqa: N806
        for i in range(b - a):
            q = rnd(W1[:, i], S[:, a + i])
            Q[:, a + i] = q
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i + 1:] -= err[:, None] * U1[i, i + 1:][None, :]
            E1[:, i] = err
        W[:, b:] -= E1 @ U[a:b, b:]
    return Q[:, torch.argsort(perm)].to(w.dtype)
