"""Model-side acceleration that reuses features across steps, on the architectures people run.

Methods (:data:`METHODS`): DeepCache and encoder propagation (Faster Diffusion) for U-Nets; the first-block
residual cache for diffusion transformers; TaylorSeer (forecast skipped features) for both; MagCache (skip by the
calibrated magnitude ratio of the residual) for transformers. They wrap the network's own blocks (block adapters
derived from the model families' cache layouts, :mod:`fewstep.caching.adapters`), so the network's ``forward`` still
runs; a cache that never reuses equals the model bit for bit (tested per family). Rooms:
:mod:`~fewstep.caching.stats` (what is reported: work is the share of the network's multiply-accumulates computed),
:mod:`~fewstep.caching.policies` (when to reuse, what to reuse), :mod:`~fewstep.caching.engines` (per-run state),
:mod:`~fewstep.caching.methods` (the Denoisers and the registry), :mod:`~fewstep.caching.magnitude` (MagCache's
curve), :mod:`~fewstep.caching.spec` (a spec string parsed once into a :class:`CacheSpec`),
:mod:`~fewstep.caching.calibrate` (calibration, and the caches specs build), :mod:`~fewstep.caching.pipeline`
(``enable_cache(pipe, ...)``).
"""

from fewstep.caching.adapters import ADAPTERS, BlockAdapter, adapter_of
from fewstep.caching.calibrate import (
    Calibration,
    cache_error,
    cache_from_spec,
    calibrate_cache,
    check_cache_spec,
    make_cache,
)
from fewstep.caching.magnitude import magnitude_curve
from fewstep.caching.methods import (
    METHODS,
    BlockCache,
    DeepCache,
    EncoderPropagation,
    FeatureCache,
    MagCache,
    TaylorSeer,
    with_cache,
)
from fewstep.caching.pipeline import disable_cache, enable_cache
from fewstep.caching.policies import MagnitudeCurve, full_steps
from fewstep.caching.spec import CacheSpec, check_target, parse_cache
from fewstep.caching.stats import CacheStats

__all__ = ["ADAPTERS", "METHODS", "BlockAdapter", "BlockCache", "CacheSpec", "CacheStats", "Calibration", "DeepCache",
           "EncoderPropagation", "FeatureCache", "MagCache", "MagnitudeCurve", "TaylorSeer", "adapter_of",
           "cache_error", "cache_from_spec", "calibrate_cache", "check_cache_spec", "check_target", "disable_cache",
           "enable_cache", "full_steps", "magnitude_curve", "make_cache", "parse_cache", "with_cache"]
