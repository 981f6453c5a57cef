"""Reuse policies: when an evaluation may reuse features, and how reused features are predicted.

- :func:`full_steps` / :class:`Scheduled`: full evaluations on a fixed set of steps (DeepCache, Faster
  Diffusion, TaylorSeer);
- :class:`FirstBlockThreshold`: per sample, reuse while the first block's residual has changed less than a
  threshold since that sample's last full evaluation (first-block cache);
- :class:`MagnitudeRatio`: reuse while the accumulated magnitude-ratio error of the skipped residual, read off a
  curve calibrated from one run, stays under a threshold (MagCache);
- :class:`Forecast`: what a reused feature is: the cached value (order 0) or its Taylor expansion from finite
  differences of the last full evaluations (TaylorSeer), per sample, at the sample's own clock (the time input
  of the network).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FirstBlockThreshold", "Forecast", "MagnitudeCurve", "MagnitudeRatio", "Scheduled", "full_steps"]

Streams = tuple[torch.Tensor | None, ...]


def full_steps(steps: int, interval: int, schedule: str = "uniform", *, power: float = 2.0) -> list[int]:
    """Steps computed in full out of ``steps`` step slots, about one in ``interval``.

    ``"uniform"``: ``0, interval, 2 interval, ...`` (DeepCache's uniform 1:N). ``"nonuniform"``: the same count of
    full steps placed at ``round((steps - 1) (i/m)^power)``, denser early, where features change fastest at few
    steps (the key-step placement of Faster Diffusion and DeepCache's non-uniform variant, without their tuned
    constants). Step 0 is always full; ``interval=1`` makes every step full."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an int >= 1, got {interval!r}")
    if schedule == "uniform":
        return list(range(0, steps, interval))
    if schedule != "nonuniform":
        raise ValueError(f"schedule must be 'uniform' or 'nonuniform', got {schedule!r}")
    m = max(1, math.ceil(steps / interval))
    out: list[int] = []
    for i in range(m):  # distinct, increasing
        pos = round((steps - 1) * (i / m) ** power)
        out.append(max(pos, out[-1] + 1) if out else 0)
    return [p for p in out if p < steps]


@dataclass(frozen=True)
class Scheduled:
    """Full evaluations on :func:`full_steps` (or the explicit ``full`` list), plus the first ``warmup`` steps.

    Steps are counted over every grid index of the run, the final grid time included: an evaluation at the last
    grid time (Heun's corrector onto ``t_min``, F-DDIM's look-ahead) has its own slot, so ``interval=1`` computes
    every evaluation."""

    interval: int = 3
    schedule: str = "uniform"
    warmup: int = 0
    full: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        full_steps(8, self.interval, self.schedule)  # validates
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")

    def full_set(self, slots: int) -> set[int]:
        """Full steps out of ``slots`` grid indices: the steps' own ``slots - 1`` by :func:`full_steps`, and the final
        grid time when the uniform pattern reaches it or when every step is full."""
        if self.full is not None:
            base = set(self.full) | {0}
        else:
            base = set(full_steps(max(slots - 1, 1), self.interval, self.schedule))
            last = slots - 1
            if self.interval == 1 or (self.schedule == "uniform" and last % self.interval == 0):
                base.add(last)
        return base | set(range(self.warmup))


@dataclass(frozen=True)
class FirstBlockThreshold:
    """Per-sample reuse from the first block's residual ``r``: reuse when
    ``mean|r - r_ref| / mean|r_ref| < threshold`` (``r_ref``: the sample's residual at its last full evaluation),
    after ``warmup`` steps and at most ``max_reuse`` evaluations in a row."""

    threshold: float = 0.05
    warmup: int = 1
    max_reuse: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not (isinstance(self.threshold, int | float)
                                                     and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold must be a number >= 0, got {self.threshold!r}")
        for name in ("warmup", "max_reuse"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def decide(self, r: torch.Tensor, ref: torch.Tensor | None, streak: torch.Tensor | None,
               step: int) -> torch.Tensor:
        batch = r.shape[0]
        if ref is None or ref.shape != r.shape or step < self.warmup or self.threshold == 0:
            return torch.zeros(batch, dtype=torch.bool, device=r.device)
        change = (r - ref).abs().flatten(1).mean(1) / ref.abs().flatten(1).mean(1).clamp_min(1e-12)
        return (change.cpu() < self.threshold) & (streak.cpu() < self.max_reuse)


@dataclass(frozen=True)
class MagnitudeCurve:
    """Mean token norm of the blocks' residual (output minus input of the block chain) against the network's
    time input, recorded on one uncached run (:func:`fewstep.caching.magnitude_curve`)."""

    clocks: tuple[float, ...]
    norms: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.clocks) != len(self.norms) or len(self.clocks) < 2:
            raise ValueError("a magnitude curve needs at least two (clock, norm) points")
        if not all(math.isfinite(c) for c in self.clocks) or not all(math.isfinite(n) and n > 0
                                                                       for n in self.norms):
            raise ValueError("a magnitude curve needs finite clocks and positive finite norms")

    def log_norm(self, clock: float) -> float:
        """``log`` of the norm at ``clock``, linear between recorded points, flat beyond them."""
        pts = sorted(zip(self.clocks, self.norms, strict=True))
        if clock <= pts[0][0]:
            return math.log(pts[0][1])
        if clock >= pts[-1][0]:
            return math.log(pts[-1][1])
        for (c0, n0), (c1, n1) in zip(pts, pts[1:], strict=False):
            if c0 <= clock <= c1:
                w = 0.0 if c1 == c0 else (clock - c0) / (c1 - c0)
                return (1 - w) * math.log(n0) + w * math.log(n1)
        return math.log(pts[-1][1])  # pragma: no cover

    def ratio(self, a: float, b: float) -> float:
        """Magnitude ratio of the residual at clock ``b`` to that at clock ``a``."""
        return math.exp(self.log_norm(b) - self.log_norm(a))


@dataclass(frozen=True)
class MagnitudeRatio:
    """MagCache's rule: after the first ``retention`` share of the steps, skip while the accumulated error
    ``sum_k |1 - prod_{j<=k} gamma_j|`` of the magnitude ratios ``gamma`` between consecutive evaluations
    (read off ``curve``) stays under ``threshold`` and at most ``max_skip`` evaluations in a row."""

    curve: MagnitudeCurve
    threshold: float = 0.06
    max_skip: int = 3
    retention: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.curve, MagnitudeCurve):
            raise TypeError("curve must be a MagnitudeCurve (fewstep.caching.magnitude_curve records one)")
        if isinstance(self.threshold, bool) or not (isinstance(self.threshold, int | float)
                                                     and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold must be a number >= 0, got {self.threshold!r}")
        if isinstance(self.max_skip, bool) or not isinstance(self.max_skip, int) or self.max_skip < 0:
            raise ValueError(f"max_skip must be an int >= 0, got {self.max_skip!r}")
        if not 0.0 <= self.retention <= 1.0:
            raise ValueError(f"retention must be in [0, 1], got {self.retention!r}")


class MagnitudeState:
    """One branch's accumulators for :class:`MagnitudeRatio`."""

    def __init__(self, rule: MagnitudeRatio) -> None:
        self.rule = rule
        self.ratio, self.error, self.skips = 1.0, 0.0, 0
        self.last: float | None = None

    def skip(self, step: int, slots: int, clock: float, ready: bool) -> bool:
        last, self.last = self.last, clock
        rule = self.rule
        if not ready or last is None or step < rule.retention * slots or rule.threshold == 0:
            self.reset()
            return False
        self.ratio *= rule.curve.ratio(last, clock)
        self.error += abs(1.0 - self.ratio)
        self.skips += 1
        if self.error < rule.threshold and self.skips <= rule.max_skip:
            return True
        self.reset()
        return False

    def reset(self) -> None:
        self.ratio, self.error, self.skips = 1.0, 0.0, 0


class Forecast:
    """A reused feature of each sample (a tuple of streams): its value at the sample's last full evaluation
    (``order=0``), or the Taylor expansion ``sum_i D_i (c - c_k)^i / i!`` with ``D_0`` the last value and
    ``D_{i+1} = (D_i - D_i^prev) / (c_k - c_prev)`` the finite differences of successive full evaluations, at
    the network's time input ``c`` (TaylorSeer). A sample with fewer full evaluations than ``order + 1`` uses the
    terms it has.

    References: *From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers* (Liu et al.,
    ICCV 2025)."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.terms: list[list[torch.Tensor | None]] | None = None  # terms[i][stream]: (B, ...)
        self.clock: torch.Tensor | None = None  # (B,) float64
        self.have: torch.Tensor | None = None  # (B,) number of terms known

    def ready(self, batch: int) -> bool:
        return self.have is not None and self.have.shape[0] == batch and bool((self.have > 0).all())

    def ready_rows(self, batch: int) -> torch.Tensor | None:
        return None if self.have is None or self.have.shape[0] != batch else self.have > 0

    def update(self, index: torch.Tensor | None, value: Streams, clock: torch.Tensor, batch: int) -> None:
        """Record the features ``value`` of the samples ``index`` (all when ``None``) at clocks ``clock[index]``.
        A sample evaluated again at the clock of its last record (Heun's corrector and the next step's predictor
        share a time) has its value refreshed and its differences kept: a zero-width difference is no derivative."""
        if self.terms is None or self.have is None or self.have.shape[0] != batch:
            self.terms = [[None if v is None else _zeros_full(v, batch, self._dtype(v)) for v in value]
                          for _ in range(self.order + 1)]
            self.clock = torch.zeros(batch, dtype=torch.float64)
            self.have = torch.zeros(batch, dtype=torch.long)
        assert self.clock is not None
        rows = torch.arange(batch) if index is None else index.cpu()
        have, c_new = self.have[rows], clock.cpu()[rows]
        dt = c_new - self.clock[rows]
        fresh = (dt.abs() > 1e-9 * c_new.abs().clamp_min(1.0)) | (have == 0)
        step = torch.where(fresh, dt, torch.ones_like(dt))
        new = list(value)
        for i in range(self.order + 1):
            for s, v in enumerate(new):
                term = self.terms[i][s]
                if v is None or term is None:
                    continue
                v = v.to(term.dtype)
                prev = term[rows]
                shape = (-1, *([1] * (v.ndim - 1)))
                write = fresh.to(v.device).reshape(shape) if i > 0 else None
                term[rows] = v if write is None else torch.where(write, v, prev)
                if i < self.order:  # the next term: a finite difference, where the sample has term i already
                    scale = (1.0 / step).to(device=v.device, dtype=v.dtype).reshape(shape)
                    known = (have > i).to(v.device).reshape(shape)
                    diff = (v - prev) * scale
                    new[s] = torch.where(known, diff, torch.zeros_like(diff))
        self.have[rows] = torch.where(fresh, torch.clamp(have + 1, max=self.order + 1), torch.clamp(have, min=1))
        self.clock[rows] = torch.where(fresh, c_new, self.clock[rows])

    def _dtype(self, v: torch.Tensor) -> torch.dtype:
        """Taylor tables in float32 at least: ``(c - c_k)^2 / 2`` reaches 5e5 on a 0-1000 clock (float16 max
        6.5e4). Plain reuse (order 0) keeps the features' own dtype, exactly."""
        if self.order == 0 or v.dtype == torch.float64:
            return v.dtype
        return torch.float32

    def predict(self, index: torch.Tensor | None, clock: torch.Tensor, like: Streams | None = None) -> Streams:
        """The forecast features of the samples ``index`` (all when ``None``) at clocks ``clock[index]``, new
        tensors in the features' own dtype (the network may change what it gets in place)."""
        assert self.terms is not None and self.have is not None and self.clock is not None
        rows: Any = slice(None) if index is None else index.cpu()
        out: list[torch.Tensor | None] = [None if v is None else v[rows].clone() for v in self.terms[0]]
        if self.order > 0:
            dt = clock.cpu()[rows] - self.clock[rows]
            have = self.have[rows]
            for i in range(1, self.order + 1):
                coeff = torch.where(have > i, dt ** i / math.factorial(i), torch.zeros_like(dt))
                if not bool((coeff != 0).any()):
                    continue
                for s, v in enumerate(self.terms[i]):
                    if v is None or out[s] is None:
                        continue
                    term = v[rows]
                    out[s] = out[s] + coeff.to(device=term.device, dtype=term.dtype).reshape(
                        -1, *([1] * (term.ndim - 1))) * term
        if like is not None:
            out = [o if (o is None or x is None) else o.to(x.dtype) for o, x in zip(out, like, strict=True)]
        return tuple(out)


def _zeros_full(v: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((batch, *v.shape[1:]), dtype=dtype, device=v.device)


def as_tuple(values: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(sorted({int(s) for s in values}))
