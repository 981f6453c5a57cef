"""Per-sample seeded noise: sample k sees the same draws whatever the batch size."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["MAX_SEEDS", "SampleNoise", "parse_seeds"]


class SampleNoise:
    """One ``torch.Generator`` per sample, seeded with that sample's seed (as EDM's ``StackedRandomGenerator``).

    Draws happen in a fixed order — the initial noise first, then one standard normal per stochastic step —
    so a run is reproducible and sample ``k`` is identical in a batch of 1, 7 or 64. Generators live on the
    CPU and the draws are moved to ``device``; created inside ``sample()``, never shared between runs.
    """

    def __init__(self, seeds: Sequence[int], sample_shape: Sequence[int], *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if len(seeds) == 0:
            raise ValueError("seeds must not be empty")
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.sample_shape = tuple(sample_shape)
        self.device, self.dtype = device, dtype

    def draw(self) -> torch.Tensor:
        """The next standard-normal tensor of shape ``(len(seeds), *sample_shape)``."""
        out = torch.stack([torch.randn(self.sample_shape, generator=g, dtype=torch.float64)
                           for g in self.generators])
        return out.to(device=self.device, dtype=self.dtype)


MAX_SEEDS = 1_000_000
"""The most seeds one call takes: a larger range is almost surely a typo, and its list alone would exhaust memory."""

_SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes non-negative seeds below 2**64; keep to int64


def _check_count(count: int, spec: object) -> None:
    if count > MAX_SEEDS:
        raise ValueError(f"seeds {spec!r} name {count:,} samples; at most {MAX_SEEDS:,} per run")


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """``"0-63"``, ``"1,5,9"``, ``"0-3,10"``, an int ``n`` (seeds ``0..n-1``) or a list -> list of seeds.

    Seeds are non-negative integers below 2**63 (as on the command line); at most :data:`MAX_SEEDS` of them.
    """
    if isinstance(spec, bool):
        raise TypeError("seeds must be a range string, an int or a list of ints")
    if isinstance(spec, int | np.integer):
        if spec < 1:
            raise ValueError(f"need at least one seed, got {spec}")
        _check_count(int(spec), spec)
        return list(range(int(spec)))
    if isinstance(spec, str):
        ranges: list[tuple[int, int]] = []
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
                raise ValueError(f"bad seed range {spec!r}: expected e.g. '0-63' or '1,5,9'")
            first = int(match[1])
            ranges.append((first, int(match[2] or first)))
        if max(last for _, last in ranges) >= _SEED_LIMIT:
            raise ValueError(f"bad seed range {spec!r}: seeds must be below 2**63")
        _check_count(sum(last - first + 1 for first, last in ranges), spec)
        return [s for first, last in ranges for s in range(first, last + 1)]
    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    try:
        items = list(spec)
    except TypeError:
        raise TypeError(f"seeds must be a range string, an int or a list of ints, got {type(spec).__name__}") from None
    if not items:
        raise ValueError("seeds must not be empty")
    _check_count(len(items), f"list of {len(items)}")
    bad = [s for s in items if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= s < _SEED_LIMIT]
    if bad:
        raise ValueError(f"seeds must be non-negative integers below 2**63, got {bad[0]!r}")
    return [int(s) for s in items]
