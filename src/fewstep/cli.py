"""The ``fewstep`` command line.

Examples::

    fewstep demo                       # solver errors at 5/10/20 NFE on the analytic Gaussian-mixture model
    fewstep demo --nfe 4,8,16 --seeds 0-255 --schedule edm
    fewstep solvers                    # name, order, NFE/step, stochastic, reference paper
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from fewstep import __version__
from fewstep.grids import GRIDS
from fewstep.noise import parse_seeds
from fewstep.solvers import SOLVERS, make_solver

DEMO_SOLVERS = ["ddim", "euler", "heun", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_compat",
                "unipc", "deis", "ipndm"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _seeds(text: str) -> list[int]:
    try:
        return parse_seeds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_solvers(args: argparse.Namespace) -> int:
    rows = [("name", "order", "NFE/step", "stochastic", "reference")]
    for name in SOLVERS:
        s = make_solver(name)
        rows.append((name, str(s.order), str(s.nfe_per_step), "yes" if s.stochastic else "no", s.paper))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fewstep.grids import make_grid
    from fewstep.sample import sample
    from fewstep.schedules import EDM, DiscreteVP, LinearVP
    from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

    schedule = {"discrete": DiscreteVP.named("linear"), "vp": LinearVP(), "edm": EDM()}[args.schedule]
    den = AnalyticDenoiser(gaussian_mixture(dim=16, components=6, std=0.2, seed=0), schedule)
    solvers = args.solvers or DEMO_SOLVERS
    for name in solvers:
        make_solver(name)  # fail early on a bad name
    noise = torch.randn(len(args.seeds), 16, generator=torch.Generator().manual_seed(args.seeds[0]),
                        dtype=torch.float64)
    t_start, t_end = schedule.t_max, schedule.t_min
    x_init = noise * (schedule.alpha(t_start) ** 2 + schedule.sigma(t_start) ** 2) ** 0.5
    print(f"fewstep {__version__} demo: exact Gaussian-mixture denoiser (16-D, 6 components), {schedule!r},")
    print(f"{args.grid} grid, {len(args.seeds)} samples; RMSE at t_min vs the probability-flow ODE solution")
    print("(torchdiffeq dopri5, rtol 1e-10). Lower is better; '-' = NFE not reachable by that solver.\n")
    ref = den.reference(x_init, t_start, t_end)
    header = f"{'solver':18s}" + "".join(f"{'NFE ' + str(n):>12s}" for n in args.nfe)
    print(header)
    print("-" * len(header))
    from tqdm.auto import tqdm

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="solver errors vs NFE on an analytic model with a known exact solution",
                          description="Print each solver's RMSE against the exact probability-flow solution.")
    demo.add_argument("--nfe", type=_int_list, default=[5, 10, 20], help="comma-separated NFE budgets (5,10,20)")
    demo.add_argument("--seeds", type=_seeds, default=parse_seeds("0-63"), help="seed range, e.g. 0-63")
    demo.add_argument("--grid", choices=list(GRIDS), default="logsnr", help="time grid (logsnr)")
    demo.add_argument("--schedule", choices=["discrete", "vp", "edm"], default="discrete",
                      help="noise schedule: DDPM linear betas (discrete), continuous linear VP, or EDM")
    demo.add_argument("--solvers", type=lambda s: s.split(","), default=None,
                      help=f"comma-separated solver names (default: {','.join(DEMO_SOLVERS)})")
    demo.set_defaults(func=cmd_demo)
    solvers = sub.add_parser("solvers", help="list the solvers: name, order, NFE/step, stochastic, paper")
    solvers.set_defaults(func=cmd_solvers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"fewstep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
