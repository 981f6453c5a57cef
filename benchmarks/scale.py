"""Scale: throughput of 1 vs 2 processes (torchrun, one thread each) and peak memory against the seed count at a
fixed batch size, on ``fewstep sample`` writing shard folders.

Each measurement is a fresh process tree; wall time includes process start and model loading (a few seconds),
and the sampling rate printed by ``fewstep sample`` itself is reported beside it. Peak RSS is the largest resident
set of the processes of one command (ru_maxrss of its children). Runs one command at a time.

    python benchmarks/scale.py [--model unet_m] [--steps 20] [--seeds 4096] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from fewstep.shards import read_shards

_MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)")


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) of the command's processes, and its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_KB")) / 1024
    return wall, peak, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-rss", action="store_true", help="the throughput part only")
    args = parser.parse_args()
    sample = ["-m", "fewstep", "sample", "--model", args.model, "--solver", "dpmpp_2m", "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"## Throughput: {args.seeds} seeds, {args.model}, {args.steps} steps, batch {args.batch_size}\n")
        print("| processes | wall s | samples/s (wall) | samples/s while sampling (rank 0 x processes) | "
              "peak RSS per process MB |")
        print("|---|---|---|---|---|")
        rates: dict[int, float] = {}
        inner: dict[int, float] = {}
        for n in (1, 2):
            out = f"{tmp}/p{n}"
            seeds = ["--seeds", f"0-{args.seeds - 1}", "--out", out]
            cmd = [sys.executable, *sample, *seeds] if n == 1 else [
                "torchrun", "--standalone", f"--nproc-per-node={n}", *sample, *seeds]
            wall, peak, out = measure(cmd)
            rates[n] = args.seeds / wall
            inner[n] = n * float(re.search(r"([0-9.]+) samples/s per process", out).group(1))
            print(f"| {n} | {wall:.1f} | {rates[n]:.0f} | {inner[n]:.0f} | {peak:.0f} |", flush=True)
        one, two = (np.concatenate([x for _, x in read_shards(f"{tmp}/p{n}")]) for n in (1, 2))
        print(f"\n2 processes / 1: {rates[2] / rates[1]:.2f}x in wall time (process start and model loading "
              f"included), {inner[2] / inner[1]:.2f}x while sampling; samples bit-identical: "
              f"{np.array_equal(one, two)}\n")
        if args.skip_rss:
            return
        print(f"## Peak RSS against the seed count (batch {args.batch_size}, one process)\n")
        print("| seeds | wall s | peak RSS MB |")
        print("|---|---|---|")
        for count in (64, 1024, 16384):
            wall, peak, _ = measure([sys.executable, *sample, "--seeds", f"0-{count - 1}",
                                     "--out", f"{tmp}/rss{count}"])
            print(f"| {count} | {wall:.1f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
