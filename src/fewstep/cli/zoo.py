"""``fewstep zoo``: retrain a shipped model, or measure it into its card."""

from __future__ import annotations

import argparse
from pathlib import Path

from fewstep.bench.cards import evaluate
from fewstep.cli.common import Subparsers, positive_int
from fewstep.zoo.train import train


def add_parser(sub: Subparsers) -> None:
    zoo = sub.add_parser("zoo", help="the model zoo")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    tr = zoo_sub.add_parser("train", help="retrain a shipped model on sklearn digits (reproducible)")
    tr.add_argument("name", help="model name (unet_s, unet_m, unet_l, unet_v, unet_flow, classifier)")
    tr.add_argument("--out", type=Path, default=None, help="output folder (default: the package's weights)")
    tr.add_argument("--iters", type=positive_int, default=None,
                    help="training iterations (default: the model's recipe)")
    tr.set_defaults(func=run_train)
    ev = zoo_sub.add_parser("evaluate", help="FD of 1000-step sampling vs real digits, written into the model card")
    ev.add_argument("name", help="model name")
    ev.add_argument("--samples", type=positive_int, default=512, help="number of samples (512)")
    ev.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    print(train(args.name, args.out, iters=args.iters))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    print(evaluate(args.name, n=args.samples))
    return 0
