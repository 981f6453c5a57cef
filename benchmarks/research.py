"""The research solvers on closed-form problems (about 30 s):

1. divergence under strong guidance: exact 16-D, 5-class mixture (std 0.3) with classifier-free guidance, class 1,
   DDPM linear betas, time_quadratic grid; RMSE against a 1000-step DPM-Solver++(3M) solution, 256 samples;
2. the forward-value sign flip: signed error along the exact end point, single Gaussian;
3. inversion round trips (float64): BDIA vs DDIM/DPM++2M inversion;
4. accuracy at NFE 5-20 against the exact probability-flow endpoint (the table of benchmarks/solvers.py).

    python benchmarks/research.py
"""

from __future__ import annotations

import torch

from fewstep import ClassifierFreeGuidance, invert, make_solver, regenerate, sample
from fewstep.grids import logsnr
from fewstep.schedules import DiscreteVP, LinearVP
from fewstep.zoo import AnalyticDenoiser, gaussian, gaussian_mixture

MOMENTUM = [("ghvb", {"solver_order": 4, "beta": 1.0}, "PLMS-4 (AB4)"),
            ("hb", {"base": "plms", "solver_order": 4, "beta": 0.8}, "HB 0.8 on PLMS-4"),
            ("ghvb", {"solver_order": 4, "beta": 0.3}, "GHVB 3.3"),
            ("ghvb", {"solver_order": 3, "beta": 1.0}, "PLMS-3 (AB3)"),
            ("ghvb", {"solver_order": 3, "beta": 0.5}, "GHVB 2.5"),
            ("dpmpp_2m", {}, "DPM++2M"), ("hb", {"beta": 0.8}, "HB 0.8 on DPM++2M")]


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def momentum() -> None:
    den = AnalyticDenoiser(gaussian_mixture(dim=16, components=5, std=0.3, seed=3), DiscreteVP.named("linear"))
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = [6, 8, 10, 12, 15, 20]
    for scale in (8.0, 15.0):
        model = ClassifierFreeGuidance(den, scale)
        ref = sample(model, make_solver("dpmpp_3m"), 1000, x_init=x, cond=1, grid="logsnr")
        print(f"\nguidance scale {scale:g}: RMSE vs reference\n")
        print("| solver | " + " | ".join(f"NFE {n}" for n in steps) + " |")
        print("|---|" + "---|" * len(steps))
        for name, knobs, label in MOMENTUM:
            errs = [rmse(sample(model, make_solver(name, **knobs), n, x_init=x, cond=1, grid="time_quadratic",
                                check=False), ref) for n in steps]
            print(f"| {label} | " + " | ".join(f"{e:.3g}" for e in errs) + " |")


def forward_value_sign() -> None:
    vp = LinearVP()
    den = AnalyticDenoiser(gaussian(dim=4, mean=0.0, std=0.5), vp)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t1 = vp.inverse_lam(3.0)
    print("\nsigned error <x - x*, x*>/|x*|^2 on a Gaussian (linear VP, lam to 3)\n")
    print("| steps | ddim | f_ddim | f_dpmsolver | dpmpp_2m |")
    print("|---|---|---|---|---|")
    for n in (5, 10, 20, 40):
        grid = logsnr(vp, n, to_zero=False, t_end=t1)
        exact = den.gaussian_flow(x, float(grid[0]), t1)
        vals = []
        for name in ("ddim", "f_ddim", "f_dpmsolver", "dpmpp_2m"):
            out = sample(den, name, grid, x_init=x)
            vals.append(float(((out - exact) * exact).sum() / (exact * exact).sum()))
        print(f"| {n} | " + " | ".join(f"{v:+.3e}" for v in vals) + " |")


def inversion() -> None:
    den = AnalyticDenoiser(gaussian_mixture(dim=16, components=5, std=0.3, seed=3), LinearVP())
    x0 = den.data.sample(8, generator=torch.Generator().manual_seed(2))
    cases = [("ddim", {}), ("dpmpp_2m", {}), ("bdia", {"gamma": 1.0}), ("bdia", {"gamma": 0.5}),
             ("bdia", {"gamma": 0.9})]
    steps = [5, 10, 50, 200, 1000]
    print("\nround trip max |regenerate(invert(x0)) - x0| / max |x0| (float64); latent std in brackets\n")
    print("| solver | " + " | ".join(f"{n} steps" for n in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, knobs in cases:
        cells = []
        for n in steps:
            try:
                inv = invert(den, x0, solver=make_solver(name, **knobs), steps=n)
                err = float((regenerate(den, inv) - x0).abs().max() / x0.abs().max())
                cells.append(f"{err:.1e} ({float(inv.x_T.std()):.3g})")
            except ValueError:
                cells.append("overflow")
        print(f"| `{name}{knobs or ''}` | " + " | ".join(cells) + " |")


def accuracy() -> None:
    sched = DiscreteVP.named("linear")
    den = AnalyticDenoiser(gaussian_mixture(dim=16, components=6, std=0.2, seed=0), sched)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = den.reference_data(x, sched.t_max)
    names = [("ddim", {}), ("dpmpp_2m", {}), ("unipc", {}), ("f_ddim", {}), ("f_dpmsolver", {}), ("evodiff", {}),
             ("evodiff", {"final": "demo"}), ("sa_solver", {"tau": 0.0}), ("hb", {}), ("ghvb", {}),
             ("bdia", {}), ("bdia", {"gamma": 0.5})]
    print("\nRMSE at t = 0 vs the exact PF-ODE endpoint, logsnr grid (16-D, 6-component mixture, std 0.2)\n")
    print("| solver | NFE 5 | NFE 8 | NFE 10 | NFE 20 |")
    print("|---|---|---|---|---|")
    for name, knobs in names:
        errs = [rmse(sample(den, make_solver(name, **knobs), n, x_init=x, check=False), ref) for n in (5, 8, 10, 20)]
        print(f"| `{name}{knobs or ''}` | " + " | ".join(f"{e:.3g}" for e in errs) + " |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    momentum()
    forward_value_sign()
    inversion()
    accuracy()
