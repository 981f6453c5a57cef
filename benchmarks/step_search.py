"""``fewstep tune`` on the zoo models: per model and NFE, the chosen plan's held-out error next to the best fixed
fewstep solver x grid and the best diffusers scheduler (deterministic ones, trailing spacing, same NFE), with the
held-out FD of each, and the teacher and search time apart. One report per model (``report.md``, ``steps.png``,
``error_vs_nfe.png``, ``grid.png``) under ``--out``.

Error: mean per-sample RMSE of the end point against the teacher (DPM-Solver++(3M), 8 substeps per interval of
the 40-step candidate grid) from the same noise; calibration seeds 1000-1031, held-out seeds 0-255. dit_s is
tuned on labels 0-4 and held out on labels 5-9, at guidance 1 (none) and 4. One thread.

    python benchmarks/step_search.py [--models unet_m,unet_v,unet_flow,dit_s,dit_s@4] [--nfe 4,5,6,8] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewstep.cli import main as fewstep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="unet_m,unet_v,unet_flow,dit_s,dit_s@4",
                        help="zoo models; dit_s@G: guidance scale G")
    parser.add_argument("--nfe", default="4,5,6,8")
    parser.add_argument("--solvers", default="ddim,dpmpp_2m")
    parser.add_argument("--iterations", default="150")
    parser.add_argument("--out", default="tune_results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for spec in args.models.split(","):
        model, _, guidance = spec.partition("@")
        argv = ["tune", "--model", model, "--nfe", args.nfe, "--solvers", args.solvers, "--holdout", "0-255",
                "--iterations", args.iterations, "--out", f"{args.out}/{spec.replace('@', '_g')}"]
        if model.startswith("dit"):
            argv += ["--label", "0-4", "--holdout-label", "5-9"]
        if guidance:
            argv += ["--guidance", guidance]
        print(f"\n## {spec}\n", flush=True)
        t0 = time.perf_counter()
        if fewstep(argv) != 0:
            raise SystemExit(f"fewstep {' '.join(argv)} failed")
        print(f"\n{spec}: {time.perf_counter() - t0:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
