"""The ``fewstep`` command line.

Examples::

    fewstep bench --models unet_m --solvers ddim,dpmpp_2m,unipc --steps 5,10,20 --with-diffusers --report report
    fewstep sample --model unet_m --solver dpmpp_2m --steps 10 --grid logsnr --seeds 0-63 --out grid.png
    fewstep report --db fewstep-results.sqlite --out report
    fewstep models                     # the shipped models and their cards
    fewstep solvers                    # name, order, NFE/step, stochastic, reference paper
    fewstep demo                       # solver errors at 5/10/20 NFE on an analytic Gaussian mixture
    fewstep zoo train unet_m           # retrain a shipped model (reproducible)
    fewstep generate --pipeline ./sd-model --prompt "a red fox" --solver unipc --steps 8 --out fox.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fewstep import __version__
from fewstep.cli import bench, demo, fd, generate, models, report, sample, solvers, tune, zoo
from fewstep.cli.common import Parser

__all__ = ["build_parser", "main"]

COMMANDS = (demo, solvers, models, sample, generate, tune, bench, fd, report, zoo)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fewstep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:  # bad input: refused before any work where it can be checked
        print(f"fewstep: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine refused (disk full, permissions changed mid-run): say so, no traceback
        print(f"fewstep: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
