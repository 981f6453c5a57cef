"""One ``Plan``: a frozen, JSON-serialisable description of how to sample, and the one ``build()`` that turns it
into a sampler.

A plan names the model (a zoo name or a local diffusers folder), the solver and its knobs, the time grid (a grid
name with its knobs and a step count, or explicit times), a quantization scheme, a cache spec, classifier-free
guidance, and the dtype and device of the state. ``fewstep sample``, the bench runner and
``FewstepScheduler.from_plan`` all assemble model + solver + grid + quantization + cache through :meth:`Plan.build`;
a tuner writes plans (``fewstep.plan/1`` JSON files).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep.grids import DEFAULT_GRID, GRIDS, explicit, make_grid, suggest
from fewstep.models.base import Cond, Denoiser
from fewstep.solvers import Solver, make_solver

__all__ = ["FORMAT", "Plan", "Sampler"]

FORMAT = "fewstep.plan/1"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _plain(value: Any, what: str) -> Any:
    """``value`` if it is JSON data (numbers, strings, booleans, None, lists, string-keyed dicts), else an error."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{what}: {value!r} is not a finite number")
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, what) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"{what}: keys must be strings")
        return {k: _plain(v, what) for k, v in value.items()}
    raise ValueError(f"{what}: {type(value).__name__} is not JSON data")


@dataclass(frozen=True)
class Plan:
    """How to sample, as data.

    Attributes:
        model: a zoo model name (``"unet_m"``) or a local diffusers folder.
        solver, solver_options: a registered solver and its knobs (``fewstep solvers``).
        grid, grid_options, steps: a named grid (:data:`fewstep.grids.GRIDS`) with its knobs and a step count;
            or ``grid="explicit"`` with ``times``: the decreasing continuous times of the grid, the last one 0 or
            ``t_min`` (what a tuner finds).
        model_times: with explicit ``times``, optionally the decoupled time the network is evaluated at for each
            nonzero grid time (LD3; :class:`fewstep.models.retime.Retimed`); ``None``: the grid times themselves.
        cache: a cache spec (``"taylorseer:interval=3"``, ``"auto:target_error=0.02"``, ``""`` for none;
            :func:`fewstep.caching.cache_from_spec`).
        quant: a quantization scheme for the network (``"int8wo"``, ``"w8"``, ``"w4a8"``, ``""`` or ``"none"``;
            :data:`fewstep.quant.SCHEMES`), applied by :meth:`build` before guidance and cache; every scheme a
            calibration run changes (activation ranges; GPTQ weight rounding, the default for all but ``fp8wo``)
            calibrates on this plan's own solver and times (:func:`fewstep.quant.calibrate`'s default seeds).
            Written to JSON only when set, so plans from before it existed read and hash as they
            did.
        guidance: a classifier-free guidance scale for models with a default null condition (a class-conditional
            DiT); text models take their negative conditioning at :meth:`build`.
        dtype, device: where and in what precision the run goes: the network runs in ``dtype`` on ``device``
            (:meth:`build` moves a network it loads; a given one must already be there), the state too, except
            that float16/bfloat16 runs keep the state in float32, as diffusers' pipelines keep their latents.
    """

    model: str
    solver: str = "dpmpp_2m"
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    grid: str = DEFAULT_GRID
    grid_options: Mapping[str, Any] = field(default_factory=dict)
    steps: int | None = None
    times: tuple[float, ...] | None = None
    model_times: tuple[float, ...] | None = None
    cache: str = ""
    guidance: float | None = None
    quant: str = ""
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"plan model must be a zoo name or a folder, got {self.model!r}")
        object.__setattr__(self, "solver_options", dict(_plain(dict(self.solver_options), "solver_options")))
        object.__setattr__(self, "grid_options", dict(_plain(dict(self.grid_options), "grid_options")))
        make_solver(self.solver, **self.solver_options)  # unknown solvers and knobs raise here
        if self.grid == "explicit":
            if self.times is None:
                raise ValueError("grid='explicit' needs times=[...] (decreasing, ending at 0 or t_min)")
            times = tuple(float(t) for t in _plain(list(self.times), "times"))
            if len(times) < 2 or any(b >= a for a, b in zip(times, times[1:], strict=False)):
                raise ValueError(f"plan times must be at least 2 strictly decreasing values, got {list(times)}")
            if self.steps is not None and self.steps != len(times) - 1:
                raise ValueError(f"steps={self.steps} does not match {len(times)} times")
            object.__setattr__(self, "times", times)
            object.__setattr__(self, "steps", len(times) - 1)
            if self.grid_options:
                raise ValueError("grid_options are for a named grid, not grid='explicit'")
            if self.model_times is not None:
                from fewstep.models.retime import check_model_times

                object.__setattr__(self, "model_times",
                                   check_model_times(times, _plain(list(self.model_times), "model_times")))
        else:
            if self.grid not in GRIDS:
                raise ValueError(f"unknown grid {self.grid!r}{suggest(self.grid, list(GRIDS) + ['explicit'])}")
            if self.times is not None or self.model_times is not None:
                raise ValueError(f"times and model_times are for grid='explicit', not grid={self.grid!r}")
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise ValueError(f"plan steps must be an int >= 1 for grid={self.grid!r}, got {self.steps!r}")
        if not isinstance(self.cache, str):
            raise ValueError(f"plan cache must be a spec string, got {self.cache!r}")
        if not isinstance(self.quant, str):
            raise ValueError(f"plan quant must be a scheme string such as 'int8wo' ('' for none), got {self.quant!r}")
        if self.quant.strip() == "none":
            object.__setattr__(self, "quant", "")
        if self.quant:
            from fewstep.quant.schemes import parse_scheme

            parse_scheme(self.quant)  # unknown schemes and knobs raise here
        if self.guidance is not None and (isinstance(self.guidance, bool) or not isinstance(self.guidance, int | float)
                                          or not math.isfinite(self.guidance)):
            raise ValueError(f"plan guidance must be a number, got {self.guidance!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"plan dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        torch.device(self.device)  # a malformed device name raises here

    # -- JSON ------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = {"format": FORMAT, **asdict(self)}
        for key in ("times", "model_times"):
            out[key] = None if getattr(self, key) is None else list(getattr(self, key))
        if not self.quant:  # as before quantization existed: old plans keep their bytes and bench keys
            del out["quant"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"not a fewstep plan (expected \"format\": \"{FORMAT}\")")
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - fields - {"format"})
        if unknown:
            raise ValueError(f"unknown plan keys {unknown}; a plan has {', '.join(sorted(fields))}")
        body = {k: v for k, v in data.items() if k != "format"}
        for key in ("times", "model_times"):
            if body.get(key) is not None:
                body[key] = tuple(body[key])
        return cls(**body)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically."""
        from fewstep.outputs import atomic_write, check_output_file

        out = check_output_file(path, (".json",))
        text = self.to_json() + "\n"
        atomic_write(out, lambda f: f.write(text.encode()))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        from fewstep.models.diffusers import load_json

        return cls.from_dict(load_json(Path(path)))

    # -- building ---------------------------------------------------------------------------------------------------

    def build(self, den: Denoiser | None = None, *, shape: Sequence[int] | None = None, uncond: Cond = None,
              calibration_cond: Cond = None) -> Sampler:
        """The sampler this plan describes: the model (``den``, else loaded from :attr:`model`), quantized, guided and
        cached as the plan says, the solver, and the grid's times. ``shape``: one sample's shape (default: the model's);
        ``uncond``: the negative conditioning of guided text models; ``calibration_cond``: the conditioning an
        ``auto`` cache and an activation quantization scheme calibrate with (for their default seeds). ``den`` is
        never modified: :func:`fewstep.quant.quantize` works on a copy of its network."""
        from fewstep.caching import cache_from_spec
        from fewstep.models import ClassifierFreeGuidance

        if den is None:
            from fewstep.zoo import load

            den = load(self.model)
            place(den, torch.device(self.device), DTYPES[self.dtype])
        else:
            check_placed(den, torch.device(self.device), DTYPES[self.dtype])
        solver = make_solver(self.solver, **self.solver_options)
        if shape is None:
            shape = den.sample_shape  # type: ignore[attr-defined]
        shape = tuple(int(s) for s in shape)
        if self.times is not None:
            times = explicit(den.schedule, self.times)
        else:
            assert self.steps is not None
            times = make_grid(self.grid, den.schedule, self.steps, **self.grid_options)
        model: Denoiser = den
        if self.guidance is not None:
            model = ClassifierFreeGuidance(den, float(self.guidance), uncond=uncond)
        if self.quant:  # the network under the guidance; activations see guided runs
            from fewstep.quant import parse_scheme, quantize

            cal = None
            if parse_scheme(self.quant).calibratable:  # calibrate's default seeds, this plan's solver and times
                cal = {"solver": solver, "steps": times, "shape": shape, "cond": calibration_cond}
            model = quantize(model, self.quant, calibration=cal)
        network = model.inner if isinstance(model, ClassifierFreeGuidance) else model
        calibration = None
        if self.cache:  # "none" gives the model back; auto and magcache calibrate on this plan's own times
            model, calibration = cache_from_spec(model, self.cache, solver=solver, steps=times, shape=shape,
                                                 cond=calibration_cond)
        if self.model_times is not None:  # outermost: guidance and caches see the network's own times
            from fewstep.models.retime import Retimed

            model = Retimed(model, times.tolist(), self.model_times)
        return Sampler(self, model, solver, times, shape, calibration, network)


def _network(den: Denoiser) -> torch.nn.Module | None:
    inner = den
    while not isinstance(getattr(inner, "model", None), torch.nn.Module) and hasattr(inner, "inner"):
        inner = inner.inner
    model = getattr(inner, "model", None)
    return model if isinstance(model, torch.nn.Module) else None


def place(den: Denoiser, device: torch.device, dtype: torch.dtype) -> None:
    """Move the network inside ``den`` to ``device`` and ``dtype`` (in place; :meth:`Plan.build` does it to a
    network it loads)."""
    net = _network(den)
    param = None if net is None else next(iter(net.parameters()), None)
    if net is not None and param is not None and (param.device != device or param.dtype != dtype):
        net.to(device=device, dtype=dtype)
        if hasattr(den, "dtype"):
            den.dtype = dtype  # type: ignore[attr-defined]  # the ModelDenoiser casts inputs to it


def check_placed(den: Denoiser, device: torch.device, dtype: torch.dtype) -> None:
    """A network given to :meth:`Plan.build` must be where the plan runs: moving it would change the caller's
    module behind their back."""
    net = _network(den)
    param = None if net is None else next(iter(net.parameters()), None)
    if param is None:
        return
    if param.device.type != device.type or (device.index is not None and param.device != device):
        raise ValueError(f"the plan runs on {device}, the network is on {param.device}: move it first "
                         f"(network.to({str(device)!r})) or build without a model to load it there")
    if param.dtype != dtype:
        raise ValueError(f"the plan runs in {str(dtype).removeprefix('torch.')}, the network is in "
                         f"{str(param.dtype).removeprefix('torch.')}: cast it first or change the plan's dtype")


def placement(dtype: str, device: str) -> tuple[torch.dtype, torch.device]:
    """``dtype`` (a name in :data:`DTYPES`) and ``device`` (a torch device name) as torch objects, or a one-line
    ``ValueError``. The device need not be present here (a command line checks that: ``--device``)."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(device, str):  # a name, as a plan's JSON holds it
        raise ValueError(f"device must be a torch device name (e.g. cpu, cuda, cuda:1), got {device!r}")
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"not a torch device: {device!r} (e.g. cpu, cuda, cuda:1)") from None
    return DTYPES[dtype], where


def state_dtype(dtype: str) -> torch.dtype:
    """The dtype of the sampling state of a run in ``dtype``: float32 for half precisions."""
    return torch.float64 if dtype == "float64" else torch.float32


@dataclass
class Sampler:
    """What :meth:`Plan.build` makes: call :meth:`sample`."""

    plan: Plan
    denoiser: Denoiser
    solver: Solver
    times: torch.Tensor
    shape: tuple[int, ...]
    calibration: Any = None
    network: Denoiser | None = None  # the denoiser guidance, cache and retiming wrap (quantized if the plan says)

    def sample(self, *, seeds: Any = None, x_init: torch.Tensor | None = None, cond: Cond = None,
               hooks: Sequence[Any] = (), batch_size: int | None = None) -> torch.Tensor:
        """The samples of ``seeds`` (or from ``x_init``). ``batch_size``: run them that many at a time (memory of
        one batch for the run; sample ``k`` is the same whatever the batch size, up to the network's own kernels);
        ``cond`` tensors with one row per seed are cut with them."""
        from fewstep.noise import parse_seeds
        from fewstep.sample import sample

        dtype = state_dtype(self.plan.dtype)
        if x_init is not None:
            return sample(self.denoiser, self.solver, self.times, x_init=x_init, seeds=seeds, cond=cond, hooks=hooks,
                          dtype=dtype, device=self.plan.device)
        ids = parse_seeds(seeds if seeds is not None else 1)
        if batch_size is None or batch_size >= len(ids):
            return sample(self.denoiser, self.solver, self.times, shape=self.shape, seeds=ids, cond=cond,
                          hooks=hooks, dtype=dtype, device=self.plan.device)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        parts = [self.sample(seeds=ids[a:a + batch_size], cond=cut_cond(cond, len(ids), a, a + batch_size),
                             hooks=hooks) for a in range(0, len(ids), batch_size)]
        return torch.cat(parts)


def cut_cond(cond: Cond, n: int, start: int, stop: int) -> Cond:
    """The conditioning of samples ``start:stop`` of ``n``: tensors with ``n`` rows are cut, others (batch-1
    prompt embeddings, scalars) kept."""
    if cond is None or not isinstance(cond, Mapping):
        return cond
    return {k: v[start:stop] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n and n > 1 else v
            for k, v in cond.items()}
