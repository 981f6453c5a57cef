"""Grid choice on a zoo model: mean per-sample RMSE at t = 0 for several solvers x grids x NFE.

Uses the same starting noise (seeds 0-255) and the same dopri5 reference as `fewstep bench` (cached in the
results database given, computed if missing).

    python benchmarks/zoo_grids.py [--model unet_m] [--db docs/zoo/results.sqlite]
"""

from __future__ import annotations

import argparse

from fewstep import make_solver, sample
from fewstep.bench import Experiment, ResultStore, rmse_per_sample
from fewstep.bench.runner import Context
from fewstep.grids import make_grid

SOLVERS = ["ddim", "dpmpp_2m", "unipc", "dpmpp_3m", "ipndm"]
GRIDS = ["logsnr", "karras", "time_uniform", "time_quadratic", "trailing"]
NFES = [5, 10, 20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_m")
    parser.add_argument("--db", default="docs/zoo/results.sqlite")
    args = parser.parse_args()
    ctx = Context(ResultStore(args.db))
    exp = Experiment(args.model, "ddim", 5)
    den, x, ref = ctx.model(args.model), ctx.x_init(exp), ctx.reference(exp)
    print("| solver | grid | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
    print("|---|---|" + "---|" * len(NFES))
    for name in SOLVERS:
        for grid in GRIDS:
            errs = [float(rmse_per_sample(sample(den, make_solver(name), make_grid(grid, den.schedule, n), x_init=x),
                                          ref).mean()) for n in NFES]
            print(f"| `{name}` | {grid} | " + " | ".join(f"{e:.4f}" for e in errs) + " |")


if __name__ == "__main__":
    main()
