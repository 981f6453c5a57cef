"""Quality and cost metrics, all offline.

* :func:`rmse_per_sample` — error against a high-accuracy reference from the same starting noise.
* :class:`DigitsFD` — Fréchet distance in the 64-d penultimate features of the shipped digits classifier
  (Inception FID is impossible offline), with its real-vs-real floor.
* :func:`sliced_wasserstein` — sliced 2-Wasserstein distance in pixel space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["DigitsFD", "frechet_distance", "rmse_per_sample", "sliced_wasserstein"]


def rmse_per_sample(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Root-mean-square error of each sample against the reference, shape ``(B,)``."""
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    return ((x.double() - ref.double()) ** 2).flatten(1).mean(1).sqrt()


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` of two Gaussians (scipy's ``sqrtm``; the tiny imaginary
    part that round-off gives is dropped)."""
    import scipy.linalg  # slow to import; only FD needs it

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        eps = np.eye(cov1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def _stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(0), np.cov(feats, rowvar=False)


class DigitsFD:
    """FD of generated digits against half of the real digits, in the shipped classifier's feature space.

    The 1797 real digits are split once (fixed seed) into halves A (898) and B (899). Samples are compared with B;
    the floor is the FD of ``n`` digits drawn from A against B — the same estimator on real data at the same
    sample size, so ``fd / floor`` near 1 means "as good as real data at this N".
    """

    def __init__(self) -> None:
        from fewstep.data import digits_tensor
        from fewstep.zoo import load_classifier

        self.classifier = load_classifier()
        data, _ = digits_tensor()
        perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0))
        self.half_a, self.half_b = data[perm[:898]], data[perm[898:]]
        self.mu_b, self.cov_b = _stats(self.features(self.half_b))

    def features(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.classifier.features(x.float().clamp(-1, 1).reshape(-1, 1, 8, 8)).double().numpy()

    def __call__(self, samples: torch.Tensor) -> float:
        mu, cov = _stats(self.features(samples))
        return frechet_distance(mu, cov, self.mu_b, self.cov_b)

    def of_shards(self, folder: str | Path) -> tuple[float, int]:
        """The FD of a shard folder's samples (:mod:`fewstep.shards`), its feature moments accumulated one shard
        at a time: equal to the FD of the same features' moments taken at once up to float64 round-off (the
        classifier's float32 features of a sample may differ in the last bits with the batch it is in). Returns it
        and the count."""
        from fewstep.shards import folder_moments

        moments, n = folder_moments(folder, self.features)
        mu, cov = moments.stats()
        return frechet_distance(mu, cov, self.mu_b, self.cov_b), n

    def floor(self, n: int, *, repeats: int = 3) -> float:
        """Mean FD of ``n`` real digits from half A against half B over ``repeats`` draws."""
        if not 2 <= n <= self.half_a.shape[0]:
            raise ValueError(f"the floor needs 2 <= n <= {self.half_a.shape[0]}, got {n}")
        g = torch.Generator().manual_seed(1)
        vals = [self(self.half_a[torch.randperm(self.half_a.shape[0], generator=g)[:n]]) for _ in range(repeats)]
        return float(np.mean(vals))

    def classify(self, samples: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier(samples.float().clamp(-1, 1)).softmax(-1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two point clouds (flattened), with ``projections`` random
    directions; unequal sizes are compared through interpolated quantiles."""
    x, y = a.flatten(1).double(), b.flatten(1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError("point clouds must have the same dimension")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(0).values, (y @ dirs).sort(0).values
    n = max(px.shape[0], py.shape[0])
    q = torch.linspace(0, 1, n, dtype=torch.float64)

    def quantiles(p: torch.Tensor) -> torch.Tensor:
        if p.shape[0] == n:
            return p
        pos = q * (p.shape[0] - 1)
        lo = pos.floor().long().clamp(max=p.shape[0] - 2)
        w = (pos - lo)[:, None]
        return p[lo] * (1 - w) + p[lo + 1] * w

    return float(((quantiles(px) - quantiles(py)) ** 2).mean().sqrt())
