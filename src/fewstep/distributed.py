"""Many processes with torchrun: each process takes its share of the shards (or experiments) by rank.

``torchrun --nproc-per-node N -m fewstep sample ... --out DIR`` starts N processes with ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` set; :func:`process_group` joins them (gloo on CPU, NCCL on CUDA, one GPU per local rank) only to
wait for one another at the end. Work is split without messages: shard ``i`` belongs to rank ``i % world``, and
every shard is a file written atomically, so a rank that dies leaves whole shards and a rerun finishes the rest.
Across machines, torchrun's usual rendezvous (``--nnodes``, ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT``)
gives the same environment; the output folder must then be on a filesystem every machine sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["barrier", "process_group", "world"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment; ``(0, 1)`` without it."""
    try:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError("RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={size})")
    return rank, size


@contextmanager
def process_group(device: str = "cpu") -> Iterator[tuple[int, int]]:
    """Join torchrun's process group for the duration (a no-op in one process); yields ``(rank, world)``. On
    leaving without error, every process waits for the others, so rank 0 can then report on the whole run."""
    rank, size = world()
    if size == 1:
        yield rank, size
        return
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield rank, size
        dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process of the group (nothing in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
