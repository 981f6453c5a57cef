"""``fewstep sample``: a zoo model or a diffusers folder, sampled to a PNG grid, an .npz or a shard folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewstep import zoo
from fewstep.caching import CacheStats, check_cache_spec
from fewstep.cli.common import (
    Subparsers,
    add_prompt_arguments,
    check_guidance,
    class_labels,
    device,
    options,
    plan_device,
    positive_int,
    prompt_source,
    scheme_list,
    seeds,
    step_count,
)
from fewstep.conditioning import Prompts
from fewstep.distributed import barrier, process_group, world
from fewstep.grids import DEFAULT_GRID, GRIDS
from fewstep.hooks import NFECounter, ProgressBar
from fewstep.models import from_diffusers
from fewstep.noise import parse_seeds
from fewstep.outputs import check_output_dir, check_output_file
from fewstep.plan import DTYPES, Plan, place
from fewstep.quant import weights_bytes
from fewstep.shards import ShardFolder, run_shards, write_samples


def add_parser(sub: Subparsers) -> None:
    smp = sub.add_parser("sample", help="sample a zoo model or a diffusers folder to a PNG grid or an .npz",
                         description="Sample a model. Example: fewstep sample --model unet_m --solver dpmpp_2m "
                                     "--steps 10 --seeds 0-63 --out grid.png")
    smp.add_argument("--model", default=None, help="zoo model name (see `fewstep models`) or a diffusers folder")
    smp.add_argument("--plan", default=None, help="a plan file (JSON: model, solver, grid or times, cache, quant, "
                     "dtype, device) instead of --model/--solver/--steps/--grid/--option/--cache/--quant/--dtype/"
                     "--device")
    smp.add_argument("--solver", default=None, help="solver name (see `fewstep solvers`; dpmpp_2m)")
    smp.add_argument("--steps", type=step_count, default=None, help="number of steps (10)")
    smp.add_argument("--grid", choices=list(GRIDS), default=None, help="time grid (time_quadratic)")
    smp.add_argument("--seeds", type=seeds, default=parse_seeds("0-63"), help="seed range (0-63)")
    smp.add_argument("--option", action="append", help="solver knob key=value (repeatable), e.g. eta=1")
    smp.add_argument("--label", default=None, help="class label for class-conditional models (dit_s): an int, or "
                     "'cycle' for 0-9 in turn; default: the model's unconditional label")
    add_prompt_arguments(smp, what="every seed")
    smp.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale: models with a null label (dit_s), or a pipeline's prompts "
                          "against the negative prompt (default: none)")
    smp.add_argument("--cache", default=None, help="feature cache: taylorseer:interval=3:order=2, "
                     "deepcache:interval=3, encoder:interval=2 (U-Nets), block:threshold=0.05, magcache:threshold=0.1 "
                     "(transformers), auto:target_error=0.05[:method=all] (calibrated here), none")
    smp.add_argument("--quant", default=None, metavar="SCHEME",
                     help="quantize (a copy of) the network: " + scheme_list() + "; calibrated on this run's solver "
                          "and steps (seeds 1000-1127): activation ranges, and GPTQ weight rounding (all but fp8wo; "
                          ":round=nearest skips it); first and last layers stay float (:keep_ends=false quantizes "
                          "them); none (default)")
    smp.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default=None,
                     help="precision of the network (float32; float16/bfloat16 keep the state in float32)")
    smp.add_argument("--device", type=device, default=None, help="torch device (cpu; cuda, cuda:1, ...)")
    smp.add_argument("--batch-size", type=positive_int, default=None,
                     help="samples per batch: memory is bounded by it, not by the seed count (default: all seeds "
                          "at once for a file, 64 for a folder); sample k is the same whatever the batch size")
    smp.add_argument("--out", required=True,
                     help="output .png (image grid) or .npz (samples), or a folder (a path without a suffix): "
                          "shards of --batch-size seeds with a manifest, written as they finish; the same command "
                          "resumes an interrupted folder, and under torchrun (torchrun --nproc-per-node N -m fewstep "
                          "sample ...) the processes share the shards")
    smp.add_argument("--quiet", action="store_true", help="no progress bar")
    smp.set_defaults(func=run)


def sample_plan(args: argparse.Namespace) -> Plan:
    """The plan ``fewstep sample`` runs: ``--plan FILE``, or one made from the flags (never both)."""
    flags = {"--model": args.model, "--solver": args.solver, "--steps": args.steps, "--grid": args.grid,
             "--option": args.option, "--cache": args.cache, "--quant": args.quant, "--dtype": args.dtype,
             "--device": args.device, "--guidance": args.guidance}
    if args.plan is not None:
        given = [k for k, v in flags.items() if v is not None]
        if given:
            raise ValueError(f"--plan gives the model, solver, grid, cache, quant, guidance, dtype and device; drop "
                             f"{', '.join(given)}")
        plan = Plan.load(args.plan)
        plan_device(plan)
        return plan
    if args.model is None:
        raise ValueError("give --model (a zoo name or a diffusers folder) or --plan (a plan file)")
    cache = args.cache if args.cache not in (None, "none") else ""
    return Plan(model=args.model, solver=args.solver or "dpmpp_2m", solver_options=options(args.option),
                grid=args.grid or DEFAULT_GRID, steps=args.steps or 10, cache=cache, dtype=args.dtype or "float32",
                device=args.device or "cpu", quant=args.quant or "", guidance=args.guidance)


def sample_prompts(args: argparse.Namespace, plan: Plan) -> Prompts | None:
    """``--prompt``/``--prompts`` as a source (``None`` without), for the run ``plan`` describes (its guidance:
    ``--guidance`` or the plan file's)."""
    return prompt_source(args, labelled=args.label is not None, guided=plan.guidance is not None)


def run(args: argparse.Namespace) -> int:
    rank, size = world()
    to_folder = Path(args.out).suffix == ""
    # before any work: a bad path must not cost a run
    out = check_output_dir(args.out) if to_folder else check_output_file(args.out, (".png", ".npz"))
    if size > 1 and not to_folder:
        raise ValueError(f"--out {args.out}: {size} processes write a folder of shards, not one file; give a "
                         "folder (a path without a suffix)")
    plan = sample_plan(args)
    prompts = sample_prompts(args, plan)
    batch = args.batch_size or (64 if to_folder else None)
    pipe, uncond, calibration_cond = None, None, None
    if prompts is None:
        den = zoo.load(plan.model)
        cond = class_labels(den, args.label, len(args.seeds))
        check_guidance(den, plan.guidance)
    else:  # the pipeline's own encoder encodes the prompts; a PNG is its VAE's decoding of the latents
        from fewstep.pipelines import load_pipeline  # diffusers: imported only when a command needs it

        pipe = load_pipeline(zoo.model_path(plan.model))
        den = from_diffusers(pipe)
        cond, calibration_cond = prompts.cond(pipe, len(args.seeds)), prompts.cond(pipe, 1)
        uncond = None if plan.guidance is None else prompts.negative_cond(pipe)
    shape = den.sample_shape
    if not to_folder and out.suffix == ".png" and shape[0] not in (1, 3) and pipe is None:
        raise ValueError(f"--out {out}: a PNG grid needs 1 or 3 channels, this model makes {shape[0]}; use .npz")
    if plan.cache:
        check_cache_spec(den, plan.cache)
    shards = None
    if to_folder:
        identity = {"plan": plan.to_dict(), "label": args.label, "shape": list(shape)}
        if prompts is not None:
            identity["prompts"] = prompts.fingerprint
        shards = ShardFolder(out, list(args.seeds), batch, identity)
        done = shards.prepare()  # every rank checks the same manifest; a foreign folder is refused here
        if done and rank == 0:
            print(f"resuming: {done} of {shards.count} shards already in {out}")
    place(den, torch.device(plan.device), DTYPES[plan.dtype])
    with process_group(plan.device):
        if shards is not None:
            if rank == 0:
                shards.clean()  # a killed writer's temporary files; no process writes until the barrier
            barrier()
        # a quantized plan quantizes a copy of den's network (and calibrates) here
        sampler = plan.build(den, uncond=uncond, calibration_cond=calibration_cond)
        stats = CacheStats()
        cal = sampler.calibration
        note = "" if cal is None else f" (auto: {cal.spec}, calibration error {cal.error:.3g})"
        if plan.quant:
            info = sampler.network.quant
            note += (f"; {plan.quant} ({info.rounding}, {len(info.skipped)} layers float): weights "
                     f"{weights_bytes(sampler.network) / 1024:,.1f} of {weights_bytes(den) / 1024:,.1f} KiB")
        if shards is not None:
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
    if pipe is not None and not to_folder and out.suffix == ".png":
        from fewstep.pipelines import decode

        x, what = decode(pipe, x), "images (decoded by the pipeline's VAE)"
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
    write_samples(out, x, args.seeds, nfe)
    print(f"{len(args.seeds)} {what}, {nfe} NFE{note}, {len(args.seeds) / seconds:.1f} samples/s -> {out}")
    return 0
