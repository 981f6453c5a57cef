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
from collections.abc import Sequence
from typing import Any

import torch

from fewstep.caching.adapters import adapter_of
from fewstep.caching.calibrate import Calibration, _rel_err, method_names, pick
from fewstep.caching.engines import _Engine, _Meters
from fewstep.caching.magnitude import _Recorder, curve_of
from fewstep.caching.methods import METHODS, FeatureCache
from fewstep.caching.policies import MagnitudeCurve
from fewstep.caching.spec import check_target, parse_cache
from fewstep.caching.stats import CacheStats
from fewstep.models.diffusers import denoising_network
from fewstep.models.families import family_of

__all__ = ["PipelineCache", "calibrate_pipeline_cache", "disable_cache", "enable_cache", "pipeline_magnitude_curve"]

_ENABLED: weakref.WeakKeyDictionary[torch.nn.Module, PipelineCache] = weakref.WeakKeyDictionary()


class PipelineCache:
    """A cache enabled on a pipeline's network; ``stats`` counts the evaluations of the latest run, ``calibration``
    says what ``auto`` chose. Holds the pipeline and its network weakly: enabling a cache never keeps them alive."""

    def __init__(self, pipe: Any, net: torch.nn.Module, method: type[FeatureCache], recipe: Any, spec: str) -> None:
        self._pipe, self._net = weakref.ref(pipe), weakref.ref(net)
        self.method, self.recipe, self.spec = method, recipe, spec
        self.stats = CacheStats()
        self.calibration: Calibration | None = None
        self._original: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._meters = _Meters()
        self._engines: dict[int, _Engine] = {}
        self._current: _Engine | None = None
        self._timesteps: Any = None
        self._last_key: Any = None
        self._branch = self._count = self._step = 0

    @property
    def pipe(self) -> Any:
        return self._pipe()

    @property
    def net(self) -> torch.nn.Module | None:
        return self._net()

    @property
    def adapter(self) -> Any:
        return self.method.adapter_for(self.net)

    def block(self, position: Any, block: torch.nn.Module, call: Any) -> Any:
        if self._current is None:  # called outside the network's forward (not by the pipeline)
            return call.run(block)
        return self._current.block(position, block, call)

    def _close_evaluation(self) -> None:
        if self._current is not None:
            reused, work = self._current.end()  # disarms the work meter, also after a forward that raised
            self.stats.on_cache(self._step, reused, work)
        self._current = None

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._close_evaluation()
        family = family_of(module)
        self.adapter.check_cond(kwargs)
        sample = kwargs.get(family.sample, args[0] if args else None)
        timestep = kwargs.get(family.timestep, args[1] if len(args) > 1 else None)
        if not isinstance(sample, torch.Tensor) or timestep is None:
            raise ValueError(f"enable_cache: {type(module).__name__} was called without its sample and timestep")
        clock = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu().reshape(-1)
        scheduler = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        begin = getattr(scheduler, "begin_index", None) or 0  # img2img: the run starts mid-schedule
        if hasattr(type(scheduler), "step_index"):
            # schedulers that count their steps (Euler, DPM-Solver, Heun, UniPC, FlowMatch, FewstepScheduler):
            # None until the first step() of a run, then the index of the evaluation
            raw = scheduler.step_index
            if timesteps is not self._timesteps or (raw is None and self._last_key is not None):
                self._new_run(timesteps)
            index = 0 if raw is None else max(int(raw) - begin, 0)
            key: Any = index
        else:
            # schedulers that do not (DDIM, DDPM, PNDM): a new evaluation whenever the timestep changes
            if timesteps is not self._timesteps:
                self._new_run(timesteps)
            key = tuple(clock.tolist())
            if self._last_key is not None and key != self._last_key:
                self._count += 1
            index = self._count
        self._branch = self._branch + 1 if key == self._last_key else 0
        self._last_key = key
        slots = len(timesteps) - begin + 1 if timesteps is not None else 1  # as a grid: one more point than steps
        engine = self._engines.get(self._branch)
        if engine is None:
            engine = self._engines[self._branch] = self.recipe.engine(module, self.adapter, self._meters)
        batch = sample.shape[0]
        clock = clock.expand(batch) if clock.numel() == 1 else clock
        engine.begin(index, clock, batch, slots, tuple(sample.shape[1:]))
        self._current, self._step = engine, index

    def _new_run(self, timesteps: Any) -> None:
        self._timesteps, self._engines, self._last_key, self._count = timesteps, {}, None, 0
        self.stats.on_start(torch.zeros(0))

    def _post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._close_evaluation()


def enable_cache(pipe: Any, spec: str, *, seeds: Sequence[int] = (1000, 1001, 1002, 1003),
                 **call: Any) -> PipelineCache:
    """Put the cache ``spec`` (``"block:threshold=0.08"``, ``"taylorseer:interval=3"``, ``"deepcache:interval=3"``,
    ``"none"``) on ``pipe.unet`` / ``pipe.transformer``; works with fewstep's and diffusers' schedulers. Replaces a
    cache enabled before. Returns the handle (``.stats``: reuse and work of the latest run).

    Two specs run the pipeline first, with the keywords ``call`` of the calls the cache will serve (``prompt=``,
    ``num_inference_steps=``, ``guidance_scale=``, ...) on the calibration ``seeds``: ``"magcache:..."`` records its
    magnitude curve from one uncached run, and ``"auto:target_error=0.05[:method=...]"`` picks the cheapest setting
    whose latents stay within the target of the uncached ones (:func:`calibrate_pipeline_cache`)."""
    net = denoising_network(pipe)
    parsed = parse_cache(spec)
    if parsed.needs_run and not call:
        raise ValueError(f"{parsed.name} runs the pipeline first: pass the keywords of the calls it will serve, e.g. "
                         f"enable_cache(pipe, {spec!r}, prompt='...', num_inference_steps=28)")
    disable_cache(pipe)
    if parsed.is_search:
        assert parsed.target_error is not None
        cal = calibrate_pipeline_cache(pipe, target_error=parsed.target_error, method=parsed.search, seeds=seeds,
                                       **call)
        handle = _enable(pipe, net, METHODS.get(cal.method), dict(cal.knobs), spec)  # None: "none" was chosen
        handle.calibration = cal
        return handle
    cls = parsed.method
    if cls is None:
        return _enable(pipe, net, None, {}, spec)
    if cls.needs_run(parsed.knobs):
        cls.adapter_for(net)  # refuses a network this method cannot use, before the run
    knobs = cls.with_curve(parsed.knobs, lambda: pipeline_magnitude_curve(pipe, seeds=seeds, **call))
    return _enable(pipe, net, cls, knobs, spec)


def _enable(pipe: Any, net: torch.nn.Module, cls: type[FeatureCache] | None, knobs: dict[str, Any],
            spec: str) -> PipelineCache:
    """``cls`` with ``knobs`` on ``net``; ``None``: no cache (a handle that counts nothing, nothing installed)."""
    if cls is None:
        return PipelineCache(pipe, net, FeatureCache, None, spec)
    adapter = cls.adapter_for(net)
    try:
        recipe = cls.make_recipe(adapter, net, **knobs)
    except TypeError as err:
        raise TypeError(f"cache {cls.name!r}: {err}") from None
    return _install(pipe, net, cls, recipe, spec)


def _install(pipe: Any, net: torch.nn.Module, cls: type[FeatureCache], recipe: Any, spec: str) -> PipelineCache:
    """Wrap ``net``'s blocks in place for ``recipe`` and hook its forward; the handle :func:`disable_cache` undoes."""
    handle = PipelineCache(pipe, net, cls, recipe, spec)
    handle._original = cls.adapter_for(net).wrap_in_place(net, handle)
    handle._handles = [net.register_forward_pre_hook(handle._pre, with_kwargs=True),
                       net.register_forward_hook(handle._post, always_call=True)]
    _ENABLED[net] = handle
    return handle


def disable_cache(pipe: Any) -> None:
    """Remove a cache :func:`enable_cache` put on the pipeline's network (nothing when there is none)."""
    net = denoising_network(pipe)
    handle = _ENABLED.pop(net, None)
    if handle is None:
        return
    handle._close_evaluation()
    for h in handle._handles:
        h.remove()
    handle.adapter.unwrap(net, handle._original)


def _latents(pipe: Any, seeds: Sequence[int], call: dict[str, Any]) -> torch.Tensor:
    """The pipeline's undecoded latents, one generator per seed."""
    device = getattr(pipe, "device", "cpu")
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    kwargs = {"num_images_per_prompt": len(seeds), **call, "generator": generators, "output_type": "latent"}
    with torch.no_grad():
        return pipe(**kwargs).images


def pipeline_magnitude_curve(pipe: Any, *, seeds: Sequence[int] = (1000, 1001, 1002, 1003),
                             **call: Any) -> MagnitudeCurve:
    """MagCache's curve recorded on one uncached run of the pipeline called with ``call`` (its clock: the
    network's timestep input, as the pipeline feeds it)."""
    net = denoising_network(pipe)
    record: list[tuple[float, float]] = []
    disable_cache(pipe)
    _install(pipe, net, _Recorder, _Recorder.make_recipe(_Recorder.adapter_for(net), net, record=record), "record")
    try:
        _latents(pipe, seeds, call)
    finally:
        disable_cache(pipe)
    return curve_of(record)


def calibrate_pipeline_cache(pipe: Any, *, target_error: float, method: str | None = None,
                             seeds: Sequence[int] = (1000, 1001, 1002, 1003), **call: Any) -> Calibration:
    """:func:`~fewstep.caching.calibrate_cache` for a pipeline: runs ``pipe(**call)`` on the calibration ``seeds``
    uncached and with every candidate setting of ``method`` (``None``: DeepCache for U-Nets, the first-block cache
    for transformers; ``"all"``: every method the network supports) and returns the cheapest whose latents stay
    within ``target_error`` (mean per-sample relative error, held to its bootstrap 90th percentile)."""
    target = check_target(target_error)
    net = denoising_network(pipe)
    adapter = adapter_of(net)
    names = method_names(net, method)
    disable_cache(pipe)
    exact = _latents(pipe, seeds, call)
    table = []
    for name in names:
        cls = METHODS[name]
        extra = cls.with_curve({}, lambda: pipeline_magnitude_curve(pipe, seeds=seeds, **call))
        for knobs in cls.candidates(adapter):
            handle = _enable(pipe, net, cls, {**knobs, **extra}, name)
            try:
                out = _latents(pipe, seeds, call)
            finally:
                disable_cache(pipe)
            table.append((name, {**knobs, **extra}, *_rel_err(out, exact), handle.stats.mean_work))
    return pick(table, target)
