"""The harness: metrics with known answers, Experiment serialisation, a resumable SQLite store, reports."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fewstep.bench import Experiment, ResultStore, frechet_distance, rmse_per_sample, sliced_wasserstein, sweep
from fewstep.bench.report import pareto_front


def test_fd_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    cov = a @ a.T + np.eye(5)
    mu = rng.normal(size=5)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-8


def test_fd_closed_forms():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T + np.eye(4)
    mu = rng.normal(size=4)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    # shifted Gaussians: |shift|^2
    assert frechet_distance(mu, cov, mu + shift, cov) == pytest.approx(shift @ shift, rel=1e-9)
    # isotropic covariances s1^2 I and s2^2 I: d (s1 - s2)^2
    assert frechet_distance(mu, 4.0 * np.eye(4), mu, 9.0 * np.eye(4)) == pytest.approx(4 * (2 - 3) ** 2, rel=1e-9)


def test_sliced_wasserstein_known_answers():
    x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sliced_wasserstein(x, x) == 0.0
    # a translation by c along every axis moves each projection by <c, dir>: SW2 = |c| sqrt(E<u, dir>^2) = |c|/sqrt(d)
    c = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    assert sliced_wasserstein(x, x + c, projections=4096) == pytest.approx(3.0 / 3**0.5, rel=0.05)
    # unequal sizes go through quantiles
    assert sliced_wasserstein(x, x[:1000]) < 0.1


def test_rmse_per_sample():
    a = torch.zeros(3, 2, 2)
    b = torch.ones(3, 2, 2) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    assert torch.allclose(rmse_per_sample(a, b), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes differ"):
        rmse_per_sample(a, b[:2])


def test_experiment_json_and_yaml_round_trip():
    e = Experiment("unet_m", "unipc", 8, grid="karras", seeds="0-15", options={"variant": "bh1", "solver_order": 3})
    assert Experiment.from_json(e.to_json()) == e
    assert Experiment.from_yaml(e.to_yaml()) == e
    assert Experiment.from_json(e.to_json()).key == e.key
    swapped = {"solver_order": 3, "variant": "bh1"}
    assert Experiment("unet_m", "unipc", 8, grid="karras", seeds="0-15", options=swapped).key == e.key
    assert Experiment("unet_m", "unipc", 9, grid="karras", seeds="0-15").key != e.key
    with pytest.raises(ValueError, match="unknown experiment fields"):
        Experiment.from_dict({**json.loads(e.to_json()), "nfe": 3})


@pytest.mark.parametrize("bad,match", [({"solver": "dpmpp2m"}, "did you mean 'dpmpp_2m'"),
                                       ({"grid": "karas"}, "did you mean 'karras'"), ({"steps": 0}, "steps"),
                                       ({"seeds": "3-1"}, "seed"), ({"backend": "kdiff"}, "backend"),
                                       ({"backend": "diffusers", "solver": "DPM++2"}, "DPM\\+\\+2M")])
def test_experiment_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        Experiment(**{"model": "m", "solver": "ddim", "steps": 5, **bad})


def test_sweep_pairs_diffusers_counterparts():
    exps = sweep(["m"], ["ddim", "dpmpp_2m", "ipndm"], [5, 10], with_diffusers=True)
    labels = sorted({e.label for e in exps})
    assert labels == ["ddim", "diffusers:DDIM", "diffusers:DPM++2M", "dpmpp_2m", "ipndm"]
    assert len(exps) == 10


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (0.5, 9.0)]
    assert pareto_front(pts) == [4, 0, 1, 3]


def test_store_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot open the results database"):
        ResultStore(blocker / "sub" / "db.sqlite")


SWEEP_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    from fewstep.bench import Experiment, ResultStore, run_sweep
    from fewstep.bench import runner

    def fake(exp, ctx):  # a slow, deterministic stand-in for a real run
        time.sleep(float(sys.argv[2]))
        return {"nfe": exp.steps, "error": 1.0 / exp.steps, "fd": 0.0}, torch.zeros(2, 1, 8, 8)

    runner.run_experiment = fake
    exps = [Experiment("m", "ddim", n, seeds="0-1") for n in range(1, 13)]
    print(run_sweep(exps, ResultStore(sys.argv[1]), progress=False), flush=True)
""")


def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path):
    db = tmp_path / "r.sqlite"
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(db), "0.4"], env=env)
    import sqlite3
    import time

    deadline = time.time() + 120
    done = 0
    while time.time() < deadline:
        time.sleep(0.2)
        if db.exists():
            try:
                done = sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.Error:
                continue
            if done >= 3:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert 3 <= done < 12
    out = subprocess.run([sys.executable, str(script), str(db), "0"], env=env, capture_output=True, text=True,
                         check=True)
    assert int(out.stdout.strip()) == 12 - done  # only the missing ones ran
    rows = sqlite3.connect(db).execute("SELECT steps, COUNT(*) FROM results GROUP BY steps").fetchall()
    assert sorted(rows) == [(n, 1) for n in range(1, 13)]
    # a finished sweep reruns nothing
    again = subprocess.run([sys.executable, str(script), str(db), "0"], env=env, capture_output=True, text=True,
                           check=True)
    assert int(again.stdout.strip()) == 0
