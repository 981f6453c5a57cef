"""The results store against what users' disks hold: other programs' databases, stores from older fewsteps,
read-only files and folders, locks held by other connections, two sweeps on one store; and the diffusers peers
that cannot drive a model's schedule."""

import collections
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from fewstep.bench import Experiment, ResultStore, run_sweep, sweep
from fewstep.bench import store as store_module
from fewstep.bench.store import APPLICATION_ID, SCHEMA_VERSION

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

# the schema of the stores fewstep wrote before the marker existed (copied from that version's store.py)
LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY, spec TEXT NOT NULL, backend TEXT, model TEXT, solver TEXT, grid TEXT, steps INTEGER,
    seeds TEXT, nfe INTEGER, error REAL, fd REAL, fd_floor REAL, swd REAL, model_seconds REAL, wall_seconds REAL,
    peak_rss_mb REAL, samples BLOB, created TEXT DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS refs (
    model TEXT, seeds TEXT, nfe INTEGER, data BLOB, PRIMARY KEY (model, seeds)
);
"""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` -> sha256 of its bytes ('dir' for folders): shows stray journals too."""
    return {p.relative_to(folder).as_posix(): "dir" if p.is_dir() else digest(p) for p in sorted(folder.rglob("*"))}


def exps(n: int = 4) -> list[Experiment]:
    return [Experiment("m", "ddim", k, seeds="0-1") for k in range(1, n + 1)]


def fake_result(exp: Experiment) -> tuple[dict, torch.Tensor]:
    return {"nfe": exp.steps, "error": 1.0 / exp.steps, "fd": 0.5, "note": "x"}, torch.full((2, 1, 4, 4), exp.steps / 7)


def fake_run(exp, ctx):
    return fake_result(exp)


def sqlite_file(path: Path, script: str, *, app: int = 0, version: int = 0) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(script)
    conn.execute(f"PRAGMA application_id = {app}")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    return path


def legacy_store(path: Path, *, extra: bool) -> Path:
    """A store as fewstep wrote it before the marker: one result and one reference, ``extra`` per its version."""
    exp = exps(1)[0]
    record, x = fake_result(exp)
    blob = store_module._to_blob(x)
    script = LEGACY_SCHEMA + ("ALTER TABLE results ADD COLUMN extra TEXT;" if extra else "")
    sqlite_file(path, script)
    conn = sqlite3.connect(path)
    cols = "key, spec, backend, model, solver, grid, steps, seeds, nfe, error, fd, samples" + (", extra" if extra
                                                                                              else "")
    vals = [exp.key, exp.to_json(), exp.backend, exp.model, exp.label, exp.grid, exp.steps, exp.seeds, exp.steps,
            record["error"], record["fd"], blob] + ([json.dumps({"note": "x"})] if extra else [])
    conn.execute(f"INSERT INTO results ({cols}) VALUES ({', '.join('?' * len(vals))})", vals)
    conn.execute("INSERT INTO refs VALUES ('m', '0-1', 7, ?)", (blob,))
    conn.commit()
    conn.close()
    return path


def marker(path: Path) -> tuple[int, int, set[str]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return (conn.execute("PRAGMA application_id").fetchone()[0], conn.execute("PRAGMA user_version").fetchone()[0],
                tables)
    finally:
        conn.close()


# ------------------------------------------------------------------------------ 1. only fewstep stores are touched


@pytest.mark.parametrize("start", ["missing", "empty file", "sqlite without tables"])
def test_a_new_store_is_created_and_marked(tmp_path, start):
    path = tmp_path / "sub" / "r.sqlite"
    if start != "missing":
        path.parent.mkdir()
        path.write_bytes(b"") if start == "empty file" else sqlite_file(path, "")
    with ResultStore(path) as store:
        exp = exps(1)[0]
        store.put(exp, *fake_result(exp))
    assert marker(path) == (APPLICATION_ID, SCHEMA_VERSION, {"results", "refs", "claims"})


FOREIGN = {
    "an unrelated table": lambda p: sqlite_file(p, "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);"
                                                   "INSERT INTO customers (name) VALUES ('kept');"),
    "results with other columns": lambda p: sqlite_file(p, "CREATE TABLE results (key TEXT, score REAL);"
                                                           "CREATE TABLE refs (model TEXT, seeds TEXT, nfe INTEGER,"
                                                           " data BLOB);"),
    "our tables and one more": lambda p: sqlite_file(p, LEGACY_SCHEMA + "CREATE TABLE notes (t TEXT);"),
    "refs with other columns": lambda p: sqlite_file(p, LEGACY_SCHEMA.replace("data BLOB", "payload BLOB")),
    "results alone": lambda p: sqlite_file(p, LEGACY_SCHEMA.split("CREATE TABLE IF NOT EXISTS refs")[0]),
    "our tables plus a view": lambda p: sqlite_file(p, LEGACY_SCHEMA + "CREATE VIEW v AS SELECT key FROM results;"),
    "another application's marker": lambda p: sqlite_file(p, "", app=0x4750_4B47),
    "a newer fewstep store": lambda p: sqlite_file(p, LEGACY_SCHEMA + "ALTER TABLE results ADD COLUMN extra TEXT;",
                                                   app=APPLICATION_ID, version=SCHEMA_VERSION + 1),
    "a text file": lambda p: p.write_text("these are my notes, not a database\n" * 20),
    "a short binary file": lambda p: p.write_bytes(b"SQLite format 3\x00"),
}


@pytest.mark.parametrize("readonly", [False, True], ids=["write", "readonly"])
@pytest.mark.parametrize("kind", list(FOREIGN))
def test_anything_else_is_refused_and_left_byte_for_byte(tmp_path, kind, readonly):
    path = tmp_path / "theirs.sqlite"
    FOREIGN[kind](path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as err:
        ResultStore(path, readonly=readonly)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert ("newer fewstep" in message) == (kind == "a newer fewstep store")
    assert snapshot(tmp_path) == before  # the file unchanged, and no journal or other file left beside it


@pytest.mark.parametrize("readonly", [False, True], ids=["write", "readonly"])
def test_a_folder_is_refused(tmp_path, readonly):
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder"):
        ResultStore(tmp_path, readonly=readonly)


@pytest.mark.parametrize("extra", [False, True], ids=["before-extra", "with-extra"])
def test_a_store_from_before_the_marker_is_accepted_and_stamped(tmp_path, extra):
    path = legacy_store(tmp_path / "old.sqlite", extra=extra)
    with ResultStore(path, readonly=True) as store:  # readable as it is, without a change
        (row,) = store.rows()
        assert row["nfe"] == 1 and row.get("note") == ("x" if extra else None)
    assert marker(path)[:2] == (0, 0)
    with ResultStore(path) as store:
        (row,) = store.rows()
        exp = exps(1)[0]
        assert row["experiment"] == exp and store.has(exp)
        assert torch.equal(store.samples(exp.key), fake_result(exp)[1])
        assert store.reference("m", "0-1")[1] == 7
        store.put(exps(2)[1], *fake_result(exps(2)[1]))
    assert marker(path) == (APPLICATION_ID, SCHEMA_VERSION, {"results", "refs", "claims"})
    with ResultStore(path) as store:
        assert [r["nfe"] for r in store.rows()] == [1, 2]


def test_an_older_marked_store_is_migrated(tmp_path):
    path = legacy_store(tmp_path / "v1.sqlite", extra=True)
    sqlite_file(path, "", app=APPLICATION_ID, version=1)
    with ResultStore(path) as store:
        assert len(store.rows()) == 1
        assert store.claim(exps(2)[1]) == "claimed"
    assert marker(path) == (APPLICATION_ID, SCHEMA_VERSION, {"results", "refs", "claims"})


# ------------------------------------------------------------------------------------- 2. read-only files and folders


def test_a_read_only_file_is_refused_before_any_work(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as store:
        store.put(exps(1)[0], *fake_result(exps(1)[0]))
    path.chmod(0o444)
    try:
        before = snapshot(tmp_path)
        with pytest.raises(ValueError, match=f"cannot open the results database {path} for writing: its file is "
                                             "read-only"):
            ResultStore(path)
        with ResultStore(path, readonly=True) as store:  # reports still work
            assert len(store.rows()) == 1
        assert snapshot(tmp_path) == before
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "new"])
def test_a_store_in_a_read_only_folder_is_refused(tmp_path, exists):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "r.sqlite"
    if exists:
        ResultStore(path).close()
    folder.chmod(0o555)
    try:
        before = snapshot(tmp_path)
        with pytest.raises(ValueError, match="its folder is read-only"):
            ResultStore(path)
        assert snapshot(tmp_path) == before
    finally:
        folder.chmod(0o755)


def test_the_write_probe_finds_what_mode_bits_do_not_show(tmp_path, monkeypatch):
    """A read-only mount or a file of another user: simulated by SQLite's ``mode=ro``, which stops root too."""
    path = tmp_path / "r.sqlite"
    ResultStore(path).close()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store_module._probe_write(conn)
    assert not conn.in_transaction
    conn.close()
    real = store_module._connect
    monkeypatch.setattr(store_module, "_connect", lambda p, mode, busy: real(p, "ro", busy))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"cannot open the results database {path} for writing: .*readonly"):
        ResultStore(path)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not ROOT_USER or not hasattr(os, "fork"), reason="needs root to become another user")
def test_not_writable_for_an_ordinary_user(tmp_path):
    """Root drops to ``nobody`` in a forked child, for whom permissions are real: a file of another user, and a
    folder where no journal can be created, are refused at open; reading still works."""
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is closed to other users
    try:
        base.chmod(0o755)
        theirs = base / "root.sqlite"  # root's 0644 file: its mode bits allow writing, but not by nobody
        ResultStore(theirs).close()
        folder = base / "rootdir"
        folder.mkdir(mode=0o755)
        mine = folder / "nobody.sqlite"  # nobody's own file in root's folder: no journal can be created beside it
        ResultStore(mine).close()
        os.chown(mine, 65534, 65534)
        before = snapshot(base)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            code = 1
            try:
                os.close(read)
                os.setgid(65534)
                os.setuid(65534)
                lines = []
                for path in (theirs, mine):
                    try:
                        ResultStore(path).close()
                        lines.append(f"{path}: opened")
                    except ValueError as err:
                        lines.append(str(err))
                    with ResultStore(path, readonly=True) as store:
                        lines.append(f"read {len(store.rows())}")
                os.write(write, "\n".join(lines).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as f:
            lines = f.read().splitlines()
        assert os.waitpid(pid, 0)[1] == 0, lines
        assert lines[0].startswith(f"cannot open the results database {theirs} for writing"), lines
        assert lines[2].startswith(f"cannot open the results database {mine} for writing"), lines
        assert lines[1] == lines[3] == "read 0"
        assert snapshot(base) == before
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)


def test_readonly_mode_never_creates_or_modifies(tmp_path):
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(ValueError, match=f"no results database at {missing}"):
        ResultStore(missing, readonly=True)
    (tmp_path / "empty.sqlite").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        ResultStore(tmp_path / "empty.sqlite", readonly=True)
    sqlite_file(tmp_path / "blank.sqlite", "")
    with pytest.raises(ValueError, match="no results yet"):
        ResultStore(tmp_path / "blank.sqlite", readonly=True)
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as store:
        store.put(exps(1)[0], *fake_result(exps(1)[0]))
    before = snapshot(tmp_path)
    with ResultStore(path, readonly=True) as store:
        assert store.rows()[0]["note"] == "x"
        with pytest.raises(ValueError, match="read-only"):
            store.put(exps(2)[1], *fake_result(exps(2)[1]))
        with pytest.raises(ValueError, match="read-only"):
            store.claim(exps(2)[1])
    assert snapshot(tmp_path) == before


# -------------------------------------------------------------------------------------------------------- 3. locks


def hold_lock(path: Path, seconds: float) -> threading.Thread:
    """Another connection takes an exclusive lock now and releases it after ``seconds``, from a thread."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")

    def release() -> None:
        time.sleep(seconds)
        other.execute("ROLLBACK")
        other.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def test_a_lock_released_in_time_is_waited_for(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path, lock_timeout=20.0)
    exp = exps(1)[0]
    holder = hold_lock(path, 1.5)
    t0 = time.monotonic()
    store.put(exp, *fake_result(exp))
    assert time.monotonic() - t0 > 1.0
    holder.join()
    assert store.has(exp)
    store.close()


def test_a_lock_held_too_long_gives_a_clear_error(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path, lock_timeout=0.5)
    exp = exps(1)[0]
    holder = hold_lock(path, 3.0)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=f"the results database {path} stayed locked by another connection for "
                                         "0.5 s while writing a result"):
        store.put(exp, *fake_result(exp))
    with pytest.raises(ValueError, match="stayed locked"):
        ResultStore(path, lock_timeout=0.5)
    assert time.monotonic() - t0 < 2.9
    holder.join()
    assert not store.has(exp) and not store.conn.in_transaction
    store.put(exp, *fake_result(exp))  # the store is usable once the lock is gone
    assert store.has(exp)
    store.close()


# ------------------------------------------------------------------------------------------------------- 4. claims


def test_claim_states(tmp_path):
    path = tmp_path / "r.sqlite"
    a, b = ResultStore(path), ResultStore(path)
    exp = exps(1)[0]
    assert a.claim(exp) == "claimed"
    assert b.claim(exp) == "busy"
    assert a.claim(exp) == "claimed"  # its own claim
    start = time.time()
    a.put(exp, *fake_result(exp))
    assert b.claim(exp) == "done"
    assert b.claim(exp, since=start) == "done"  # a forced sweep that began before it was rewritten
    assert b.claim(exp, since=time.time() + 1) == "claimed"  # ... or after: rerun it
    assert a.claim(exp, since=time.time() + 1) == "busy"
    b.release(exp)
    assert a.claim(exp, since=time.time() + 1) == "claimed"
    a.close()
    b.close()


def fake_claim(path: Path, exp: Experiment, *, host: str, pid: int, expires: float) -> None:
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO claims (key, owner, host, pid, expires) VALUES (?, ?, ?, ?, ?)",
                 (exp.key, f"{host}:{pid}:0000", host, pid, expires))
    conn.commit()
    conn.close()


def recording_run(log: list[int]):
    def run(exp, ctx):
        log.append(exp.steps)
        return fake_result(exp)

    return run


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    fake_claim(path, exps(1)[0], host=socket.gethostname(), pid=int(dead.stdout), expires=time.time() + 3600)
    log: list[int] = []
    t0 = time.monotonic()
    assert run_sweep(exps(), store, run=recording_run(log), progress=False) == 4
    assert sorted(log) == [1, 2, 3, 4] and time.monotonic() - t0 < 5
    store.close()


def test_a_lapsed_claim_is_waited_for_then_taken_over(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path)
    fake_claim(path, exps(1)[0], host="elsewhere", pid=1, expires=time.time() + 1.0)
    log: list[int] = []
    t0 = time.monotonic()
    assert run_sweep(exps(), store, run=recording_run(log), progress=False, poll=0.05) == 4
    assert log == [2, 3, 4, 1]  # the claimed one last, once its lease lapsed
    assert time.monotonic() - t0 > 0.8
    store.close()


def test_a_live_claim_is_left_to_its_owner_and_its_result_awaited(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path)
    first = exps(1)[0]
    fake_claim(path, first, host="elsewhere", pid=1, expires=time.time() + 600)

    def other_sweep() -> None:
        time.sleep(0.5)
        with ResultStore(path) as theirs:
            theirs.put(first, *fake_result(first))

    thread = threading.Thread(target=other_sweep)
    thread.start()
    log: list[int] = []
    assert run_sweep(exps(), store, run=recording_run(log), progress=False, poll=0.05) == 3
    thread.join()
    assert log == [2, 3, 4] and all(store.has(e) for e in exps())
    store.close()


def test_a_failed_run_gives_its_claim_back(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path)

    def broken(exp, ctx):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        run_sweep(exps(), store, run=broken, progress=False)
    with ResultStore(path) as other:
        assert other.claim(exps(1)[0]) == "claimed"
    store.close()


def test_the_heartbeat_keeps_a_long_run_claimed(tmp_path):
    path = tmp_path / "r.sqlite"
    store, other = ResultStore(path, lease=0.4), ResultStore(path)
    seen = []

    def slow(exp, ctx):
        time.sleep(1.0)  # 2.5 leases
        seen.append(other.claim(exp))
        return fake_result(exp)

    run_sweep(exps(1), store, run=slow, progress=False)
    assert seen == ["busy"]
    store.close()
    other.close()


SWEEP_SCRIPT = textwrap.dedent("""
    import os, pathlib, sys, time
    import torch
    import tqdm.auto  # imported before the start line, so both sweeps begin together
    from fewstep.bench import Experiment, ResultStore, run_sweep

    db, log, ready, other, force, pause = sys.argv[1:]

    def fake(exp, ctx):  # a slow, deterministic stand-in for a real run that says who ran what
        time.sleep(float(pause))
        with open(log, "a") as f:
            f.write(f"{exp.key} {os.getpid()}\\n")
        return {"nfe": exp.steps, "error": 1.0 / exp.steps}, torch.full((2, 1, 4, 4), exp.steps / 7)

    exps = [Experiment("m", "ddim", n, seeds="0-1") for n in range(1, 13)]
    store = ResultStore(db, lease=5.0)
    pathlib.Path(ready).touch()
    deadline = time.time() + 120
    while not pathlib.Path(other).exists() and time.time() < deadline:
        time.sleep(0.005)
    ran = run_sweep(exps, store, run=fake, force=force == "1", progress=False, poll=0.05)
    print(ran, len(store.rows()), flush=True)
""")


def two_sweeps(tmp_path: Path, *, force: bool, pause: float) -> tuple[collections.Counter, list[tuple[int, int]]]:
    """Run the sweep script in two processes at once on one store; returns (key -> runs, [(ran, rows)])."""
    script, db, log = tmp_path / "sweep.py", tmp_path / "r.sqlite", tmp_path / "log.txt"
    script.write_text(SWEEP_SCRIPT)
    log.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, str(script), str(db), str(log), str(tmp_path / f"ready{i}"),
                               str(tmp_path / f"ready{1 - i}"), "1" if force else "0", str(pause)],
                              env=env, stdout=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = [line.split() for line in log.read_text().splitlines()]
    assert len({pid for _, pid in runs}) == 2, runs  # both did some of the work
    return collections.Counter(key for key, _ in runs), [tuple(map(int, o.split())) for o in outs]


def test_two_sweeps_on_one_store_run_each_experiment_once(tmp_path):
    keys = {e.key for e in (Experiment("m", "ddim", n, seeds="0-1") for n in range(1, 13))}
    runs, ends = two_sweeps(tmp_path, force=False, pause=0.15)
    assert set(runs) == keys and set(runs.values()) == {1}
    assert sum(ran for ran, _ in ends) == 12 and [rows for _, rows in ends] == [12, 12]
    with ResultStore(tmp_path / "r.sqlite", readonly=True) as store:  # bit-equal to what the runs returned
        for row in store.rows():
            n = row["experiment"].steps
            assert torch.equal(store.samples(row["key"]), torch.full((2, 1, 4, 4), n / 7))
    # forced, both again: each experiment is rerun once in all, never by both
    runs, ends = two_sweeps(tmp_path, force=True, pause=0.3)
    assert set(runs) == keys and set(runs.values()) == {1}
    assert sum(ran for ran, _ in ends) == 12


# ------------------------------------------------------------------------------------------ 5. diffusers peers


def test_a_named_peer_that_cannot_drive_the_model_is_refused_up_front():
    for peers in (["DDIM"], ["Euler", "Heun"]):
        with pytest.raises(ValueError, match=r"diffusers peer '(DDIM|Heun)' cannot run model 'unet_flow' .*"
                                             r"FlowMatchEulerDiscreteScheduler.*peers that apply to it: Euler$"):
            sweep(["unet_m", "unet_flow"], ["ddim"], [2], peers=peers)
    with pytest.raises(ValueError, match="did you mean 'DPM\\+\\+2M'"):  # not dropped as 'not applicable'
        sweep(["unet_flow"], ["ddim"], [2], peers=["DPM++2"])
    labels = [(e.model, e.label) for e in sweep(["unet_m", "unet_flow"], ["ddim"], [2], peers=["Euler"])]
    assert labels == [("unet_m", "ddim"), ("unet_flow", "ddim"), ("unet_m", "diffusers:Euler"),
                      ("unet_flow", "diffusers:Euler")]


def test_automatic_counterparts_that_do_not_apply_are_skipped():
    got = [(e.model, e.label) for e in sweep(["unet_m", "unet_flow"], ["ddim", "euler"], [2], with_diffusers=True)
           if e.backend == "diffusers"]
    assert got == [("unet_m", "diffusers:DDIM"), ("unet_m", "diffusers:Euler"), ("unet_flow", "diffusers:Euler")]


def test_the_euler_peer_drives_a_flow_model_like_our_euler():
    """diffusers' FlowMatchEulerDiscreteScheduler (no init_noise_sigma, no scale_model_input) as the Euler peer of
    a rectified-flow model equals our Euler on the same times."""
    import diffusers

    from fewstep.bench.peers import run_diffusers
    from fewstep.noise import SampleNoise, parse_seeds
    from fewstep.sample import sample
    from fewstep.solvers import make_solver
    from fewstep.zoo import load

    den = load("unet_flow")
    config = dict(den.scheduler_config)
    c = den.model.config
    x_init = SampleNoise(parse_seeds("0-3"), (c.in_channels, c.sample_size, c.sample_size)).draw()
    theirs, nfe = run_diffusers("Euler", lambda x, t: den.model(x, t).sample, config, x_init, 6)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(6)
    grid = scheduler.sigmas.double()
    grid[0] = den.schedule.t_max  # diffusers starts at sigma = 1, where our schedule is not defined
    ours = sample(den, make_solver("euler"), grid, x_init=x_init)
    assert nfe == 6
    assert float((ours - theirs).abs().max()) < 1e-3
