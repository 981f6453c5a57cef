"""Sampling output as a folder of shards: bounded memory, resumable, shared by many processes.

A shard folder holds ``manifest.json`` (what run it is, its seeds and how they are cut) and one ``shard_NNNNN.npz``
per batch of ``batch_size`` seeds (``samples``, ``seeds``, ``nfe``), each written atomically. A run that stops
leaves only whole shards; run again with the same folder and it skips them. Processes share the work by shard
index (``index % world == rank``), and since sample ``k`` depends only on its seed and its shard's batch, the union
is the same, bit for bit, whatever the number of processes. :func:`write_samples` writes the single file of a run
instead: an ``.npz`` (as one shard) or a PNG image grid.

:class:`StreamingMoments` gives the mean and covariance of features shard by shard (Chan, Golub and LeVeque's
pairwise update, float64), so an FD over 50k samples needs the memory of one shard.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fewstep.hooks import NFECounter
from fewstep.outputs import atomic_write, save_grid
from fewstep.plan import cut_cond

__all__ = ["FORMAT", "ShardFolder", "StreamingMoments", "read_manifest", "read_shards", "save_samples",
           "write_samples"]

FORMAT = "fewstep.shards/1"
MANIFEST = "manifest.json"


@dataclass
class ShardFolder:
    """The shards of one run in ``folder``: ``seeds`` cut into batches of ``batch_size``; ``run`` is what makes
    two runs the same (the plan, the conditioning, the shape), as JSON data."""

    folder: Path
    seeds: list[int]
    batch_size: int
    run: Mapping[str, Any]

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.seeds = [int(s) for s in self.seeds]
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be an int >= 1, got {self.batch_size!r}")
        if not self.seeds:
            raise ValueError("a shard folder needs at least one seed")

    @property
    def count(self) -> int:
        return -(-len(self.seeds) // self.batch_size)

    def shard_seeds(self, index: int) -> list[int]:
        return self.seeds[index * self.batch_size:(index + 1) * self.batch_size]

    def path(self, index: int) -> Path:
        return self.folder / f"shard_{index:05d}.npz"

    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "run": json.loads(json.dumps(dict(self.run))), "seeds": self.seeds,
                "batch_size": self.batch_size, "shards": [self.path(i).name for i in range(self.count)]}

    def prepare(self) -> int:
        """Create the folder and its manifest, or check that an existing one is this run's (then it resumes).
        Returns the number of shards already done. Every process may call it: the manifest is the same."""
        want = self.manifest()
        existing = self.folder / MANIFEST
        self._await_manifest(existing)
        if existing.is_file():
            try:
                have = json.loads(existing.read_text())
            except (OSError, ValueError) as err:
                raise ValueError(f"{existing} is not a readable shard manifest ({err})") from None
            if have != want:
                diff = sorted(k for k in want if have.get(k) != want.get(k)) if isinstance(have, dict) else ["all"]
                raise ValueError(f"{self.folder} holds the shards of another run (its {', '.join(diff)} differ); "
                                 f"use a new folder or remove it")
        else:
            if self.folder.exists() and any(self.folder.iterdir()):
                raise ValueError(f"{self.folder} is not empty and has no {MANIFEST}: not a shard folder")
            self.folder.mkdir(exist_ok=True)
            text = json.dumps(want) + "\n"
            atomic_write(existing, lambda f: f.write(text.encode()))
        return sum(self.done(i) for i in range(self.count))

    def _await_manifest(self, existing: Path, *, timeout: float = 10.0) -> None:
        """Wait while another process of the same run is writing the manifest: the folder then holds only the
        manifest's temporary file (``atomic_write``'s ``.manifest.json.*.tmp``), and is not a foreign folder."""
        deadline = time.monotonic() + timeout
        while not existing.is_file() and self.folder.is_dir() and time.monotonic() < deadline:
            names = [p.name for p in self.folder.iterdir()]
            if not names or not all(n.startswith(f".{MANIFEST}.") and n.endswith(".tmp") for n in names):
                return
            time.sleep(0.05)

    def done(self, index: int) -> bool:
        """Whether shard ``index`` is written whole (its file loads and holds its seeds)."""
        path = self.path(index)
        if not path.is_file():
            return False
        try:
            with np.load(path) as data:
                return data["seeds"].tolist() == self.shard_seeds(index) and "samples" in data
        except (OSError, ValueError, KeyError, EOFError):
            return False  # a torn file from another writer cannot exist (atomic), but a foreign one may

    def clean(self) -> int:
        """Remove the temporary files of shards whose writer was killed mid-write (call it while no process
        writes: before the run starts); returns how many."""
        stale = list(self.folder.glob(".shard_*.npz.*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        """The shards process ``rank`` of ``world`` has left to do."""
        return [i for i in range(rank, self.count, world) if not self.done(i)]

    def write(self, index: int, samples: np.ndarray, nfe: int) -> Path:
        seeds = self.shard_seeds(index)
        if samples.shape[0] != len(seeds):
            raise ValueError(f"shard {index} has {len(seeds)} seeds, got {samples.shape[0]} samples")
        return save_samples(self.path(index), samples, seeds, nfe)


def save_samples(path: str | os.PathLike, samples: np.ndarray, seeds: Sequence[int], nfe: int) -> Path:
    """``samples``, their ``seeds`` and the ``nfe`` per sample as one ``.npz``, written atomically: a shard, or the
    single file of ``fewstep sample --out x.npz``."""
    arrays = {"samples": samples, "seeds": np.array(seeds), "nfe": np.array(nfe)}
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def write_samples(path: str | os.PathLike, samples: torch.Tensor, seeds: Sequence[int], nfe: int) -> Path:
    """The single file of ``fewstep sample --out``: an ``.npz`` of ``samples``, their ``seeds`` and the ``nfe``
    (:func:`save_samples`), or for any other suffix a PNG grid (:func:`save_grid`), written atomically."""
    if Path(path).suffix == ".npz":
        return save_samples(path, samples.cpu().numpy(), seeds, nfe)
    return save_grid(path, samples.cpu())


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a shard folder (:meth:`ShardFolder.manifest`), or a one-line ``ValueError``."""
    manifest = Path(folder) / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder} is not a shard folder ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{manifest} is not a fewstep shard manifest")
    return data


def read_shards(folder: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(seeds, samples)`` of each shard of a complete shard folder, in seed order; a missing shard raises."""
    folder = Path(folder)
    data = read_manifest(folder)
    missing = [name for name in data["shards"] if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is incomplete: {len(missing)} of {len(data['shards'])} shards missing "
                         f"(first {missing[0]}); run the same command again to finish it")
    for name in data["shards"]:
        with np.load(folder / name) as shard:
            yield shard["seeds"], shard["samples"]


class StreamingMoments:
    """Mean and covariance of rows added in batches, merged pairwise in float64 (Chan, Golub & LeVeque, *Algorithms
    for computing the sample variance*, 1983): equal to ``np.cov`` of all rows at once up to round-off."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None  # sum of outer products of deviations from the mean

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"add takes a non-empty (n, d) array, got shape {rows.shape}")
        m = rows.shape[0]
        mean_b = rows.mean(0)
        dev = rows - mean_b
        scatter_b = dev.T @ dev
        if self.mean is None:
            self.n, self.mean, self.scatter = m, mean_b, scatter_b
            return
        if rows.shape[1] != self.mean.shape[0]:
            raise ValueError(f"rows of {rows.shape[1]} features after rows of {self.mean.shape[0]}")
        n = self.n + m
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (m / n)
        self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (self.n * m / n)
        self.n = n

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, covariance)`` with ``n - 1`` in the denominator, as ``np.cov``."""
        if self.mean is None or self.n < 2:
            raise ValueError("a covariance needs at least 2 rows")
        return self.mean, self.scatter / (self.n - 1)


def folder_moments(folder: str | os.PathLike, features: Any) -> tuple[StreamingMoments, int]:
    """The streaming moments of ``features(samples)`` (a callable to ``(n, d)`` arrays) over a complete shard
    folder, one shard in memory at a time; returns them and the number of samples."""
    moments = StreamingMoments()
    for _, samples in read_shards(folder):
        moments.add(features(torch.from_numpy(samples)))
    return moments, moments.n


def run_shards(sampler: Any, shards: ShardFolder, *, cond: Any = None, rank: int = 0, world: int = 1,
               hooks: Sequence[Any] = (), progress: bool = False) -> tuple[int, int]:
    """Sample this process's pending shards with ``sampler`` (a :class:`fewstep.plan.Sampler`), each written as it
    is done; ``cond`` with one row per seed is cut per shard. ``progress``: a bar over samples. Returns the number
    of shards written and the NFE per sample."""
    pending = shards.pending(rank, world)
    counter = NFECounter()
    bar = None
    if progress:
        bar = tqdm(total=sum(len(shards.shard_seeds(i)) for i in pending), unit="sample",
                   desc=f"rank {rank}" if world > 1 else "sampling")
    n = len(shards.seeds)
    for i in pending:
        ids = shards.shard_seeds(i)
        start = i * shards.batch_size
        x = sampler.sample(seeds=ids, cond=cut_cond(cond, n, start, start + len(ids)), hooks=[counter, *hooks])
        shards.write(i, x.detach().cpu().numpy(), counter.nfe)
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
    return len(pending), counter.nfe
