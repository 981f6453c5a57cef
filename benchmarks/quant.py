"""Quantization measured with the solvers: scheme x solver x NFE on the zoo models, through ``fewstep bench``.

For every scheme (``none`` = the float32 network) and solver at each NFE, on the held-out seeds 0-255: the FD of
the samples, the quantization error (mean per-sample RMSE against the float network's own samples from the same
noise, same solver and steps), the weights' size, and the wall time of the run (this CPU, one thread). Calibrated
schemes (all but ``round=nearest``) calibrate on the run's own solver and grid (seeds 1000-1127): activation ranges
and GPTQ Hessians over every step (``calibration=trajectory``, Q-Diffusion) or at one time (``single``, the middle
step). ``int8wo:round=nearest:keep_ends=false`` is torchao's int8 weight-only as users apply it (every layer,
round to nearest); ``int8wo`` is fewstep's default (GPTQ on the trajectory, first and last layers in float).

    python benchmarks/quant.py [--models unet_m,dit_s] [--db quant.sqlite]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch

from fewstep.bench import ResultStore
from fewstep.cli import main as fewstep

SCHEMES = ("none,int8wo:round=nearest:keep_ends=false,int8wo,fp:e4m3,w4:round=nearest:keep_ends=false,w4,"
           "w4a8:calibration=trajectory,w4a8:calibration=single,w4a8:group=32:calibration=trajectory,"
           "w4a8:group=32:calibration=single")
PAIRS = (("w4a8", "per output channel"), ("w4a8:group=32", "one scale per 32 input columns"))
INT8 = ("int8wo:round=nearest:keep_ends=false", "int8wo")
SOLVERS = "ddim,dpmpp_2m,unipc,f_ddim"
STEPS = "5,10,20,50"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="unet_m,dit_s")
    parser.add_argument("--schemes", default=SCHEMES)
    parser.add_argument("--solvers", default=SOLVERS)
    parser.add_argument("--steps", default=STEPS)
    parser.add_argument("--seeds", default="0-255")
    parser.add_argument("--db", default="quant.sqlite")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for model in args.models.split(","):
        argv = ["bench", "--models", model, "--solvers", args.solvers, "--steps", args.steps, "--quant",
                args.schemes, "--seeds", args.seeds, "--db", args.db]
        if fewstep(argv) != 0:
            raise SystemExit(f"fewstep {' '.join(argv)} failed")
    with ResultStore(args.db, readonly=True) as store:
        rows = store.rows()
    for model in args.models.split(","):
        mine = [r for r in rows if r["experiment"].model == model and r["experiment"].backend == "fewstep"]
        cells: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
        for r in mine:
            e = r["experiment"]
            cells[(e.quant or "none", e.solver)][e.steps] = r
        print(f"\n## {model}: FD (quantization error) by scheme, solver and NFE\n")
        steps = [int(s) for s in args.steps.split(",")]
        print("| scheme | weights KiB | solver | " + " | ".join(f"NFE {n}" for n in steps) + " |")
        print("|---|---|---|" + "---|" * len(steps))
        for (scheme, solver), by in sorted(cells.items(), key=lambda kv: (args.schemes.split(",").index(kv[0][0])
                                                                         if kv[0][0] in args.schemes.split(",")
                                                                         else 99, kv[0][1])):
            kib = next(iter(by.values())).get("weights_bytes")
            size = "-" if kib is None else f"{kib / 1024:,.0f}"
            vals = []
            for n in steps:
                r = by.get(n)
                if r is None:
                    vals.append("-")
                    continue
                q = r.get("quant_error")
                vals.append(f"{r['fd']:.2f}" + ("" if q is None else f" ({q:.3f})"))
            print(f"| {scheme} | {size} | {solver} | " + " | ".join(vals) + " |")
        print(f"\n### {model}: wall seconds per run, median over solvers\n")
        print("| scheme | " + " | ".join(f"NFE {n}" for n in steps) + " |")
        print("|---|" + "---|" * len(steps))
        for scheme in args.schemes.split(","):
            line = []
            for n in steps:
                secs = [by[n]["wall_seconds"] for (s, _), by in cells.items() if s == scheme and n in by]
                line.append(f"{statistics.median(secs):.2f}" if secs else "-")
            print(f"| {scheme} | " + " | ".join(line) + " |")
        print(f"\n### {model}: int8 weight-only, FD change over float (%)\n")
        print("| scheme | solver | " + " | ".join(f"NFE {n}" for n in steps) + " |")
        print("|---|---|" + "---|" * len(steps))
        for scheme in INT8:
            for solver in args.solvers.split(","):
                base, by = cells.get(("none", solver), {}), cells.get((scheme, solver), {})
                line = [f"{100 * (by[n]['fd'] / base[n]['fd'] - 1):+.1f}" if n in by and n in base else "-"
                        for n in steps]
                print(f"| {scheme} | {solver} | " + " | ".join(line) + " |")
        for fmt, what in PAIRS:
            print(f"\n### {model}: FD increase over float at NFE 20, trajectory vs single-time calibration "
                  f"({fmt}: 4-bit weights {what})\n")
            print("| solver | float FD | trajectory | single | increase ratio trajectory / single | "
                  "error ratio trajectory / single |")
            print("|---|---|---|---|---|---|")
            for solver in args.solvers.split(","):
                try:
                    base = cells[("none", solver)][20]["fd"]
                    traj = cells[(f"{fmt}:calibration=trajectory", solver)][20]
                    single = cells[(f"{fmt}:calibration=single", solver)][20]
                except KeyError:
                    continue
                t, s1 = traj["fd"], single["fd"]
                ratio = (t - base) / (s1 - base) if s1 != base else float("nan")
                print(f"| {solver} | {base:.2f} | {t:.2f} ({t - base:+.2f}) | {s1:.2f} ({s1 - base:+.2f}) "
                      f"| {ratio:.2f} | {traj['quant_error'] / single['quant_error']:.2f} |")
    _calibration_times(args.models.split(","), [int(n) for n in args.steps.split(",")])


def _calibration_times(models: list[str], steps: list[int]) -> None:
    """Seconds to quantize with calibration (``int8wo``: the calibration run with Hessians, GPTQ, torchao), once per
    plan and not part of the rows' wall time: DDIM on the benchmark's grid, calibrate's default seeds, one thread."""
    import time

    from fewstep.quant import quantize
    from fewstep.zoo import load

    print("\n### Calibration: seconds to quantize int8wo with calibration, once per plan (DDIM)\n")
    print("| model | " + " | ".join(f"NFE {n}" for n in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for model in models:
        den, line = load(model), []
        for n in steps:
            t0 = time.perf_counter()
            quantize(den, "int8wo", calibration=dict(solver="ddim", steps=n, grid="time_quadratic"))
            line.append(f"{time.perf_counter() - t0:.1f}")
        print(f"| {model} | " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
