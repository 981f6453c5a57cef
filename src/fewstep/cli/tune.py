"""``fewstep tune``: the best plan per NFE for a model, its time steps tuned and checked on held-out seeds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from fewstep import zoo
from fewstep.cli.common import (
    Subparsers,
    add_prompt_arguments,
    check_guidance,
    class_labels,
    device,
    positive_int,
    prompt_source,
    seeds,
    step_list,
)
from fewstep.conditioning import Prompts
from fewstep.metrics import DigitsFD
from fewstep.models import from_diffusers
from fewstep.noise import parse_seeds
from fewstep.outputs import check_output_dir
from fewstep.plan import DTYPES, place
from fewstep.solvers import make_solver
from fewstep.tuning import COMPARE, Row, TuneStore, best_row, tune, write_tune_report


def add_parser(sub: Subparsers) -> None:
    tun = sub.add_parser("tune", help="the best plan per NFE for a model: tuned time steps, checked on held-out seeds",
                         description="Per NFE: search the time steps of each --solvers solver against a teacher "
                                     "solve (dynamic programming over a fine candidate grid, then gradient descent "
                                     "through a differentiable run, then learned network times), compare with the "
                                     "fixed grids of those and the --compare solvers and with diffusers' schedulers "
                                     "on held-out seeds, and write the best plan (a tuned grid that loses on held-out "
                                     "seeds gives way to the best fixed one) and a report. Rerunning with the same "
                                     "--out resumes from its tune.sqlite. Example: "
                                     "fewstep tune --model unet_m --nfe 4,5,6,8 --out plans")
    tun.add_argument("--model", required=True, help="zoo model name or a diffusers folder")
    tun.add_argument("--nfe", type=step_list, default=[4, 5, 6, 8], help="network evaluations (4,5,6,8)")
    tun.add_argument("--solvers", type=lambda s: s.split(","), default=["ddim", "dpmpp_2m"],
                     help="candidate solvers (ddim,dpmpp_2m)")
    tun.add_argument("--compare", type=lambda s: [x for x in s.split(",") if x], default=list(COMPARE),
                     help=f"more solvers run on the fixed grids only, the best fixed configuration a tuned plan "
                          f"must beat ({','.join(COMPARE)}; '' for none)")
    tun.add_argument("--seeds", type=seeds, default=parse_seeds("1000-1031"), help="calibration seeds (1000-1031)")
    tun.add_argument("--holdout", type=seeds, default=parse_seeds("2000-2063"), help="held-out seeds (2000-2063)")
    tun.add_argument("--candidates", type=positive_int, default=40, help="candidate grid steps (40)")
    tun.add_argument("--label", default=None,
                     help="class-conditional models: the calibration labels (an int, a list or range such as 0-4, "
                          "cycled over the seeds, or cycle for all classes)")
    tun.add_argument("--holdout-label", default=None, help="the held-out labels, as --label (default: --label's)")
    add_prompt_arguments(tun, what="the calibration seeds (and the held-out ones, without --holdout-prompts)")
    tun.add_argument("--holdout-prompts", default=None, metavar="FILE",
                     help="the held-out prompts, one per line (default: the calibration prompts)")
    tun.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale the plan is tuned for (models with a null label, or a "
                          "pipeline's prompts against the negative prompt)")
    tun.add_argument("--minutes", type=float, default=None, help="search budget per NFE (teacher not counted)")
    tun.add_argument("--iterations", type=positive_int, default=150, help="gradient steps per refinement (150)")
    tun.add_argument("--no-decouple", action="store_true", help="no learned network times (tuned_decoupled rows)")
    tun.add_argument("--no-diffusers", action="store_true", help="no diffusers scheduler rows")
    tun.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32",
                     help="precision of the network for the teacher, the search and every row, written into the plans "
                          "(float32; float16/bfloat16 keep the state in float32)")
    tun.add_argument("--device", type=device, default="cpu",
                     help="torch device the teacher, the search and every row run on, written into the plans (cpu; "
                          "cuda, cuda:1, ...)")
    tun.add_argument("--out", required=True,
                     help="folder for the plans (plan_nfe<N>.json), the report (report.md, steps.png, "
                          "error_vs_nfe.png, grid.png) and tune.sqlite (a rerun resumes from it)")
    tun.set_defaults(func=run)


def digits_fd(den: Any) -> DigitsFD | None:
    """The digits FD for the shipped 8x8 digits models, else ``None``."""
    if tuple(getattr(den, "sample_shape", ())) != (1, 8, 8):
        return None
    return DigitsFD()


def cell(r: Row | None) -> str:
    """A best row as a table cell: its held-out error and what it is."""
    if r is None:
        return "—"
    name = r["solver"] if r["kind"] == "diffusers" else f"{r['solver']} {r['grid']}"
    return f"{r['holdout']:.4f} ({name})"


def prompt_sources(args: argparse.Namespace) -> tuple[Prompts | None, Prompts | None]:
    """The calibration and held-out prompt sources (``None, None`` without prompts)."""
    labelled = args.label is not None or args.holdout_label is not None
    prompts = prompt_source(args, labelled=labelled, guided=args.guidance is not None)
    if prompts is None:
        if args.holdout_prompts is not None:
            raise ValueError("--holdout-prompts goes with --prompt or --prompts")
        return None, None
    if args.holdout_prompts is None:
        return prompts, prompts
    return prompts, Prompts.from_file(args.holdout_prompts, negative=prompts.negative, what="--holdout-prompts")


def run(args: argparse.Namespace) -> int:
    out = Path(check_output_dir(args.out))  # before any work
    for name in [*args.solvers, *args.compare]:
        make_solver(name)
    if args.minutes is not None and not args.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    from fewstep.pipelines import decode, load_pipeline  # diffusers: imported only when a command needs it

    prompts, hold_prompts = prompt_sources(args)
    pipe, uncond = None, None
    if prompts is None or hold_prompts is None:
        den = zoo.load(args.model)
        cond = class_labels(den, args.label, len(args.seeds))
        if args.holdout_label is None:
            hold_cond = class_labels(den, args.label, len(args.holdout))
        else:
            hold_cond = class_labels(den, args.holdout_label, len(args.holdout), what="--holdout-label")
        check_guidance(den, args.guidance)
    else:  # the pipeline's own encoders encode the prompts (each checked against them first), before any sampling
        pipe = load_pipeline(zoo.model_path(args.model))
        den = from_diffusers(pipe)
        cond, hold_cond = prompts.cond(pipe, len(args.seeds)), hold_prompts.cond(pipe, len(args.holdout))
        uncond = None if args.guidance is None else prompts.negative_cond(pipe)
    place(den, torch.device(args.device), DTYPES[args.dtype])
    shape = den.sample_shape
    fd = digits_fd(den) if len(args.holdout) > 64 else None  # FD needs more samples than its 64 features
    out.mkdir(parents=True, exist_ok=True)
    store = TuneStore(out / "tune.sqlite")
    teachers: dict = {}  # one teacher solve for every NFE
    results, images = [], {}
    print("| NFE | plan | held-out error | best fixed (held-out) | best diffusers (held-out) | teacher s | search s |")
    print("|---|---|---|---|---|---|---|")
    for nfe in args.nfe:
        got = tune(den, args.model, nfe, solvers=args.solvers, shape=shape, seeds=args.seeds, holdout=args.holdout,
                   cond=cond, holdout_cond=hold_cond, guidance=args.guidance, uncond=uncond,
                   candidates=args.candidates, compare=args.compare, decouple=not args.no_decouple,
                   iterations=args.iterations, minutes=args.minutes, diffusers=not args.no_diffusers,
                   dtype=args.dtype, device=args.device, fd=fd, store=store, teachers=teachers)
        path = got.plan.save(out / f"plan_nfe{nfe}.json")
        results.append(got.result())
        if pipe is not None:  # the report draws the decoded images of the latents
            got.samples = {label: decode(pipe, x) for label, x in got.samples.items()}
        teacher = got.samples.pop("teacher", None)
        if teacher is not None and "teacher" not in images:
            images["teacher"] = teacher
        images.update({f"NFE {nfe}: {label}": x for label, x in got.samples.items()})
        row = got.chosen
        fixed, peer = best_row(got.rows, "fewstep", fixed=True), best_row(got.rows, "diffusers")
        print(f"| {nfe} | {row['solver']} {row['grid']} -> {path} | {row['holdout']:.4f} | {cell(fixed)} | "
              f"{cell(peer)} | {got.teacher_seconds:.0f} | {got.search_seconds:.0f} |", flush=True)
    store.close()
    print(f"report: {write_tune_report(out, args.model, results, images=images, schedule=den.schedule)}")
    return 0
