"""diffusers' own cache hooks as comparison peers ("diffusers:<cache>" rows): the same network, grid and solver,
with diffusers' hook doing the reuse instead of a fewstep cache.

:class:`DiffusersCache` wraps a :class:`~fewstep.models.ModelDenoiser` of a diffusers transformer and drives one of
diffusers' hooks (:data:`DIFFUSERS_CACHES`) the way a diffusers pipeline does: each evaluation runs inside a
``cache_context`` carrying the step, the step count, the timestep and the flow sigma; hooks that ask for callbacks
(the current timestep, the evaluation's latents) get them from fewstep. diffusers is not edited.

Lifetime. diffusers' hooks live on the module, not in a run, and ``sample()`` tells a denoiser when a run begins
(``for_run``) but never when it ends. So the hooks are held by a ``with`` block::

    with DiffusersCache(den, "fbcache", threshold=0.1) as cached:
        x = sample(cached, "ddim", 10, shape=..., hooks=[CacheStats()])

Inside the block the hooks are (re)installed at the first evaluation of every run, built for that run (fresh
diffusers state; MagCache's step count from the run's grid); on exit they are removed and the module is left
exactly as found (no diffusers hook registry, no patched ``forward``, no torch hooks). Using it outside the block
raises. One run at a time per module: diffusers keeps its cache state on the module, so two interleaved runs (two
threads) are refused rather than silently mixed.

Guidance. Every bound copy (``for_run``) has its own cache-context names, and inside one copy every distinct
conditioning (by identity, else by content) gets its own context, so the two branches of
:class:`~fewstep.models.ClassifierFreeGuidance` keep separate diffusers state whether the guidance binds one copy for
both branches or one per branch. Hooks whose state diffusers does not key by context (PAB, FasterCache: diffusers'
pipelines batch both branches into one call) get one state object per context, swapped in before each call.

Work. Each evaluation reports ``on_cache(step, reused, work)`` to the run's hooks
(:class:`fewstep.caching.CacheStats`) in the unit of fewstep's own caches: ``work`` is the share of a full
evaluation's multiply-accumulates that the evaluation computed, both counted by
:class:`fewstep.caching.stats.WorkMeter` (convolutions, linear layers and attention products, over the whole
network) on the layers that really ran; the full count is the largest seen at the same input shapes, that of a run's
first evaluation, which diffusers' hooks always compute. ``reused`` is ``work < 1``. A block a diffusers hook skips
never calls its layers, and an attention it answers from its cache never calls its projections, so skipped work is
never counted.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import diffusers.hooks as dhooks
import torch
from diffusers.hooks.hooks import StateManager
from diffusers.models.cache_utils import CacheMixin

from fewstep.caching.stats import WorkMeter
from fewstep.grids import suggest
from fewstep.models import ModelDenoiser
from fewstep.models.base import Cond, Denoiser, Run
from fewstep.models.families import family_of, setting

__all__ = ["DIFFUSERS_CACHES", "DiffusersCache"]

_TIMESTEP = "fewstep passes the timestep of each evaluation"
_CFG_OFF = "it tunes FasterCache's CFG-Cache, which is off: fewstep runs guidance branches as separate calls"
_FASTER_CFG_ONLY = ("unconditional_batch_skip_range", "unconditional_batch_timestep_skip_range",
                    "low_frequency_weight_update_timestep_range", "high_frequency_weight_update_timestep_range",
                    "alpha_low_frequency", "alpha_high_frequency", "low_frequency_weight_callback",
                    "high_frequency_weight_callback", "tensor_format")


def _nothing(cache: DiffusersCache, steps: int | None) -> dict[str, Any]:
    return {}


def _as_given(knobs: dict[str, Any], net: torch.nn.Module) -> dict[str, Any]:
    return knobs


def _pab_defaults(knobs: dict[str, Any], net: torch.nn.Module) -> dict[str, Any]:
    if any(k.endswith("_block_skip_range") for k in knobs):
        return knobs
    return {**knobs, "spatial_attention_block_skip_range": 2}  # diffusers' fallback, made explicit


def _half(module: torch.nn.Module) -> float:
    return 0.5


def _mag_defaults(knobs: dict[str, Any], net: torch.nn.Module) -> dict[str, Any]:
    if knobs.get("mag_ratios") is not None or knobs.get("calibrate", False):
        return knobs
    if type(net).__name__ != "FluxTransformer2DModel":
        raise ValueError(f"diffusers' magcache needs mag_ratios= for {type(net).__name__} (they are "
                         f"checkpoint-dependent; a run with calibrate=True logs them)")
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    return {**knobs, "mag_ratios": FLUX_MAG_RATIOS}  # diffusers' documented ratios for Flux


def _mag_fill(cache: DiffusersCache, steps: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"num_inference_steps": steps if steps is not None else 28}
    ratios = cache.knobs.get("mag_ratios")
    if isinstance(ratios, torch.Tensor):
        out["mag_ratios"] = ratios.clone()
    return out


@dataclasses.dataclass(frozen=True)
class _Hook:
    """What fewstep knows of one diffusers cache hook.

    Attributes:
        config, apply: the names of diffusers' config class and of the function that applies it to a module.
        supplied: config fields fewstep fills itself, and why (named in the error that refuses them as knobs).
        fill: their values for a cache and a run of ``steps`` grid steps (``None``: not a run).
        defaults: the knobs for a network, with diffusers' fallback made explicit where diffusers requires a choice.
        min_blocks: a block-residual cache: the fewest blocks it takes, in the block lists diffusers recognises.
        no_text_stream: what it does when the last block returns no text stream (SD3), refused with this reason;
            empty when it does not read that stream.
        identifiers: its default ``cache_identifiers`` may match none of a model's modules (the error says so).
        first_call: it reuses at its first call when the run's first timestep lies in its spatial-attention range
            (refused before the run).
        latents: it reads each evaluation's latents (through ``raw_vision_callback``).
    """

    config: str
    apply: str
    supplied: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fill: Callable[[DiffusersCache, int | None], dict[str, Any]] = _nothing
    defaults: Callable[[dict[str, Any], torch.nn.Module], dict[str, Any]] = _as_given
    min_blocks: int = 0
    no_text_stream: str = ""
    identifiers: bool = False
    first_call: bool = False
    latents: bool = False


_HOOKS: dict[str, _Hook] = {
    "fbcache": _Hook("FirstBlockCacheConfig", "apply_first_block_cache", min_blocks=2,
                     no_text_stream="fails (its tail residual subtracts the text stream)"),
    "pab": _Hook("PyramidAttentionBroadcastConfig", "apply_pyramid_attention_broadcast",
                 supplied={"current_timestep_callback": _TIMESTEP},
                 fill=lambda c, steps: {"current_timestep_callback": c._timestep}, defaults=_pab_defaults),
    "fastercache": _Hook(
        "FasterCacheConfig", "apply_faster_cache",
        supplied={"current_timestep_callback": _TIMESTEP,
                  "is_guidance_distilled": "fewstep runs guidance branches as separate calls, so FasterCache's "
                                           "CFG-Cache (which splits one batch into its two branches) is off",
                  **dict.fromkeys(_FASTER_CFG_ONLY, _CFG_OFF)},
        fill=lambda c, steps: {"current_timestep_callback": c._timestep, "is_guidance_distilled": True},
        defaults=lambda knobs, net: {**knobs, "attention_weight_callback": knobs.get("attention_weight_callback",
                                                                                      _half)},  # diffusers' fallback
        first_call=True),
    "taylorseer": _Hook("TaylorSeerCacheConfig", "apply_taylorseer_cache", identifiers=True),
    "magcache": _Hook("MagCacheConfig", "apply_mag_cache",
                      supplied={"num_inference_steps": "fewstep sets it to each run's grid steps"}, fill=_mag_fill,
                      defaults=_mag_defaults, min_blocks=1),
    "seacache": _Hook("SeaCacheConfig", "apply_sea_cache",
                      supplied={"raw_vision_callback": "fewstep passes each evaluation's latents"},
                      fill=lambda c, steps: {"raw_vision_callback": c._raw_vision}, min_blocks=1,
                      no_text_stream="never reuses (it records no residual history without the text stream)",
                      latents=True),
}

DIFFUSERS_CACHES: dict[str, type] = {
    name: getattr(dhooks, h.config) for name, h in _HOOKS.items() if hasattr(dhooks, h.config)
    and hasattr(dhooks, h.apply)
}
"""diffusers' cache hooks by short name, as far as this diffusers has them:

* ``fbcache``: First Block Cache (ParaAttention, Cheng 2024; after *Timestep Embedding Tells: It's Time to Cache for
  Video Diffusion Model*, Liu et al., 2024): when the first block's residual changed little since the last full
  evaluation, the other blocks are skipped and their cached residual added.
* ``pab``: *Real-Time Video Generation with Pyramid Attention Broadcast* (Zhao et al., 2024): attention outputs
  reused for ``N - 1`` of every ``N`` calls inside a timestep range.
* ``fastercache``: *FasterCache: Training-Free Video Diffusion Model Acceleration with High Quality* (Lv et al.,
  2024): attention outputs extrapolated from the last two computed ones. Only its attention reuse runs here: its
  CFG-Cache needs both guidance branches in one batch, fewstep's guidance calls them separately.
* ``taylorseer``: *From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers* (Liu et al., 2025):
  module outputs forecast by a Taylor series in the step between full computations.
* ``magcache``: *MagCache: Fast Video Generation with Magnitude-Aware Cache* (Ma et al., 2025): blocks skipped while
  the accumulated error predicted by calibrated residual-magnitude ratios stays under a threshold.
* ``seacache``: SeaCache (spectral-evolution-aware caching, arXiv 2602.18993): blocks skipped while a spectrally
  filtered change of the latents, accumulated, stays under a threshold.
"""

# the block lists diffusers' block-residual caches recognise by name (its transformer block identifiers, which
# diffusers keeps private; tests/test_cache_peers.py pins this copy to them)
_STACK_NAMES = frozenset({"blocks", "layers", "single_transformer_blocks", "temporal_transformer_blocks",
                          "transformer_blocks", "visual_transformer_blocks"})

_SERIAL = itertools.count()
_OPEN: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_ABSENT = object()
_PATCHED = ("forward", "_diffusers_hook", "_cache_config")  # instance attributes diffusers' hooks add to modules


@dataclasses.dataclass
class _Now:
    """The evaluation in progress, read by the callbacks fewstep hands to diffusers."""

    timestep: float = 0.0
    x_flow: torch.Tensor | None = None


class DiffusersCache(Denoiser):
    """A diffusers cache hook (:data:`DIFFUSERS_CACHES`) on the network of ``den``, as a comparison peer.

    Args:
        den: a :class:`~fewstep.models.ModelDenoiser` of a diffusers model whose blocks the hook recognises
            (checked here: the hook is applied once and removed).
        name: a key of :data:`DIFFUSERS_CACHES`.
        **knobs: fields of that diffusers config (``threshold=0.1``, ``spatial_attention_block_skip_range=2``, ...),
            except those fewstep fills: the timestep callbacks of PAB and FasterCache, MagCache's
            ``num_inference_steps``, SeaCache's ``raw_vision_callback``. Defaults are diffusers' own; where diffusers
            requires a choice, fewstep makes diffusers' fallback explicit (PAB: ``spatial_attention_block_skip_range=2``
            when no skip range is given; FasterCache: attention weight 0.5) or diffusers' documented default
            (MagCache on Flux: ``FLUX_MAG_RATIOS``; other models need ``mag_ratios=`` or ``calibrate=True``).

    Use it inside ``with DiffusersCache(...) as cached:`` (see the module docstring); calling it directly raises.
    The timestep the hooks see is the one diffusers' pipelines report as ``current_timestep`` (the scheduler's:
    0-1000, Flux's sigma times 1000), the sigma is the flow sigma ``sigma / (alpha + sigma)``, and the step is the
    grid step of the evaluation (``Run.step_of``). MagCache counts evaluations as its steps: its schedule fits
    solvers with one evaluation per step.
    """

    def __init__(self, den: ModelDenoiser, name: str, **knobs: Any) -> None:
        if not isinstance(den, ModelDenoiser) or not isinstance(den.model, torch.nn.Module):
            raise TypeError(f"DiffusersCache wraps a ModelDenoiser of a diffusers model, got {type(den).__name__}")
        if name not in DIFFUSERS_CACHES:
            raise ValueError(f"unknown diffusers cache {name!r}{suggest(name, DIFFUSERS_CACHES)}; this diffusers has "
                             f"{', '.join(DIFFUSERS_CACHES)}")
        self.den, self.name, self.hook = den, name, _HOOKS[name]
        self.net: torch.nn.Module = den.model
        self.schedule = den.schedule
        self.required_cond = den.required_cond
        cls_name = type(self.net).__name__
        self.family = family_of(self.net)
        self.knobs = self._check_knobs(knobs)
        self._config(steps=None)  # diffusers validates the values
        self._mixin = isinstance(self.net, CacheMixin)
        self._blocks = _blocks(self.net, self.family.blocks)
        if not self._blocks:
            raise ValueError(f"{cls_name} has no blocks to cache")
        if self.hook.min_blocks:
            stack = [b for n, c in self.net.named_children() if n in _STACK_NAMES and isinstance(c, torch.nn.ModuleList)
                     for b in c]
            if len(stack) < self.hook.min_blocks:
                lists = ", ".join(sorted(_STACK_NAMES))
                raise ValueError(f"diffusers' {name} needs {self.hook.min_blocks} or more blocks in the transformer "
                                 f"block lists it recognises ({lists}); {cls_name} has {len(stack)}")
        if self.hook.no_text_stream and getattr(self._blocks[-1], "context_pre_only", False):
            raise ValueError(f"diffusers' {name} {self.hook.no_text_stream} on {cls_name}: its last block returns no "
                             f"text stream (context_pre_only)")
        inside = [m for b in self._blocks for m in b.modules()]
        self._block_ids = {id(m) for m in inside}
        self._layer_ids = {id(m) for m in inside if isinstance(m, WorkMeter.DENSE)}  # what the meter counts itself
        self._meter = WorkMeter(self.net, {})
        self._full: dict[Any, int] = {}  # the full evaluation's multiply-accumulates, by input shapes
        self._now = _Now()
        self._is_open = False
        self._run: Run | None = None
        self._snapshot: dict[torch.nn.Module, tuple[Any, ...]] = {}
        self._added: list[tuple[torch.nn.Module, str]] = []
        self._plain_stateful: list[Any] = []  # hooks with one state for the module (not keyed by context)
        self._fresh: dict[Any, Any] = {}
        self._require_free()
        self._snapshot = _snapshot(self.net)
        try:
            self._install(None)  # applicability, with diffusers' own selection logic
        finally:
            self._uninstall()

    # -- the knobs ---------------------------------------------------------------------------------------------------

    def _check_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        fields = [f.name for f in dataclasses.fields(DIFFUSERS_CACHES[self.name]) if not f.name.startswith("_")]
        supplied = self.hook.supplied
        valid = [f for f in fields if f not in supplied]
        for key in knobs:
            if key in supplied:
                raise ValueError(f"diffusers' {self.name}: {key} is not a knob here: {supplied[key]}")
            if key not in valid:
                raise TypeError(f"diffusers' {self.name} takes no knob {key!r}{suggest(key, valid)}; its knobs: "
                                f"{', '.join(valid)}")
        return self.hook.defaults(dict(knobs), self.net)

    def _config(self, steps: int | None) -> Any:
        """A fresh diffusers config (diffusers' apply functions fill in and keep it): the knobs plus what fewstep
        supplies; ``steps``: the run's grid steps (MagCache)."""
        values = {**self.knobs, **self.hook.fill(self, steps)}
        try:
            return DIFFUSERS_CACHES[self.name](**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"diffusers' {self.name}: {_first_line(err)}") from None

    def _timestep(self) -> float:
        return self._now.timestep

    def _raw_vision(self, module: torch.nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
        x = self._now.x_flow
        if x is None or x.ndim != 4:
            return None
        return [sample.unsqueeze(1) for sample in x]  # (C, T=1, H, W) per sample, as SeaCache reads video latents

    # -- installing and removing diffusers' hooks -------------------------------------------------------------------

    def _require_free(self) -> None:
        if self.net in _OPEN:
            raise ValueError(f"this {type(self.net).__name__} is already in use by an open DiffusersCache; close it "
                             f"first")
        if getattr(self.net, "is_cache_enabled", False):
            raise ValueError(f"this {type(self.net).__name__} already has a diffusers cache enabled "
                             f"({type(self.net._cache_config).__name__}); call disable_cache() first")

    def _install(self, run: Run | None, t_first: float | None = None) -> None:
        """Apply the hook, built for ``run`` (whose first evaluation is at ``t_first``), and record what it added."""
        cls_name = type(self.net).__name__
        if self.hook.first_call and t_first is not None:
            lo, hi = self._config(None).spatial_attention_timestep_skip_range
            first = self._pipeline_timestep(t_first)
            if lo < first < hi:
                raise ValueError(f"diffusers' fastercache would reuse attention at its first call (timestep "
                                 f"{first:.6g} is inside spatial_attention_timestep_skip_range=({lo}, {hi})) before "
                                 f"anything is cached; end the range below the run's first timestep")
        before = {m: set(m._diffusers_hook.hooks) for m in self.net.modules() if "_diffusers_hook" in m.__dict__}
        config = self._config(None if run is None else len(run.times) - 1)
        apply_fn = getattr(dhooks, self.hook.apply)
        quiet = run is not None  # diffusers' warnings were shown when this cache was built
        try:
            with _quiet(quiet):
                if self._mixin:
                    self.net.enable_cache(config)
                else:
                    apply_fn(self.net, config)
        except Exception as err:
            raise ValueError(f"diffusers' {self.name} cannot be applied to {cls_name}: "
                             f"{type(err).__name__}: {_first_line(err)}") from None
        finally:
            self._record(before)
            root = self.net.__dict__.get("_diffusers_hook")
            if root is not None:
                root.invalidate_child_registries_cache()
        names = dict(self.net.named_modules())
        hooked = {id(m) for m, _ in self._added}
        if not hooked & self._block_ids:
            raise ValueError(f"diffusers' {self.name} finds nothing to cache in the blocks of {cls_name}"
                             + (" (its default cache_identifiers hook attention modules named '...attn'; pass "
                                "cache_identifiers=[...] matching this model's)" if self.hook.identifiers else ""))
        layer = next((n for n, m in names.items() if id(m) in hooked & self._layer_ids), None)
        if layer is not None:
            raise ValueError(f"diffusers' {self.name} hooks the layer {layer!r} of {cls_name} itself; fewstep counts "
                             f"the work of the layers that run, so it takes hooks on blocks or attention modules")
        self._plain_stateful = []
        self._fresh = {}
        for module, hook_name in self._added:
            hook = module._diffusers_hook.hooks[hook_name]
            keyed = any(isinstance(v, StateManager) for v in vars(hook).values())
            if getattr(hook, "_is_stateful", False) and not keyed and hasattr(hook, "state"):
                self._plain_stateful.append(hook)
                self._fresh[hook] = copy.deepcopy(hook.state)
        self._run = run

    def _record(self, before: dict[torch.nn.Module, set[str]]) -> None:
        self._added = [(m, n) for m in self.net.modules() if "_diffusers_hook" in m.__dict__
                       for n in m._diffusers_hook.hooks if n not in before.get(m, ())]

    def _uninstall(self) -> None:
        """Remove every hook this cache added and restore the attributes diffusers patched (as found)."""
        if self._mixin and getattr(self.net, "_cache_config", None) is not None and self._added:
            self.net.disable_cache()
        for module, hook_name in reversed(self._added):
            registry = module.__dict__.get("_diffusers_hook")
            if registry is not None and hook_name in registry.hooks:
                registry.remove_hook(hook_name, recurse=False)
        self._added, self._plain_stateful, self._fresh = [], [], {}
        self._run = None
        for module, found in self._snapshot.items():
            registry = module.__dict__.get("_diffusers_hook")
            if found[1] is _ABSENT and registry is not None and registry.hooks:
                continue  # somebody else's hooks, added meanwhile: not ours to remove
            for attr, value in zip(_PATCHED, found, strict=True):
                if value is _ABSENT:
                    module.__dict__.pop(attr, None)
                else:
                    module.__dict__[attr] = value
        root = self.net.__dict__.get("_diffusers_hook")
        if root is not None:
            root.invalidate_child_registries_cache()

    # -- the with block ---------------------------------------------------------------------------------------------

    def __enter__(self) -> DiffusersCache:
        if self._is_open:
            raise ValueError("this DiffusersCache is already open")
        self._require_free()
        self._snapshot = _snapshot(self.net)
        self._meter.arm()
        _OPEN.add(self.net)
        self._is_open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove diffusers' hooks and fewstep's counters from the module, leaving it as found (idempotent)."""
        if not self._is_open:
            return
        try:
            self._uninstall()
        finally:
            self._meter.disarm()
            _OPEN.discard(self.net)
            self._is_open = False

    def _check_open(self) -> None:
        if not self._is_open:
            raise ValueError(f"DiffusersCache({self.name!r}) holds diffusers' hooks on the module only inside its "
                             f"with block: `with DiffusersCache(den, {self.name!r}, ...) as cached: sample(cached, "
                             f"...)`")

    # -- the Denoiser -----------------------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        raise TypeError("a DiffusersCache lives in one run: call it through fewstep.sample() (inside its with block)")

    def for_run(self, run: Run) -> Denoiser:
        self._check_open()
        return _BoundDiffusersCache(self, run)

    def _pipeline_timestep(self, t: float) -> float:
        """The timestep diffusers' pipeline would report at ``t``: the scheduler's (Flux's model takes it / 1000;
        Sana's pipeline scales it by ``timestep_scale``)."""
        value = float(self.den.native_time(t))
        if self.family.time == "unit":
            value *= 1000.0
        if self.family.time_scale is not None:
            value /= float(setting(self.net, self.family.time_scale) or 1.0)
        return value

    def _work(self, shapes: tuple[Any, ...]) -> float:
        """The share of a full evaluation's multiply-accumulates that the evaluation just counted computed; the full
        count at these input shapes is the largest seen (a run's first evaluation, which diffusers' hooks always
        compute)."""
        done = self._meter.total
        full = self._full[shapes] = max(self._full.get(shapes, 0), done)
        return done / full if full else 1.0

    def __repr__(self) -> str:
        knobs = "".join(f", {k}={v!r}" for k, v in self.knobs.items() if not callable(v))
        return f"DiffusersCache({type(self.net).__name__}, {self.name!r}{knobs})"


class _BoundDiffusersCache(Denoiser):
    """One run's view of a :class:`DiffusersCache`: its own cache-context names (one per conditioning), and the
    per-context states of hooks whose state diffusers keeps per module."""

    def __init__(self, owner: DiffusersCache, run: Run) -> None:
        self.owner, self.run = owner, run
        self.schedule = owner.schedule
        self.required_cond = owner.required_cond
        self.prefix = f"fewstep-{next(_SERIAL)}"
        self.conds: list[Cond] = []
        self.states: dict[str, dict[Any, Any]] = {}
        self.started = False

    def _branch(self, cond: Cond) -> str:
        index = next((i for i, seen in enumerate(self.conds) if seen is cond), None)
        if index is None:
            index = next((i for i, seen in enumerate(self.conds) if _same(seen or {}, cond or {})), None)
        if index is None:
            self.conds.append(cond)
            index = len(self.conds) - 1
        return f"{self.prefix}/{index}"

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        owner = self.owner
        owner._check_open()
        if owner._run is not self.run:
            if self.started:
                raise RuntimeError(f"another run started on this {type(owner.net).__name__} while this one was going: "
                                   f"diffusers keeps its cache state on the module, run one after another")
            owner._uninstall()
            owner._install(self.run, t)  # fresh diffusers state for this run
        self.started = True
        name = self._branch(cond)
        states = self.states.setdefault(name, {})
        for hook in owner._plain_stateful:
            if hook not in states:
                states[hook] = copy.deepcopy(owner._fresh[hook])
            hook.state = states[hook]
        steps = len(self.run.times) - 1
        step = min(self.run.step_of(t), steps - 1)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        flow_sigma = sigma / (alpha + sigma)
        timestep = owner._pipeline_timestep(t)
        owner._now.timestep = timestep
        owner._now.x_flow = x / (alpha + sigma) if owner.hook.latents else None
        owner._meter.reset()
        try:
            # diffusers' public context setter, also on modules whose class does not mix it in (DiT, PixArt, SD3)
            with CacheMixin.cache_context(owner.net, name, step_index=step, num_inference_steps=steps,
                                          timestep=timestep, sigma=flow_sigma):
                out = owner.den(x, t, cond)
        finally:
            owner._now.x_flow = None
        work = owner._work(_shapes(x, cond))
        self.run.report("on_cache", step, work < 1.0, work)
        return out


def _blocks(net: torch.nn.Module, specs: tuple[Any, ...]) -> list[torch.nn.Module]:
    out: list[torch.nn.Module] = []
    for spec in specs:
        held = getattr(net, spec.attr, None)
        if held is None:
            continue
        out.extend([held] if spec.single else list(held))
    return out


def _snapshot(net: torch.nn.Module) -> dict[torch.nn.Module, tuple[Any, ...]]:
    return {m: tuple(m.__dict__.get(a, _ABSENT) for a in _PATCHED) for m in net.modules()}


def _shapes(x: torch.Tensor, cond: Cond) -> tuple[Any, ...]:
    """What a full evaluation's multiply-accumulates depend on: the shapes of the input and of the conditioning's
    tensors (a prompt's length)."""
    tensors = sorted((k, tuple(v.shape)) for k, v in (cond or {}).items() if isinstance(v, torch.Tensor))
    return tuple(x.shape), tuple(tensors)


@contextmanager
def _quiet(on: bool) -> Iterator[None]:
    logger = logging.getLogger("diffusers.hooks")
    level = logger.level
    if on:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _same(a: Any, b: Any) -> bool:
    """Whether two conditionings are the same (identity, else equal content, tensors compared exactly)."""
    if a is b:
        return True
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__

