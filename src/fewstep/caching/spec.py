"""Cache specs, parsed once: ``"taylorseer:interval=3"``, ``"magcache:threshold=0.1"``,
``"auto:target_error=0.02[:method=...]"``, ``"none"`` or ``""`` become a :class:`CacheSpec`.

Grammar: ``name[:key=value...]`` (values read as JSON where they can be, :func:`fewstep.spec.parse_options`), where
``name`` is a method of :data:`~fewstep.caching.METHODS` (its knobs are checked when it is built on a network),
``none`` / the empty string (no cache), or ``auto`` (a calibration search, :func:`~fewstep.caching.calibrate_cache`)
taking ``target_error`` (a relative error > 0, default 0.05) and ``method`` (a method, ``all``, or left out: the
network kind's default). :func:`parse_cache` is the one place an unknown cache name is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fewstep.caching.methods import METHODS, FeatureCache
from fewstep.grids import suggest
from fewstep.spec import parse_options

__all__ = ["CacheSpec", "check_target", "method_class", "parse_cache"]

NONE = "none"  # the spec name of no cache (as is the empty string)
SEARCH = "auto"  # the spec name of a calibration search
ALL = "all"  # a search's ``method``: every method the network supports
DEFAULT_TARGET_ERROR = 0.05


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache spec (:func:`parse_cache`): no cache, one method with its knobs, or a calibration search.

    Attributes:
        text: the spec as written.
        method: the method class (``None``: no cache, or a search).
        knobs: the method's knobs (strings are parsed as JSON values; Python callers may add objects, a curve).
        target_error: a search's target (``None``: not a search): the cheapest setting whose mean per-sample
            relative error stays within it.
        search: a search's methods: a method name, ``"all"``, or ``None`` (the network kind's default).
    """

    text: str
    method: type[FeatureCache] | None = None
    knobs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    target_error: float | None = None
    search: str | None = None

    @property
    def name(self) -> str:
        """The spec's name: a method's, ``"auto"`` for a search, ``"none"``."""
        if self.method is not None:
            return self.method.name
        return NONE if self.target_error is None else SEARCH

    @property
    def is_none(self) -> bool:
        """Whether the spec caches nothing."""
        return self.method is None and self.target_error is None

    @property
    def is_search(self) -> bool:
        """Whether the spec is a calibration search (``auto``)."""
        return self.target_error is not None

    @property
    def needs_run(self) -> bool:
        """Whether building it runs the model first: a search, or a method that records a curve not given."""
        return self.is_search or (self.method is not None and self.method.needs_run(self.knobs))


def check_target(target_error: Any) -> float:
    """``target_error`` as a float; a one-line ``ValueError`` unless it is a finite number > 0."""
    if isinstance(target_error, bool) or not isinstance(target_error, int | float) or not (
            math.isfinite(target_error) and target_error > 0):
        raise ValueError(f"target_error must be a number > 0 (a relative error such as 0.05), got {target_error!r}")
    return float(target_error)


def method_class(name: Any, *, before: tuple[str, ...] = (), after: tuple[str, ...] = ()) -> type[FeatureCache] | None:
    """The method of :data:`METHODS` called ``name``; ``None`` for one of the names ``before`` / ``after`` (which
    the caller handles); the one-line "unknown cache" ``ValueError``, naming the closest and every known name in
    that order, otherwise."""
    if isinstance(name, str) and name in METHODS:
        return METHODS[name]
    if name in before or name in after:
        return None
    known = [*before, *METHODS, *after]
    raise ValueError(f"unknown cache {name!r}{suggest(name, known)}; known: {', '.join(known)}")


def parse_cache(text: str, **knobs: Any) -> CacheSpec:
    """A spec string (module docstring's grammar) -> :class:`CacheSpec`; ``knobs`` are added to the string's (a
    method's Python-valued knobs, such as MagCache's ``curve``). Refuses an unknown name, an unknown ``auto`` knob or
    ``method``, and a ``target_error`` that is not a number > 0, each with a one-line error."""
    if not isinstance(text, str):
        raise TypeError(f"a cache spec is a string such as 'taylorseer:interval=3', got {type(text).__name__}")
    name, *items = text.split(":")
    knobs = {**parse_options(items), **knobs}
    if name == "":
        name = NONE
    method = method_class(name, before=(NONE,), after=(SEARCH,))
    if method is not None:
        return CacheSpec(text, method, knobs)
    if name == NONE:
        return CacheSpec(text)  # knobs of "none" are ignored
    target = check_target(knobs.pop("target_error", DEFAULT_TARGET_ERROR))
    search = knobs.pop("method", None)
    if knobs:
        raise TypeError(f"auto takes target_error and method; got {sorted(knobs)}")
    if search is not None:
        method_class(search, after=(ALL,))
    return CacheSpec(text, target_error=target, search=search)
