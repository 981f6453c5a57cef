"""Specs on the command line: ``name:key=value:key=value`` (solvers, caches) and ``key=value`` options."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = ["parse_options", "parse_spec"]


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """``["eta=1", "variant=bh1"]`` -> ``{"eta": 1, "variant": "bh1"}`` (values parsed as JSON when they can be:
    numbers, ``true``/``false``, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad option {item!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"sa_solver:tau=0:predictor_order=3"`` -> ``("sa_solver", {"tau": 0, "predictor_order": 3})``."""
    name, *items = text.split(":")
    if not name:
        raise ValueError(f"bad spec {text!r}: expected name[:key=value...]")
    return name, parse_options(items)
