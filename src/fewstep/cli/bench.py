"""``fewstep bench``: models x solvers x steps (and plans) side by side, optionally with diffusers, into a results
database."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from fewstep import zoo
from fewstep.bench import ResultStore, run_sweep, sweep, write_report
from fewstep.bench.peers import PEERS
from fewstep.bench.runner import diffusers_cache
from fewstep.bench.store import DEFAULT_DB
from fewstep.caching import check_cache_spec, parse_cache
from fewstep.cli.common import Subparsers, device, plan_device, scheme_list, seed_spec, step_list
from fewstep.conditioning import Labels
from fewstep.distributed import world
from fewstep.grids import GRIDS
from fewstep.outputs import check_output_dir
from fewstep.plan import Plan
from fewstep.solvers import make_solver
from fewstep.spec import parse_spec


def add_parser(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="run solvers side by side (optionally with diffusers) into a results DB",
                           description="Run models x solvers x steps, and any --plans, store results (resumable), "
                                       "optionally report.",
                           epilog="example: fewstep bench --models unet_m --solvers ddim,dpmpp_2m,unipc "
                                  "--steps 5,10,20 --with-diffusers --report report")
    bench.add_argument("--models", type=lambda s: s.split(","), default=["unet_m"], help="comma-separated (unet_m)")
    bench.add_argument("--solvers", type=lambda s: s.split(","), default=["ddim", "dpmpp_2m", "unipc"],
                       help="comma-separated fewstep solvers, each optionally with knobs as name:key=value "
                            "(ddim,dpmpp_2m,unipc; e.g. sa_solver:tau=0:predictor_order=3)")
    bench.add_argument("--steps", type=step_list, default=[5, 10, 20], help="comma-separated step counts (5,10,20)")
    bench.add_argument("--grid", choices=list(GRIDS), default="time_quadratic",
                       help="fewstep time grid (time_quadratic: the most accurate at 10-20 NFE on the zoo models)")
    bench.add_argument("--seeds", type=seed_spec, default="0-255", help="seed range (0-255)")
    bench.add_argument("--with-diffusers", action="store_true", help="also run diffusers' counterpart schedulers")
    bench.add_argument("--diffusers", type=lambda s: s.split(","), default=[],
                       help="diffusers schedulers to run as well, by label: " + ", ".join(PEERS))
    bench.add_argument("--cache", type=lambda s: s.split(","), default=[""],
                       help="comma-separated feature caches to run every fewstep solver with: none, "
                            "taylorseer:interval=3, deepcache:interval=3, encoder:interval=2, block:threshold=0.05, "
                            "magcache:threshold=0.1, auto:target_error=0.05 (default: none)")
    bench.add_argument("--quant", type=lambda s: s.split(","), default=[""], metavar="SCHEMES",
                       help="comma-separated quantization schemes to run every fewstep solver with (none for the "
                            "float network): " + scheme_list() + ", calibrated on each row's solver and steps as "
                            "in sample; each quantized row also records quant_error "
                            "(RMSE against the float network's samples from the same noise) and weights_bytes "
                            "(default: none)")
    bench.add_argument("--plans", type=lambda s: [x for x in s.split(",") if x], default=[],
                       help="comma-separated plan files (e.g. fewstep tune's plans/plan_nfe5.json), each one more "
                            "row labelled by its file name's stem (plan_nfe5), run as the plan says (solver, grid or "
                            "times, cache, dtype, device) from the same --seeds, on the plan's own model (added to "
                            "the report even if not in --models); an edited plan is rerun")
    bench.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32",
                       help="precision of the network (float32; float16/bfloat16 keep the state in float32); another "
                            "dtype or device is another experiment, labelled e.g. 'ddim [cuda, float16]' (the "
                            "reference stays the float32 CPU one; --plans run as their plan says)")
    bench.add_argument("--device", type=device, default="cpu",
                       help="torch device of the network, the noise and the state (cpu; cuda, cuda:1, ...)")
    bench.add_argument("--label", default=None,
                       help="class-conditional models (dit_s): the labels of the seeds, for every row, its reference "
                            "and diffusers' rows (an int, a list or range such as 0-4 cycled over the seeds, or cycle "
                            "for all classes in turn); another labelling is another experiment, labelled e.g. "
                            "'ddim [labels=3]' (default: the model's own default conditioning)")
    bench.add_argument("--db", default=str(DEFAULT_DB), help="results database (fewstep-results.sqlite)")
    bench.add_argument("--force", action="store_true", help="rerun experiments already in the database")
    bench.add_argument("--report", default=None, help="write the report to this folder afterwards")
    bench.set_defaults(func=run)


def bench_plans(paths: list[str]) -> dict[str, Plan]:
    """``--plans``: each file's plan by its stem (the row label), its model, device and cache checked before any
    experiment runs."""
    plans: dict[str, Plan] = {}
    for path in paths:
        name = Path(path).stem
        if name in plans:
            raise ValueError(f"--plans: two plan files are named {name!r} (the row label); rename one")
        try:
            plan = plans[name] = Plan.load(path)
            zoo.model_path(plan.model)
            plan_device(plan)
            if not parse_cache(plan.cache).is_none:
                check_cache_spec(zoo.load(plan.model), plan.cache)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--plans {path}: {err}") from None
    return plans


def check_caches(models: list[str], caches: list[str]) -> None:
    """Every cache spec against every model, before any experiment runs (diffusers' hooks are installed on the
    network and removed again to see that they apply)."""
    specs = [c for c in caches if c.startswith("diffusers:") or not parse_cache(c).is_none]
    for model in models if specs else []:
        den = zoo.load(model)
        for spec in specs:
            try:
                if spec.startswith("diffusers:"):
                    diffusers_cache(den, spec)
                else:
                    check_cache_spec(den, spec)
            except (TypeError, ValueError) as err:
                raise ValueError(f"--cache {spec} on {model}: {err}") from None


def run(args: argparse.Namespace) -> int:
    if args.report:
        check_output_dir(args.report)  # before any work
    for m in args.models:
        zoo.model_path(m)
    for s in args.solvers:
        name, opts = parse_spec(s)
        make_solver(name, **opts)
    labels = Labels.of(args.label, what="--label")
    plans = bench_plans(args.plans)
    exps = sweep(args.models, args.solvers, args.steps, grid=args.grid, seeds=args.seeds,
                 with_diffusers=args.with_diffusers, peers=args.diffusers, caches=args.cache, plans=plans,
                 dtype=args.dtype, device=args.device, quants=args.quant, labels=args.label or "")
    if labels is not None:  # every model (plans' too) is class-conditional with these classes, before any work
        for model in dict.fromkeys(e.model for e in exps):
            try:
                labels.check(zoo.load(model))
            except ValueError as err:
                raise ValueError(f"{err} ({model})") from None
    check_caches(args.models, args.cache)
    where = torch.device(args.device)
    # under torchrun, as in fewstep sample: 'cuda' is each process's own GPU
    if where.type == "cuda" and where.index is None and world()[1] > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = ResultStore(args.db)
    ran = run_sweep(exps, store, force=args.force)
    print(f"{ran} experiments run here, {len(exps) - ran} already in (or run by another sweep on) {store.path}")
    if args.report:
        print(f"report: {write_report(store, args.report)}")
    return 0
