"""``FewstepScheduler``: every fewstep solver and grid as a diffusers scheduler, so a pipeline changes one line::

    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver="unipc", grid="time_quadratic")
    image = pipe(prompt, num_inference_steps=8).images[0]

How a solver that calls the model itself runs inside a loop that the pipeline owns. A diffusers pipeline
evaluates the network at ``scheduler.timesteps[i]`` on the latents the scheduler last returned and hands the raw
output to :meth:`FewstepScheduler.step`. fewstep solvers instead call ``model(x, t)`` themselves, possibly several
times per step (Heun, DPM-Solver-2/3) and at points other than the step's start (forward-value solvers). The
scheduler bridges the two by *replay*: the outputs received so far in the current solver step are kept (converted to
``x0_hat``), and the solver step is re-run with a model that answers its first calls from that list; the first call
that is not answered yet is where the pipeline must evaluate next, so its point ``x`` is returned as
``prev_sample``. When the step completes, its result becomes the new state. Re-running costs only the solver's
arithmetic; the network is called exactly as often as :func:`fewstep.sample` calls it for the same solver and grid
(``set_timesteps`` finds the evaluation times by a dry run of the solver, since a pipeline needs them up front).

The state the pipeline sees is the schedule's own frame (``x = alpha x0 + sigma eps``: variance preserving for
DDPM-family models, ``x = (1 - sigma) x0 + sigma eps`` for flow models), so ``scale_model_input`` is the
identity and ``init_noise_sigma`` is the prior's standard deviation at the first time (1 for both).

Per-run state (the grid, the solver's state, the outputs of the current step) is made by :meth:`set_timesteps`
and lives nowhere else; two schedulers share nothing.

This module is also the public home of :func:`diffusers_kwargs`, which goes the other way: a plan's times for a
diffusers scheduler's own solver (``pipe(prompt, **diffusers_kwargs(plan, pipe.scheduler))``). It lives in
:mod:`fewstep.scheduler_export` and is re-exported here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from fewstep.grids import explicit, make_grid
from fewstep.models.adapter import EDM_PREDICTIONS, ModelDenoiser
from fewstep.models.retime import Retimed
from fewstep.models.scheduler_config import (
    diffusers_grid,
    native_time_from_config,
    schedule_from_config,
    time_from_native,
    times_of_sigmas,
)
from fewstep.scheduler_export import diffusers_kwargs
from fewstep.schedules import DiscreteVP, NoiseSchedule, RectifiedFlow
from fewstep.solvers import Solver, Step, make_solver
from fewstep.zoo import load

__all__ = ["FewstepScheduler", "diffusers_kwargs"]

# Our own keys in the scheduler config; every other key is the base scheduler's, kept as it was.
_OWN_KEYS = ("solver", "solver_options", "grid", "grid_options", "base_scheduler")


class _NeedEval(Exception):  # noqa: N818  (control flow, not an error)
    """Raised by the replay model at the first evaluation that has no output yet."""

    def __init__(self, x: torch.Tensor, t: float) -> None:
        self.x, self.t = x, t


class _Replay:
    """The model as a replayed solver step sees it: answers call k from ``outputs[k]``, stops at the first
    unanswered call."""

    def __init__(self, schedule: NoiseSchedule, outputs: Sequence[torch.Tensor]) -> None:
        self.schedule, self.outputs, self.calls = schedule, outputs, 0

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        k = self.calls
        self.calls += 1
        if k < len(self.outputs):
            return self.outputs[k]
        raise _NeedEval(x, t)


class _Recorder:
    """A dry-run model: a fixed linear denoiser that records every evaluation time."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule
        self.times: list[float] = []

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.times.append(t)
        return 0.5 * x


class _Held:
    """A 'network' that returns the raw output the pipeline computed, so the adapter's own conversion
    (eps / v / x0 / flow -> x0_hat) is the one used here too."""

    def __init__(self) -> None:
        self.output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        assert self.output is not None
        return self.output


@dataclass
class _Plan:
    """One ``set_timesteps``: the grid, its solver steps and every network evaluation in order."""

    schedule: NoiseSchedule
    times: list[float]
    steps: list[Step]
    eval_times: list[float]
    eval_step: list[int]  # the solver step each evaluation belongs to (len(steps) = the final denoise-to-zero)
    step_first_eval: dict[int, int]  # solver step -> index of its first evaluation
    model_times: list[float]  # where the network is evaluated for each: eval_times, or their decoupled times (LD3)


@dataclass
class _RunState:
    """Where a run stands: the state at the start of the current solver step and what it has received."""

    eval_index: int
    step_pos: int
    x: torch.Tensor
    solver_state: Any
    outputs: list[torch.Tensor]
    noise: torch.Tensor | None = None
    returned: torch.Tensor | None = None  # what the last step returned: the pipeline's latents unless it edits them


def native_time_of(config: Mapping[str, Any],
                   schedule: NoiseSchedule) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """``(to_native, from_native)``: fewstep time ``t`` <-> the timestep diffusers feeds the network, as the base
    scheduler's config defines it (:mod:`fewstep.models.scheduler_config`)."""
    return native_time_from_config(config, schedule), time_from_native(config, schedule)


def _onto_table(schedule: DiscreteVP, sigmas: list[float]) -> list[float]:
    """Published sigma lists are rounded (SD 1.5's AYS ends at 0.029; its table's smallest sigma is 0.02916): a sigma
    within 1 % outside the table's range is put on its end, one further out is refused."""
    lo = schedule.sigma(schedule.t_min) / schedule.alpha(schedule.t_min)
    hi = schedule.sigma(schedule.t_max) / schedule.alpha(schedule.t_max)
    out = []
    for s in sigmas:
        if s > 0 and (s < lo * 0.99 or s > hi * 1.01):
            raise ValueError(f"sigma {s} is outside this model's range [{lo:.5g}, {hi:.5g}]")
        out.append(min(max(s, lo), hi) if s > 0 else s)
    return out


def _infer_base_class(config: Mapping[str, Any]) -> str:
    """The diffusers scheduler class whose ``__init__`` takes exactly the keys of ``config``.

    A scheduler made in code keeps no class name in its ``.config`` (one loaded from a folder does), but its config
    holds exactly its ``__init__`` parameters, which tells the class. Variants with the same parameters and the
    same timesteps (``DDIMParallelScheduler``, ...) give way to the plain one; other ties are refused."""
    keys = {k for k in config if not k.startswith("_")}
    found = []
    for name in dir(diffusers):
        if not name.endswith("Scheduler"):
            continue  # getattr on anything else would import whole pipelines
        cls = getattr(diffusers, name)
        if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
            params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
            if params == keys:
                found.append(name)
    plain = [n for n in found if "Parallel" not in n and not n.startswith("CogVideoX")]
    if len(plain) == 1:
        return plain[0]
    if not plain:
        raise ValueError("cannot tell which diffusers scheduler this config belongs to; pass the scheduler itself "
                         "(FewstepScheduler.from_config(pipe.scheduler, ...)) or base_scheduler='...'")
    raise ValueError(f"this scheduler config fits {', '.join(plain)}; pass base_scheduler= to choose")


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a fewstep solver over a fewstep (or the base scheduler's own) grid.

    Args:
        solver: a fewstep solver name (``fewstep solvers``); its knobs as extra keyword arguments
            (``FewstepScheduler.from_config(cfg, solver="sa_solver", tau=0)``) or ``solver_options``.
        grid: a fewstep grid name (``time_quadratic``, ``karras``, ``logsnr``, ``trailing``, ...), or
            ``"diffusers"``: the base scheduler's own timesteps for the step count (the steps users know).
            ``sigmas=`` / ``timesteps=`` given to :meth:`set_timesteps` (how pipelines pass AYS-style schedules)
            override a ``"diffusers"`` grid; with a named grid they are refused, except the plain
            ``linspace(1, 1/n, n)`` sigmas that flow pipelines always pass.
        grid_options: knobs of the named grid (e.g. ``{"rho": 7}`` for ``karras``).
        base_config: the config of the scheduler the model was trained with (kept in this scheduler's config, so
            pipelines that read e.g. ``base_image_seq_len`` from it keep working). ``from_config`` fills it.
    """

    config_name = "scheduler_config.json"
    _compatibles: list[str] = []  # noqa: RUF012

    def __init__(self, solver: str = "dpmpp_2m", grid: str = "diffusers", *, solver_options: dict | None = None,
                 grid_options: dict | None = None, base_config: Mapping[str, Any] | None = None,
                 base_scheduler: str | None = None, **knobs: Any) -> None:
        base = {k: v for k, v in dict(base_config or {}).items() if not k.startswith("_") and k not in _OWN_KEYS}
        base_scheduler = base_scheduler or dict(base_config or {}).get("_class_name") or "DDPMScheduler"
        options = {**dict(solver_options or {}), **knobs}
        self._solver: Solver = make_solver(solver, **options)  # unknown solvers and knobs raise here
        self._solver_name = solver
        self._base_class = base_scheduler
        self._base = {**base, "_class_name": base_scheduler}
        # The schedule; with dynamic shifting it depends on the image size, so it is made per run from ``mu``.
        mu = 0.0 if base.get("use_dynamic_shifting") else None
        self._schedule, self._prediction = schedule_from_config(self._base, mu=mu)
        self._native = native_time_of(self._base, self._schedule)
        if base.get("thresholding"):
            raise ValueError("thresholding=True (dynamic thresholding of x0) in the base scheduler config is not "
                             "supported by FewstepScheduler; set it to False")
        # DDIM/DDPM-style clip_sample clips x0_hat: a change of the denoiser that every solver then sees
        self._clip = float(base.get("clip_sample_range", 1.0)) if base.get("clip_sample") else None
        if grid == "explicit":  # a plan's own times (a tuned grid): validated on this model's schedule
            given = dict(grid_options or {})
            if not isinstance(given.get("times"), list | tuple) or not {"times"} <= set(given) <= {
                    "times", "model_times"}:
                raise ValueError("grid='explicit' takes grid_options={'times': [...]} (decreasing continuous times) "
                                 "and optionally 'model_times': [...]")
            explicit(self._schedule, given["times"])
            if given.get("model_times") is not None:
                Retimed(self._converter(), given["times"], given["model_times"])  # validated here
        elif grid != "diffusers":  # a bad grid name (with a suggestion) or knob fails here, not in the pipeline
            try:
                make_grid(grid, self._schedule, 2, **dict(grid_options or {}))
            except TypeError as err:
                raise TypeError(f"grid {grid!r}: {err}") from None
        elif grid_options:
            raise ValueError("grid_options are for a named fewstep grid, not grid='diffusers'")
        # A solver a pipeline cannot drive (its first evaluation is not on the initial noise) is refused now,
        # before a pipeline is loaded or run: plan a 2-step grid once.
        self._make_plan(self._schedule, make_grid("time_uniform", self._schedule, 2).tolist())
        self.register_to_config(**base, solver=solver, solver_options=options, grid=grid,
                                grid_options=dict(grid_options or {}), base_scheduler=base_scheduler)
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._plan: _Plan | None = None
        self._run: _RunState | None = None
        self._begin_index: int | None = None

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False,  # noqa: FBT001, FBT002
                    **kwargs: Any) -> FewstepScheduler:
        """From a scheduler's config (or a scheduler, or a saved FewstepScheduler config) plus our options."""
        base_name = type(config).__name__ if isinstance(config, SchedulerMixin) else None
        if isinstance(config, SchedulerMixin | ConfigMixin):
            config = config.config
        cfg = dict(config or {})
        own = {k: cfg.pop(k) for k in _OWN_KEYS if k in cfg}
        if cfg.get("_class_name") == cls.__name__:
            cfg["_class_name"] = own.get("base_scheduler")
        if not cfg.get("_class_name") and not own.get("base_scheduler") and not kwargs.get("base_scheduler"):
            cfg["_class_name"] = base_name or _infer_base_class(cfg)
        # A saved solver's (grid's) knobs go with that solver (grid): choosing another one starts from its defaults.
        saved_solver = own.pop("solver_options", None) or {}
        if kwargs.get("solver", own.get("solver")) != own.get("solver"):
            saved_solver = {}
        if kwargs.get("grid", own.get("grid")) != own.get("grid"):
            own.pop("grid_options", None)
        solver_options = {**dict(saved_solver), **dict(kwargs.pop("solver_options", {}))}
        scheduler = cls(**{**own, **kwargs}, solver_options=solver_options, base_config=cfg)
        return (scheduler, {}) if return_unused_kwargs else scheduler

    @classmethod
    def from_plan(cls, plan: Any, config: Any = None) -> FewstepScheduler:
        """A scheduler that samples as a :class:`~fewstep.plan.Plan` says: its solver and knobs, and its named grid
        or its explicit times (then ``num_inference_steps`` must be the plan's step count). ``config``: the
        pipeline's scheduler (or its config); default: the scheduler config beside the plan's model.

        A plan's ``model_times`` (LD3's decoupled network times; :class:`fewstep.models.retime.Retimed`) are what
        the pipeline feeds the network: ``timesteps`` are their native times, while the solver steps over the plan's
        ``times`` and :meth:`step` converts each output at the time the network was evaluated at."""
        if plan.cache:
            raise ValueError(f"a scheduler does not cache; put the plan's cache on the pipeline with "
                             f"fewstep.enable_cache(pipe, {plan.cache!r})")
        if plan.guidance is not None:
            raise ValueError("a scheduler does not guide; pass the plan's guidance scale to the pipeline "
                             "(guidance_scale=)")
        if getattr(plan, "quant", ""):
            raise ValueError(f"a scheduler does not quantize; quantize the pipeline's network with "
                             f"fewstep.quantize (scheme {plan.quant!r}) and drop the plan's quant")
        if config is None:
            config = load(plan.model).scheduler_config
        if plan.times is not None:
            model_times = getattr(plan, "model_times", None)
            options = {"times": list(plan.times)} | ({} if model_times is None else {"model_times": list(model_times)})
            return cls.from_config(config, solver=plan.solver, solver_options=dict(plan.solver_options),
                                   grid="explicit", grid_options=options)
        return cls.from_config(config, solver=plan.solver, solver_options=dict(plan.solver_options),
                               grid=plan.grid, grid_options=dict(plan.grid_options))

    # ------------------------------------------------------------------ what pipelines read

    @property
    def order(self) -> int:
        """Network evaluations per solver step (pipelines slice ``timesteps[t_start * order:]`` for img2img)."""
        return self._solver.nfe_per_step

    @property
    def init_noise_sigma(self) -> float:
        t0 = self._plan.times[0] if self._plan is not None else self._schedule.t_max
        return float(self._schedule.prior_std(t0))

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        return None if self._run is None else self._run.eval_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at evaluation ``begin_index`` (img2img); it must be the first evaluation of a step."""
        if self._plan is not None and begin_index not in self._plan.step_first_eval.values():
            starts = sorted(self._plan.step_first_eval.values())
            raise ValueError(f"begin_index {begin_index} is not the start of a solver step; starts: {starts}")
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The identity, except for EDM-preconditioned models: ``c_in`` times the sample (as diffusers' EDM
        schedulers do); ``step`` then applies ``c_skip`` / ``c_out``."""
        if self._prediction not in EDM_PREDICTIONS:
            return sample
        if timestep is None:
            raise ValueError("scale_model_input needs the timestep for an EDM-preconditioned model")
        return sample * self._converter().input_scale(float(self._times_of(timestep, model=True)[0]))

    def _converter(self, output: torch.Tensor | None = None) -> ModelDenoiser:
        """A ModelDenoiser whose 'network' returns ``output``: the adapter's own conversion to ``x0_hat``."""
        held = _Held()
        held.output = output
        return ModelDenoiser(held, self._schedule, prediction=self._prediction, native_time=self._native[0])

    def __len__(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    # ------------------------------------------------------------------ the grid

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
                      mu: float | None = None) -> None:
        """Plan a run: the grid (``num_inference_steps`` on the configured grid, or the given ``timesteps`` /
        ``sigmas``), its solver steps and every network evaluation; resets all per-run state."""
        dynamic = bool(self._base.get("use_dynamic_shifting", False))
        if mu is not None and not dynamic:
            raise ValueError("mu was given but the base scheduler config has no use_dynamic_shifting")
        schedule, time_maps = self._schedule, self._native
        if dynamic:
            if mu is None:
                raise ValueError("use_dynamic_shifting: the flow shift depends on the image size; pass mu= (the "
                                 "pipelines do)")
            schedule = schedule_from_config(self._base, mu=mu)[0]
            time_maps = native_time_of(self._base, schedule)
        to_native, from_native = time_maps
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass timesteps= or sigmas=, not both")
        custom = timesteps is not None or sigmas is not None
        if custom and num_inference_steps is not None:
            given = len(timesteps if timesteps is not None else sigmas)
            if given not in (num_inference_steps, num_inference_steps + 1):
                raise ValueError(f"{given} timesteps/sigmas given for {num_inference_steps} steps")
        grid_name = self.config["grid"]
        if sigmas is not None and grid_name != "diffusers":
            n = len(sigmas)
            if isinstance(schedule, RectifiedFlow) and np.allclose(np.asarray(sigmas, dtype=np.float64),
                                                                   np.linspace(1.0, 1.0 / n, n), atol=1e-6):
                num_inference_steps, sigmas, custom = n, None, False  # a flow pipeline's default, not a choice
            else:
                raise ValueError(f"sigmas= given, but this scheduler was built with grid={grid_name!r}; "
                                 "use grid='diffusers' to sample on given sigmas")
        if timesteps is not None and grid_name != "diffusers":
            raise ValueError(f"timesteps= given, but this scheduler was built with grid={grid_name!r}; "
                             "use grid='diffusers' to sample on given timesteps")
        if custom:
            times = self._custom_times(schedule, from_native, timesteps, sigmas, mu)
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps, timesteps= or sigmas=")
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int | np.integer):
                raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
            if grid_name == "diffusers":
                times = self._base_times(schedule, int(num_inference_steps), mu=mu)
            elif grid_name == "explicit":
                times = [float(t) for t in self.config["grid_options"]["times"]]
                if int(num_inference_steps) != len(times) - 1:
                    raise ValueError(f"this scheduler samples its plan's {len(times) - 1} steps; "
                                     f"num_inference_steps={num_inference_steps} asks for another count")
            else:
                times = make_grid(grid_name, schedule, int(num_inference_steps),
                                  **self.config.get("grid_options", {})).tolist()
        model_times = self.config["grid_options"].get("model_times") if grid_name == "explicit" else None
        self._plan = self._make_plan(schedule, times, model_times)
        self._schedule, self._native = schedule, time_maps  # only once the whole plan stands
        device = torch.device(device) if device is not None else None
        native = [to_native(t) for t in self._plan.model_times]
        integral = isinstance(schedule, DiscreteVP) and all(abs(v - round(v)) < 1e-6 for v in native)
        self.timesteps = (torch.tensor([round(v) for v in native], dtype=torch.int64, device=device) if integral
                          else torch.tensor(native, dtype=torch.float32, device=device))
        sig = [schedule.sigma(t) / (schedule.alpha(t) if isinstance(schedule, DiscreteVP) else 1.0)
               for t in self._plan.eval_times]
        self.sigmas = torch.tensor([*sig, 0.0], dtype=torch.float32, device=device)
        self.num_inference_steps = len(self._plan.times) - 1
        self._run = None
        self._begin_index = None

    def _base_times(self, schedule: NoiseSchedule, steps: int | None, **kwargs: Any) -> list[float]:
        """The base scheduler's own grid (its ``set_timesteps(steps, **kwargs)``) as fewstep times."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return diffusers_grid(self._base, schedule, steps, **kwargs).tolist()

    def _custom_times(self, schedule: NoiseSchedule, from_native: Callable[[float], float],
                      timesteps: Sequence[float] | None, sigmas: Sequence[float] | None,
                      mu: float | None) -> list[float]:
        """Given ``timesteps=`` / ``sigmas=``: what the base scheduler makes of them where it takes them (flow
        schedulers shift given sigmas, for instance); else native timesteps (or k-diffusion sigmas of a VP model)
        converted directly, the last step denoising to zero."""
        takes = inspect.signature(getattr(diffusers, self._base_class).set_timesteps).parameters
        if sigmas is not None and isinstance(schedule, DiscreteVP):
            sigmas = _onto_table(schedule, [float(v) for v in sigmas])
        given = {"timesteps": timesteps} if timesteps is not None else {"sigmas": sigmas}
        if next(iter(given)) in takes:
            return self._base_times(schedule, None, mu=mu, **{k: list(map(float, v)) for k, v in given.items()})
        if timesteps is not None:  # evaluation points; the last step denoises to zero, as DDIM-style schedulers do
            times = [from_native(float(v)) for v in timesteps]
            times += [] if times[-1] == 0.0 else [0.0]
        else:  # every point of the grid, the end included (flow sigmas, or sigma / alpha of a VP model), as Euler
            times = times_of_sigmas(schedule, [float(s) for s in sigmas], self._base_class)
        return explicit(schedule, times).tolist()

    def _make_plan(self, schedule: NoiseSchedule, times: list[float],
                   model_times: Sequence[float] | None = None) -> _Plan:
        to_zero = times[-1] == 0.0
        count = len(times) - 1
        steps = [Step.of(schedule, i, count, times[i], times[i + 1], to_zero=to_zero)
                 for i in range(count - int(to_zero))]
        # Dry run on a small random state with a linear denoiser: the evaluation times do not depend on x.
        recorder = _Recorder(schedule)
        x = torch.randn(1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        state = self._solver.init(x)
        eval_times, eval_step, first = [], [], {}
        for i, step in enumerate(steps):
            before = len(recorder.times)
            probe = _Replay(schedule, [])
            try:
                self._solver.step(probe, x, step, state, torch.zeros_like(x) if self._solver.stochastic else None)
            except _NeedEval as need:  # a step can begin a run if it first evaluates at its own start
                if need.t == step.t_cur and torch.allclose(need.x, x, rtol=1e-12, atol=0.0):
                    first[i] = len(eval_times)
            x, state = self._solver.step(recorder, x, step, state,
                                         torch.zeros_like(x) if self._solver.stochastic else None)
            eval_times += recorder.times[before:]
            eval_step += [i] * (len(recorder.times) - before)
        if to_zero:
            first[len(steps)] = len(eval_times)
            eval_times.append(times[-2])
            eval_step.append(len(steps))
        if first.get(0) != 0:
            raise ValueError(f"solver {self._solver_name!r} does not first evaluate the model on the initial "
                             "noise at the first time, where a diffusers pipeline always evaluates first; run it "
                             "with fewstep.sample instead")
        retimed = None if model_times is None else Retimed(self._converter(), times, model_times)
        return _Plan(schedule, times, steps, eval_times, eval_step, first,
                     eval_times if retimed is None else [retimed.time_of(t) for t in eval_times])

    # ------------------------------------------------------------------ stepping

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[torch.Tensor]:  # noqa: FBT001, FBT002
        """Take the network's raw output at the current evaluation; return the next point to evaluate (or, after
        the last evaluation, the sample)."""
        plan = self._plan
        if plan is None:
            raise ValueError("call set_timesteps before step")
        dtype = sample.dtype
        work = sample if dtype in (torch.float32, torch.float64) else sample.float()  # low precision: float32 state
        if self._run is None:
            first = self._begin_index or 0
            if first not in plan.step_first_eval.values():
                raise ValueError(f"cannot begin at evaluation {first}: not the start of a solver step")
            step_pos = plan.eval_step[first]
            self._run = _RunState(first, step_pos, work, self._solver.init(work), [])
        run = self._run
        if (not run.outputs and run.eval_index == plan.step_first_eval.get(run.step_pos)
                and run.returned is not None and not torch.equal(sample, run.returned)):
            run.x = work  # the pipeline changed the latents between steps (inpainting, callbacks): take them
        if run.eval_index >= len(plan.eval_times):
            raise ValueError("step called after the last timestep; call set_timesteps to start a new run")
        expected = self.timesteps[run.eval_index]
        if timestep is not None and not math.isclose(float(torch.as_tensor(timestep).flatten()[0]), float(expected),
                                                     rel_tol=1e-5, abs_tol=1e-4):
            raise ValueError(f"step got timestep {float(torch.as_tensor(timestep).flatten()[0])}, expected "
                             f"{float(expected)} (evaluation {run.eval_index}); steps must follow scheduler.timesteps")
        t_eval = plan.model_times[run.eval_index]  # the network's time: the solver's, unless decoupled
        if model_output.shape[1] == 2 * sample.shape[1] and str(self._base.get("variance_type")).startswith("learned"):
            model_output = model_output[:, : sample.shape[1]]  # a predicted variance beside the prediction (IF)
        # The pipeline's model saw scale_model_input(sample); the adapter converts its output at the raw sample.
        x0_hat = self._converter(model_output.to(work.dtype))(work, t_eval)
        run.outputs.append(x0_hat if self._clip is None else x0_hat.clamp(-self._clip, self._clip))
        run.eval_index += 1
        out = self._advance(run, plan, generator).to(dtype)
        run.returned = out
        return SchedulerOutput(prev_sample=out) if return_dict else (out,)

    def _advance(self, run: _RunState, plan: _Plan, generator: Any) -> torch.Tensor:
        """Replay the current solver step with the outputs received; move on while steps complete."""
        while True:
            if run.step_pos == len(plan.steps):  # the final denoise-to-zero (x0_hat once evaluated), or the end
                return run.outputs[0] if plan.times[-1] == 0.0 and run.outputs else run.x
            step = plan.steps[run.step_pos]
            if self._solver.stochastic and run.noise is None:
                run.noise = randn_tensor(run.x.shape, generator=generator, device=run.x.device, dtype=run.x.dtype)
            replay = _Replay(plan.schedule, run.outputs)
            try:
                x_next, state = self._solver.step(replay, run.x, step, run.solver_state, run.noise)
            except _NeedEval as need:
                return need.x
            run.x, run.solver_state, run.outputs, run.noise = x_next, state, [], None
            run.step_pos += 1

    # ------------------------------------------------------------------ noising (img2img, inpainting)

    def _times_of(self, timesteps: Any, *, model: bool = False) -> torch.Tensor:
        """Fewstep times of diffusers timesteps: the planned time of a timestep of this run (exact, float64; the
        solver's, or with ``model`` the network's, which differ with decoupled model times), else the native-time
        inverse; a time that a float32 timestep rounds just past the schedule's end is put on it, a timestep outside
        the model's range raises."""
        from_native, schedule = self._native[1], self._schedule
        values = torch.as_tensor(timesteps).flatten().tolist()
        planned = {} if self.timesteps is None else {float(v): t for v, t in zip(
            self.timesteps.tolist(), self._plan.model_times if model else self._plan.eval_times, strict=True)}
        return torch.tensor([planned[float(v)] if float(v) in planned
                             else min(max(from_native(v), 0.0), schedule.t_max) for v in values], dtype=torch.float64)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """``alpha(t) x0 + sigma(t) noise`` at the times of the given timesteps (one per sample, or one for all)."""
        ts = self._times_of(timesteps)
        alpha = torch.tensor([self._schedule.alpha(t) for t in ts.tolist()], dtype=torch.float64)
        sigma = torch.tensor([self._schedule.sigma(t) for t in ts.tolist()], dtype=torch.float64)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = alpha.to(original_samples.device, original_samples.dtype).reshape(shape)
        sigma = sigma.to(original_samples.device, original_samples.dtype).reshape(shape)
        return alpha * original_samples + sigma * noise

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow pipelines' name for :meth:`add_noise` (``sigma noise + (1 - sigma) sample``)."""
        return self.add_noise(sample, noise, timestep)

