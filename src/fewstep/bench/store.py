"""SQLite store of results: one row per experiment, written in its own transaction (an interrupted sweep loses
at most the run in flight), keyed by the experiment's content hash (a rerun is a no-op unless forced).

**Which files are ours.** A results file may be any path a user types, so a store is marked: ``PRAGMA
application_id`` holds :data:`APPLICATION_ID` (the bytes ``fwsp``) and ``PRAGMA user_version`` the schema version
(:data:`SCHEMA_VERSION`; 1 = ``results`` with ``extra`` + ``refs``, 2 = + ``claims``). Opening a path:

* missing, 0 bytes, or an SQLite database with no schema objects and no marker: a new store (schema and marker
  are written; not in read-only mode, which needs an existing store);
* marked as ours: used; an older version is migrated in place (:data:`_MIGRATIONS`), a newer one is refused;
* unmarked but holding exactly ``results`` and ``refs`` with our columns (``extra`` possibly missing): a store
  written before the marker existed; migrated and stamped;
* anything else (other tables or columns, another application's marker, not SQLite, a folder): ``ValueError``
  naming the path. Such a file is inspected through a read-only connection only and never opened for writing.

**Writing.** Opening for writing proves, before any experiment runs, that the store can be written: a file or a
folder with no write permission bit at all is refused (so ``chmod 444`` protects a store even from root, whom the
kernel would let write), then a real write (a claim inserted and rolled back, which needs the journal beside the
file) is tried, which catches what the bits do not show (another owner, a read-only mount). ``readonly=True``
opens with SQLite's ``mode=ro`` for reports: nothing is ever created or modified.

**Locks.** Every statement waits out another connection's lock, with backoff, for ``lock_timeout`` seconds in
total and then raises ``ValueError``; writes are ``BEGIN IMMEDIATE`` transactions, so two writers never deadlock.

**Claims.** Two sweeps on one store share the work. Before running an experiment a sweep claims its key: a row of
``claims`` with the owner ``host:pid:token`` and a lease expiry, inserted in an immediate transaction only when no
live claim exists. The result is written and the claim released in one transaction. :meth:`ResultStore.heartbeat`
renews the leases while a sweep runs; a claim whose lease expired, or whose owner is a dead process on this host,
is taken over at once. Released claims stay, with their release time, so that a forced sweep can tell a result
rewritten by another sweep running beside it (done) from an old one (to rerun). Pids and release times are
compared on one host's clocks; across hosts only the lease matters.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from fewstep.bench.experiment import Experiment

__all__ = ["APPLICATION_ID", "DEFAULT_DB", "SCHEMA_VERSION", "ResultStore"]

DEFAULT_DB = Path(os.environ.get("FEWSTEP_DB", "fewstep-results.sqlite"))

APPLICATION_ID = int.from_bytes(b"fwsp", "big")
SCHEMA_VERSION = 2

COLUMNS = ("nfe", "error", "fd", "fd_floor", "swd", "model_seconds", "wall_seconds", "peak_rss_mb")

_RESULTS = ("CREATE TABLE results (key TEXT PRIMARY KEY, spec TEXT NOT NULL, backend TEXT, model TEXT, solver TEXT, "
            "grid TEXT, steps INTEGER, seeds TEXT, " + ", ".join(f"{c} {'INTEGER' if c == 'nfe' else 'REAL'}"
                                                            for c in COLUMNS)
            + ", samples BLOB, created TEXT DEFAULT CURRENT_TIMESTAMP, extra TEXT)")
_REFS = "CREATE TABLE refs (model TEXT, seeds TEXT, nfe INTEGER, data BLOB, PRIMARY KEY (model, seeds))"
_CLAIMS = ("CREATE TABLE claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, "
           "expires REAL, released REAL)")
# version v -> the statements that make a version-v store a version v + 1 one
_MIGRATIONS: dict[int, tuple[str, ...]] = {1: (_CLAIMS,)}

# the columns of stores written before the marker (``extra`` was added later, by ALTER TABLE)
_LEGACY_RESULTS = {"key", "spec", "backend", "model", "solver", "grid", "steps", "seeds", *COLUMNS, "samples",
                   "created"}
_LEGACY_REFS = {"model", "seeds", "nfe", "data"}

_SQLITE_MAGIC = b"SQLite format 3\x00"
_HOST = socket.gethostname()
_LIVE_OWNERS: set[str] = set()  # owners of the stores open in this process (claims under our own pid)

ClaimState = Literal["claimed", "busy", "done"]
T = TypeVar("T")


def _to_blob(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.detach().cpu().float().numpy())
    return buf.getvalue()


def _from_blob(blob: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(blob)))


def _connect(path: Path, mode: Literal["ro", "rw", "rwc"], busy: float) -> sqlite3.Connection:
    """An autocommit connection (transactions are explicit) with SQLite's own busy wait of ``busy`` seconds."""
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode={mode}", uri=True, timeout=busy, isolation_level=None,
                           check_same_thread=False)


def _is_locked(err: sqlite3.Error) -> bool:
    return getattr(err, "sqlite_errorcode", None) in (5, 6) or "locked" in str(err)  # SQLITE_BUSY, SQLITE_LOCKED


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM pragma_table_info(?)", (table,))}


def _schema_version(conn: sqlite3.Connection, path: Path) -> int:
    """The fewstep schema version of the database on ``conn``: 0 for an empty one (to be created), 1 for a store
    from before the marker, the marked version otherwise; ``ValueError`` for anything that is not a fewstep store."""
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise ValueError(f"{path} is a results database of a newer fewstep (schema version {version}; this "
                             f"fewstep knows up to {SCHEMA_VERSION}): upgrade fewstep to use it")
        if version < 1:
            raise ValueError(f"{path} carries fewstep's marker but no schema version; refusing to use it")
        return version
    if app != 0 or version != 0:
        raise ValueError(f"{path} is not a fewstep results database (it belongs to another application: "
                         f"application_id {app:#x}, user_version {version}); refusing to touch it")
    objects = {name: kind for kind, name in conn.execute("SELECT type, name FROM sqlite_master")
               if not name.startswith("sqlite_")}  # autoindexes, sqlite_stat1 and the like come with any table
    if not objects:
        return 0
    if (objects == {"results": "table", "refs": "table"} and _columns(conn, "results") - {"extra"} == _LEGACY_RESULTS
            and _columns(conn, "refs") == _LEGACY_REFS):
        return 1
    raise ValueError(f"{path} is not a fewstep results database (it holds {', '.join(sorted(objects))}); refusing "
                     "to touch it")


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    """Create, migrate and stamp the store on ``conn`` (inside the caller's immediate transaction)."""
    version = _schema_version(conn, path)
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        for statement in (_RESULTS, _REFS, _CLAIMS):
            conn.execute(statement)
    else:
        if "extra" not in _columns(conn, "results"):  # stores written before extra fields existed
            conn.execute("ALTER TABLE results ADD COLUMN extra TEXT")
        for v in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[v]:
                conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _probe_write(conn: sqlite3.Connection) -> None:
    """Raise ``sqlite3.Error`` unless a row can really be written on ``conn`` (rolled back: nothing changes). A
    page write needs the journal beside the file, so this also finds a folder where no file can be created."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT OR REPLACE INTO claims (key, owner, host, pid) VALUES ('', 'probe', '', 0)")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # elsewhere os.kill(pid, 0) is no probe; only the lease tells
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _no_write_bit(path: Path) -> bool:
    return path.exists() and not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


class ResultStore:
    """Results database at ``path`` (created if missing; see the module docstring for which files are accepted).

    ``readonly``: open an existing store without ever writing (for reports). ``lock_timeout``: seconds in total that
    a statement waits for another connection's lock before ``ValueError``. ``lease``: seconds a claim stays valid
    without renewal (renewed every ``lease / 4`` by :meth:`heartbeat`)."""

    def __init__(self, path: str | Path = DEFAULT_DB, *, readonly: bool = False, lock_timeout: float = 60.0,
                 lease: float = 60.0) -> None:
        self.path, self.readonly = Path(path), readonly
        self.lock_timeout, self.lease = float(lock_timeout), float(lease)
        self._busy = min(self.lock_timeout, 1.0)  # SQLite's own wait per attempt; _retry bounds the total
        self.owner = f"{_HOST}:{os.getpid()}:{secrets.token_hex(4)}"
        exists = self._check_file()
        if readonly:
            self.conn = self._open_readonly()
        else:
            self.conn = self._open_for_writing(exists)
            _LIVE_OWNERS.add(self.owner)

    # ------------------------------------------------------------------------------------------------ opening

    def _check_file(self) -> bool:
        """Refuse what cannot be a store without opening it: a folder, a special file, a file that is not SQLite.
        Returns whether the file exists with content."""
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a folder, not a results database")
        if not self.path.exists():
            if self.readonly:
                raise ValueError(f"no results database at {self.path}")
            return False
        if not self.path.is_file():
            raise ValueError(f"{self.path} is not a regular file, not a results database")
        try:
            with open(self.path, "rb") as f:
                header = f.read(100)
        except OSError as err:
            raise ValueError(f"cannot read the results database {self.path}: {err.strerror}") from None
        if not header:
            if self.readonly:
                raise ValueError(f"{self.path} is empty: no results yet (run `fewstep bench` first)")
            return False
        if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
            raise ValueError(f"{self.path} is not an SQLite database; refusing to touch it")
        return True

    def _inspect(self, conn: sqlite3.Connection) -> int:
        try:
            return self._retry("reading its schema", lambda: _schema_version(conn, self.path))
        except sqlite3.Error as err:
            raise ValueError(f"cannot read the results database {self.path}: {err}") from None

    def _open_readonly(self) -> sqlite3.Connection:
        try:
            conn = _connect(self.path, "ro", self._busy)
        except sqlite3.Error as err:
            raise ValueError(f"cannot open the results database {self.path}: {err}") from None
        try:
            if self._inspect(conn) == 0:
                raise ValueError(f"{self.path} holds no results yet (run `fewstep bench` first)")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_for_writing(self, exists: bool) -> sqlite3.Connection:
        if exists:  # judged through a read-only connection: a foreign file is never opened for writing
            try:
                reader = _connect(self.path, "ro", self._busy)
            except sqlite3.Error as err:
                raise ValueError(f"cannot open the results database {self.path}: {err}") from None
            with contextlib.closing(reader):
                self._inspect(reader)
        folder = self.path.parent
        for p, what in ((self.path, "file"), (folder, "folder")):
            if _no_write_bit(p):
                raise ValueError(f"cannot open the results database {self.path} for writing: its {what} is "
                                 f"read-only (mode {stat.S_IMODE(p.stat().st_mode):o})")
        conn = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path, "rwc", self._busy)
            self.conn = conn
            self._write("preparing it", lambda c: _prepare(c, self.path), wrap=False)
            self._retry("testing that it can be written", lambda: _probe_write(conn))
        except (sqlite3.Error, OSError) as err:
            if conn is not None:
                conn.close()
            detail = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise ValueError(f"cannot open the results database {self.path} for writing: {detail} (can this user "
                             "write the file, and create files in its folder?)") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return conn

    # ------------------------------------------------------------------------------------------------ locking

    def _retry(self, what: str, attempt: Callable[[], T]) -> T:
        """``attempt()``, retried with backoff while the database is locked, for ``lock_timeout`` seconds in all."""
        deadline = time.monotonic() + self.lock_timeout
        pause = 0.05
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as err:
                if not _is_locked(err):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ValueError(f"the results database {self.path} stayed locked by another connection for "
                                     f"{self.lock_timeout:g} s while {what}; is another program holding it "
                                     "open in a transaction?") from None
            time.sleep(min(pause, left))
            pause = min(2 * pause, 1.0)

    def _write(self, what: str, body: Callable[[sqlite3.Connection], T], *, wrap: bool = True) -> T:
        """``body(conn)`` in one ``BEGIN IMMEDIATE`` transaction, retried while locked."""
        if self.readonly:
            raise ValueError(f"the results database {self.path} is open read-only; cannot write while {what}")

        def attempt() -> T:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                out = body(self.conn)
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            return out

        try:
            return self._retry(what, attempt)
        except sqlite3.Error as err:
            if not wrap:
                raise
            raise ValueError(f"cannot write to the results database {self.path} while {what}: {err}") from None

    def _read(self, what: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._retry(what, lambda: self.conn.execute(query, params).fetchall())
        except sqlite3.Error as err:
            raise ValueError(f"cannot read the results database {self.path} while {what}: {err}") from None

    # ------------------------------------------------------------------------------------------------ results

    def has(self, exp: Experiment) -> bool:
        return bool(self._read("looking up a result", "SELECT 1 FROM results WHERE key = ?", (exp.key,)))

    def put(self, exp: Experiment, record: dict[str, Any], samples: torch.Tensor) -> None:
        """Write one result and release this store's claim on it, in one transaction."""
        values = [record.get(c) for c in COLUMNS]
        extra = json.dumps({k: v for k, v in record.items() if k not in COLUMNS}, sort_keys=True)
        row = [exp.key, exp.to_json(), exp.backend, exp.model, exp.label, exp.grid, exp.steps, exp.seeds, *values,
               _to_blob(samples), extra]

        def body(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO results (key, spec, backend, model, solver, grid, steps, seeds, "
                         + ", ".join(COLUMNS) + ", samples, extra) VALUES (" + ", ".join("?" * len(row)) + ")", row)
            conn.execute("UPDATE claims SET expires = NULL, released = ? WHERE key = ? AND owner = ?",
                         (time.time(), exp.key, self.owner))

        self._write("writing a result", body)

    def rows(self) -> list[dict[str, Any]]:
        columns = {name for (name,) in self._read("reading results", "SELECT name FROM pragma_table_info('results')")}
        extra = "extra" if "extra" in columns else "NULL"  # a read-only store from before extra fields existed
        out = []
        for key, spec, label, more, *vals in self._read(
                "reading results", f"SELECT key, spec, solver, {extra}, " + ", ".join(COLUMNS)
                + " FROM results ORDER BY rowid"):
            row = {"key": key, "experiment": Experiment.from_dict(json.loads(spec)), "label": label}
            row.update(json.loads(more) if more else {})
            row.update(zip(COLUMNS, vals, strict=True))
            out.append(row)
        return out

    def samples(self, key: str) -> torch.Tensor:
        rows = self._read("reading samples", "SELECT samples FROM results WHERE key = ?", (key,))
        if not rows:
            raise KeyError(key)
        return _from_blob(rows[0][0])

    def reference(self, model: str, seeds: str) -> tuple[torch.Tensor, int] | None:
        rows = self._read("reading a reference", "SELECT data, nfe FROM refs WHERE model = ? AND seeds = ?",
                          (model, seeds))
        return None if not rows else (_from_blob(rows[0][0]), int(rows[0][1]))

    def put_reference(self, model: str, seeds: str, x: torch.Tensor, nfe: int) -> None:
        blob = _to_blob(x)
        self._write("writing a reference", lambda conn: conn.execute(
            "INSERT OR REPLACE INTO refs VALUES (?, ?, ?, ?)", (model, seeds, nfe, blob)))

    # ------------------------------------------------------------------------------------------------- claims

    def _alive(self, owner: str, host: str, pid: int, expires: float | None, now: float) -> bool:
        """Whether a claim still protects its experiment: unreleased, in its lease, and not left by a dead process
        of this host (a process with our own pid is gone unless it is a store open in this process)."""
        if expires is None or expires <= now:
            return False
        if host != _HOST:
            return True
        return owner in _LIVE_OWNERS if pid == os.getpid() else _pid_alive(pid)

    def claim(self, exp: Experiment, *, since: float | None = None) -> ClaimState:
        """Atomically claim ``exp`` for this store's owner: ``"claimed"`` (run it, then :meth:`put` or
        :meth:`release`), ``"busy"`` (another live owner runs it now: ask again later) or ``"done"`` (its result is
        present; with ``since`` (a forced sweep's start time), only when it was written at or after ``since``)."""
        now = time.time()

        def body(conn: sqlite3.Connection) -> ClaimState:
            present = conn.execute("SELECT 1 FROM results WHERE key = ?", (exp.key,)).fetchone() is not None
            row = conn.execute("SELECT owner, host, pid, expires, released FROM claims WHERE key = ?",
                               (exp.key,)).fetchone()
            if present and (since is None or (row is not None and row[4] is not None and row[4] >= since)):
                return "done"
            if row is not None and row[4] is None and row[0] != self.owner and self._alive(*row[:4], now):
                return "busy"
            conn.execute("INSERT OR REPLACE INTO claims (key, owner, host, pid, expires, released) "
                         "VALUES (?, ?, ?, ?, ?, NULL)", (exp.key, self.owner, _HOST, os.getpid(), now + self.lease))
            return "claimed"

        return self._write("claiming an experiment", body)

    def release(self, exp: Experiment) -> None:
        """Give up this store's claim on ``exp`` without a result (its run failed or was interrupted)."""
        self._write("releasing a claim", lambda conn: conn.execute(
            "DELETE FROM claims WHERE key = ? AND owner = ? AND released IS NULL", (exp.key, self.owner)))

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renew this store's unreleased claims every ``lease / 4`` seconds while the block runs, from a thread with
        its own connection, so that an experiment longer than the lease keeps its claim (a missed beat, e.g. while
        the database is locked, is simply skipped)."""
        stop = threading.Event()

        def beat() -> None:
            with contextlib.suppress(sqlite3.Error), contextlib.closing(_connect(self.path, "rw", self._busy)) as c:
                while not stop.wait(self.lease / 4):
                    with contextlib.suppress(sqlite3.Error):
                        c.execute("UPDATE claims SET expires = ? WHERE owner = ? AND released IS NULL",
                                  (time.time() + self.lease, self.owner))

        thread = threading.Thread(target=beat, name="fewstep-claims-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # ---------------------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        _LIVE_OWNERS.discard(self.owner)
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
