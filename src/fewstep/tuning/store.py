"""The SQLite file of one ``fewstep tune``: the teacher's states and every candidate it evaluated, keyed by all
they depend on, so an interrupted tune resumes where it stopped and a repeated one costs nothing."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["TuneStore", "fingerprint"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS teachers (key TEXT PRIMARY KEY, states BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (key TEXT PRIMARY KEY, row TEXT NOT NULL);
"""


def fingerprint(value: Any) -> str:
    """A stable digest of JSON data and tensors (nested in mappings and sequences): the key of what a teacher or
    a candidate depends on."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        elif isinstance(v, Mapping):
            h.update(b"{")
            for k in sorted(v, key=str):
                h.update(json.dumps(str(k)).encode())
                feed(v[k])
            h.update(b"}")
        elif isinstance(v, list | tuple):
            h.update(b"[")
            for item in v:
                feed(item)
            h.update(b"]")
        else:
            h.update(json.dumps(v, default=repr).encode())

    feed(value)
    return h.hexdigest()


class TuneStore:
    """``tune.sqlite``: ``teachers`` (states at the candidate times, as tensors) and ``candidates`` (one JSON row
    per evaluated candidate). Each write is its own transaction: a tune killed mid-way keeps what it finished."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise ValueError(f"{self.path} is not a file")
        try:
            self._conn = sqlite3.connect(self.path, timeout=30.0)
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path} is not a fewstep tune store ({err})") from None

    def states(self, key: str) -> list[torch.Tensor] | None:
        got = self._conn.execute("SELECT states FROM teachers WHERE key = ?", (key,)).fetchone()
        return None if got is None else torch.load(io.BytesIO(got[0]), weights_only=True)

    def put_states(self, key: str, states: Sequence[torch.Tensor]) -> None:
        buf = io.BytesIO()
        torch.save([s.detach().cpu().contiguous() for s in states], buf)
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO teachers VALUES (?, ?)", (key, buf.getvalue()))

    def row(self, key: str) -> dict[str, Any] | None:
        got = self._conn.execute("SELECT row FROM candidates WHERE key = ?", (key,)).fetchone()
        return None if got is None else json.loads(got[0])

    def put_row(self, key: str, row: Mapping[str, Any]) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO candidates VALUES (?, ?)", (key, json.dumps(dict(row))))

    def count(self) -> tuple[int, int]:
        """(teachers, candidates) stored."""
        return (self._conn.execute("SELECT COUNT(*) FROM teachers").fetchone()[0],
                self._conn.execute("SELECT COUNT(*) FROM candidates").fetchone()[0])

    def close(self) -> None:
        self._conn.close()
