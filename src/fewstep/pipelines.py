"""From a prompt to an image: a local diffusers pipeline folder, sampled by a fewstep solver.

:func:`load_pipeline` loads a pipeline folder offline from safetensors only; :func:`use_fewstep` swaps its scheduler
for :class:`~fewstep.scheduler.FewstepScheduler` (:func:`use_plan`: one that samples as a plan says);
:func:`quantize_pipeline` puts a weight-only quantized copy of its network in its place; :func:`generate` runs it with
one seeded generator per image, so image k is the same whatever else is generated with it; :func:`save_generated`
writes what it made.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.caching import enable_cache, parse_cache
from fewstep.caching.pipeline import PipelineCache
from fewstep.models.diffusers import denoising_network, network_name
from fewstep.outputs import atomic_write, save_grid
from fewstep.plan import Plan
from fewstep.scheduler import FewstepScheduler

__all__ = ["DTYPES", "cache_pipeline", "check_pipeline_scheme", "decode", "denoising_network", "generate",
           "load_pipeline", "quantize_pipeline", "save_generated", "use_fewstep", "use_plan"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipeline(folder: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, variant: str | None = None) -> Any:
    """A diffusers pipeline from a local folder (``model_index.json`` + components), nothing downloaded.

    Every component's weights are read from safetensors (``use_safetensors=True``: diffusers and transformers raise
    instead of falling back to a pickled file, whatever else the folder holds). A one-line ``ValueError`` names
    what is wrong.
    """
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    root = Path(folder)
    if not (root / "model_index.json").is_file():
        raise ValueError(f"{root} is not a diffusers pipeline folder (no model_index.json)")
    from transformers.utils import logging as transformers_logging

    verbosity = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(root, use_safetensors=True, local_files_only=True,
                                                           dtype=torch_dtype, variant=variant)
    except Exception as err:  # diffusers/transformers raise OSError, ValueError, EnvironmentError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load the pipeline in {root}: {first}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity[0])
        transformers_logging.set_verbosity(verbosity[1])
        for logging, enabled in zip((diffusers_logging, transformers_logging), bars, strict=True):
            if enabled:
                logging.enable_progress_bar()
    if device is not None:
        pipe.to(device)
    return pipe


def use_fewstep(pipe: Any, solver: str = "dpmpp_2m", grid: str = "diffusers", **knobs: Any) -> FewstepScheduler:
    """Replace ``pipe.scheduler`` with a :class:`FewstepScheduler` on the same base config; returns it."""
    scheduler = FewstepScheduler.from_config(pipe.scheduler, solver=solver, grid=grid, **knobs)
    pipe.scheduler = scheduler
    return scheduler


def use_plan(pipe: Any, plan: Plan) -> FewstepScheduler:
    """Replace ``pipe.scheduler`` with a :class:`FewstepScheduler` that samples as ``plan`` says (its solver and
    knobs, its grid or explicit times) on the pipeline's own scheduler config; returns it. The pipeline stands in
    for the plan's model, and what a scheduler does not do is left to the caller: the plan's quantization
    (:func:`quantize_pipeline`), cache (:func:`fewstep.enable_cache`) and guidance scale (:func:`generate`)."""
    scheduler = FewstepScheduler.from_plan(dataclasses.replace(plan, cache="", guidance=None, quant=""),
                                           pipe.scheduler)
    pipe.scheduler = scheduler
    return scheduler


def check_pipeline_scheme(scheme: str) -> None:
    """Raise the error :func:`quantize_pipeline` would for ``scheme`` itself (unknown, or calibrating activations),
    without loading anything."""
    from fewstep.quant import parse_scheme

    parsed = parse_scheme(scheme)
    if parsed.calibrated:
        what = "calibrates activations" if parsed.act is not None else "rounds weights by GPTQ on Hessians gathered"
        raise ValueError(f"a pipeline takes uncalibrated weight-only schemes (int8wo, int8dq, w8, fp:e4m3, ..., "
                         f"rounded to nearest); {scheme!r} {what} over fewstep.sample runs, which a pipeline's prompt "
                         f"encoding does not go through: use fewstep.quantize on a denoiser with "
                         f"calibration=dict(cond=...)")


def quantize_pipeline(pipe: Any, scheme: str) -> Any:
    """Replace the pipeline's denoising network by a copy quantized with a weight-only ``scheme`` (``int8wo``,
    ``w8``, ``fp:e4m3``, ...; :func:`fewstep.quant.quantize`; weights rounded to nearest, the first and last layers
    kept in float unless ``keep_ends=false``); returns what was done
    (:class:`~fewstep.quant.QuantInfo`). The original network is left as it was, and ``pipe`` no longer holds it
    (both are in memory while the copy is made).

    Schemes that need a calibration run (activation ranges, ``round=gptq``) are refused: their calibration runs
    :func:`fewstep.sample` on a :class:`~fewstep.models.ModelDenoiser`, which does not see the pipeline's own prompt
    encoding and guidance; quantize a denoiser with ``fewstep.quantize(den, scheme, calibration=dict(cond=...))``
    for those."""
    from fewstep.models import from_diffusers
    from fewstep.quant import quantize

    check_pipeline_scheme(scheme)
    name = network_name(pipe)
    quantized = quantize(from_diffusers(getattr(pipe, name), pipe.scheduler), scheme)
    setattr(pipe, name, quantized.model)
    return quantized.quant


def cache_pipeline(pipe: Any, spec: str, *, prompt: str, steps: int, negative_prompt: str | None = None,
                   guidance: float | None = None, height: int | None = None,
                   width: int | None = None) -> PipelineCache | None:
    """Put the feature cache ``spec`` on the pipeline's network (:func:`fewstep.enable_cache`) for calls like
    :func:`generate`'s with these arguments; ``None`` for no cache. The knobs are checked against the network before
    any sampling; ``auto`` and ``magcache`` run the pipeline on their calibration seeds (1000-1003) first, never the
    caller's seeds, with its progress bar off."""
    if parse_cache(spec).is_none:
        return None
    call: dict[str, Any] = {"prompt": prompt, "num_inference_steps": steps}
    for key, value in (("negative_prompt", negative_prompt), ("guidance_scale", guidance), ("height", height),
                       ("width", width)):
        if value is not None:
            call[key] = value
    pipe.set_progress_bar_config(disable=True)
    return enable_cache(pipe, spec, **call)


def decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's VAE decoding of ``latents`` (a sampler's end point, in the VAE's scaled latent space), as
    images in [-1, 1] on the CPU (what :func:`fewstep.outputs.mosaic` draws)."""
    vae = pipe.vae
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    param = next(vae.parameters())
    with torch.no_grad():
        images = vae.decode((latents.to(param.device, param.dtype) / scale) + shift, return_dict=False)[0]
    return images.float().clamp(-1, 1).cpu()


def generate(pipe: Any, prompt: str, *, seeds: Sequence[int], steps: int, negative_prompt: str | None = None,
             guidance: float | None = None, height: int | None = None, width: int | None = None,
             latents: bool = False, progress: bool = True) -> tuple[torch.Tensor, int]:
    """Images (``(B, 3, H, W)`` in [0, 1]) or, with ``latents=True``, the undecoded latents, one per seed; and the
    number of network calls. Image k comes from a generator seeded with ``seeds[k]`` alone."""
    calls = []
    hook = denoising_network(pipe).register_forward_hook(lambda *_: calls.append(1))
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "num_images_per_prompt": len(seeds),
                              "generator": [torch.Generator().manual_seed(int(s)) for s in seeds],
                              "output_type": "latent" if latents else "pt"}
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    pipe.set_progress_bar_config(disable=not progress)
    try:
        with torch.no_grad():
            out = pipe(prompt, **kwargs).images
    finally:
        hook.remove()
    return out, len(calls)


def save_generated(path: str | os.PathLike, x: torch.Tensor, *, seeds: Sequence[int], calls: int,
                   timesteps: torch.Tensor) -> Path:
    """What :func:`generate` made, written atomically: to an ``.npz`` the undecoded latents (``latents``, with their
    ``seeds``, the ``network_calls`` and the scheduler's ``timesteps``), else images in [0, 1] as a PNG grid."""
    out = Path(path)
    if out.suffix == ".npz":
        arrays = {"latents": x.float().cpu().numpy(), "seeds": np.array(seeds), "network_calls": calls,
                  "timesteps": timesteps.float().cpu().numpy()}
        return atomic_write(out, lambda f: np.savez(f, **arrays))
    return save_grid(out, x.float().cpu() * 2 - 1, scale=1)
