"""Cache specs parsed once into a CacheSpec; methods declaring what they need as data; the caching package's
layering (no import cycle, the magnitude curve in its own module, one place that refuses an unknown cache)."""

import dataclasses
import re
from pathlib import Path

import pytest

import fewstep
from fewstep.caching import (
    ADAPTERS,
    METHODS,
    CacheSpec,
    MagCache,
    MagnitudeCurve,
    TaylorSeer,
    check_target,
    magnitude_curve,
    make_cache,
    parse_cache,
)
from fewstep.models.families import CACHE_KINDS
from fewstep.schedules import DiscreteVP
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture
from import_graph import Graph, cycles

SRC = Path(fewstep.__file__).parent
CURVE = MagnitudeCurve((0.0, 1.0), (1.0, 1.0))


@pytest.mark.parametrize(("text", "name", "method", "knobs", "target", "search", "needs_run"), [
    ("taylorseer:interval=3", "taylorseer", TaylorSeer, {"interval": 3}, None, None, False),
    ("magcache:threshold=0.1", "magcache", MagCache, {"threshold": 0.1}, None, None, True),
    ("auto:target_error=0.02", "auto", None, {}, 0.02, None, True),
    ("auto", "auto", None, {}, 0.05, None, True),
    ("auto:target_error=0.3:method=all", "auto", None, {}, 0.3, "all", True),
    ("auto:method=taylorseer", "auto", None, {}, 0.05, "taylorseer", True),
    ("none", "none", None, {}, None, None, False),
    ("", "none", None, {}, None, None, False),
])
def test_a_spec_string_becomes_one_typed_object(text, name, method, knobs, target, search, needs_run):
    spec = parse_cache(text)
    assert isinstance(spec, CacheSpec) and spec.text == text and spec.name == name
    assert (spec.method, dict(spec.knobs), spec.target_error, spec.search) == (method, knobs, target, search)
    assert spec.needs_run is needs_run
    assert spec.is_none is (name == "none") and spec.is_search is (target is not None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.method = None


def test_python_knobs_join_the_string_and_a_given_curve_needs_no_run():
    spec = parse_cache("magcache:threshold=0.1", curve=CURVE)
    assert dict(spec.knobs) == {"threshold": 0.1, "curve": CURVE} and not spec.needs_run


@pytest.mark.parametrize(("text", "kind", "message"), [
    ("dep", ValueError, "unknown cache 'dep' (did you mean 'deepcache'?); known: none, deepcache, encoder, block, "
                        "taylorseer, magcache, auto"),
    ("taylorsear:interval=3", ValueError, "unknown cache 'taylorsear' (did you mean 'taylorseer'?)"),
    ("auto:method=tailorseer", ValueError, "unknown cache 'tailorseer' (did you mean 'taylorseer'?); known: "
                                           "deepcache, encoder, block, taylorseer, magcache, all"),
    ("auto:target_error=0", ValueError, "target_error must be a number > 0"),
    ("auto:target_error=-1", ValueError, "target_error must be a number > 0"),
    ("auto:target_error=nan", ValueError, "target_error must be a number > 0"),
    ("auto:target_error=true", ValueError, "target_error must be a number > 0"),
    ("auto:seeds=3", TypeError, "auto takes target_error and method; got ['seeds']"),
    ("deepcache:interval", ValueError, "bad option 'interval'"),
])
def test_bad_specs_get_one_line_errors_from_the_parser(text, kind, message):
    with pytest.raises(kind) as err:
        parse_cache(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_spec_is_a_string():
    with pytest.raises(TypeError, match="a cache spec is a string"):
        parse_cache(3)


def test_check_target_is_public_and_returns_a_float():
    assert check_target(1) == 1.0 and isinstance(check_target(1), float)
    with pytest.raises(ValueError, match="target_error must be"):
        check_target(float("inf"))


def test_make_cache_reads_specs_and_refuses_a_search():
    den = AnalyticDenoiser(gaussian_mixture(dim=4, components=2, std=0.3), DiscreteVP.named("linear"))
    assert make_cache(den, "none") is den and make_cache(den, "") is den
    with pytest.raises(ValueError, match="calibration search"):
        make_cache(den, "auto:target_error=0.1")
    with pytest.raises(ValueError, match="magcache needs a calibration run"):
        make_cache(den, "magcache")
    with pytest.raises(ValueError, match="unknown cache 'nope'"):
        make_cache(den, "nope")


# -- methods declare what they need ---------------------------------------------------------------------------------

def test_methods_declare_their_kinds_defaults_and_runs_as_data():
    for cls in METHODS.values():
        assert cls.name and set(cls.kinds) <= set(CACHE_KINDS) and set(cls.default_for) <= set(cls.kinds)
        assert cls.needs_run({}) is (cls.curve_knob is not None)
        if cls.curve_knob is not None:
            assert not cls.needs_run({cls.curve_knob: CURVE})
            assert cls.with_curve({}, lambda: CURVE) == {cls.curve_knob: CURVE}
        given = {"a": 1} if cls.curve_knob is None else {"a": 1, cls.curve_knob: CURVE}
        assert cls.with_curve(given, lambda: pytest.fail("a run for a method that has what it needs")) == given
    for kind in {a.kind for a in ADAPTERS.values()}:  # a calibration with no method named tries one per kind
        assert len([c for c in METHODS.values() if kind in c.default_for]) == 1, kind
    assert [c.name for c in METHODS.values() if c.curve_knob] == ["magcache"]


# -- the room's layering, read from the source ----------------------------------------------------------------------

def test_the_caching_package_has_no_import_cycle_and_the_curve_has_its_own_module():
    graph = Graph(SRC)
    room = {m: {t for t in ts if t.startswith("fewstep.caching.")} for m, ts in graph.edges().items()
            if m.startswith("fewstep.caching.")}
    assert cycles(room) == []
    assert "fewstep.caching.magnitude" not in room["fewstep.caching.methods"]
    assert "fewstep.caching.calibrate" not in room["fewstep.caching.methods"]
    assert fewstep.caching.magnitude_curve is magnitude_curve
    assert magnitude_curve.__module__ == "fewstep.caching.magnitude"


def _sources() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in sorted(SRC.rglob("*.py"))}


def test_one_place_refuses_an_unknown_cache():
    sites = {name: len(re.findall(r"unknown cache \{", text)) for name, text in _sources().items()}
    assert {n: k for n, k in sites.items() if k} == {"caching/spec.py": 1}


def test_no_method_is_recognised_by_its_name_string():
    pattern = re.compile(r"""[=!]=\s*["'](auto|magcache)["']|["'](auto|magcache)["']\s*[=!]=""")
    found = {name: pattern.findall(text) for name, text in _sources().items()}
    assert {n: f for n, f in found.items() if f} == {}
