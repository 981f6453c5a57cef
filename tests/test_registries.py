"""Every registry entry is covered where it must be: each solver has a measured order (or a weak-order check), each
grid is a fixed grid of ``fewstep tune`` unless it opts out with a reason, and each solver is compared by
``fewstep tune`` unless it is stochastic or opts out with a reason; tune's diffusers rows are the deterministic
peers. Side lists are derived from the registries, so a new entry cannot be skipped silently."""

import re
from pathlib import Path

from tests.test_orders import CASES as ORDER_CASES
from tests.test_stochastic import WEAK_ORDER_ONE

from fewstep.bench.peers import DETERMINISTIC_PEERS, PEERS
from fewstep.grids import DEFAULT_GRID, GRIDS
from fewstep.solvers import SOLVERS, make_solver
from fewstep.tuning import COMPARE, DIFFUSERS_PEERS, FIXED_GRIDS, NOT_COMPARED, NOT_FIXED
from fewstep.tuning.run import DEFAULT_SOLVERS


def test_every_solver_has_an_order_case():
    measured = {name for name, _ in ORDER_CASES.values()} | {name for name, _ in WEAK_ORDER_ONE.values()}
    assert set(SOLVERS) - measured == set()


def test_every_grid_is_a_fixed_grid_of_tune_or_says_why_not():
    assert set(FIXED_GRIDS) | set(NOT_FIXED) == set(GRIDS) and not set(FIXED_GRIDS) & set(NOT_FIXED)
    assert all(isinstance(why, str) and why for why in NOT_FIXED.values())
    assert DEFAULT_GRID in GRIDS and next(iter(GRIDS)) == DEFAULT_GRID


def test_every_solver_is_compared_by_tune_or_says_why_not():
    stochastic = {n for n in SOLVERS if make_solver(n).stochastic}
    assert set(COMPARE) | set(NOT_COMPARED) | stochastic == set(SOLVERS)
    assert not set(COMPARE) & (set(NOT_COMPARED) | stochastic)
    assert set(NOT_COMPARED) <= set(SOLVERS) and all(isinstance(why, str) and why for why in NOT_COMPARED.values())
    assert set(DEFAULT_SOLVERS) <= set(NOT_COMPARED)
    assert list(COMPARE) == [n for n in SOLVERS if n in COMPARE]  # in the registry's order


def test_tunes_diffusers_rows_are_the_deterministic_peers():
    assert DIFFUSERS_PEERS == DETERMINISTIC_PEERS
    assert all(ours in SOLVERS for _, _, ours in PEERS.values())
    assert {label for label, (_, _, ours) in PEERS.items() if make_solver(ours).stochastic} == \
        set(PEERS) - set(DETERMINISTIC_PEERS)


def test_every_solver_is_in_the_readmes_solver_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Solvers", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `"))
    named = set(re.findall(r"`([a-z0-9_]+)`", table))
    assert set(SOLVERS) - named == set()
