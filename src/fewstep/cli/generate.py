"""``fewstep generate``: a local diffusers pipeline folder, prompted, sampled by a fewstep solver."""

from __future__ import annotations

import argparse
from typing import Any

from fewstep.caching import parse_cache
from fewstep.cli.common import (
    Subparsers,
    device,
    options,
    plan_device,
    positive_int,
    scheme_list,
    seeds,
    step_count,
)
from fewstep.grids import GRIDS
from fewstep.noise import parse_seeds
from fewstep.outputs import check_output_file
from fewstep.plan import Plan


def add_parser(sub: Subparsers) -> None:
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
    gen.add_argument("--steps", type=step_count, default=None, help="number of steps (20)")
    gen.add_argument("--grid", choices=["diffusers", *GRIDS], default=None,
                     help="time grid: the pipeline scheduler's own steps (diffusers, the default) or a fewstep grid")
    gen.add_argument("--seeds", type=seeds, default=parse_seeds("0-3"), help="seed range, one image each (0-3)")
    gen.add_argument("--height", type=positive_int, default=None, help="image height (default: the model's)")
    gen.add_argument("--width", type=positive_int, default=None, help="image width (default: the model's)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                     help="dtype of the pipeline's weights (float32)")
    gen.add_argument("--device", type=device, default=None, help="torch device (cpu)")
    gen.add_argument("--cache", default=None, help="feature cache on the pipeline's network: "
                     "taylorseer:interval=3:order=2, deepcache:interval=3, encoder:interval=2 (U-Nets), "
                     "block:threshold=0.08, magcache:threshold=0.1 (transformers), auto:target_error=0.05"
                     "[:method=all] (calibrated by running the pipeline on seeds 1000-1003), none (default)")
    gen.add_argument("--quant", default=None, metavar="SCHEME",
                     help="quantize the pipeline's unet/transformer with a weight-only scheme: " + scheme_list()
                          + " (weights rounded to nearest: not wNaM or round=gptq, which calibrate); none (default)")
    gen.add_argument("--out", required=True, help="output .png (RGB image grid) or .npz (undecoded latents)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=run)


def generate_plan(args: argparse.Namespace) -> Plan | None:
    """``fewstep generate --plan FILE``'s plan (``None`` without one): refused with a flag it gives, or with a
    dtype or device this command cannot honour."""
    if args.plan is None:
        return None
    from fewstep.pipelines import DTYPES  # diffusers: imported only when a command needs it

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
        plan_device(plan)
    except ValueError as err:
        raise ValueError(f"--plan {args.plan}: {err}") from None
    return plan


def check_pipeline_cache(spec: str) -> None:
    """A pipeline cache spec names a method, ``auto`` or ``none`` (its knobs are checked against the network)."""
    parse_cache(spec)


def run(args: argparse.Namespace) -> int:
    # diffusers: imported only when a command needs it
    from fewstep.pipelines import (
        DTYPES,
        cache_pipeline,
        check_pipeline_scheme,
        generate,
        load_pipeline,
        quantize_pipeline,
        save_generated,
        use_fewstep,
        use_plan,
    )
    from fewstep.scheduler import FewstepScheduler

    out = check_output_file(args.out, (".png", ".npz"))  # before any work
    plan = generate_plan(args)
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % 8:
            raise ValueError(f"{name} must be a multiple of 8, got {value}")
    if plan is None:
        solver, knobs, grid = args.solver or "dpmpp_2m", options(args.option), args.grid or "diffusers"
        grid_options: dict[str, Any] = {}
        steps, cache, guidance = args.steps or 20, args.cache or "none", args.guidance
        quant = "" if args.quant in (None, "none") else args.quant
        dtype, device_name, where = args.dtype or "float32", args.device or "cpu", f"the {grid} grid"
    else:  # the pipeline stands in for the plan's model; quant, cache, guidance go on the pipeline, not the scheduler
        solver, knobs, grid, grid_options = plan.solver, dict(plan.solver_options), plan.grid, dict(plan.grid_options)
        steps, cache, guidance, quant = plan.steps, plan.cache or "none", plan.guidance, plan.quant
        dtype, device_name, where = plan.dtype, plan.device, f"the {grid} grid of {args.plan}"
    # A bad solver, knob or grid, or a solver no pipeline can drive, fails here, before the pipeline loads (a plan's
    # explicit times are checked on the pipeline's own schedule once it is loaded, before it runs).
    FewstepScheduler(solver, "diffusers" if grid == "explicit" else grid, solver_options=knobs,
                     grid_options=grid_options)
    check_pipeline_cache(cache)
    if quant:
        check_pipeline_scheme(quant)
    pipe = load_pipeline(args.pipeline, torch_dtype=DTYPES[dtype], device=device_name)
    info = quantize_pipeline(pipe, quant) if quant else None  # before the cache, which hooks the network in place
    scheduler = use_fewstep(pipe, solver, grid, **knobs) if plan is None else use_plan(pipe, plan)
    handle = cache_pipeline(pipe, cache, prompt=args.prompt, steps=steps, negative_prompt=args.negative_prompt,
                            guidance=guidance, height=args.height, width=args.width)
    x, calls = generate(pipe, args.prompt, seeds=args.seeds, steps=steps, negative_prompt=args.negative_prompt,
                        guidance=guidance, height=args.height, width=args.width,
                        latents=out.suffix == ".npz", progress=not args.quiet)
    save_generated(out, x, seeds=args.seeds, calls=calls, timesteps=scheduler.timesteps)
    what = "undecoded latents" if out.suffix == ".npz" else "images"
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
