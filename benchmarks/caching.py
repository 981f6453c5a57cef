"""Feature caching on the zoo: wall-clock speedup against FD and error, per method x solver x steps.

For each (solver, steps) the uncached model and every cache run side by side in this process, on the same 256
seeds, ``--repeats`` times each in rotation; time = median wall time of the whole sampling call. Error: mean
per-sample RMSE against the model's own probability-flow ODE solution (dopri5, cached in the results database);
"cache err": mean per-sample relative distance to the uncached samples of the same solver and steps (the
calibration's measure); FD in the digits
classifier's features (floor at N = 256: 13.05; FD below the floor is real-data noise). Work: counted share of
the network's multiply-accumulates actually computed.

    python benchmarks/caching.py [--model unet_m] [--steps 10,20,50] [--repeats 3]
    python benchmarks/caching.py --model dit_s --caches block
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fewstep import make_solver, sample
from fewstep.bench import DigitsFD, Experiment, ResultStore, rmse_per_sample
from fewstep.bench.runner import Context
from fewstep.caching import CacheStats, cache_error, cache_from_spec

UNET_CACHES = ["deepcache:interval=2", "deepcache:interval=3", "deepcache:interval=3:schedule=nonuniform",
               "deepcache:interval=5", "encoder:interval=2", "encoder:interval=3", "auto:target_error=0.05"]
DIT_CACHES = ["block:threshold=0.05", "block:threshold=0.1", "block:threshold=0.2", "auto:target_error=0.05"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_m")
    parser.add_argument("--solvers", default="ddim,dpmpp_2m,unipc")
    parser.add_argument("--steps", default="10,20,50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--db", default="docs/zoo/results.sqlite")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ctx = Context(ResultStore(args.db))
    exp = Experiment(args.model, "ddim", 10)
    den, x_init = ctx.model(args.model), ctx.x_init(exp)
    shape = tuple(x_init.shape[1:])
    fd = DigitsFD()
    is_dit = type(den.model).__name__ == "DiTTransformer2DModel"
    caches = DIT_CACHES if is_dit else UNET_CACHES
    # the zoo DiT is class-conditional and weak unconditionally: sample classes 0-9 in turn, no ODE reference
    cond = {"class_labels": torch.arange(x_init.shape[0]) % 10} if is_dit else None
    ref = None if is_dit else ctx.reference(exp)
    cal_cond = {"class_labels": torch.arange(128) % 10} if is_dit else None  # calibration seeds 1000-1127
    print(f"model {args.model}, batch {x_init.shape[0]}, FD floor {ctx.floor(x_init.shape[0]):.2f}\n")
    print("| solver | steps | cache | work | time (s) | speedup | error | cache err | FD | FD loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for solver_name in args.solvers.split(","):
        solver = make_solver(solver_name)
        for steps in [int(s) for s in args.steps.split(",")]:
            dens, notes = {"none": den}, {}
            for spec in caches:
                dens[spec], cal = cache_from_spec(den, spec, solver=solver, steps=steps, shape=shape, cond=cal_cond)
                if cal is not None:
                    notes[spec] = f"{cal.method}:{cal.knobs}"
            times: dict[str, list[float]] = {k: [] for k in dens}
            outs, works = {}, {}
            for _ in range(args.repeats):
                for key, d in dens.items():
                    stats = CacheStats()
                    t0 = time.perf_counter()
                    outs[key] = sample(d, solver, steps, x_init=x_init, grid="time_quadratic", hooks=[stats],
                                       cond=cond)
                    times[key].append(time.perf_counter() - t0)
                    works[key] = stats.mean_work
            base_t, base = statistics.median(times["none"]), outs["none"]
            base_fd = fd(base)
            for key, out in outs.items():
                t = statistics.median(times[key])
                err = float(rmse_per_sample(out, ref).mean()) if ref is not None else float("nan")
                cerr = float(cache_error(out, base).mean())
                f = fd(out)
                label = key + (f" -> {notes[key]}" if key in notes else "")
                print(f"| {solver_name} | {steps} | {label} | {works[key]:.2f} | {t:.2f} | {base_t / t:.2f}x | "
                      f"{err:.4f} | {cerr:.3f} | {f:.2f} | {100 * (f - base_fd) / base_fd:+.0f} % |", flush=True)


if __name__ == "__main__":
    main()
