"""``fewstep fd``: the Frechet distance of a shard folder of digits samples, one shard in memory at a time."""

from __future__ import annotations

import argparse
from pathlib import Path

from fewstep.cli.common import Subparsers
from fewstep.metrics import DigitsFD
from fewstep.shards import MANIFEST, read_manifest


def add_parser(sub: Subparsers) -> None:
    fdp = sub.add_parser("fd", help="Frechet distance of a shard folder of digits samples, one shard in memory",
                         description="The FD of a folder written by fewstep sample --out DIR (8x8 digits models) "
                                     "against the real digits, in the shipped classifier's features, accumulated "
                                     "shard by shard (equal to the in-memory FD to float64 round-off). Example: "
                                     "fewstep fd samples")
    fdp.add_argument("folder", help="a shard folder (with manifest.json)")
    fdp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"{folder} is not a shard folder (no {MANIFEST}); write one with fewstep sample --out DIR")
    try:
        shape = read_manifest(folder)["run"]["shape"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{folder / MANIFEST} is not a fewstep shard manifest") from None
    if list(shape) != [1, 8, 8]:
        raise ValueError(f"the digits FD takes 1x8x8 samples; {folder} holds {'x'.join(map(str, shape))}")
    fd = DigitsFD()
    value, n = fd.of_shards(folder)
    floor = fd.floor(min(n, 898))
    print(f"FD {value:.4f} over {n} samples (real digits against real digits at n={min(n, 898)}: {floor:.4f})")
    return 0
