"""``fewstep demo``: solver errors against the exact probability-flow solution of an analytic Gaussian mixture."""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from fewstep import __version__
from fewstep.cli.common import Subparsers, seeds, step_list
from fewstep.grids import GRIDS, make_grid
from fewstep.noise import parse_seeds
from fewstep.sample import sample
from fewstep.schedules import EDM, DiscreteVP, LinearVP
from fewstep.solvers import SOLVERS, make_solver
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

DEMO_SOLVERS = [name for name in SOLVERS if not make_solver(name).stochastic]
"""Every deterministic solver of the registry (a stochastic one has no single exact end point to compare with)."""


def add_parser(sub: Subparsers) -> None:
    demo = sub.add_parser("demo", help="solver errors vs NFE on an analytic model with a known exact solution",
                          description="Print each solver's RMSE against the exact probability-flow solution.")
    demo.add_argument("--nfe", type=step_list, default=[5, 10, 20], help="comma-separated NFE budgets (5,10,20)")
    demo.add_argument("--seeds", type=seeds, default=parse_seeds("0-63"), help="seed range, e.g. 0-63")
    demo.add_argument("--grid", choices=list(GRIDS), default="logsnr", help="time grid (logsnr)")
    demo.add_argument("--schedule", choices=["discrete", "vp", "edm"], default="discrete",
                      help="noise schedule: DDPM linear betas (discrete), continuous linear VP, or EDM")
    demo.add_argument("--solvers", type=lambda s: s.split(","), default=None,
                      help=f"comma-separated solver names (default: {','.join(DEMO_SOLVERS)})")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    schedule = {"discrete": DiscreteVP.named("linear"), "vp": LinearVP(), "edm": EDM()}[args.schedule]
    den = AnalyticDenoiser(gaussian_mixture(dim=16, components=6, std=0.2, seed=0), schedule)
    solvers = args.solvers or DEMO_SOLVERS
    for name in solvers:
        make_solver(name)  # fail early on a bad name
    noise = torch.randn(len(args.seeds), 16, generator=torch.Generator().manual_seed(args.seeds[0]),
                        dtype=torch.float64)
    t_start, t_end = schedule.t_max, schedule.t_min
    x_init = noise * schedule.prior_std(t_start)
    print(f"fewstep {__version__} demo: exact Gaussian-mixture denoiser (16-D, 6 components), {schedule!r},")
    print(f"{args.grid} grid, {len(args.seeds)} samples; RMSE at t_min vs the probability-flow ODE solution")
    print("(torchdiffeq dopri5, rtol 1e-10). Lower is better; '-' = NFE not reachable by that solver.\n")
    ref = den.reference(x_init, t_start, t_end)
    header = f"{'solver':18s}" + "".join(f"{'NFE ' + str(n):>12s}" for n in args.nfe)
    print(header)
    print("-" * len(header))
    for name in tqdm(solvers, desc="solvers", leave=False, disable=not sys.stderr.isatty()):
        solver = make_solver(name)
        cells = []
        for nfe in args.nfe:
            if nfe % solver.nfe_per_step:
                cells.append(f"{'-':>12s}")
                continue
            grid = make_grid(args.grid, schedule, nfe // solver.nfe_per_step, to_zero=False)
            out = sample(den, solver, grid, x_init=x_init)
            cells.append(f"{float(((out - ref) ** 2).mean().sqrt()):12.2e}")
        print(f"{name:18s}" + "".join(cells))
    return 0
