"""Bottleneck sampling (high - low - high resolution) on the zoo UNet: FD and cost next to plain sampling.

    python benchmarks/bottleneck.py [--model unet_mr] [--steps 20]

``unet_mr`` is trained on 8x8 digits and their 4x4 average-pooled versions; ``unet_m`` (8x8 only) shows what
happens with a single-resolution model.
"""

from __future__ import annotations

import argparse

import torch

from fewstep import sample, zoo
from fewstep.bench import DigitsFD
from fewstep.bottleneck import bottleneck_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_mr")
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    den = zoo.load(args.model)
    fd = DigitsFD()
    base = sample(den, args.solver, args.steps, shape=(1, 8, 8), seeds="0-255", grid="time_quadratic")
    print(f"{args.model}, {args.solver}, {args.steps} steps, 256 samples; FD floor {fd.floor(256):.2f}\n")
    print("| stages (low from, to) | shift | NFE | cost (full-res evals) | FD |")
    print("|---|---|---|---|---|")
    print(f"| plain | - | {args.steps} | {args.steps} | {fd(base):.2f} |")
    for n in (8, 10, 14):
        fewer = sample(den, args.solver, n, shape=(1, 8, 8), seeds="0-255", grid="time_quadratic")
        print(f"| plain, fewer steps | - | {n} | {n} | {fd(fewer):.2f} |")
    for stages in ((0.2, 0.8), (0.1, 0.5), (0.05, 0.4), (0.1, 0.3)):
        for shift in (1.0, 4.0, 16.0):
            r = bottleneck_sample(den, args.solver, args.steps, shape=(1, 8, 8), seeds="0-255", stages=stages,
                                  shift=shift)
            print(f"| {stages} | {shift} | {r.nfe} | {r.cost:.2f} | {fd(r.samples):.2f} |")


if __name__ == "__main__":
    main()
