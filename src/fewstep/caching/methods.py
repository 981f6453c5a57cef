"""The cache methods as Denoisers, and the registry that names them (with their calibration candidates).

Each method class declares what it needs as data: the network kinds it works on (``kinds``), the kinds whose
calibration tries it by default (``default_for``), and the knob holding a magnitude curve that a calibration run
records when it is not given (``curve_knob``, MagCache's ``curve``). Specs and calibration read these; nothing
recognises a method by its name.

Each method is a :class:`~fewstep.models.Denoiser` around a :class:`~fewstep.models.ModelDenoiser`: solvers never
hear of it. Its state lives in a per-run copy (``for_run``, called by ``sample()``): a shallow copy of the network
whose block lists go through a fresh engine (:mod:`fewstep.caching.engines`), so nothing is shared between runs or
threads and the original network is never modified. Under :class:`~fewstep.models.ClassifierFreeGuidance` each
branch binds its own copy, so the conditional and unconditional branches never read each other's features.

Every evaluation is opened explicitly with its grid step (the grid time nearest to it: Heun's second evaluation of
step ``i`` belongs to step ``i + 1``) and the network's time input, and reports ``on_cache(step, reused, work)`` to
the run's hooks (:class:`~fewstep.caching.CacheStats`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from fewstep.caching.adapters import ADAPTERS, BlockAdapter, adapter_of
from fewstep.caching.engines import ChainRecipe, Recipe, UNetRecipe, _Engine, _Meters
from fewstep.caching.policies import (
    FirstBlockThreshold,
    MagnitudeCurve,
    MagnitudeRatio,
    Scheduled,
    as_tuple,
)
from fewstep.models.adapter import ModelDenoiser
from fewstep.models.base import Cond, Denoiser, Run
from fewstep.models.guidance import ClassifierFreeGuidance

__all__ = ["METHODS", "BlockCache", "DeepCache", "EncoderPropagation", "FeatureCache", "MagCache", "TaylorSeer",
           "model_denoiser", "with_cache"]


class FeatureCache(Denoiser):
    """Base of the cache methods: a recipe (what to skip and when) around a ModelDenoiser's network.

    Class data: ``name`` (its spec name), ``kinds`` (the network kinds, ``"unet"`` / ``"chain"``, it works on),
    ``default_for`` (the kinds whose calibration tries it when no method is named), ``curve_knob`` (the knob holding
    the :class:`~fewstep.caching.MagnitudeCurve` it reads, recorded by a calibration run when not given; ``None``:
    it needs no run)."""

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ("unet", "chain")
    default_for: ClassVar[tuple[str, ...]] = ()
    curve_knob: ClassVar[str | None] = None

    def __init__(self, den: Denoiser, **knobs: Any) -> None:
        self.den = model_denoiser(den, type(self).__name__)
        self.adapter = self.adapter_for(self.den.model)
        try:
            self.recipe = self.make_recipe(self.adapter, self.den.model, **knobs)
        except TypeError as err:
            if "unexpected keyword" in str(err) or "positional argument" in str(err):
                raise TypeError(f"cache {self.name!r}: {err}") from None
            raise
        self.knobs = dict(knobs)
        self.schedule = self.den.schedule
        self.required_cond = self.den.required_cond
        self._meters = _Meters()

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.den.sample_shape

    @classmethod
    def needs_run(cls, knobs: Mapping[str, Any]) -> bool:
        """Whether a calibration run must come before this method is built with ``knobs``: it reads a magnitude
        curve (``curve_knob``) and ``knobs`` do not give one."""
        return cls.curve_knob is not None and cls.curve_knob not in knobs

    @classmethod
    def with_curve(cls, knobs: Mapping[str, Any], record: Callable[[], MagnitudeCurve]) -> dict[str, Any]:
        """``knobs``, with the magnitude curve this method reads taken from ``record()`` (a calibration run, or a
        stand-in that checks the other knobs) when :meth:`needs_run`; ``record`` is not called otherwise."""
        knob = cls.curve_knob
        if knob is None or knob in knobs:
            return dict(knobs)
        return {**knobs, knob: record()}

    @classmethod
    def adapter_for(cls, net: torch.nn.Module) -> BlockAdapter:
        adapter = adapter_of(net)
        if adapter.kind not in cls.kinds:
            fits = [a.family for a in ADAPTERS.values() if a.kind in cls.kinds]
            others = [n for n, c in METHODS.items() if adapter.kind in c.kinds]
            raise TypeError(f"{cls.__name__} works on {', '.join(fits)}; for a {type(net).__name__} use "
                            f"{', '.join(others)}")
        return adapter

    @classmethod
    def make_recipe(cls, adapter: BlockAdapter, net: torch.nn.Module, **knobs: Any) -> Recipe:
        raise NotImplementedError

    @classmethod
    def candidates(cls, adapter: BlockAdapter) -> list[dict[str, Any]]:
        """Settings :func:`~fewstep.caching.calibrate_cache` tries, most aggressive first."""
        return []

    def engine(self, net: torch.nn.Module) -> _Engine:
        return self.recipe.engine(net, self.adapter, self._meters)

    def for_run(self, run: Run) -> Denoiser:
        return _CachedRun(self, run)

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        raise TypeError("a cache lives in one run: call it through fewstep.sample()")

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.knobs.items())
        return f"{type(self).__name__}({knobs})"


class _CachedRun(Denoiser):
    """One run's (and one guidance branch's) cache: the network copy with wrapped blocks and its engine."""

    def __init__(self, cache: FeatureCache, run: Run) -> None:
        self.cache, self.run = cache, run
        inner = cache.den
        self.engine = cache.engine(inner.model)
        self.den = copy.copy(inner)
        self.den.model = cache.adapter.wrap(inner.model, self.engine)
        self.schedule, self.required_cond = inner.schedule, inner.required_cond

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        self.cache.adapter.check_cond(cond)
        step = self.run.step_of(t)
        self.schedule.alpha(t)  # validates t before the time input is read from it
        clock = torch.tensor([float(self.den.native_time(t))], dtype=torch.float64)
        self.engine.begin(step, clock, x.shape[0], len(self.run.times), tuple(x.shape[1:]))
        try:
            out = self.den(x, t, cond)
        finally:
            reused, work = self.engine.end()
        self.run.report("on_cache", step, reused, work)
        return out


def model_denoiser(den: Denoiser, who: str) -> ModelDenoiser:
    """``den`` itself, checked to be the ModelDenoiser a cache wraps (a guided one is refused: caches go under the
    guidance)."""
    if isinstance(den, ClassifierFreeGuidance):
        raise TypeError(f"{who} goes under the guidance, around the network: ClassifierFreeGuidance({who}(den, ...), "
                        f"scale), or make_cache(guided, ...) which puts it there")
    if not isinstance(den, ModelDenoiser):
        raise TypeError(f"{who} wraps a fewstep ModelDenoiser around a diffusers network (e.g. from_diffusers or "
                        f"fewstep.zoo.load); got {type(den).__name__}")
    return den


def _network(den: Denoiser, who: str) -> ModelDenoiser:
    """The ModelDenoiser under ``den``'s guidance."""
    while isinstance(den, ClassifierFreeGuidance):
        den = den.inner
    return model_denoiser(den, who)


def _placed(net: ModelDenoiser) -> dict[str, Any]:
    """``sample()``'s ``device`` and ``dtype`` for runs of ``net``: its network's device, and the state dtype of a
    run in its dtype (float32 under half precisions, as :func:`fewstep.plan.state_dtype`)."""
    param = next(iter(net.model.parameters()), None) if isinstance(net.model, torch.nn.Module) else None
    if param is None:
        return {}
    return {"device": param.device, "dtype": torch.float64 if param.dtype == torch.float64 else torch.float32}


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _unet_depth(net: torch.nn.Module) -> int:
    return len(net.up_blocks)


class DeepCache(FeatureCache):
    """DeepCache: on full steps run the U-Net; on the others run only its shallow branch — ``conv_in``, down
    blocks ``0..branch``, up blocks ``U - 1 - branch..`` and the head — on the cached input of up block
    ``U - 1 - branch`` (the deep features). ``branch=0`` reuses the most.

    Knobs: ``interval`` and ``schedule`` (``"uniform"`` or ``"nonuniform"``, :func:`full_steps`) or an explicit
    ``full=[...]`` list of grid steps; ``branch``; ``order``: 0 reuses the deep features as they are, 1 or 2
    forecasts them with a Taylor expansion of the last full steps (TaylorSeer on DeepCache's features).
    ``interval=1`` never reuses and equals the model bit for bit.

    References: *DeepCache: Accelerating Diffusion Models for Free* (Ma, Fang, Wang, CVPR 2024).
    """

    name = "deepcache"
    kinds = ("unet",)
    default_for = ("unet",)

    @classmethod
    def make_recipe(cls, adapter: BlockAdapter, net: torch.nn.Module, *, interval: int = 3, branch: int = 0,
                    schedule: str = "uniform", full: Sequence[int] | None = None, order: int = 0,
                    warmup: int = 0) -> Recipe:
        n_up = _unet_depth(net)
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < n_up - 1:
            raise ValueError(f"branch must be in [0, {n_up - 2}] for a U-Net with {n_up} up blocks (a model "
                             f"without a deeper branch to skip cannot use DeepCache)")
        _int("order", order, 0)
        n_down = len(net.down_blocks)
        skip = {("down", i) for i in range(branch + 1, n_down)} | {("mid", 0)}
        skip |= {("up", i) for i in range(n_up - 1 - branch)}
        return UNetRecipe(Scheduled(interval, schedule, warmup, as_tuple(full)), frozenset(skip),
                          forecast_at=("up", n_up - 2 - branch), order=order)

    @classmethod
    def candidates(cls, adapter: BlockAdapter) -> list[dict[str, Any]]:
        return [{"interval": k, "schedule": s} for k in range(8, 1, -1) for s in ("uniform", "nonuniform")]


class EncoderPropagation(FeatureCache):
    """Encoder propagation (Faster Diffusion): on key steps run the whole U-Net and keep the encoder's outputs
    (every down block's and the mid block's); on the others run only the decoder (up blocks and head) on the
    cached encoder features with the current time embedding. Key steps: :func:`full_steps` (``"nonuniform"`` by
    default, denser early as in the paper) or an explicit ``full=[...]``.

    References: *Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model Inference* (Li et al.,
    NeurIPS 2024).
    """

    name = "encoder"
    kinds = ("unet",)

    @classmethod
    def make_recipe(cls, adapter: BlockAdapter, net: torch.nn.Module, *, interval: int = 2,
                    schedule: str = "nonuniform", full: Sequence[int] | None = None) -> Recipe:
        skip = {("down", i) for i in range(len(net.down_blocks))} | {("mid", 0)}
        return UNetRecipe(Scheduled(interval, schedule, 0, as_tuple(full)), frozenset(skip))

    @classmethod
    def candidates(cls, adapter: BlockAdapter) -> list[dict[str, Any]]:
        return [{"interval": k, "schedule": s} for k in range(8, 1, -1) for s in ("uniform", "nonuniform")]


class BlockCache(FeatureCache):
    """First-block-residual cache for diffusion transformers (DiT, PixArt, SD3, Flux).

    Every evaluation runs the first block, ``r = block_0(h) - h``. For each sample, when the relative change
    ``mean|r - r_ref| / mean|r_ref|`` against the residual of its last full evaluation is below ``threshold``
    (after ``warmup`` grid steps, at most ``max_reuse`` evaluations in a row), the remaining blocks are skipped
    for it and their residual ``h_L - h_1`` (every stream: SD3's and Flux's text tokens too) is added instead —
    as cached (``order=0``) or forecast by a Taylor expansion (``order`` 1 or 2); the other samples run them.
    Decisions are per sample, so sample ``k`` is the same in any batch. ``threshold=0`` never reuses and equals
    the model bit for bit.

    References: first-block cache (ParaAttention's FBCache; cache-dit's DBCache F1B0); *From Reusing to
    Forecasting: Accelerating Diffusion Models with TaylorSeers* (Liu et al., ICCV 2025) for ``order > 0``.
    """

    name = "block"
    kinds = ("chain",)
    default_for = ("chain",)

    @classmethod
    def make_recipe(cls, adapter: BlockAdapter, net: torch.nn.Module, *, threshold: float = 0.05, warmup: int = 1,
                    max_reuse: int = 3, order: int = 0) -> Recipe:
        if adapter.length(net) < 2:
            raise ValueError("BlockCache needs at least two transformer blocks")
        return ChainRecipe(first=FirstBlockThreshold(threshold, warmup, max_reuse), order=_int("order", order, 0))

    @classmethod
    def candidates(cls, adapter: BlockAdapter) -> list[dict[str, Any]]:
        return [{"threshold": th} for th in (0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05, 0.03, 0.02, 0.01)]


class TaylorSeer(FeatureCache):
    """TaylorSeer: compute in full on scheduled steps (the first ``warmup``, then one in ``interval``) and
    *forecast* the skipped features on the others from a Taylor expansion, of order ``order``, whose derivatives
    are finite differences of the last full steps' features in the network's time input. On transformers the
    features are the residual of the whole block chain (every block skipped); on U-Nets the decoder's output
    (``branch="all"``: only the stem, time embedding and head run) or, with ``branch=b``, DeepCache's deep
    features at that branch (the shallow branch still runs). Measured on the zoo U-Net at 50 steps the whole-decoder
    forecast is both faster and closer than forecasting DeepCache's features (docs/results.md).

    References: *From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers* (Liu et al., ICCV
    2025).
    """

    name = "taylorseer"

    @classmethod
    def make_recipe(cls, adapter: BlockAdapter, net: torch.nn.Module, *, interval: int = 4, order: int = 1,
                    warmup: int = 2, schedule: str = "uniform", branch: int | str = "all") -> Recipe:
        _int("order", order, 0)
        if adapter.kind == "unet":
            if branch == "all":  # every block: the decoder's output forecast, only the stem and head run
                n_up = _unet_depth(net)
                skip = {("down", i) for i in range(len(net.down_blocks))} | {("mid", 0)}
                skip |= {("up", i) for i in range(n_up)}
                return UNetRecipe(Scheduled(interval, schedule, warmup), frozenset(skip),
                                  forecast_at=("up", n_up - 1), order=order)
            return DeepCache.make_recipe(adapter, net, interval=interval, schedule=schedule, order=order,
                                         warmup=warmup, branch=branch)
        return ChainRecipe(schedule=Scheduled(interval, schedule, warmup), order=order)

    @classmethod
    def candidates(cls, adapter: BlockAdapter) -> list[dict[str, Any]]:
        if adapter.kind == "unet":
            return [{"interval": k, "order": o, "branch": b} for k in range(8, 1, -1) for o in (1, 2)
                    for b in ("all", 0)]
        return [{"interval": k, "order": o} for k in range(8, 1, -1) for o in (1, 2)]


class MagCache(FeatureCache):
    """MagCache: skip the whole block chain (reusing its residual ``h_L - h_0``) while the accumulated error of the
    residual's magnitude ratios between consecutive evaluations, read off a ``curve`` recorded on one uncached run
    (:func:`~fewstep.caching.magnitude_curve`), stays under ``threshold``; at most ``max_skip`` evaluations in a
    row; the first ``retention`` share of the steps always runs. The decision depends only on the time, so it is
    the same for every sample.

    References: *MagCache: Fast Video Generation with Magnitude-Aware Cache* (Ma et al., 2025).
    """

    name = "magcache"
    kinds = ("chain",)
    curve_knob = "curve"

    @classmethod
    def make_recipe(cls, adapter: BlockAdapter, net: torch.nn.Module, *, curve: MagnitudeCurve | None = None,
                    threshold: float = 0.06, max_skip: int = 3, retention: float = 0.2) -> Recipe:
        if curve is None:
            raise ValueError("MagCache needs curve=: record one with fewstep.caching.magnitude_curve(den, solver, "
                             "steps, shape=...) (specs and calibrate_cache record it for you)")
        return ChainRecipe(magnitude=MagnitudeRatio(curve, threshold, max_skip, retention))

    @classmethod
    def candidates(cls, adapter: BlockAdapter) -> list[dict[str, Any]]:
        return [{"threshold": th, "max_skip": k} for th in (0.5, 0.3, 0.2, 0.12, 0.08, 0.05, 0.03, 0.015)
                for k in (4, 2)]


METHODS: dict[str, type[FeatureCache]] = {c.name: c for c in (DeepCache, EncoderPropagation, BlockCache,
                                                                TaylorSeer, MagCache)}


def with_cache(den: Denoiser, make: Callable[[Denoiser], Denoiser]) -> Denoiser:
    """``den`` with ``make(model_denoiser)`` put under its guidance: a cache goes around the network, inside
    :class:`~fewstep.models.ClassifierFreeGuidance` (which then keeps one cache state per branch)."""
    if isinstance(den, ClassifierFreeGuidance):
        return ClassifierFreeGuidance(with_cache(den.inner, make), den.scale, uncond=den.uncond)
    return make(den)
