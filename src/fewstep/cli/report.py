"""``fewstep report``: a Markdown table, plots and image grids from a results database."""

from __future__ import annotations

import argparse
from pathlib import Path

from fewstep.bench import ResultStore, write_report
from fewstep.bench.store import DEFAULT_DB
from fewstep.cli.common import Subparsers
from fewstep.outputs import check_output_dir


def add_parser(sub: Subparsers) -> None:
    rep = sub.add_parser("report", help="Markdown table, plots and image grids from a results database",
                         epilog="example: fewstep report --db fewstep-results.sqlite --out report")
    rep.add_argument("--db", default=str(DEFAULT_DB), help="results database (fewstep-results.sqlite)")
    rep.add_argument("--out", required=True, help="output folder")
    rep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not Path(args.db).is_file():
        raise ValueError(f"no results database at {args.db}")
    check_output_dir(args.out)
    print(f"report: {write_report(ResultStore(args.db, readonly=True), args.out)}")
    return 0
