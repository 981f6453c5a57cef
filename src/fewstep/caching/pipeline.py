"""``enable_cache(pipe, spec)``: a feature cache on a diffusers pipeline's own network, with any scheduler.

The pipeline's ``unet`` / ``transformer`` gets its block lists wrapped in place (the module keeps its identity,
parameters and config) and a forward pre-hook that opens each evaluation from what the network is called with:
the step is the scheduler's ``step_index`` (the evaluation count within the run; a new ``set_timesteps`` starts a
new run), the clock is the network's ``timestep`` input, one value per sample. Several calls at one step (a
pipeline that runs the conditional and unconditional branches separately) get one cache state each; a batched
guidance pass keeps per-sample state within its batch. :func:`disable_cache` puts the original blocks back.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from fewstep.caching.engines import _Engine, _Meters
from fewstep.caching.methods import METHODS, FeatureCache
from fewstep.caching.stats import CacheStats
from fewstep.models.families import family_of

__all__ = ["PipelineCache", "disable_cache", "enable_cache"]

_ENABLED: weakref.WeakKeyDictionary[torch.nn.Module, PipelineCache] = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class PipelineCache:
    """A cache enabled on a pipeline's network; ``stats`` counts the evaluations of the latest run."""

    pipe: Any
    net: torch.nn.Module
    method: type[FeatureCache]
    recipe: Any
    spec: str
    stats: CacheStats = field(default_factory=CacheStats)
    _original: dict[str, Any] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)
    _meters: _Meters = field(default_factory=_Meters)
    _engines: dict[int, _Engine] = field(default_factory=dict)
    _current: _Engine | None = None
    _timesteps: Any = None
    _last_index: int | None = None
    _last_raw: Any = None
    _branch: int = 0
    _step: int = 0

    def block(self, position: Any, block: torch.nn.Module, call: Any) -> Any:
        if self._current is None:  # called outside the network's forward (not by the pipeline)
            return call.run(block)
        return self._current.block(position, block, call)

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        family = family_of(module)
        self.adapter.check_cond(kwargs)
        sample = kwargs.get(family.sample, args[0] if args else None)
        timestep = kwargs.get(family.timestep, args[1] if len(args) > 1 else None)
        if not isinstance(sample, torch.Tensor) or timestep is None:
            raise ValueError(f"enable_cache: {type(module).__name__} was called without its sample and timestep")
        scheduler = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        raw = getattr(scheduler, "step_index", None)
        if timesteps is not self._timesteps or (raw is None and self._last_raw is not None):
            self._timesteps, self._engines, self._last_index = timesteps, {}, None  # a new run
            self.stats.on_start(torch.zeros(0))
        self._last_raw = raw
        index = 0 if raw is None else int(raw)
        self._branch = self._branch + 1 if index == self._last_index else 0
        self._last_index = index
        slots = len(timesteps) + 1 if timesteps is not None else 1  # as a grid: one more point than steps
        engine = self._engines.get(self._branch)
        if engine is None:
            engine = self._engines[self._branch] = self.recipe.engine(module, self.adapter, self._meters)
        batch = sample.shape[0]
        clock = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu().reshape(-1)
        clock = clock.expand(batch) if clock.numel() == 1 else clock
        engine.begin(index, clock, batch, slots, tuple(sample.shape[1:]))
        self._current, self._step = engine, index

    def _post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._current is not None:
            reused, work = self._current.end()
            self.stats.on_cache(self._step, reused, work)
        self._current = None

    @property
    def adapter(self) -> Any:
        return self.method.adapter_for(self.net)


def enable_cache(pipe: Any, spec: str) -> PipelineCache:
    """Put the cache ``spec`` (``"block:threshold=0.08"``, ``"taylorseer:interval=4"``, ``"deepcache:interval=3"``,
    ``"none"``) on ``pipe.unet`` / ``pipe.transformer``; works with fewstep's and diffusers' schedulers. Replaces a
    cache enabled before. Returns the handle (``.stats``: reuse and work of the latest run).

    MagCache needs a curve recorded on a run of the same solver (:func:`~fewstep.caching.magnitude_curve` on a
    Denoiser); ``auto`` calibrates on Denoisers (:func:`~fewstep.caching.calibrate_cache`) — pass its choice
    (``Calibration.spec``) here."""
    from fewstep.pipelines import denoising_network
    from fewstep.spec import parse_spec

    net = denoising_network(pipe)
    name, knobs = parse_spec(spec)
    if name == "auto":
        raise ValueError("enable_cache takes a chosen cache; calibrate with fewstep.calibrate_cache on the "
                         "pipeline's denoiser and pass Calibration.spec")
    if name != "none" and name not in METHODS:
        raise ValueError(f"unknown cache {name!r}; known: none, {', '.join(METHODS)}")
    disable_cache(pipe)
    if name == "none":
        return PipelineCache(pipe, net, METHODS["deepcache"], None, spec)
    cls = METHODS[name]
    adapter = cls.adapter_for(net)
    try:
        recipe = cls.make_recipe(adapter, net, **knobs)
    except TypeError as err:
        raise TypeError(f"cache {name!r}: {err}") from None
    handle = PipelineCache(pipe, net, cls, recipe, spec)
    handle._original = adapter.wrap_in_place(net, handle)
    handle._handles = [net.register_forward_pre_hook(handle._pre, with_kwargs=True),
                       net.register_forward_hook(handle._post)]
    _ENABLED[net] = handle
    return handle


def disable_cache(pipe: Any) -> None:
    """Remove a cache :func:`enable_cache` put on the pipeline's network (nothing when there is none)."""
    from fewstep.pipelines import denoising_network

    net = denoising_network(pipe)
    handle = _ENABLED.pop(net, None)
    if handle is None:
        return
    for h in handle._handles:
        h.remove()
    handle.adapter.unwrap(net, handle._original)
