"""The house's layers, read from the source: no import cycle (imports inside functions included), the harness
never reaches up into the tuner, only the command line, the harness and the tuner import the harness, no module
imports another package's private name, and no source file outgrows one concern (600 lines)."""

from pathlib import Path

import pytest

import fewstep
from import_graph import Graph, cycles

SRC = Path(fewstep.__file__).parent
GRAPH = Graph(SRC)
MAX_LINES = 600

LAYERS = [  # docs/extending.md's table: a room imports only rooms of its own layer or below
    {"schedules", "grids", "noise", "spec", "hostfn", "data", "outputs", "hooks", "distributed"},
    {"solvers", "models", "zoo"},
    {"sample", "differentiable", "inversion", "multilevel", "bottleneck", "conditioning"},
    {"quant", "scheduler", "scheduler_export", "caching"},
    {"plan", "shards", "pipelines"},
    {"metrics", "bench"},
    {"tuning"},
    {"cli", "__main__"},
]


def test_no_import_cycle_between_modules():
    assert cycles(GRAPH.edges()) == []


def test_no_import_cycle_between_rooms():
    """A room is a subpackage or a top-level module; the graph of rooms has no cycle either (``tuning`` above
    ``bench``, ``differentiable`` above ``models``, the magnitude curve apart from the cache methods)."""
    assert cycles(GRAPH.room_edges()) == []


def test_every_room_has_a_layer_and_imports_only_its_own_or_lower_ones():
    level = {room: k for k, rooms in enumerate(LAYERS) for room in rooms}
    edges = GRAPH.room_edges()
    rooms = {GRAPH.room(m) for m in GRAPH.files} - {""}
    assert rooms - set(level) == set(), "a new room: put it in LAYERS and in docs/extending.md"
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if level[b] > level[a])
    assert upward == []


def test_the_bench_never_imports_the_tuner():
    rooms = GRAPH.room_edges()
    assert "tuning" not in rooms.get("bench", set())
    assert "bench" in rooms["tuning"]  # the tuner builds on the harness's peers, not the reverse


def test_only_the_cli_the_bench_and_the_tuner_import_the_bench():
    users = {room for room, targets in GRAPH.room_edges().items() if "bench" in targets}
    assert users <= {"cli", "tuning", "__main__"}, sorted(users)


def _room(module: str) -> str:
    """``fewstep.caching.methods`` -> ``fewstep.caching``; a top-level module is a room of its own
    (``fewstep.sample``), as is the package root."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_module_imports_a_private_name_of_another_package():
    """``from a import _b`` (or ``import a._b``) only inside ``a``'s own room (a subpackage, or a top-level module
    itself); a third-party library's private names (diffusers' ``_set_cache_context``) never."""
    offenders = []
    for module, imps in GRAPH.imports.items():
        for imp in imps:
            private_module = any(p.startswith("_") and not p.startswith("__") for p in imp.target.split("."))
            private_names = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if not (private_module or private_names):
                continue
            if imp.target.startswith("fewstep") and _room(imp.target) == _room(module) != "fewstep":
                continue
            offenders.append(f"{module}:{imp.line} {imp.target} {list(private_names)}")
    assert offenders == []


def test_no_source_file_is_over_600_lines():
    long = {m: n for m, p in GRAPH.files.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


# The checks themselves find what they are for ----------------------------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> Graph:
    root = tmp_path / "fewstep"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Graph(root)


def test_a_cycle_hidden_in_a_function_level_import_is_found(tmp_path):
    graph = _tree(tmp_path, {"__init__.py": "", "bench/__init__.py": "", "grids.py": "",
                             "bench/runner.py": "from fewstep import plan\n",
                             "plan.py": "def build():\n    from .bench import runner\n"})
    assert cycles(graph.edges()) == [["fewstep.bench.runner", "fewstep.plan"]]
    assert cycles(graph.room_edges()) == [["bench", "plan"]]


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    graph = _tree(tmp_path, {"__init__.py": "", "tuning/__init__.py": "from fewstep.tuning.run import tune\n",
                             "tuning/run.py": "from fewstep.bench import peers\n", "bench/__init__.py": "",
                             "bench/peers.py": "", "bench/report.py": "import fewstep.tuning\n"})
    assert cycles(graph.room_edges()) == [["bench", "tuning"]]
    assert cycles(graph.edges()) == []  # module by module it is no cycle; room by room it is


@pytest.mark.parametrize(("text", "found"), [("from fewstep.plan import _check_placed\n", True),
                                              ("from fewstep.solvers._coeffs import lincomb\n", True),
                                              ("from diffusers.hooks.hooks import _set_cache_context\n", True),
                                              ("from fewstep.caching._engine import Engine\n", False),
                                              ("from fewstep.caching.engines import _Meters\n", False),
                                              ("from fewstep.plan import check_placed\n", False),
                                              ("from fewstep.sample import _BoundModel\n", True)])
def test_the_private_name_check_tells_a_room_from_another(text, found, tmp_path, monkeypatch):
    graph = _tree(tmp_path, {"__init__.py": "", "plan.py": "", "sample.py": "", "solvers/__init__.py": "",
                             "solvers/_coeffs.py": "",
                             "caching/__init__.py": "", "caching/engines.py": "", "caching/_engine.py": "",
                             "caching/methods.py": text})
    monkeypatch.setattr(__import__(__name__), "GRAPH", graph)
    if found:
        with pytest.raises(AssertionError):
            test_no_module_imports_a_private_name_of_another_package()
    else:
        test_no_module_imports_a_private_name_of_another_package()
