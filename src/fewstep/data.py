"""Real data sets, offline: sklearn's bundled 8x8 digits (no download).

One loader for every consumer: the zoo trains on it, :mod:`fewstep.bench` measures FD against it, the analytic
``digits`` mixture is built from it. It depends on nothing else in fewstep.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["digits_tensor"]


def digits_tensor(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(N, 1, 8, 8)`` in [-1, 1] (pixel values 0-16 map to ``v / 8 - 1``, exact in any float
    dtype), and their labels (int64)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float64) / 8.0 - 1.0).to(dtype)[:, None]
    return x, torch.from_numpy(d.target.astype(np.int64))
