"""A tune's rows: one candidate configuration (solver, grid, times) and its measured errors, and the rule that
picks a plan among them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["TUNED", "Row", "best_row", "choose"]

TUNED = ("tuned", "tuned_decoupled")
"""Grid labels of searched times (``tuned_decoupled``: with learned network times)."""


@dataclass
class Row(Mapping[str, Any]):
    """One candidate of a tune: ``solver`` on ``grid`` (a fixed grid's name, a :data:`TUNED` label, or a diffusers
    scheduler's label for ``kind="diffusers"``) at ``times`` (``None`` for diffusers' own), with the decoupled
    network times of a ``tuned_decoupled`` row; its end-point errors (mean per-sample RMSE against the teacher)
    on the calibration seeds (``None`` for diffusers rows) and the held-out seeds, and its held-out FD when asked.

    Read as a record (``row.holdout``) or, as reports and stores take it, a read-only mapping of its fields
    (``row["holdout"]``, ``row.get("fd")``, :meth:`to_dict`)."""

    solver: str
    grid: str
    kind: str
    times: list[float] | None
    model_times: list[float] | None
    calibration: float | None
    holdout: float | None = None
    fd: float | None = None

    @property
    def label(self) -> str:
        return f"{self.solver} {self.grid}"

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Row:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown tune row fields {unknown}; a row has {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in data.items() if k in names})


def best_row(rows: Sequence[Row], kind: str, *, fixed: bool = False) -> Row | None:
    """The row of ``kind`` (``fewstep`` or ``diffusers``) with the least held-out error; with ``fixed``, among
    fixed grids only."""
    pool = [r for r in rows if r["kind"] == kind and not (fixed and r["grid"] in TUNED)]
    return min(pool, key=lambda r: r["holdout"]) if pool else None


def choose(rows: Sequence[Row]) -> Row:
    """Among fewstep's rows, the one with the least calibration error; but a tuned grid whose held-out error is
    above the best fixed grid's held-out error gives way to that fixed grid."""
    ours = [r for r in rows if r.get("kind", "fewstep") == "fewstep"]
    chosen = min(ours, key=lambda r: r["calibration"])
    fixed = [r for r in ours if r["grid"] not in TUNED]
    if chosen["grid"] in TUNED and fixed:
        best_fixed = min(fixed, key=lambda r: r["holdout"])
        if chosen["holdout"] > best_fixed["holdout"]:
            return best_fixed
    return chosen
