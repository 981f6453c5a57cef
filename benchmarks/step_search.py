"""The step search's first stage (``fewstep.tuning.search_steps``): the DP path over 40 candidate times against a
teacher, next to the fixed grids, on held-out seeds.

Search on seeds 1000-1031 (teacher: DPM-Solver++(3M) with 8 substeps per candidate interval); evaluation on seeds
0-255 against a teacher with 25 substeps; error = mean per-sample RMSE of the end point. One thread.

    python benchmarks/step_search.py [--model unet_m] [--solvers ddim,dpmpp_2m] [--nfe 4,5,6,8]
"""

from __future__ import annotations

import argparse
import time

import torch

from fewstep import sample, zoo
from fewstep.grids import make_grid
from fewstep.noise import SampleNoise
from fewstep.tuning import search_steps, teacher_states

FIXED = ["time_quadratic", "trailing", "logsnr", "karras", "time_uniform"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_m")
    parser.add_argument("--solvers", default="ddim,dpmpp_2m")
    parser.add_argument("--nfe", default="4,5,6,8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    den = zoo.load(args.model)
    shape = den.sample_shape
    hold = list(range(256))
    cand = make_grid("time_quadratic", den.schedule, 40)
    x_hold = den.schedule.prior_std(float(cand[0])) * SampleNoise(hold, shape).draw()
    t0 = time.perf_counter()
    ref = teacher_states(den, cand, x_init=x_hold, seeds=hold, substeps=25)[-1]
    print(f"model {args.model}; held-out teacher {time.perf_counter() - t0:.0f} s\n")

    def err(times: list[float], solver: str) -> float:
        out = sample(den, solver, times, x_init=x_hold, seeds=hold)
        return float((out - ref).flatten(1).pow(2).mean(1).sqrt().mean())

    print(f"| solver | NFE | tuned | best fixed | {' | '.join(FIXED)} | search (s) | tuned times |")
    print("|---|---|---|---|" + "---|" * len(FIXED) + "---|---|")
    for solver in args.solvers.split(","):
        for nfe in [int(n) for n in args.nfe.split(",")]:
            t0 = time.perf_counter()
            found = search_steps(den, solver, nfe, shape=shape, candidates=40)
            seconds = time.perf_counter() - t0
            fixed = {g: err(make_grid(g, den.schedule, nfe).tolist(), solver) for g in FIXED}
            best = min(fixed, key=fixed.__getitem__)
            tuned = err(found.times, solver)
            cells = " | ".join(f"{fixed[g]:.4f}" for g in FIXED)
            times = ", ".join(f"{t:.3f}" for t in found.times)
            print(f"| {solver} | {nfe} | {tuned:.4f} | {fixed[best]:.4f} ({best}) | {cells} | {seconds:.0f} | "
                  f"{times} |", flush=True)


if __name__ == "__main__":
    main()
