"""diffusers' schedulers as peers: the same network and starting noise, pinned configs, counted NFE."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fewstep.solvers import make_solver

__all__ = ["DETERMINISTIC_PEERS", "PEERS", "applicable", "compatible", "counterpart", "run_diffusers"]

# label: (diffusers class name, pinned config overrides, fewstep solver it is compared with)
PEERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "DDIM": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}, "ddim"),
    "DDPM": ("DDPMScheduler", {"clip_sample": False}, "ddpm"),
    "Euler": ("EulerDiscreteScheduler", {}, "euler"),
    "Heun": ("HeunDiscreteScheduler", {}, "heun"),
    "DPM++2M": ("DPMSolverMultistepScheduler", {"solver_order": 2}, "dpmpp_2m"),
    "DPM++3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}, "dpmpp_3m"),
    "DPM++2M-SDE": ("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
                    "dpmpp_2m_sde"),
    "UniPC": ("UniPCMultistepScheduler", {"solver_order": 2}, "unipc"),
    "DEIS": ("DEISMultistepScheduler", {"solver_order": 3}, "deis"),
    "SA-Solver": ("SASolverScheduler", {}, "sa_solver"),
}

DETERMINISTIC_PEERS = tuple(label for label, (_, _, ours) in PEERS.items() if not make_solver(ours).stochastic)
"""The peers whose counterpart is deterministic (a fixed end point to measure against a teacher), in :data:`PEERS`
order."""


def _is_flow(config: Mapping[str, Any]) -> bool:
    return str(config.get("_class_name", "")).startswith("FlowMatch")


def compatible(label: str, scheduler_config: Mapping[str, Any]) -> bool:
    """Whether diffusers' scheduler ``label`` can drive a model trained with ``scheduler_config``: DDPM-family
    schedulers need a beta schedule; rectified-flow models run only with ``Euler`` (``FlowMatchEulerDiscrete``).
    An empty config (a model folder without one) is not judged here: it is accepted."""
    return label == "Euler" if _is_flow(scheduler_config) else True


def applicable(scheduler_config: Mapping[str, Any]) -> list[str]:
    """The peer labels that can drive a model trained with ``scheduler_config``, in :data:`PEERS` order (named in
    the error that refuses the others)."""
    return [label for label in PEERS if compatible(label, scheduler_config)]


def counterpart(solver: str) -> str | None:
    """The diffusers peer label compared with fewstep's ``solver``, if any."""
    return next((label for label, (_, _, ours) in PEERS.items() if ours == solver), None)


def run_diffusers(
    label: str,
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler_config: Mapping[str, Any],
    x_init: torch.Tensor,
    steps: int,
    *,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, int]:
    """Sample with diffusers' scheduler ``label``: ``timestep_spacing="trailing"`` plus the pinned settings of
    :data:`PEERS` and ``options`` (a rectified-flow model runs ``FlowMatchEulerDiscreteScheduler`` as "Euler").
    ``x_init`` is the starting noise in the VP frame (scaled by the scheduler's ``init_noise_sigma``); the run goes
    where it is, on its device and in its dtype, its timesteps there as a pipeline puts them. Returns the samples
    and the counted network evaluations."""
    import diffusers

    if not compatible(label, scheduler_config):
        raise ValueError(f"diffusers' {label} cannot drive a rectified-flow model; use Euler")
    cls_name, pinned, _ = PEERS[label]
    if _is_flow(scheduler_config):
        cls_name, pinned = "FlowMatchEulerDiscreteScheduler", {}
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    config.update({"timestep_spacing": "trailing", **pinned, **dict(options or {})})
    cls = getattr(diffusers, cls_name)
    accepted = set(inspect.signature(cls).parameters)
    scheduler = cls(**{k: v for k, v in config.items() if k in accepted})
    scheduler.set_timesteps(steps, device=x_init.device)
    # FlowMatchEulerDiscreteScheduler has neither: its noise has unit scale and its input is not rescaled
    x = x_init * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, _t: sample)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    calls = 0
    with torch.no_grad():
        for t in scheduler.timesteps:
            calls += 1
            out = net(scale_input(x, t), t)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x, calls
