"""A plan's times for a diffusers scheduler's *own* solver: :func:`diffusers_kwargs`.

The other direction from :class:`fewstep.scheduler.FewstepScheduler`, which runs fewstep's solvers inside a
pipeline's loop: here the pipeline keeps its diffusers scheduler and only the plan's times travel, as the
``sigmas=`` or ``timesteps=`` of its ``set_timesteps``::

    image = pipe(prompt, **diffusers_kwargs(plan, pipe.scheduler)).images[0]

Import it from :mod:`fewstep.scheduler`, its public home, which re-exports it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import diffusers

from fewstep.grids import explicit, make_grid
from fewstep.models.scheduler_config import (
    EDM_SCHEDULERS,
    config_of,
    diffusers_grid,
    fresh_scheduler,
    schedule_from_config,
)
from fewstep.schedules import DiscreteVP, NoiseSchedule

__all__ = ["diffusers_kwargs"]

# The class name a FewstepScheduler's config carries. Named, not imported: fewstep.scheduler imports this module.
_FEWSTEP_SCHEDULER = "FewstepScheduler"


def diffusers_kwargs(plan: Any, scheduler: Any, *, mu: float | None = None) -> dict[str, list[float] | list[int]]:
    """The ``set_timesteps`` keyword arguments that make a diffusers scheduler sample on a plan's times with its
    *own* solver: ``pipe(prompt, **diffusers_kwargs(plan, pipe.scheduler))``.

    Only the times travel: the plan's explicit ``times``, or its named grid made on the schedule of the scheduler's
    config (:func:`fewstep.models.scheduler_config.schedule_from_config`). The plan's solver, cache and guidance are
    not a diffusers scheduler's to run (:meth:`fewstep.scheduler.FewstepScheduler.from_plan` runs the solver too).
    The values are in the scheduler's own convention, and diffusers itself has the last word: a fresh copy of the
    scheduler runs ``set_timesteps`` with them, and the grid it makes
    (:func:`fewstep.models.scheduler_config.diffusers_grid`) must be the plan's, with one network evaluation per
    step start.

    * ``{"sigmas": [...]}`` where the scheduler takes sigmas. Beta tables (``EulerDiscreteScheduler``): the
      k-diffusion sigmas ``sigma / alpha`` of every time, the plan's final 0 (or ``sigma_min``) included, since
      Euler evaluates at all sigmas but the last. Flow matching (``FlowMatchEulerDiscreteScheduler``): the flow
      sigmas *before* the scheduler's shift, which are the times ``t`` themselves (diffusers shifts given sigmas,
      by ``shift`` or by the pipeline's ``mu``); evaluation points only, as it appends the final sigma 0 itself.
      (``UniPCMultistepScheduler`` takes sigmas only with ``use_flow_sigmas=True``, and then as an array only:
      refused.)
    * ``{"timesteps": [...]}`` where only integer timesteps are taken (``DPMSolverMultistepScheduler``,
      ``DPMSolverSinglestepScheduler``, ``HeunDiscreteScheduler``, ``DDPMScheduler``, ``LCMScheduler``,
      ``TCDScheduler``): the times are **rounded to training steps** (refused where two round to the same step);
      evaluation points only, the scheduler ending where its config says (``final_sigmas_type``: ``"zero"`` for
      a plan ending at 0, ``"sigma_min"`` for one ending at ``t_min``).

    Refused with a ``ValueError``: a plan with ``model_times`` (LD3-style decoupled network times: diffusers'
    schedulers evaluate the network where they step), a ``FewstepScheduler`` (it runs a plan itself), a scheduler
    whose ``set_timesteps`` takes neither keyword (DDIM, DEIS, PNDM, the EDM schedulers, ...), or one that, so
    configured, does not sample on the plan's times. ``mu``: the dynamic shift of a ``use_dynamic_shifting``
    config, needed only to make a named grid (explicit times are unshifted sigmas, the same whatever the
    pipeline's ``mu``).
    """
    if getattr(plan, "model_times", None) is not None:
        raise ValueError("diffusers' schedulers evaluate the network at the times they step to, so a plan with "
                         "model_times cannot be exported; use FewstepScheduler.from_plan(plan, pipe.scheduler)")
    cfg = config_of(scheduler)
    name = cfg.get("_class_name")
    if name == _FEWSTEP_SCHEDULER:
        raise ValueError("a FewstepScheduler runs a plan itself: FewstepScheduler.from_plan(plan, pipe.scheduler)")
    if not name or not isinstance(getattr(diffusers, str(name), None), type):
        raise ValueError("diffusers_kwargs needs the diffusers scheduler itself (pipe.scheduler) or a config with "
                         "its _class_name")
    if name in EDM_SCHEDULERS:
        raise ValueError(f"diffusers' {name} takes no sigmas (EDMEulerScheduler's sigmas= is a ramp through its "
                         "sigma_schedule); use FewstepScheduler.from_plan(plan, pipe.scheduler)")
    takes = inspect.signature(getattr(diffusers, name).set_timesteps).parameters
    keys = [k for k in ("sigmas", "timesteps") if k in takes]
    if not keys:
        raise ValueError(f"diffusers' {name}.set_timesteps takes neither sigmas= nor timesteps=; use "
                         "FewstepScheduler.from_plan(plan, pipe.scheduler) to sample on the plan's times")
    schedule, times, mu = _plan_times(plan, cfg, mu)
    refusals = []
    for key in keys:
        if key == "sigmas":
            values: list[float] | list[int] = list(times)  # flow: the unshifted flow sigma, t itself
            if isinstance(schedule, DiscreteVP):  # a beta table: sigma / alpha
                values = [schedule.sigma(t) / schedule.alpha(t) if t > 0 else 0.0 for t in times]
            expected = times
        elif isinstance(schedule, DiscreteVP):
            values = [round(schedule.sigma_index(t)) for t in times if t > 0]
            merged = [(a, b) for a, b, n, m in zip(times, times[1:], values, values[1:], strict=False) if n == m]
            if merged:
                raise ValueError(f"diffusers' {name} takes integer timesteps only, and rounded to training steps the "
                                 f"plan's times {merged[0][0]:g} and {merged[0][1]:g} fall on the same step")
            expected = [schedule.time_of_index(n) for n in values] + ([0.0] if times[-1] == 0.0 else [])
        else:
            refusals.append(f"timesteps=: integer training steps of a beta table, not of {schedule!r}")
            continue
        # evaluation points only (the scheduler appends the end), or every time (it takes the end in the list)
        for given in (values[: len(times) - 1], values) if len(values) == len(times) else (values,):
            kwargs = {key: given}
            try:
                grid = diffusers_grid(cfg, schedule, None, **kwargs, **({} if mu is None else {"mu": mu})).tolist()
                fresh = fresh_scheduler(cfg)
                fresh.set_timesteps(**kwargs, **({} if mu is None else {"mu": mu}))
            except (ValueError, TypeError) as err:  # refused by diffusers (UniPC: flow sigmas only, as an array)
                refusals.append(f"{key}=: {str(err).splitlines()[0]}")
                continue
            evaluations = len(set(fresh.timesteps.tolist()))
            if evaluations == len(times) - 1 and len(grid) == len(expected) and all(
                    math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12) for a, b in zip(grid, expected, strict=True)):
                return kwargs
            refusals.append(f"{key}= gives {evaluations} evaluations on times {[round(t, 5) for t in grid]}")
    raise ValueError(f"diffusers' {name}, so configured, does not sample on the plan's times "
                     f"{[round(t, 5) for t in times]}: {'; '.join(dict.fromkeys(refusals))}")


def _plan_times(plan: Any, cfg: Mapping[str, Any],
                mu: float | None) -> tuple[NoiseSchedule, list[float], float | None]:
    """(the schedule of ``cfg``, the plan's times on it, the ``mu`` to run diffusers' ``set_timesteps`` with)."""
    dynamic = bool(cfg.get("use_dynamic_shifting"))
    if mu is not None and not dynamic:
        raise ValueError("mu was given but the scheduler config has no use_dynamic_shifting")
    if dynamic and mu is None:
        if plan.times is None:
            raise ValueError(f"a named grid ({plan.grid!r}) on a use_dynamic_shifting schedule depends on the image "
                             "size; pass mu= (the pipeline's)")
        mu = 0.0 if cfg.get("time_shift_type", "exponential") == "exponential" else 1.0  # shift 1: t = sigma
    schedule, _ = schedule_from_config(cfg, mu=mu)
    if plan.times is not None:
        return schedule, explicit(schedule, plan.times).tolist(), mu
    return schedule, make_grid(plan.grid, schedule, plan.steps, **dict(plan.grid_options)).tolist(), mu
