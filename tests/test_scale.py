"""``fewstep sample`` at scale: batches, shard folders that resume, and torchrun processes (gloo on CPU) whose union
is bit for bit the one-process run, also after a rank is killed mid-run.

Processes run with one thread each (torchrun's default), and the one-process runs they are compared with too: a
network's CPU kernels may round differently with another thread count."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.shards import read_shards

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def fewstep(*argv, torchrun=False, check=True):
    cmd = [*(TORCHRUN if torchrun else [sys.executable]), "-m", "fewstep", *argv]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def samples(folder):
    got = list(read_shards(folder))
    return np.concatenate([s for s, _ in got]), np.concatenate([x for _, x in got])


def test_a_folder_is_the_file_and_the_batch_size_bounds_the_run(tmp_path, capsys):
    args = ["sample", "--model", "unet_s", "--steps", "4", "--seeds", "3-12", "--quiet", "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "x.npz")]) == 0
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "10 samples in 3 shards of 4, 4 NFE" in capsys.readouterr().out
    seeds, x = samples(tmp_path / "run")
    with np.load(tmp_path / "x.npz") as whole:
        assert np.array_equal(seeds, whole["seeds"]) and np.array_equal(x, whole["samples"])
    assert main([*args, "--out", str(tmp_path / "run")]) == 0  # nothing to do
    assert "nothing left to sample" in capsys.readouterr().out
    assert main([*args[:-1], "5", "--out", str(tmp_path / "run")]) == 2  # another run's folder
    assert "holds the shards of another run (its batch_size, shards differ)" in capsys.readouterr().err


@pytest.mark.parametrize("options", [
    ["--solver", "dpmpp_2m"],
    ["--solver", "dpmpp_2m_sde"],
    ["--solver", "dpmpp_2m", "--cache", "deepcache:interval=2"],
], ids=["ode", "sde", "cache"])
def test_two_processes_are_one_bit_for_bit(tmp_path, options):
    args = ["sample", "--model", "unet_s", "--steps", "6", "--seeds", "0-10", "--batch-size", "2", "--quiet",
            *options]
    fewstep(*args, "--out", str(tmp_path / "one"))
    done = fewstep(*args, "--out", str(tmp_path / "two"), torchrun=True)
    assert "this process wrote 3 shards" in done.stdout and "(complete)" in done.stdout  # rank 0: shards 0, 2, 4
    one, two = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


def test_a_killed_rank_loses_nothing_and_a_rerun_finishes(tmp_path):
    args = ["sample", "--model", "unet_s", "--steps", "40", "--seeds", "0-47", "--batch-size", "1", "--quiet",
            "--out", str(tmp_path / "run")]
    proc = subprocess.Popen([*TORCHRUN, "-m", "fewstep", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(list((tmp_path / "run").glob("shard_*.npz"))) < 4 and time.time() < deadline:
            time.sleep(0.02)
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert ranks, "no rank processes found"
        os.kill(int(ranks[-1]), signal.SIGKILL)  # one rank dies mid-run
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    written = sorted(p.name for p in (tmp_path / "run").glob("shard_*.npz"))
    assert 4 <= len(written) < 48  # whole shards only, and not all of them
    fewstep(*args, torchrun=True)  # the rerun does the rest
    fewstep(*args[:-1], str(tmp_path / "one"))
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["manifest.json"] + [f"shard_{i:05d}.npz" for i in range(48)]  # no temporary files left
    one, two = samples(tmp_path / "one"), samples(tmp_path / "run")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


def test_many_processes_need_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sample", "--model", "unet_s", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "2 processes write a folder of shards, not one file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["sample", "--model", "unet_s", "--out", str(tmp_path / "mine")]) == 2
    assert "not empty and has no manifest.json" in capsys.readouterr().err


def test_bench_under_torchrun_runs_each_experiment_and_the_reference_once(tmp_path):
    from fewstep.bench import ResultStore

    db = tmp_path / "r.sqlite"
    done = fewstep("bench", "--models", "unet_s", "--solvers", "ddim,dpmpp_2m", "--steps", "3,4,5", "--seeds",
                   "0-15", "--db", str(db), torchrun=True)
    with ResultStore(db, readonly=True) as store:
        rows = store.rows()
        assert len(rows) == 6 and len({r["key"] for r in rows}) == 6
    # each rank reports what it ran: together, every experiment once
    ran = [int(line.split()[0]) for line in done.stdout.splitlines() if " experiments run here" in line]
    assert len(ran) == 2 and sum(ran) == 6, done.stdout


def test_a_reference_claimed_by_another_sweep_is_awaited_not_solved_again(tmp_path, monkeypatch):
    import threading

    import fewstep.bench.runner as runner
    from fewstep.bench import Experiment, ResultStore

    exp = Experiment("unet_s", "ddim", 3, seeds="0-1")
    other, mine = ResultStore(tmp_path / "r.sqlite"), ResultStore(tmp_path / "r.sqlite")
    token = runner._Token(f"reference:{exp.model}:{exp.seeds}")
    assert other.claim(token) == "claimed"  # another live sweep is solving it
    ref = torch.full((2, 1, 8, 8), 0.25)

    def finish():
        time.sleep(1.0)
        other.put_reference(exp.model, exp.seeds, ref, 7)
        other.release(token)

    monkeypatch.setattr(runner, "pf_ode_reference", lambda *a, **k: pytest.fail("solved twice"))
    thread = threading.Thread(target=finish)
    thread.start()
    got = runner.Context(mine).reference(exp)
    thread.join()
    assert torch.equal(got, ref)


def test_a_reference_stored_between_the_look_and_the_claim_is_not_solved_again(tmp_path, monkeypatch):
    """The other sweep stores the reference and releases its claim after this one found no reference and before it
    claims: the claim succeeds, and the stored reference is used, not solved a second time."""
    import fewstep.bench.runner as runner
    from fewstep.bench import Experiment, ResultStore

    exp = Experiment("unet_s", "ddim", 3, seeds="0-1")
    other, mine = ResultStore(tmp_path / "r.sqlite"), ResultStore(tmp_path / "r.sqlite")
    ref = torch.full((2, 1, 8, 8), 0.5)
    claim = mine.claim

    def late_claim(token, **kw):
        if mine.reference(exp.model, exp.seeds) is None:
            other.put_reference(exp.model, exp.seeds, ref, 7)
        return claim(token, **kw)

    monkeypatch.setattr(mine, "claim", late_claim)
    monkeypatch.setattr(runner, "pf_ode_reference", lambda *a, **k: pytest.fail("solved twice"))
    assert torch.equal(runner.Context(mine).reference(exp), ref)


def test_fd_of_a_folder(tmp_path, capsys):
    from fewstep.metrics import DigitsFD

    assert main(["sample", "--model", "unet_s", "--steps", "4", "--seeds", "0-69", "--batch-size", "32", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["fd", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    x = np.concatenate([x for _, x in read_shards(tmp_path / "run")])
    assert out.startswith(f"FD {DigitsFD()(torch.from_numpy(x)):.4f} over 70 samples")
    assert main(["fd", str(tmp_path)]) == 2
    assert "is not a shard folder" in capsys.readouterr().err
