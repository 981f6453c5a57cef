"""Measurement: experiments, metrics, a resumable SQLite store, diffusers peers, and reports."""

from fewstep.bench.experiment import Experiment, sweep
from fewstep.bench.report import write_report
from fewstep.bench.runner import run_experiment, run_sweep
from fewstep.bench.store import DEFAULT_DB, ResultStore
from fewstep.metrics import DigitsFD, frechet_distance, rmse_per_sample, sliced_wasserstein

__all__ = ["DEFAULT_DB", "DigitsFD", "Experiment", "ResultStore", "frechet_distance", "rmse_per_sample",
           "run_experiment", "run_sweep", "sliced_wasserstein", "sweep", "write_report"]
