"""Compare two result stores of the same commands run by two versions of fewstep, row by row.

A refactor that claims "behaviour unchanged" is held to it here: every bench row with the same key, the same NFE,
error, FD, floor, SWD and bit-identical samples (``cache_work`` and ``cache_reused`` shown beside them); every tune
candidate with the same key and the same row; the plans of two tune folders identical.

    python benchmarks/compare_stores.py before.sqlite after.sqlite        # two bench stores (fewstep bench --db)
    python benchmarks/compare_stores.py before_plans after_plans          # two fewstep tune --out folders

Exit status 0 when everything matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any


def bench_rows(path: Path) -> dict[str, tuple[Any, ...]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return {key: (spec, nfe, error, fd, floor, swd, samples, json.loads(extra or "{}"))
                for key, spec, nfe, error, fd, floor, swd, samples, extra in conn.execute(
                    "SELECT key, spec, nfe, error, fd, fd_floor, swd, samples, extra FROM results")}


def compare_bench(before: Path, after: Path) -> bool:
    a, b = bench_rows(before), bench_rows(after)
    same_keys = set(a) == set(b)
    identical = 0
    for key in sorted(a, key=lambda k: a[k][0]):
        if key not in b:
            print(f"missing after: {a[key][0]}")
            continue
        ra, rb = a[key], b[key]
        same = ra[1:7] == rb[1:7]
        identical += same
        work = (ra[7].get("cache_work"), rb[7].get("cache_work"))
        note = "" if work == (None, None) else f"  cache_work {work[0]} -> {work[1]}"
        print(f"{'same' if same else 'DIFFERS':8s}{json.loads(ra[0])}{note}")
    print(f"{len(a)} rows before, {len(b)} after, same keys: {same_keys}; {identical} identical "
          "(NFE, error, FD, floor, SWD, the samples' bytes)")
    return same_keys and identical == len(a)


def compare_tune(before: Path, after: Path) -> bool:
    def rows(folder: Path) -> dict[str, Any]:
        with sqlite3.connect(f"file:{folder / 'tune.sqlite'}?mode=ro", uri=True) as conn:
            return {k: json.loads(r) for k, r in conn.execute("SELECT key, row FROM candidates")}

    a, b = rows(before), rows(after)
    identical = sum(a[k] == b.get(k) for k in a)
    print(f"{len(a)} tune candidates before, {len(b)} after, same keys: {set(a) == set(b)}; {identical} identical")
    ok = set(a) == set(b) and identical == len(a)
    for plan in sorted(p.name for p in before.glob("plan_nfe*.json")):
        same = json.loads((before / plan).read_text()) == json.loads((after / plan).read_text())
        print(f"{plan}: {'identical' if same else 'DIFFERENT'}")
        ok &= same
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    ok = compare_tune(args.before, args.after) if args.before.is_dir() else compare_bench(args.before, args.after)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
