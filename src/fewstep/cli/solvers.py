"""``fewstep solvers``: the solver registry as a table."""

from __future__ import annotations

import argparse

from fewstep.cli.common import Subparsers
from fewstep.solvers import SOLVERS, make_solver


def add_parser(sub: Subparsers) -> None:
    solvers = sub.add_parser("solvers", help="list the solvers: name, order, NFE/step, stochastic, paper")
    solvers.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = [("name", "order", "NFE/step", "stochastic", "reference")]
    for name in SOLVERS:
        s = make_solver(name)
        rows.append((name, str(s.order), str(s.nfe_per_step), "yes" if s.stochastic else "no", s.paper))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0
