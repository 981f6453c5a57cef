"""Measured convergence orders of every deterministic solver on the order-test problem of tests/test_orders.py.

3-D, 3-component Gaussian mixture (std 0.5), linear VP-SDE, lam-uniform grid from lam = -5 to 4 without the
final jump, 64 starting points, reference by torchdiffeq dopri5 (rtol = atol = 1e-10); RMSE at the end point and
the local slope log2(e_N / e_2N). Multistep solvers run with lower_order_final=False.

    python benchmarks/orders.py
"""

from __future__ import annotations

import math

import torch

from fewstep import make_solver, sample
from fewstep.grids import logsnr
from fewstep.schedules import LinearVP
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

STEPS = [10, 20, 40, 80, 160, 320]
CASES = [
    ("ddim", {}), ("heun", {}), ("dpm_solver_2", {}), ("dpm_solver_3", {}),
    ("dpmpp_2m", {"lower_order_final": False}), ("dpmpp_3m", {"lower_order_final": False}),
    ("dpmpp_3m_compat", {"lower_order_final": False}),
    ("unipc", {"solver_order": 1, "lower_order_final": False}),
    ("unipc", {"solver_order": 2, "lower_order_final": False}),
    ("unipc", {"solver_order": 3, "lower_order_final": False}),
    ("unipc", {"solver_order": 2, "corrector": False, "lower_order_final": False}),
    ("deis", {"solver_order": 2, "lower_order_final": False}),
    ("deis", {"solver_order": 3, "lower_order_final": False}),
    ("deis", {"solver_order": 3, "interpolate_in": "logrho", "lower_order_final": False}),
    ("ipndm", {}),
    ("sa_solver", {"predictor_order": 3, "corrector_order": 4, "tau": 0.0, "lower_order_final": False}),
    ("sa_solver", {"predictor_order": 2, "corrector_order": 3, "tau": 0.0, "lower_order_final": False}),
    ("sa_solver", {"predictor_order": 2, "corrector_order": 0, "tau": 0.0, "lower_order_final": False}),
    ("hb", {"beta": 0.8, "lower_order_final": False}), ("hb", {"beta": 0.8, "base": "plms", "solver_order": 4}),
    ("ghvb", {"solver_order": 2, "beta": 0.5}), ("ghvb", {"solver_order": 3, "beta": 0.8}),
    ("ghvb", {"solver_order": 4, "beta": 0.8}),
    ("f_ddim", {}), ("f_dpmsolver", {}), ("evodiff", {"lower_order_final": False}),
    ("bdia", {"gamma": 1.0}), ("bdia", {"gamma": 0.5}),
]


def main() -> None:
    vp = LinearVP()
    den = AnalyticDenoiser(gaussian_mixture(dim=3, components=3, std=0.5, seed=1), vp)
    t0, t1 = vp.inverse_lam(-5.0), vp.inverse_lam(4.0)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = den.reference(x, t0, t1)
    print("| solver | declared | " + " | ".join(f"{n} steps" for n in STEPS) + " | local slopes |")
    print("|---|---|" + "---|" * len(STEPS) + "---|")
    for name, knobs in CASES:
        solver = make_solver(name, **knobs)
        errs = [float(((sample(den, solver, logsnr(vp, n, to_zero=False, t_start=t0, t_end=t1), x_init=x) - ref)
                       ** 2).mean().sqrt()) for n in STEPS]
        sl = " ".join(f"{math.log2(errs[i] / errs[i + 1]):.2f}" for i in range(len(errs) - 1))
        label = name + ("(" + ", ".join(f"{k}={v}" for k, v in knobs.items() if k != "lower_order_final") + ")"
                        if len(knobs) > ("lower_order_final" in knobs) else "")
        print(f"| `{label}` | {solver.order} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {sl} |")


if __name__ == "__main__":
    main()
