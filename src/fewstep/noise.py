"""Per-sample seeded noise: sample k sees the same draws whatever the batch size."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

__all__ = ["SampleNoise", "parse_seeds"]


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


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """``"0-63"``, ``"1,5,9"``, ``"0-3,10"``, an int ``n`` (seeds ``0..n-1``) or a list -> list of seeds."""
    if isinstance(spec, bool):
        raise TypeError("seeds must be a range string, an int or a list of ints")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"need at least one seed, got {spec}")
        return list(range(spec))
    if isinstance(spec, str):
        seeds: list[int] = []
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
                raise ValueError(f"bad seed range {spec!r}: expected e.g. '0-63' or '1,5,9'")
            first = int(match[1])
            seeds.extend(range(first, int(match[2] or first) + 1))
        return seeds
    seeds = [int(s) for s in spec]
    if not seeds:
        raise ValueError("seeds must not be empty")
    return seeds
