"""``fewstep tune``: the best plan for a model at a budget, found against a teacher and checked on held-out seeds.

Rooms: :mod:`~fewstep.tuning.search` (the DP search and the refinements), :mod:`~fewstep.tuning.rows` (a candidate's
measured errors and the rule that chooses), :mod:`~fewstep.tuning.run` (one tune as a class, and :func:`tune`),
:mod:`~fewstep.tuning.store` (the resumable SQLite file) and :mod:`~fewstep.tuning.report` (Markdown and figures). It
builds on the harness (:mod:`fewstep.bench`'s diffusers peers, :mod:`fewstep.metrics`); the harness never imports
it.

The package's public names are re-exported here; ``fewstep.tune`` the attribute of the top-level package is the
:func:`tune` function itself (``fewstep.tune(den, "unet_m", 5, shape=...)``), so import this package's other names
from it by path (``from fewstep.tuning import Tuned``).
"""

from fewstep.tuning.report import write_tune_report
from fewstep.tuning.rows import TUNED, Row, best_row, choose
from fewstep.tuning.run import COMPARE, DIFFUSERS_PEERS, FIXED_GRIDS, NOT_COMPARED, NOT_FIXED, Tune, Tuned, tune
from fewstep.tuning.search import (
    Refined,
    StepSearch,
    dp_path,
    edge_costs,
    refine_by_gradient,
    refine_steps,
    search_steps,
    teacher_states,
)
from fewstep.tuning.store import TuneStore, fingerprint

__all__ = ["COMPARE", "DIFFUSERS_PEERS", "FIXED_GRIDS", "NOT_COMPARED", "NOT_FIXED", "TUNED", "Refined", "Row",
           "StepSearch", "Tune", "TuneStore", "Tuned", "best_row", "choose", "dp_path", "edge_costs",
           "fingerprint", "refine_by_gradient", "refine_steps", "search_steps", "teacher_states", "tune",
           "write_tune_report"]
