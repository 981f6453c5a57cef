"""Feature caching on the zoo: wall-clock speedup against FD and error, per method x solver x steps.

For each (solver, steps) the uncached model and every cache run side by side in this process, on the same 256
seeds, ``--repeats`` times each in rotation; time = median wall time of the whole sampling call (one thread).
Error: mean per-sample RMSE against the model's own probability-flow ODE solution (dopri5, cached in the results
database; U-Nets only); "cache err": mean per-sample relative distance to the uncached samples of the same
solver and steps (the calibration's measure); FD in the digits classifier's features (floor at N = 256: 13.05;
FD below the floor is real-data noise) and its change against the uncached run. Work: the counted share of the
network's multiply-accumulates (and attention products) actually computed. ``diffusers:<cache>`` rows are
diffusers' own cache hooks on the same model, noise and solver (where the model class supports them).

    python benchmarks/caching.py --model unet_m --steps 20,50
    python benchmarks/caching.py --model dit_s --steps 20,50
    python benchmarks/caching.py --model dit_s --steps 20,50 --guidance 4   # labels 0-9, one cache per branch
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

import torch

from fewstep import ClassifierFreeGuidance, make_solver, sample
from fewstep.bench import DigitsFD, Experiment, ResultStore, rmse_per_sample
from fewstep.bench.runner import Context
from fewstep.caching import CacheStats, cache_error, cache_from_spec
from fewstep.models.base import Cond, Denoiser, Run

UNET_CACHES = ["deepcache:interval=3", "deepcache:interval=5", "encoder:interval=3",
               "taylorseer:interval=3:order=2", "taylorseer:interval=4:order=2", "taylorseer:interval=2",
               "auto:target_error=0.02:method=all"]
DIT_CACHES = ["block:threshold=0.1", "block:threshold=0.2:order=1", "magcache:threshold=0.1",
              "magcache:threshold=0.3:max_skip=4", "taylorseer:interval=3", "taylorseer:interval=4",
              "taylorseer:interval=5:order=2", "auto:target_error=0.02:method=all"]
SHARED = ["block:threshold=0.1", "taylorseer:interval=3"]
DIT_PEERS = ["diffusers:fbcache:threshold=0.1", "diffusers:fbcache:threshold=0.2", "diffusers:fbcache:threshold=0.3",
             "diffusers:pab", "diffusers:fastercache", "diffusers:seacache"]


class _SharedState(Denoiser):
    """Guidance whose two branches share one cache state (fewstep before one state per branch): for comparison."""

    def __init__(self, guided: ClassifierFreeGuidance) -> None:
        self.guided, self.schedule = guided, guided.schedule

    def for_run(self, run: Run) -> Denoiser:
        g = self.guided
        return ClassifierFreeGuidance(g.inner.for_run(run), g.scale, uncond=g.uncond)

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        raise TypeError("call it through fewstep.sample()")


def _peers(den: Any, specs: list[str]) -> dict[str, Any]:
    """diffusers' own cache hooks (fewstep.bench.cache_peers), those this model and diffusers support."""
    try:
        from fewstep.bench.cache_peers import DiffusersCache
        from fewstep.spec import parse_spec
    except ImportError:
        return {}
    out = {}
    for spec in specs:
        name, knobs = parse_spec(spec.removeprefix("diffusers:"))
        try:
            out[spec] = DiffusersCache(den, name, **knobs)
        except (TypeError, ValueError) as err:
            print(f"(skipped {spec}: {err})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_m")
    parser.add_argument("--solvers", default="dpmpp_2m")
    parser.add_argument("--steps", default="20,50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (class-conditional models)")
    parser.add_argument("--caches", default=None, help="comma-separated specs (default: the model's list)")
    parser.add_argument("--db", default="docs/zoo/results.sqlite")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ctx = Context(ResultStore(args.db))
    exp = Experiment(args.model, "ddim", 10)
    base_den, x_init = ctx.model(args.model), ctx.x_init(exp)
    shape = tuple(x_init.shape[1:])
    fd = DigitsFD()
    is_dit = type(base_den.model).__name__ == "DiTTransformer2DModel"
    caches = args.caches.split(",") if args.caches else (DIT_CACHES if is_dit else UNET_CACHES)
    # the zoo DiT is class-conditional and weak unconditionally: sample classes 0-9 in turn, no ODE reference
    cond = {"class_labels": torch.arange(x_init.shape[0]) % 10} if is_dit else None
    cal_cond = {"class_labels": torch.arange(128) % 10} if is_dit else None  # calibration seeds 1000-1127
    den = base_den if args.guidance is None else ClassifierFreeGuidance(base_den, args.guidance)
    ref = None if is_dit else ctx.reference(exp)
    print(f"model {args.model}, batch {x_init.shape[0]}, guidance {args.guidance}, FD floor "
          f"{ctx.floor(x_init.shape[0]):.2f}, one thread\n")
    print("| solver | steps | cache | work | time (s) | speedup | error | cache err | FD | FD change |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for solver_name in args.solvers.split(","):
        solver = make_solver(solver_name)
        for steps in [int(s) for s in args.steps.split(",")]:
            dens: dict[str, Any] = {"none": den}
            notes: dict[str, str] = {}
            for spec in caches:
                dens[spec], cal = cache_from_spec(den, spec, solver=solver, steps=steps, shape=shape, cond=cal_cond)
                if cal is not None:
                    notes[spec] = cal.spec
            peers = _peers(base_den, DIT_PEERS if is_dit else []) if args.guidance is None else {}
            dens.update(peers)
            if args.guidance is not None:  # what one state per branch buys: the same caches with one shared state
                for spec in SHARED:
                    cached, _ = cache_from_spec(den, spec, solver=solver, steps=steps, shape=shape, cond=cal_cond)
                    assert isinstance(cached, ClassifierFreeGuidance)
                    dens[f"{spec} (one state for both branches)"] = _SharedState(cached)
            times: dict[str, list[float]] = {k: [] for k in dens}
            outs, works = {}, {}
            for _ in range(args.repeats):
                for key, d in dens.items():
                    stats = CacheStats()
                    with (d if key in peers else contextlib.nullcontext()):
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
                      f"{err:.4f} | {cerr:.3f} | {f:.2f} | {100 * (f - base_fd) / base_fd:+.1f} % |", flush=True)


if __name__ == "__main__":
    main()
