"""``fewstep models``: the shipped models and their cards."""

from __future__ import annotations

import argparse

from fewstep.cli.common import Subparsers
from fewstep.zoo import list_models


def add_parser(sub: Subparsers) -> None:
    models = sub.add_parser("models", help="list the shipped models and their cards")
    models.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cards = list_models()
    if not cards:
        print("no shipped models in this install")
        return 0
    print(f"{'name':12s} {'kind':11s} {'params':>9s}  {'FD (1000 steps) / floor':28s} description")
    for name, c in cards.items():
        fd = c.get("fd_1000_step")
        fd_txt = f"{fd:.3f} / {c['fd_floor']:.3f}" if fd is not None else "-"
        print(f"{name:12s} {c['kind']:11s} {c['params']:>9,d}  {fd_txt:28s} {c.get('description', '')}")
    return 0
