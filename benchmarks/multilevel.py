"""ML-EM against Euler-Maruyama with the finest model, on the zoo family and on a synthetic family with a chosen
cost-accuracy exponent gamma; and trajectory stitching on the zoo family.

Error of an SDE sampler = strong (pathwise) error at t_min: RMS distance to the finest model's Euler-Maruyama
solution on a 4x finer grid **driven by the same Brownian path** (coarse steps use the summed fine increments
of B(tau), tau = sbar^2, one path per seed). Compute = counted evaluations in units of one finest-level
evaluation (ML-EM reports its realised cost through CostMeter). Grids: equally spaced in sqrt(t), nested.

    python benchmarks/multilevel.py [--part zoo|synthetic|stitch|all] [--n 256]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from fewstep import CostMeter, make_solver, sample, zoo
from fewstep.grids import time_quadratic
from fewstep.models import Denoiser, Run
from fewstep.multilevel import Multilevel, Stitch, calibrate, measure_costs, optimal_probs
from fewstep.schedules import DiscreteVP
from fewstep.solvers import EulerMaruyama, Step
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

REF_FACTOR = 4


def brownian(seeds: list[int], shape: tuple[int, ...], taus: np.ndarray) -> torch.Tensor:
    """Increments of one Brownian path per seed over the decreasing ``taus``: ``(len(taus) - 1, B, *shape)``."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(10_000 + s)
        z = torch.randn(len(taus) - 1, *shape, generator=g, dtype=torch.float64)
        out.append(z * torch.from_numpy(np.sqrt(taus[:-1] - taus[1:])).view(-1, *[1] * len(shape)))
    return torch.stack(out, 1)


def em(den: Denoiser, times: list[float], x: torch.Tensor, dw: torch.Tensor, seeds: list[int]) -> tuple[
    torch.Tensor, float
]:
    """Euler-Maruyama in the EDM frame (as fewstep's ``euler_maruyama``) with given Brownian increments ``dw``
    (one per step); returns the end state and the counted cost."""
    meter = CostMeter()
    run = Run(tuple(seeds), tuple(times), (meter,))
    bound = den.for_run(run)
    sched = den.schedule
    calls = 0
    with torch.no_grad():
        for n in range(len(times) - 1):
            step = Step.of(sched, n, len(times) - 1, times[n], times[n + 1])
            c_x, c_x0, _ = EulerMaruyama.coefficients(step)
            # the EDM-frame noise term is the Brownian increment itself, mapped back by alpha_next
            x = c_x * x + c_x0 * bound(x, times[n]) + step.alpha_next * dw[n]
            calls += 1
    return x, (meter.cost if meter.evaluations else float(calls))


def _coarse(dw_fine: torch.Tensor, factor: int) -> torch.Tensor:
    return dw_fine.view(-1, factor, *dw_fine.shape[1:]).sum(1)


def study(levels: list[Denoiser], costs: list[float], shape: tuple[int, ...], n: int, steps: list[int],
          budgets: list[float], ml_steps: list[int], calib_steps: int, label: str) -> None:
    sched = levels[0].schedule
    seeds = list(range(n))
    finest = max(max(steps), max(ml_steps)) * REF_FACTOR
    fine = time_quadratic(sched, finest, to_zero=False).tolist()
    taus = np.array([sched.edm_sigma(t) ** 2 for t in fine])
    dw = brownian(seeds, shape, taus)
    x0 = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                      for s in seeds]) * sched.prior_std(fine[0])
    print(f"\n### {label}\n")
    cal = calibrate(levels, calib_steps, shape=shape, seeds=16, costs=costs)
    print("| level | cost | drift error vs finest (weighted RMS) | increment variance V_l |")
    print("|---|---|---|---|")
    for i, (c, e, v) in enumerate(zip(cal.costs, cal.errors, cal.variances, strict=True)):
        print(f"| {i + 1} | {c:.3g} | {e:.3g} | {v:.3g} |")
    pts = [(c, e) for c, e in zip(cal.costs, cal.errors, strict=True) if e > 0]
    if len(pts) >= 2:
        gam = -np.polyfit(np.log([e for _, e in pts]), np.log([c for c, _ in pts]), 1)[0]
        print(f"\ncost-accuracy exponent from levels 1..{len(pts)} vs the finest: gamma = {gam:.2f}")
    ref, _ = em(levels[-1], fine, x0, dw, seeds)

    def err(x: torch.Tensor) -> float:
        return float((x - ref).flatten(1).pow(2).sum(1).mean().sqrt() / math.sqrt(math.prod(shape)))

    print("\n| sampler | steps | compute (finest evals) | strong error |")
    print("|---|---|---|---|")
    em_curve = []
    for s in steps:
        x, c = em(levels[-1], fine[::finest // s], x0, _coarse(dw, finest // s), seeds)
        em_curve.append((c, err(x)))
        print(f"| EM finest | {s} | {c:.1f} | {em_curve[-1][1]:.4g} |")
    best = []
    for b in budgets:
        probs = optimal_probs(cal.variances, cal.costs, budget=b)
        ml = Multilevel(levels, probs, costs=cal.costs)
        for s in ml_steps:
            x, c = em(ml, fine[::finest // s], x0, _coarse(dw, finest // s), seeds)
            e = err(x)
            # EM compute needed for the same error, log-log interpolated on the EM curve
            # (only EM points in its stable range, error < 1: EM with few large steps blows up on the zoo nets)
            stable = [p for p in em_curve if p[1] < 1.0]
            cs, es = np.log([p[0] for p in stable]), np.log([p[1] for p in stable])
            order = np.argsort(es)
            need = math.exp(np.interp(math.log(e), es[order], cs[order])) if es.min() <= math.log(e) <= es.max() \
                else float("nan")
            best.append((need / c, b, s))
            ps = ", ".join(f"{p:.2g}" for p in probs)
            verdict = f"EM needs {need:.1f}: {need / c:.2f}x" if not math.isnan(need) else "outside EM's range"
            print(f"| ML-EM budget {b} (p = {ps}) | {s} | {c:.1f} | {e:.4g} ({verdict}) |")
    good = [r for r in best if not math.isnan(r[0])]
    if good:
        r = max(good)
        print(f"\nbest compute ratio EM/ML-EM at equal error: {r[0]:.2f}x (budget {r[1]}, {r[2]} steps)")


def zoo_family(n: int) -> None:
    names = ["unet_s", "unet_m", "unet_l"]
    levels = [zoo.load(m) for m in names]
    for d in levels:
        d.model.double()
        d.dtype = torch.float64
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    costs = measure_costs(levels, x, 0.5)
    print(f"measured costs (median wall time per evaluation, batch {n}, relative to unet_l): "
          + ", ".join(f"{m} {c:.3f}" for m, c in zip(names, costs, strict=True)))
    study(levels, costs, (1, 8, 8), n, [16, 32, 64, 128], [0.2, 0.35], [32, 64, 128], 32,
          "zoo family unet_s < unet_m < unet_l")


class _Blend(Denoiser):
    """``D_exact + w (D_other - D_exact)``: a drift of known accuracy ``w * |D_other - D_exact|``."""

    def __init__(self, exact: Denoiser, other: Denoiser, w: float) -> None:
        self.exact, self.other, self.w, self.schedule = exact, other, w, exact.schedule

    def __call__(self, x: torch.Tensor, t: float, cond: object = None) -> torch.Tensor:
        e = self.exact(x, t)
        return e + self.w * (self.other(x, t) - e)


def synthetic(n: int, gamma: float = 3.0, k: int = 5) -> None:
    sched = DiscreteVP.named("linear")
    exact = AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.3, seed=4), sched)
    other = AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.45, seed=5), sched)
    levels = [_Blend(exact, other, 2.0 ** -(level + 1)) for level in range(k)]
    costs = [2.0 ** (gamma * (level - k + 1)) for level in range(k)]
    study(levels, costs, (4,), n, [8, 16, 32, 64, 128, 256], [0.1, 0.2, 0.4], [32, 64, 128, 256], 64,
          f"synthetic family: drift error 2^-l, declared cost 2^(gamma l), gamma = {gamma:g}, {k} levels")


def stitching(n: int) -> None:
    from fewstep.bench import DigitsFD, Experiment, ResultStore, rmse_per_sample
    from fewstep.bench.runner import Context

    ctx = Context(ResultStore("docs/zoo/results.sqlite"))
    fd = DigitsFD()
    for small_name, large_name in (("unet_s", "unet_m"), ("unet_s", "unet_l")):
        small, large = zoo.load(small_name), zoo.load(large_name)
        x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        costs = measure_costs([small, large], x, 0.5)
        exp = Experiment(large_name, "ddim", 5, seeds=f"0-{n - 1}")
        x_init, ref = ctx.x_init(exp), ctx.reference(exp)
        print(f"\n### Stitching {small_name} -> {large_name} (measured cost of {small_name}: {costs[0]:.3f} of "
              f"{large_name}'s)\n")
        print(f"| solver | steps | {small_name} fraction | compute ({large_name} evals) | error vs {large_name}'s ODE "
              f"solution | FD |")
        print("|---|---|---|---|---|---|")
        for solver in ("ddim", "dpmpp_2m", "unipc"):
            for steps in (10, 20):
                for frac in (0.0, 0.2, 0.4, 0.6):
                    den = Stitch([small, large], [frac], costs=costs)
                    meter = CostMeter()
                    out = sample(den, make_solver(solver), steps, x_init=x_init, grid="time_quadratic",
                                 hooks=[meter])
                    e = float(rmse_per_sample(out, ref).mean())
                    print(f"| {solver} | {steps} | {frac} | {meter.cost:.2f} | {e:.4f} | {fd(out):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", choices=["zoo", "synthetic", "stitch", "all"])
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.part in ("synthetic", "all"):
        synthetic(args.n)
    if args.part in ("zoo", "all"):
        zoo_family(args.n)
    if args.part in ("stitch", "all"):
        stitching(args.n)


if __name__ == "__main__":
    main()
