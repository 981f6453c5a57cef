"""``fewstep tune``'s step search on a zoo model: per NFE, the tuned steps of each solver (the DP search over 40
candidate times against a teacher, and the best fixed grid, each refined by coordinate descent on the real run)
next to every fixed grid, on the calibration seeds (1000-1031) and on held-out seeds (0-255), and the plan chosen.

Error: mean per-sample RMSE of the end point against the teacher (DPM-Solver++(3M), 8 substeps per candidate
interval) from the same noise. One thread.

    python benchmarks/step_search.py [--model unet_m] [--solvers ddim,dpmpp_2m] [--nfe 4,5,6,8]
"""

from __future__ import annotations

import argparse
import time

import torch

from fewstep import zoo
from fewstep.tuning import tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_m")
    parser.add_argument("--solvers", default="ddim,dpmpp_2m")
    parser.add_argument("--nfe", default="4,5,6,8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    den = zoo.load(args.model)
    print(f"model {args.model}\n")
    teachers: dict = {}  # one teacher solve for every NFE (the first NFE's time includes it)
    print("| NFE | solver | grid | calibration error | held-out error | chosen |")
    print("|---|---|---|---|---|---|")
    for nfe in [int(n) for n in args.nfe.split(",")]:
        t0 = time.perf_counter()
        got = tune(den, args.model, nfe, solvers=args.solvers.split(","), shape=den.sample_shape,
                   holdout=range(256), teachers=teachers)
        seconds = time.perf_counter() - t0
        chosen = ("tuned" if got.plan.grid == "explicit" else got.plan.grid, got.plan.solver)
        for row in sorted(got.rows, key=lambda r: r["holdout"]):
            mark = "**yes**" if (row["grid"], row["solver"]) == chosen else ""
            print(f"| {nfe} | {row['solver']} | {row['grid']} | {row['calibration']:.4f} | {row['holdout']:.4f} | "
                  f"{mark} |", flush=True)
        times = ", ".join(f"{t:.3f}" for t in (got.plan.times or ()))
        print(f"| {nfe} | tuning took {seconds:.0f} s | {times} | | | |", flush=True)


if __name__ == "__main__":
    main()
