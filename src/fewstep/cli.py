"""The ``fewstep`` command line.

Examples::

    fewstep bench --models unet_m --solvers ddim,dpmpp_2m,unipc --steps 5,10,20 --with-diffusers --report report
    fewstep sample --model unet_m --solver dpmpp_2m --steps 10 --grid logsnr --seeds 0-63 --out grid.png
    fewstep report --db fewstep-results.sqlite --out report
    fewstep models                     # the shipped models and their cards
    fewstep solvers                    # name, order, NFE/step, stochastic, reference paper
    fewstep demo                       # solver errors at 5/10/20 NFE on an analytic Gaussian mixture
    fewstep zoo train unet_m           # retrain a shipped model (reproducible)
    fewstep generate --pipeline ./sd-model --prompt "a red fox" --solver unipc --steps 8 --out fox.png
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from fewstep import __version__
from fewstep.grids import GRIDS, MAX_STEPS
from fewstep.noise import parse_seeds
from fewstep.solvers import SOLVERS, make_solver
from fewstep.spec import parse_options, parse_spec

DEMO_SOLVERS = ["ddim", "euler", "heun", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_compat",
                "unipc", "deis", "ipndm"]


def _int_list(text: str, *, most: int | None = None) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    if most is not None and max(values) > most:
        raise argparse.ArgumentTypeError(f"at most {most:,}, got {max(values):,}")
    return values


def _step_list(text: str) -> list[int]:
    return _int_list(text, most=MAX_STEPS)


def _step_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"at most {MAX_STEPS:,} steps, got {value:,}")
    return value


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seeds(text: str) -> list[int]:
    try:
        return parse_seeds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seed_spec(text: str) -> str:
    """A seed range kept as written (it names the noise in the results database), validated."""
    _seeds(text)
    return text


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
    x_init = noise * schedule.prior_std(t_start)
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


def _options(items: list[str] | None) -> dict[str, object]:
    """``["eta=1", "variant=bh1"]`` -> ``{"eta": 1, "variant": "bh1"}`` (values parsed as JSON when they can be)."""
    return parse_options(items or [])


def cmd_models(args: argparse.Namespace) -> int:
    from fewstep.zoo import list_models

    cards = list_models()
    if not cards:
        print("no shipped models in this install")
        return 0
    print(f"{'name':12s} {'kind':11s} {'params':>9s}  {'FD (1000 steps) / floor':28s} description")
    for name, c in cards.items():
        fd = c.get("fd_1000_step")
        fd_txt = f"{fd:.3f} / {c['fd_floor']:.3f}" if fd is not None else "-"
        print(f"{name:12s} {c['kind']:11s} {c['params']:>9,d}  {fd_txt:28s} {c.get('description', '')}")
    return 0


def _class_labels(den: object, label: str | None, n: int) -> dict[str, torch.Tensor] | None:
    """``cond`` for ``--label``: an int in the model's class range, or ``cycle``; refused on other models."""
    if label is None:
        return None
    default = getattr(den, "default_cond", {}) or {}
    config = getattr(getattr(den, "model", None), "config", {})
    if "class_labels" in default:
        classes = int(default["class_labels"])  # a DiT's null label sits at index num_classes
    elif getattr(config, "num_class_embeds", None):
        classes = int(config.num_class_embeds)  # a class-conditional UNet2DModel: no null label
    else:
        raise ValueError("--label needs a class-conditional model (e.g. dit_s); this one takes no class labels")
    if label == "cycle":
        return {"class_labels": torch.arange(n) % classes}
    try:
        values = parse_seeds(label)
    except ValueError:
        raise ValueError(f"--label must be an integer class, a list or range of them, or 'cycle', got {label!r}") \
            from None
    bad = [v for v in values if not 0 <= v < classes]
    if bad:
        raise ValueError(f"--label {bad[0]} is out of range: this model has classes 0-{classes - 1}")
    return {"class_labels": torch.tensor(values)[torch.arange(n) % len(values)]}



def _sample_plan(args: argparse.Namespace) -> Any:
    """The plan ``fewstep sample`` runs: ``--plan FILE``, or one made from the flags (never both)."""
    from fewstep.plan import Plan

    flags = {"--model": args.model, "--solver": args.solver, "--steps": args.steps, "--grid": args.grid,
             "--option": args.option, "--cache": args.cache, "--quant": args.quant, "--dtype": args.dtype,
             "--device": args.device}
    if args.plan is not None:
        given = [k for k, v in flags.items() if v is not None]
        if given:
            raise ValueError(f"--plan gives the model, solver, grid, cache, quant, dtype and device; drop "
                             f"{', '.join(given)}")
        plan = Plan.load(args.plan)
        _plan_device(plan)
        return plan
    if args.model is None:
        raise ValueError("give --model (a zoo name or a diffusers folder) or --plan (a plan file)")
    cache = args.cache if args.cache not in (None, "none") else ""
    return Plan(model=args.model, solver=args.solver or "dpmpp_2m", solver_options=_options(args.option),
                grid=args.grid or "time_quadratic", steps=args.steps or 10, cache=cache, dtype=args.dtype or "float32",
                device=args.device or "cpu", quant=args.quant or "")


def cmd_sample(args: argparse.Namespace) -> int:
    from fewstep.caching import CacheStats
    from fewstep.distributed import process_group, world
    from fewstep.hooks import NFECounter, ProgressBar
    from fewstep.outputs import check_output_dir, check_output_file
    from fewstep.zoo import load

    rank, size = world()
    to_folder = Path(args.out).suffix == ""
    # before any work: a bad path must not cost a run
    out = check_output_dir(args.out) if to_folder else check_output_file(args.out, (".png", ".npz"))
    if size > 1 and not to_folder:
        raise ValueError(f"--out {args.out}: {size} processes write a folder of shards, not one file; give a "
                         "folder (a path without a suffix)")
    plan = _sample_plan(args)
    batch = args.batch_size or (64 if to_folder else None)
    den = load(plan.model)
    shape = den.sample_shape
    if not to_folder and out.suffix == ".png" and shape[0] not in (1, 3):
        raise ValueError(f"--out {out}: a PNG grid needs 1 or 3 channels, this model makes {shape[0]}; use .npz")
    cond = _class_labels(den, args.label, len(args.seeds))
    if plan.cache:
        from fewstep.caching import check_cache_spec

        check_cache_spec(den, plan.cache)
    shards = None
    if to_folder:
        from fewstep.shards import ShardFolder

        run = {"plan": plan.to_dict(), "label": args.label, "shape": list(shape)}
        shards = ShardFolder(out, list(args.seeds), batch, run)
        done = shards.prepare()  # every rank checks the same manifest; a foreign folder is refused here
        if done and rank == 0:
            print(f"resuming: {done} of {shards.count} shards already in {out}")
    from fewstep.plan import DTYPES, place

    place(den, torch.device(plan.device), DTYPES[plan.dtype])
    with process_group(plan.device):
        if shards is not None:
            from fewstep.distributed import barrier

            if rank == 0:
                shards.clean()  # a killed writer's temporary files; no process writes until the barrier
            barrier()
        sampler = plan.build(den)  # a quantized plan quantizes a copy of den's network (and calibrates) here
        stats = CacheStats()
        cal = sampler.calibration
        note = "" if cal is None else f" (auto: {cal.spec}, calibration error {cal.error:.3g})"
        if plan.quant:
            from fewstep.quant import weights_bytes

            info = sampler.network.quant
            note += (f"; {plan.quant} ({info.rounding}, {len(info.skipped)} layers float): weights "
                     f"{weights_bytes(sampler.network) / 1024:,.1f} of {weights_bytes(den) / 1024:,.1f} KiB")
        if shards is not None:
            from fewstep.shards import run_shards

            t0 = time.perf_counter()
            written, nfe = run_shards(sampler, shards, cond=cond, rank=rank, world=size, hooks=[stats],
                                      progress=not args.quiet)
            seconds = time.perf_counter() - t0
        else:
            counter = NFECounter()
            hooks = [counter, stats] + ([ProgressBar()] if not args.quiet and batch is None else [])
            t0 = time.perf_counter()
            x = sampler.sample(seeds=args.seeds, hooks=hooks, cond=cond, batch_size=batch)
            seconds, nfe = time.perf_counter() - t0, counter.nfe
    if stats.full + stats.reused:
        note += (f"; cache reused {stats.reused} of {stats.full + stats.reused} evaluations, computed "
                 f"{100 * stats.mean_work:.0f} % of the network")
    what = "samples" if shape[0] in (1, 3) else "undecoded latents (no VAE decode; `fewstep generate` decodes)"
    if shards is not None:
        n = sum(len(shards.shard_seeds(i)) for i in range(rank, shards.count, size))
        if rank == 0:
            left = shards.pending()
            status = "complete" if not left else f"{len(left)} shards still missing: run the same command again"
            mine = f"; this process wrote {written} shards" if size > 1 else ""
            speed = f", {n / seconds:.1f} samples/s per process" if written else ", nothing left to sample"
            print(f"{len(args.seeds)} {what} in {shards.count} shards of {batch}{f', {nfe} NFE' if nfe else ''}"
                  f"{note}{mine}{speed} -> {out}/ ({status})")
        return 0
    _write_samples(out, x, args.seeds, nfe)
    print(f"{len(args.seeds)} {what}, {nfe} NFE{note}, {len(args.seeds) / seconds:.1f} samples/s -> {out}")
    return 0


def _write_samples(out: Path, x: torch.Tensor, seeds: Sequence[int], nfe: int) -> None:
    """``x`` as an .npz (samples, seeds, nfe) or a PNG grid, atomically."""
    from fewstep.bench.report import mosaic
    from fewstep.outputs import atomic_write

    if out.suffix == ".npz":
        from fewstep.shards import save_samples

        save_samples(out, x.cpu().numpy(), seeds, nfe)
    else:
        from PIL import Image

        image = Image.fromarray(mosaic(x.cpu()))
        atomic_write(out, lambda f: image.save(f, format="PNG"))


def _generate_plan(args: argparse.Namespace) -> Any:
    """``fewstep generate --plan FILE``'s plan (``None`` without one): refused with a flag it gives, or with a
    dtype or device this command cannot honour."""
    if args.plan is None:
        return None
    from fewstep.pipelines import DTYPES
    from fewstep.plan import Plan

    flags = {"--solver": args.solver, "--option": args.option, "--steps": args.steps, "--grid": args.grid,
             "--cache": args.cache, "--quant": args.quant, "--guidance": args.guidance, "--dtype": args.dtype,
             "--device": args.device}
    given = [k for k, v in flags.items() if v is not None]
    if given:
        raise ValueError(f"--plan gives the solver, grid, steps, cache, quant, guidance, dtype and device; drop "
                         f"{', '.join(given)}")
    plan = Plan.load(args.plan)
    try:
        if plan.dtype not in DTYPES:
            raise ValueError(f"a pipeline runs in {', '.join(DTYPES)}, the plan asks for {plan.dtype}")
        _plan_device(plan)
    except ValueError as err:
        raise ValueError(f"--plan {args.plan}: {err}") from None
    return plan


def _plan_device(plan: Any) -> None:
    """A plan's device, checked as ``--device`` is (a CUDA device where there is none is refused)."""
    try:
        _device(plan.device)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"device {err}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import dataclasses

    import numpy as np

    from fewstep.bench.report import mosaic
    from fewstep.outputs import atomic_write, check_output_file
    from fewstep.pipelines import DTYPES, check_pipeline_scheme, generate, load_pipeline, quantize_pipeline, use_fewstep
    from fewstep.scheduler import FewstepScheduler

    out = check_output_file(args.out, (".png", ".npz"))  # before any work
    plan = _generate_plan(args)
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % 8:
            raise ValueError(f"{name} must be a multiple of 8, got {value}")
    if plan is None:
        solver, options, grid = args.solver or "dpmpp_2m", _options(args.option), args.grid or "diffusers"
        grid_options: dict[str, Any] = {}
        steps, cache, guidance = args.steps or 20, args.cache or "none", args.guidance
        quant = "" if args.quant in (None, "none") else args.quant
        dtype, device, where = args.dtype or "float32", args.device or "cpu", f"the {grid} grid"
    else:  # the pipeline stands in for the plan's model; quant, cache, guidance go on the pipeline, not the scheduler
        solver, options, grid, grid_options = plan.solver, dict(plan.solver_options), plan.grid, dict(plan.grid_options)
        steps, cache, guidance, quant = plan.steps, plan.cache or "none", plan.guidance, plan.quant
        dtype, device, where = plan.dtype, plan.device, f"the {grid} grid of {args.plan}"
    # A bad solver, knob or grid, or a solver no pipeline can drive, fails here, before the pipeline loads (a plan's
    # explicit times are checked on the pipeline's own schedule once it is loaded, before it runs).
    FewstepScheduler(solver, "diffusers" if grid == "explicit" else grid, solver_options=options,
                     grid_options=grid_options)
    _check_pipeline_cache(cache)
    if quant:
        check_pipeline_scheme(quant)
    pipe = load_pipeline(args.pipeline, torch_dtype=DTYPES[dtype], device=device)
    info = quantize_pipeline(pipe, quant) if quant else None  # before the cache, which hooks the network in place
    if plan is None:
        scheduler = use_fewstep(pipe, solver, grid, **options)
    else:
        scheduler = FewstepScheduler.from_plan(dataclasses.replace(plan, cache="", guidance=None, quant=""),
                                               pipe.scheduler)
        pipe.scheduler = scheduler
    handle = None
    if cache != "none":
        from fewstep.caching import enable_cache

        call = {"prompt": args.prompt, "num_inference_steps": steps}
        for key, value in (("negative_prompt", args.negative_prompt), ("guidance_scale", guidance),
                           ("height", args.height), ("width", args.width)):
            if value is not None:
                call[key] = value
        pipe.set_progress_bar_config(disable=True)
        # knobs are checked against the network before any sampling; auto and magcache run the pipeline on the
        # calibration seeds 1000-1003 first (never the output seeds)
        handle = enable_cache(pipe, cache, **call)
    x, calls = generate(pipe, args.prompt, seeds=args.seeds, steps=steps, negative_prompt=args.negative_prompt,
                        guidance=guidance, height=args.height, width=args.width,
                        latents=out.suffix == ".npz", progress=not args.quiet)
    if out.suffix == ".npz":
        arrays = {"latents": x.float().cpu().numpy(), "seeds": np.array(args.seeds), "network_calls": calls,
                  "timesteps": scheduler.timesteps.float().cpu().numpy()}
        atomic_write(out, lambda f: np.savez(f, **arrays))
        what = "undecoded latents"
    else:
        from PIL import Image

        image = Image.fromarray(mosaic(x.float().cpu() * 2 - 1, scale=1))
        atomic_write(out, lambda f: image.save(f, format="PNG"))
        what = "images"
    note = ""
    if info is not None:
        note = f"; network {quant} ({len(info.layers)} layers quantized, {len(info.skipped)} left in float)"
    if handle is not None:
        st = handle.stats
        if handle.calibration is not None:
            cache = f"{cache} -> {handle.calibration.spec}"
        note += (f"; cache {cache} reused {st.reused} of {st.full + st.reused} evaluations, computed "
                f"{100 * st.mean_work:.0f} % of the network")
    print(f"{len(args.seeds)} {what}, {solver} on {where}, {calls} network calls{note} -> {out}")
    return 0


def _check_pipeline_cache(spec: str) -> None:
    """A pipeline cache spec names a method, ``auto`` or ``none`` (its knobs are checked against the network)."""
    from fewstep.caching import METHODS
    from fewstep.caching.calibrate import _check_target
    from fewstep.spec import parse_spec

    name, knobs = parse_spec(spec)
    if name == "auto":
        _check_target(knobs.get("target_error", 0.05))
    elif name != "none" and name not in METHODS:
        raise ValueError(f"unknown cache {name!r}; known: none, {', '.join(METHODS)}, auto")


def cmd_bench(args: argparse.Namespace) -> int:
    from fewstep.bench import ResultStore, run_sweep, sweep, write_report
    from fewstep.outputs import check_output_dir
    from fewstep.zoo import model_path

    if args.report:
        check_output_dir(args.report)  # before any work
    for m in args.models:
        model_path(m)
    for s in args.solvers:
        name, opts = parse_spec(s)
        make_solver(name, **opts)
    plans = _bench_plans(args.plans)
    exps = sweep(args.models, args.solvers, args.steps, grid=args.grid, seeds=args.seeds,
                 with_diffusers=args.with_diffusers, peers=args.diffusers, caches=args.cache, plans=plans,
                 dtype=args.dtype, device=args.device, quants=args.quant)
    _check_caches(args.models, args.cache)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        from fewstep.distributed import world

        if world()[1] > 1:  # under torchrun, as in fewstep sample: 'cuda' is each process's own GPU
            import os

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = ResultStore(args.db)
    ran = run_sweep(exps, store, force=args.force)
    print(f"{ran} experiments run here, {len(exps) - ran} already in (or run by another sweep on) {store.path}")
    if args.report:
        print(f"report: {write_report(store, args.report)}")
    return 0


def _bench_plans(paths: list[str]) -> dict[str, Any]:
    """``--plans``: each file's plan by its stem (the row label), its model, device and cache checked before any
    experiment runs."""
    from fewstep.caching import check_cache_spec
    from fewstep.plan import Plan
    from fewstep.zoo import load, model_path

    plans: dict[str, Any] = {}
    for path in paths:
        name = Path(path).stem
        if name in plans:
            raise ValueError(f"--plans: two plan files are named {name!r} (the row label); rename one")
        try:
            plan = plans[name] = Plan.load(path)
            model_path(plan.model)
            _plan_device(plan)
            if plan.cache and plan.cache != "none":
                check_cache_spec(load(plan.model), plan.cache)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--plans {path}: {err}") from None
    return plans


def _check_caches(models: list[str], caches: list[str]) -> None:
    """Every cache spec against every model, before any experiment runs (diffusers' hooks are installed on the
    network and removed again to see that they apply)."""
    from fewstep.bench.runner import diffusers_cache
    from fewstep.caching import check_cache_spec
    from fewstep.zoo import load

    specs = [c for c in caches if c and c != "none"]
    for model in models if specs else []:
        den = load(model)
        for spec in specs:
            try:
                if spec.startswith("diffusers:"):
                    diffusers_cache(den, spec)
                else:
                    check_cache_spec(den, spec)
            except (TypeError, ValueError) as err:
                raise ValueError(f"--cache {spec} on {model}: {err}") from None


def cmd_tune(args: argparse.Namespace) -> int:
    from fewstep.tuning.report import write_tune_report
    from fewstep.outputs import check_output_dir
    from fewstep.plan import DTYPES, place
    from fewstep.tuning.store import TuneStore
    from fewstep.tuning import best_row, tune
    from fewstep.zoo import load

    out = Path(check_output_dir(args.out))  # before any work
    for name in [*args.solvers, *args.compare]:
        make_solver(name)
    if args.minutes is not None and not args.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    den = load(args.model)
    place(den, torch.device(args.device), DTYPES[args.dtype])
    shape = den.sample_shape
    hold_label = args.holdout_label if args.holdout_label is not None else args.label
    cond = _class_labels(den, args.label, len(args.seeds))
    hold_cond = _class_labels(den, hold_label, len(args.holdout))
    if args.guidance is not None and "class_labels" not in (getattr(den, "default_cond", {}) or {}):
        raise ValueError("--guidance needs a model with a null condition (a class-conditional DiT such as dit_s)")
    fd = _digits_fd(den) if len(args.holdout) > 64 else None  # FD needs more samples than its 64 features
    out.mkdir(parents=True, exist_ok=True)
    store = TuneStore(out / "tune.sqlite")
    teachers: dict = {}  # one teacher solve for every NFE
    results, images = [], {}
    print("| NFE | plan | held-out error | best fixed (held-out) | best diffusers (held-out) | teacher s | search s |")
    print("|---|---|---|---|---|---|---|")
    for nfe in args.nfe:
        got = tune(den, args.model, nfe, solvers=args.solvers, shape=shape, seeds=args.seeds, holdout=args.holdout,
                   cond=cond, holdout_cond=hold_cond, guidance=args.guidance, candidates=args.candidates,
                   compare=args.compare, decouple=not args.no_decouple, iterations=args.iterations,
                   minutes=args.minutes, diffusers=not args.no_diffusers, dtype=args.dtype, device=args.device, fd=fd,
                   store=store, teachers=teachers)
        path = got.plan.save(out / f"plan_nfe{nfe}.json")
        results.append(got.result())
        teacher = got.samples.pop("teacher", None)
        if teacher is not None and "teacher" not in images:
            images["teacher"] = teacher
        images.update({f"NFE {nfe}: {label}": x for label, x in got.samples.items()})
        row = got.chosen

        def cell(r: dict | None) -> str:
            if r is None:
                return "—"
            name = r["solver"] if r["kind"] == "diffusers" else f"{r['solver']} {r['grid']}"
            return f"{r['holdout']:.4f} ({name})"

        fixed, peer = best_row(got.rows, "fewstep", fixed=True), best_row(got.rows, "diffusers")
        print(f"| {nfe} | {row['solver']} {row['grid']} -> {path} | {row['holdout']:.4f} | {cell(fixed)} | "
              f"{cell(peer)} | {got.teacher_seconds:.0f} | {got.search_seconds:.0f} |", flush=True)
    store.close()
    print(f"report: {write_tune_report(out, args.model, results, images=images, schedule=den.schedule)}")
    return 0


def _digits_fd(den: Any) -> Any:
    """The digits FD for the shipped 8x8 digits models, else ``None``."""
    if tuple(getattr(den, "sample_shape", ())) != (1, 8, 8):
        return None
    from fewstep.metrics import DigitsFD

    return DigitsFD()


def cmd_fd(args: argparse.Namespace) -> int:
    from fewstep.metrics import DigitsFD
    from fewstep.shards import MANIFEST, read_manifest

    folder = Path(args.folder)
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"{folder} is not a shard folder (no {MANIFEST}); write one with fewstep sample --out DIR")
    try:
        shape = read_manifest(folder)["run"]["shape"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{folder / MANIFEST} is not a fewstep shard manifest") from None
    if list(shape) != [1, 8, 8]:
        raise ValueError(f"the digits FD takes 1x8x8 samples; {folder} holds {'x'.join(map(str, shape))}")
    fd = DigitsFD()
    value, n = fd.of_shards(folder)
    floor = fd.floor(min(n, 898))
    print(f"FD {value:.4f} over {n} samples (real digits against real digits at n={min(n, 898)}: {floor:.4f})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fewstep.bench import ResultStore, write_report
    from fewstep.outputs import check_output_dir

    if not Path(args.db).is_file():
        raise ValueError(f"no results database at {args.db}")
    check_output_dir(args.out)
    print(f"report: {write_report(ResultStore(args.db, readonly=True), args.out)}")
    return 0


def cmd_zoo_train(args: argparse.Namespace) -> int:
    from fewstep.zoo.train import train

    print(train(args.name, args.out, iters=args.iters))
    return 0


def cmd_zoo_evaluate(args: argparse.Namespace) -> int:
    from fewstep.bench.cards import evaluate

    print(evaluate(args.name, n=args.samples))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where help is, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fewstep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="solver errors vs NFE on an analytic model with a known exact solution",
                          description="Print each solver's RMSE against the exact probability-flow solution.")
    demo.add_argument("--nfe", type=_step_list, default=[5, 10, 20], help="comma-separated NFE budgets (5,10,20)")
    demo.add_argument("--seeds", type=_seeds, default=parse_seeds("0-63"), help="seed range, e.g. 0-63")
    demo.add_argument("--grid", choices=list(GRIDS), default="logsnr", help="time grid (logsnr)")
    demo.add_argument("--schedule", choices=["discrete", "vp", "edm"], default="discrete",
                      help="noise schedule: DDPM linear betas (discrete), continuous linear VP, or EDM")
    demo.add_argument("--solvers", type=lambda s: s.split(","), default=None,
                      help=f"comma-separated solver names (default: {','.join(DEMO_SOLVERS)})")
    demo.set_defaults(func=cmd_demo)
    solvers = sub.add_parser("solvers", help="list the solvers: name, order, NFE/step, stochastic, paper")
    solvers.set_defaults(func=cmd_solvers)

    models = sub.add_parser("models", help="list the shipped models and their cards")
    models.set_defaults(func=cmd_models)

    smp = sub.add_parser("sample", help="sample a zoo model or a diffusers folder to a PNG grid or an .npz",
                         description="Sample a model. Example: fewstep sample --model unet_m --solver dpmpp_2m "
                                     "--steps 10 --seeds 0-63 --out grid.png")
    smp.add_argument("--model", default=None, help="zoo model name (see `fewstep models`) or a diffusers folder")
    smp.add_argument("--plan", default=None, help="a plan file (JSON: model, solver, grid or times, cache, quant, "
                     "dtype, device) instead of --model/--solver/--steps/--grid/--option/--cache/--quant/--dtype/"
                     "--device")
    smp.add_argument("--solver", default=None, help="solver name (see `fewstep solvers`; dpmpp_2m)")
    smp.add_argument("--steps", type=_step_count, default=None, help="number of steps (10)")
    smp.add_argument("--grid", choices=list(GRIDS), default=None, help="time grid (time_quadratic)")
    smp.add_argument("--seeds", type=_seeds, default=parse_seeds("0-63"), help="seed range (0-63)")
    smp.add_argument("--option", action="append", help="solver knob key=value (repeatable), e.g. eta=1")
    smp.add_argument("--label", default=None, help="class label for class-conditional models (dit_s): an int, or "
                     "'cycle' for 0-9 in turn; default: the model's unconditional label")
    smp.add_argument("--cache", default=None, help="feature cache: taylorseer:interval=3:order=2, "
                     "deepcache:interval=3, encoder:interval=2 (U-Nets), block:threshold=0.05, magcache:threshold=0.1 "
                     "(transformers), auto:target_error=0.05[:method=all] (calibrated here), none")
    smp.add_argument("--quant", default=None, metavar="SCHEME",
                     help="quantize (a copy of) the network: " + _scheme_list() + "; calibrated on this run's solver "
                          "and steps (seeds 1000-1127): activation ranges, and GPTQ weight rounding (all but fp8wo; "
                          ":round=nearest skips it); first and last layers stay float (:keep_ends=false quantizes "
                          "them); none (default)")
    smp.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default=None,
                     help="precision of the network (float32; float16/bfloat16 keep the state in float32)")
    smp.add_argument("--device", type=_device, default=None, help="torch device (cpu; cuda, cuda:1, ...)")
    smp.add_argument("--batch-size", type=_positive_int, default=None,
                     help="samples per batch: memory is bounded by it, not by the seed count (default: all seeds "
                          "at once for a file, 64 for a folder); sample k is the same whatever the batch size")
    smp.add_argument("--out", required=True,
                     help="output .png (image grid) or .npz (samples), or a folder (a path without a suffix): "
                          "shards of --batch-size seeds with a manifest, written as they finish; the same command "
                          "resumes an interrupted folder, and under torchrun (torchrun --nproc-per-node N -m fewstep "
                          "sample ...) the processes share the shards")
    smp.add_argument("--quiet", action="store_true", help="no progress bar")
    smp.set_defaults(func=cmd_sample)

    gen = sub.add_parser("generate", help="a diffusers pipeline folder, prompted, sampled by a fewstep solver",
                         description="Generate images from a local diffusers pipeline folder (offline, safetensors "
                                     "only) with a fewstep solver in place of its scheduler. Example: fewstep "
                                     "generate --pipeline ./sd-model --prompt 'a red fox' --solver unipc --steps 8 "
                                     "--seeds 0-3 --out fox.png, or with a tuned plan: fewstep generate --pipeline "
                                     "./sd-model --prompt 'a red fox' --plan plans/plan_nfe5.json --out fox.png")
    gen.add_argument("--pipeline", required=True, help="local diffusers pipeline folder (with model_index.json)")
    gen.add_argument("--prompt", required=True, help="the text prompt")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt (default: the pipeline's)")
    gen.add_argument("--plan", default=None,
                     help="a plan file (fewstep tune's plan_nfe<N>.json) giving the solver and knobs, the grid or "
                          "times and steps, the cache, the quantization, the guidance scale, the dtype of the "
                          "weights (float32, float16 or bfloat16; the latents stay float32) and the device, instead of "
                          "--solver/--option/--grid/--steps/--cache/--quant/--guidance/--dtype/--device; the pipeline "
                          "stands in for the plan's model")
    gen.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    gen.add_argument("--solver", default=None, help="fewstep solver name (see `fewstep solvers`; dpmpp_2m)")
    gen.add_argument("--option", action="append", help="solver knob key=value (repeatable), e.g. tau=0")
    gen.add_argument("--steps", type=_step_count, default=None, help="number of steps (20)")
    gen.add_argument("--grid", choices=["diffusers", *GRIDS], default=None,
                     help="time grid: the pipeline scheduler's own steps (diffusers, the default) or a fewstep grid")
    gen.add_argument("--seeds", type=_seeds, default=parse_seeds("0-3"), help="seed range, one image each (0-3)")
    gen.add_argument("--height", type=_positive_int, default=None, help="image height (default: the model's)")
    gen.add_argument("--width", type=_positive_int, default=None, help="image width (default: the model's)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                     help="dtype of the pipeline's weights (float32)")
    gen.add_argument("--device", type=_device, default=None, help="torch device (cpu)")
    gen.add_argument("--cache", default=None, help="feature cache on the pipeline's network: "
                     "taylorseer:interval=3:order=2, deepcache:interval=3, encoder:interval=2 (U-Nets), "
                     "block:threshold=0.08, magcache:threshold=0.1 (transformers), auto:target_error=0.05"
                     "[:method=all] (calibrated by running the pipeline on seeds 1000-1003), none (default)")
    gen.add_argument("--quant", default=None, metavar="SCHEME",
                     help="quantize the pipeline's unet/transformer with a weight-only scheme: " + _scheme_list()
                          + " (weights rounded to nearest: not wNaM or round=gptq, which calibrate); none (default)")
    gen.add_argument("--out", required=True, help="output .png (RGB image grid) or .npz (undecoded latents)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

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
    tun.add_argument("--nfe", type=_step_list, default=[4, 5, 6, 8], help="network evaluations (4,5,6,8)")
    tun.add_argument("--solvers", type=lambda s: s.split(","), default=["ddim", "dpmpp_2m"],
                     help="candidate solvers (ddim,dpmpp_2m)")
    from fewstep.tuning import COMPARE

    tun.add_argument("--compare", type=lambda s: [x for x in s.split(",") if x], default=list(COMPARE),
                     help=f"more solvers run on the fixed grids only, the best fixed configuration a tuned plan "
                          f"must beat ({','.join(COMPARE)}; '' for none)")
    tun.add_argument("--seeds", type=_seeds, default=parse_seeds("1000-1031"), help="calibration seeds (1000-1031)")
    tun.add_argument("--holdout", type=_seeds, default=parse_seeds("2000-2063"), help="held-out seeds (2000-2063)")
    tun.add_argument("--candidates", type=_positive_int, default=40, help="candidate grid steps (40)")
    tun.add_argument("--label", default=None,
                     help="class-conditional models: the calibration labels (an int, a list or range such as 0-4, "
                          "cycled over the seeds, or cycle for all classes)")
    tun.add_argument("--holdout-label", default=None, help="the held-out labels, as --label (default: --label's)")
    tun.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale the plan is tuned for (models with a null label)")
    tun.add_argument("--minutes", type=float, default=None, help="search budget per NFE (teacher not counted)")
    tun.add_argument("--iterations", type=_positive_int, default=150, help="gradient steps per refinement (150)")
    tun.add_argument("--no-decouple", action="store_true", help="no learned network times (tuned_decoupled rows)")
    tun.add_argument("--no-diffusers", action="store_true", help="no diffusers scheduler rows")
    tun.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32",
                     help="precision of the network for the teacher, the search and every row, written into the plans "
                          "(float32; float16/bfloat16 keep the state in float32)")
    tun.add_argument("--device", type=_device, default="cpu",
                     help="torch device the teacher, the search and every row run on, written into the plans (cpu; "
                          "cuda, cuda:1, ...)")
    tun.add_argument("--out", required=True,
                     help="folder for the plans (plan_nfe<N>.json), the report (report.md, steps.png, "
                          "error_vs_nfe.png, grid.png) and tune.sqlite (a rerun resumes from it)")
    tun.set_defaults(func=cmd_tune)

    bench = sub.add_parser("bench", help="run solvers side by side (optionally with diffusers) into a results DB",
                           description="Run models x solvers x steps, and any --plans, store results (resumable), "
                                       "optionally report.",
                           epilog="example: fewstep bench --models unet_m --solvers ddim,dpmpp_2m,unipc "
                                  "--steps 5,10,20 --with-diffusers --report report")
    bench.add_argument("--models", type=lambda s: s.split(","), default=["unet_m"], help="comma-separated (unet_m)")
    bench.add_argument("--solvers", type=lambda s: s.split(","), default=["ddim", "dpmpp_2m", "unipc"],
                       help="comma-separated fewstep solvers, each optionally with knobs as name:key=value "
                            "(ddim,dpmpp_2m,unipc; e.g. sa_solver:tau=0:predictor_order=3)")
    bench.add_argument("--steps", type=_step_list, default=[5, 10, 20], help="comma-separated step counts (5,10,20)")
    bench.add_argument("--grid", choices=list(GRIDS), default="time_quadratic",
                       help="fewstep time grid (time_quadratic: the most accurate at 10-20 NFE on the zoo models)")
    bench.add_argument("--seeds", type=_seed_spec, default="0-255", help="seed range (0-255)")
    bench.add_argument("--with-diffusers", action="store_true", help="also run diffusers' counterpart schedulers")
    bench.add_argument("--diffusers", type=lambda s: s.split(","), default=[],
                       help="diffusers schedulers to run as well, by label: " + ", ".join(_peer_labels()))
    bench.add_argument("--cache", type=lambda s: s.split(","), default=[""],
                       help="comma-separated feature caches to run every fewstep solver with: none, "
                            "taylorseer:interval=3, deepcache:interval=3, encoder:interval=2, block:threshold=0.05, "
                            "magcache:threshold=0.1, auto:target_error=0.05 (default: none)")
    bench.add_argument("--quant", type=lambda s: s.split(","), default=[""], metavar="SCHEMES",
                       help="comma-separated quantization schemes to run every fewstep solver with (none for the "
                            "float network): " + _scheme_list() + ", calibrated on each row's solver and steps as "
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
    bench.add_argument("--device", type=_device, default="cpu",
                       help="torch device of the network, the noise and the state (cpu; cuda, cuda:1, ...)")
    bench.add_argument("--db", default=str(_default_db()), help="results database (fewstep-results.sqlite)")
    bench.add_argument("--force", action="store_true", help="rerun experiments already in the database")
    bench.add_argument("--report", default=None, help="write the report to this folder afterwards")
    bench.set_defaults(func=cmd_bench)

    fdp = sub.add_parser("fd", help="Frechet distance of a shard folder of digits samples, one shard in memory",
                         description="The FD of a folder written by fewstep sample --out DIR (8x8 digits models) "
                                     "against the real digits, in the shipped classifier's features, accumulated "
                                     "shard by shard (equal to the in-memory FD to float64 round-off). Example: "
                                     "fewstep fd samples")
    fdp.add_argument("folder", help="a shard folder (with manifest.json)")
    fdp.set_defaults(func=cmd_fd)

    rep = sub.add_parser("report", help="Markdown table, plots and image grids from a results database",
                         epilog="example: fewstep report --db fewstep-results.sqlite --out report")
    rep.add_argument("--db", default=str(_default_db()), help="results database (fewstep-results.sqlite)")
    rep.add_argument("--out", required=True, help="output folder")
    rep.set_defaults(func=cmd_report)

    zoo = sub.add_parser("zoo", help="the model zoo")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    tr = zoo_sub.add_parser("train", help="retrain a shipped model on sklearn digits (reproducible)")
    tr.add_argument("name", help="model name (unet_s, unet_m, unet_l, unet_v, unet_flow, classifier)")
    tr.add_argument("--out", type=Path, default=None, help="output folder (default: the package's weights)")
    tr.add_argument("--iters", type=_positive_int, default=None,
                    help="training iterations (default: the model's recipe)")
    tr.set_defaults(func=cmd_zoo_train)
    ev = zoo_sub.add_parser("evaluate", help="FD of 1000-step sampling vs real digits, written into the model card")
    ev.add_argument("name", help="model name")
    ev.add_argument("--samples", type=_positive_int, default=512, help="number of samples (512)")
    ev.set_defaults(func=cmd_zoo_evaluate)
    return parser


def _scheme_list() -> str:
    from fewstep.quant import SCHEMES

    return ", ".join(SCHEMES) + " (wNaM and fp:eXmY take any widths)"


def _peer_labels() -> list[str]:
    from fewstep.bench.peers import PEERS

    return list(PEERS)


def _default_db() -> Path:
    from fewstep.bench.store import DEFAULT_DB

    return DEFAULT_DB


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:  # bad input: refused before any work where it can be checked
        print(f"fewstep: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine refused (disk full, permissions changed mid-run): say so, no traceback
        print(f"fewstep: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
