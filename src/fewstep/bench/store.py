"""SQLite store of results: one row per experiment, written in its own transaction (an interrupted sweep loses
at most the run in flight), keyed by the experiment's content hash (a rerun is a no-op unless forced)."""

from __future__ import annotations

import io
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.bench.experiment import Experiment

__all__ = ["DEFAULT_DB", "ResultStore"]

DEFAULT_DB = Path(os.environ.get("FEWSTEP_DB", "fewstep-results.sqlite"))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY, spec TEXT NOT NULL, backend TEXT, model TEXT, solver TEXT, grid TEXT, steps INTEGER,
    seeds TEXT, nfe INTEGER, error REAL, fd REAL, fd_floor REAL, swd REAL, model_seconds REAL, wall_seconds REAL,
    peak_rss_mb REAL, samples BLOB, created TEXT DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS refs (
    model TEXT, seeds TEXT, nfe INTEGER, data BLOB, PRIMARY KEY (model, seeds)
);
"""

COLUMNS = ("nfe", "error", "fd", "fd_floor", "swd", "model_seconds", "wall_seconds", "peak_rss_mb")


def _to_blob(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.detach().cpu().float().numpy())
    return buf.getvalue()


def _from_blob(blob: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(blob)))


class ResultStore:
    """Results database at ``path`` (created if missing)."""

    def __init__(self, path: str | Path = DEFAULT_DB) -> None:
        self.path = Path(path)
        try:
            if self.path.parent != Path(""):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path)
            self.conn.executescript(_SCHEMA)
            cols = {row[1] for row in self.conn.execute("PRAGMA table_info(results)")}
            if "extra" not in cols:  # databases written before extra fields existed
                self.conn.execute("ALTER TABLE results ADD COLUMN extra TEXT")
            self.conn.commit()
        except (sqlite3.Error, OSError) as err:
            raise ValueError(f"cannot open the results database {self.path} for writing: {err}") from None

    def has(self, exp: Experiment) -> bool:
        return self.conn.execute("SELECT 1 FROM results WHERE key = ?", (exp.key,)).fetchone() is not None

    def put(self, exp: Experiment, record: dict[str, Any], samples: torch.Tensor) -> None:
        values = [record.get(c) for c in COLUMNS]
        extra = json.dumps({k: v for k, v in record.items() if k not in COLUMNS}, sort_keys=True)
        with self.conn:  # one transaction per result
            self.conn.execute(
                "INSERT OR REPLACE INTO results (key, spec, backend, model, solver, grid, steps, seeds, "
                + ", ".join(COLUMNS) + ", samples, extra) VALUES (" + ", ".join("?" * (10 + len(COLUMNS))) + ")",
                [exp.key, exp.to_json(), exp.backend, exp.model, exp.label, exp.grid, exp.steps, exp.seeds, *values,
                 _to_blob(samples), extra],
            )

    def rows(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT key, spec, solver, extra, " + ", ".join(COLUMNS)
                                + " FROM results ORDER BY rowid")
        out = []
        for key, spec, label, extra, *vals in cur.fetchall():
            row = {"key": key, "experiment": Experiment.from_dict(json.loads(spec)), "label": label}
            row.update(json.loads(extra) if extra else {})
            row.update(zip(COLUMNS, vals, strict=True))
            out.append(row)
        return out

    def samples(self, key: str) -> torch.Tensor:
        row = self.conn.execute("SELECT samples FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return _from_blob(row[0])

    def reference(self, model: str, seeds: str) -> tuple[torch.Tensor, int] | None:
        row = self.conn.execute("SELECT data, nfe FROM refs WHERE model = ? AND seeds = ?", (model, seeds)).fetchone()
        return None if row is None else (_from_blob(row[0]), int(row[1]))

    def put_reference(self, model: str, seeds: str, x: torch.Tensor, nfe: int) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO refs VALUES (?, ?, ?, ?)", (model, seeds, nfe, _to_blob(x)))

    def close(self) -> None:
        self.conn.close()
