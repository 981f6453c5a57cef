"""Report of one ``fewstep tune`` run: per NFE, the chosen plan against the best fixed grid and the best diffusers
scheduler on held-out seeds, every candidate's errors, the chosen times, and figures of the steps and the errors.

Everything that can fail (the inputs, the log-SNR of every time, the sample mosaics) is checked before the first
file is written, so a bad call leaves ``out_dir`` as it was; each file is then written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.outputs import atomic_write, mosaic
from fewstep.schedules import NoiseSchedule
from fewstep.tuning.rows import TUNED

__all__ = ["TUNED_GRIDS", "write_tune_report"]

TUNED_GRIDS = TUNED
"""Grid labels of searched times (:data:`fewstep.tuning.TUNED`); every other grid label of a ``fewstep`` row names a
fixed grid."""

_RESULT_KEYS = ("nfe", "chosen", "rows", "teacher_seconds", "search_seconds")
_CHOSEN_KEYS = ("solver", "grid", "times")
_ROW_KEYS = ("solver", "grid", "kind", "times", "calibration", "holdout", "fd")
_KINDS = ("fewstep", "diffusers")
_DASH = "—"


@dataclass(frozen=True)
class _StepsRow:
    """One line of a ``steps.png`` panel: a grid of the chosen solver, its times and their log-SNR."""

    label: str
    times: list[float]
    lams: list[float] | None  # finite values only (lam(0) is +inf); None without a schedule
    chosen: bool


@dataclass(frozen=True)
class _NfeResult:
    """One NFE of the run, checked, with the rows the summary compares."""

    nfe: int
    chosen: Mapping[str, Any]  # the result's "chosen" entry: the plan
    chosen_row: Mapping[str, Any]  # its row among the candidates
    best_fixed: Mapping[str, Any] | None
    best_diffusers: Mapping[str, Any] | None
    rows: list[Mapping[str, Any]]  # by held-out error
    steps: list[_StepsRow]
    chosen_lams: list[float] | None
    teacher_seconds: float
    search_seconds: float


def _require_keys(obj: Any, keys: Sequence[str], what: str) -> None:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(obj).__name__}")
    lacking = [k for k in keys if k not in obj]
    if lacking:
        raise ValueError(f"{what} lacks keys {lacking} (has {sorted(obj)})")


def _require_number(x: Any, what: str, *, optional: bool = False) -> None:
    if optional and x is None:
        return
    if isinstance(x, bool) or not isinstance(x, Real) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{what} must be a finite number >= 0{' or None' if optional else ''}, got {x!r}")


def _times(x: Any, what: str) -> list[float]:
    """``x`` as a list of floats if it is at least two strictly decreasing times ending at 0."""
    try:
        times = [float(v) for v in x]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of floats, got {x!r}") from None
    if len(times) < 2 or any(a <= b for a, b in zip(times, times[1:], strict=False)) or times[-1] != 0:
        raise ValueError(f"{what} must be two or more decreasing times ending at 0, got {times}")
    return times


def _lams(schedule: NoiseSchedule | None, times: list[float]) -> list[float] | None:
    if schedule is None:
        return None
    lams = [schedule.lam(t) for t in times]  # raises ValueError for a time outside the schedule
    return [lam for lam in lams if math.isfinite(lam)]


def _check_result(i: int, res: Any, schedule: NoiseSchedule | None) -> _NfeResult:
    _require_keys(res, _RESULT_KEYS, f"results[{i}]")
    nfe = res["nfe"]
    if isinstance(nfe, bool) or not isinstance(nfe, Integral) or nfe < 1:
        raise ValueError(f"results[{i}]['nfe'] must be an int >= 1, got {nfe!r}")
    what = f"results[{i}] (NFE {nfe})"
    for key in ("teacher_seconds", "search_seconds"):
        _require_number(res[key], f"{what} {key}")
    chosen = res["chosen"]
    _require_keys(chosen, _CHOSEN_KEYS, f"{what} chosen")
    chosen_times = _times(chosen["times"], f"{what} chosen times")
    model_times = chosen.get("model_times")
    if model_times is not None:
        for t in model_times:
            _require_number(t, f"{what} chosen model_times entry")
    rows = res["rows"]
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"{what} rows must be a non-empty list of dicts, got {rows!r}")
    seen: set[tuple[str, str, str]] = set()
    row_times: dict[int, list[float]] = {}
    for j, row in enumerate(rows):
        where = f"{what} rows[{j}]"
        _require_keys(row, _ROW_KEYS, where)
        if row["kind"] not in _KINDS:
            raise ValueError(f"{where} kind must be one of {_KINDS}, got {row['kind']!r}")
        if not isinstance(row["solver"], str) or not isinstance(row["grid"], str):
            raise ValueError(f"{where} solver and grid must be strings, got {row['solver']!r}, {row['grid']!r}")
        key = (row["kind"], row["solver"], row["grid"])
        if key in seen:
            raise ValueError(f"{where} repeats {row['kind']} {row['solver']} + {row['grid']}")
        seen.add(key)
        _require_number(row["holdout"], f"{where} holdout")
        _require_number(row["calibration"], f"{where} calibration", optional=True)
        _require_number(row["fd"], f"{where} fd", optional=True)
        if row["kind"] == "fewstep" and row["times"] is not None:
            row_times[j] = _times(row["times"], f"{where} times")
    fewstep = [r for r in rows if r["kind"] == "fewstep"]
    try:
        chosen_row = next(r for r in fewstep if r["solver"] == chosen["solver"] and r["grid"] == chosen["grid"])
    except StopIteration:
        raise ValueError(f"{what}: the chosen plan {chosen['solver']} + {chosen['grid']} is not among its "
                         "fewstep rows") from None
    fixed = [r for r in fewstep if r["grid"] not in TUNED_GRIDS]
    peers = [r for r in rows if r["kind"] == "diffusers"]
    # The chosen solver's grids, the plan first, then the other searched grids, then the fixed ones by name.
    mine = sorted(((j, r) for j, r in enumerate(rows) if j in row_times and r["solver"] == chosen["solver"]),
                  key=lambda jr: (jr[1] is not chosen_row, jr[1]["grid"] not in TUNED_GRIDS, jr[1]["grid"]))
    steps = []
    for j, r in mine:
        times = chosen_times if r is chosen_row else row_times[j]
        label = f"{r['grid']}{' (chosen)' if r is chosen_row else ''}  {r['holdout']:.3g}"
        steps.append(_StepsRow(label, times, _lams(schedule, times), r is chosen_row))
    return _NfeResult(
        nfe=int(nfe), chosen=chosen, chosen_row=chosen_row,
        best_fixed=min(fixed, key=lambda r: r["holdout"]) if fixed else None,
        best_diffusers=min(peers, key=lambda r: r["holdout"]) if peers else None,
        rows=sorted(rows, key=lambda r: r["holdout"]), steps=steps, chosen_lams=_lams(schedule, chosen_times),
        teacher_seconds=float(res["teacher_seconds"]), search_seconds=float(res["search_seconds"]))


def _check(results: Any, schedule: NoiseSchedule | None) -> list[_NfeResult]:
    if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence):
        raise ValueError(f"results must be a list of one dict per NFE, got {type(results).__name__}")
    if not results:
        raise ValueError("results is empty: there is no tune run to report")
    if schedule is not None and not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule or None, got {type(schedule).__name__}")
    checked = [_check_result(i, res, schedule) for i, res in enumerate(results)]
    nfes = [c.nfe for c in checked]
    if len(set(nfes)) != len(nfes):
        raise ValueError(f"results repeat an NFE: {nfes}")
    return sorted(checked, key=lambda c: c.nfe)


def _tiles(images: Any) -> dict[str, np.ndarray]:
    """The first 8 samples of each label as one mosaic strip, the same number of columns in every strip so that
    samples have the same size in every row; ``mosaic`` rejects what is not an image."""
    if not isinstance(images, Mapping) or not images:
        raise ValueError("images must be a non-empty mapping from a label to a (B, C, H, W) tensor, or None")
    for label, samples in images.items():
        if not isinstance(label, str) or not isinstance(samples, torch.Tensor) or samples.ndim != 4 \
                or not len(samples):
            raise ValueError(f"images[{label!r}] must be a str label to a non-empty (B, C, H, W) tensor")
    cols = min(8, max(len(samples) for samples in images.values()))
    return {label: mosaic(samples[:8], cols=cols, scale=1) for label, samples in images.items()}


# ---- Markdown ---------------------------------------------------------------------------------------------------


def _num(x: float | None, fmt: str = ".4g") -> str:
    return _DASH if x is None else format(x, fmt)


def _ratio(a: float, b: Mapping[str, Any] | None) -> str:
    return _DASH if b is None or b["holdout"] == 0 else f"{a / b['holdout']:.3f}"


def _markdown(model: str, checked: list[_NfeResult], figures: list[tuple[str, str]]) -> str:
    lines = [f"# fewstep tune report: {model}", "",
             "Errors: mean per-sample RMSE at t = 0 against the teacher from the same noise (lower is better), on "
             "the calibration seeds the search saw and on held-out seeds it did not. FD: Fréchet distance of the "
             "held-out samples. Best fixed: the fewstep solver x fixed grid with the least held-out error; best "
             "diffusers: the diffusers scheduler with the least held-out error on the same network and noise. "
             "Ratios below 1 mean the chosen plan is better.", "",
             "| NFE | chosen plan | held-out error | best fixed (solver x grid) | its error | chosen / best fixed "
             "| best diffusers | its error | chosen / best diffusers | FD chosen / fixed / diffusers "
             "| teacher s | search s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in checked:
        err = c.chosen_row["holdout"]
        fixed, peer = c.best_fixed, c.best_diffusers
        fds = " / ".join(_num(r["fd"] if r else None) for r in (c.chosen_row, fixed, peer))
        fixed_cells = f"{fixed['solver']} x {fixed['grid']} | {fixed['holdout']:.4g}" if fixed else f"{_DASH} | {_DASH}"
        peer_cells = f"{peer['grid']} | {peer['holdout']:.4g}" if peer else f"{_DASH} | {_DASH}"
        lines.append(f"| {c.nfe} | {c.chosen['solver']} + {c.chosen['grid']} | {err:.4g} | {fixed_cells} "
                     f"| {_ratio(err, fixed)} | {peer_cells} | {_ratio(err, peer)} | {fds} "
                     f"| {c.teacher_seconds:.1f} | {c.search_seconds:.1f} |")
    for c in checked:
        err = c.chosen_row["holdout"]
        lines += ["", f"## NFE {c.nfe}: every candidate, by held-out error", "",
                  "| kind | solver | grid | calibration error | held-out error | / chosen | FD | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in c.rows:
            notes = [name for name, best in (("**chosen**", c.chosen_row), ("best fixed", c.best_fixed),
                                             ("best diffusers", c.best_diffusers)) if r is best]
            solver, grid = (f"**{r['solver']}**", f"**{r['grid']}**") if r is c.chosen_row else (r["solver"],
                                                                                                  r["grid"])
            rel = _DASH if err == 0 else f"{r['holdout'] / err:.3f}"
            lines.append(f"| {r['kind']} | {solver} | {grid} | {_num(r['calibration'])} | {r['holdout']:.4g} "
                         f"| {rel} | {_num(r['fd'])} | {', '.join(notes)} |")
    lines += ["", "## Chosen times", ""]
    for c in checked:
        lines.append(f"- NFE {c.nfe}, {c.chosen['solver']} + {c.chosen['grid']}: t = "
                     f"`{', '.join(format(float(t), '.5g') for t in c.chosen['times'])}`")
        if c.chosen.get("model_times") is not None:
            lines.append(f"  - model times: `{', '.join(format(float(t), '.5g') for t in c.chosen['model_times'])}`")
        if c.chosen_lams is not None:
            lines.append(f"  - log-SNR lam (finite ones): `{', '.join(f'{lam:.3f}' for lam in c.chosen_lams)}`")
    lines += ["", "## Figures"]
    for title, name in figures:
        lines += ["", f"![{title}]({name})"]
    lines.append("")
    return "\n".join(lines)


# ---- figures ----------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    try:
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def _steps_figure(checked: list[_NfeResult], path: Path) -> None:
    """Per NFE a panel: one line per grid of the chosen solver, the plan's times as red diamonds on top and as
    faint vertical lines through the fixed grids below; a log-SNR column beside it when a schedule was given."""
    plt = _pyplot()
    with_lam = checked[0].chosen_lams is not None
    heights = [len(c.steps) + 1.5 for c in checked]
    fig, axes = plt.subplots(len(checked), 2 if with_lam else 1, squeeze=False, dpi=110,
                             figsize=(6.5 * (2 if with_lam else 1) + 1.5, 0.3 * sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights})
    t_hi = max([1.0] + [s.times[0] for c in checked for s in c.steps])
    for c, row_axes in zip(checked, axes, strict=True):
        for col, ax in enumerate(row_axes):
            lam_col = col == 1
            for y, s in enumerate(c.steps):
                xs = s.lams if lam_col else s.times
                if not xs:
                    continue
                if s.chosen:
                    ax.vlines(xs, -0.5, len(c.steps) - 0.5, colors="C3", alpha=0.25, lw=0.8)
                ax.hlines(y, min(xs), max(xs), colors="0.8", lw=0.6)
                ax.plot(xs, [y] * len(xs), ls="none", **(dict(marker="D", ms=6, color="C3", zorder=3) if s.chosen
                                                          else dict(marker="|", ms=11, mew=1.6, color="0.25")))
            ax.set_yticks(range(len(c.steps)), [s.label for s in c.steps], fontsize=8)
            for tick, s in zip(ax.get_yticklabels(), c.steps, strict=True):
                if s.chosen:
                    tick.set_color("C3")
                    tick.set_fontweight("bold")
            ax.set_ylim(len(c.steps) - 0.5, -0.5)
            if not lam_col:
                ax.set_xlim(-0.02 * t_hi, 1.02 * t_hi)
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(f"NFE {c.nfe}: {c.chosen['solver']} grids (label: grid, held-out error)"
                         + (", log-SNR" if lam_col else ""), fontsize=9)
    axes[-1][0].set_xlabel("t (0 = data, 1 = noise)")
    if with_lam:
        axes[-1][1].set_xlabel("lam = log(alpha / sigma) (t = 0 is off the axis)")
    _save(plt, fig, path)


def _error_figure(checked: list[_NfeResult], path: Path) -> None:
    """Held-out error against NFE: the chosen plans, the best fixed and the best diffusers per NFE (thick), and
    each fixed grid with its best solver per NFE (thin)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    per_grid: dict[str, dict[int, float]] = {}
    for c in checked:
        for r in c.rows:
            if r["kind"] == "fewstep" and r["grid"] not in TUNED_GRIDS:
                best = per_grid.setdefault(r["grid"], {})
                best[c.nfe] = min(best.get(c.nfe, math.inf), r["holdout"])

    def line(pts: list[tuple[int, float]], label: str, **style: Any) -> None:
        pts = [p for p in pts if p[1] > 0]  # a log axis
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)

    palette = plt.get_cmap("Set2")
    for k, (grid, best) in enumerate(sorted(per_grid.items())):
        line(sorted(best.items()), f"{grid} (best solver)", color=palette(k % 8), lw=0.9, marker=".", alpha=0.8)
    line([(c.nfe, c.best_fixed["holdout"]) for c in checked if c.best_fixed], "best fixed fewstep", color="k",
         lw=1.8, marker="s", ms=4)
    line([(c.nfe, c.best_diffusers["holdout"]) for c in checked if c.best_diffusers], "best diffusers",
         color="C0", ls="--", lw=1.8, marker="^", ms=5)
    line([(c.nfe, c.chosen_row["holdout"]) for c in checked], "chosen plan", color="C3", lw=2.4, marker="o", ms=5)
    ax.set_yscale("log")
    ax.set_xticks([c.nfe for c in checked])
    ax.set_xlabel("NFE")
    ax.set_ylabel("held-out error (RMSE vs teacher)")
    ax.set_title("held-out error vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def _samples_figure(tiles: dict[str, np.ndarray], path: Path) -> None:
    """One row of samples per label, the label on the left."""
    plt = _pyplot()
    width = 8.0
    heights = [width * t.shape[0] / t.shape[1] for t in tiles.values()]
    fig, axes = plt.subplots(len(tiles), 1, squeeze=False, dpi=110, figsize=(width + 2, sum(heights) + 0.3),
                             gridspec_kw={"height_ratios": heights})
    for ax, (label, tile) in zip(axes[:, 0], tiles.items(), strict=True):
        ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        ax.spines[:].set_visible(False)
    _save(plt, fig, path)


def write_tune_report(out_dir: str | Path, model: str, results: Sequence[Mapping[str, Any]], *,
                      images: Mapping[str, torch.Tensor] | None = None,
                      schedule: NoiseSchedule | None = None) -> Path:
    """Write ``report.md``, ``steps.png``, ``error_vs_nfe.png`` and (with ``images``) ``grid.png`` into ``out_dir``
    for one ``fewstep tune`` run; returns the Markdown path.

    ``results`` holds one dict per NFE: ``nfe``, ``chosen`` (``solver``, ``grid``, ``times``, optional
    ``model_times``), ``rows`` (each ``solver``, ``grid``, ``kind`` ``"fewstep"`` or ``"diffusers"``, ``times``,
    ``calibration``, ``holdout``, ``fd``; errors are mean per-sample RMSE against the teacher), ``teacher_seconds``
    and ``search_seconds``. ``images`` maps a row label (``"NFE 4: tuned"``, ``"teacher"``) to ``(B, C, H, W)``
    samples in [-1, 1]; the first 8 of each are drawn. ``schedule`` adds the log-SNR of the times. Bad input raises
    ``ValueError`` before anything is written.
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty name, got {model!r}")
    checked = _check(results, schedule)
    tiles = None if images is None else _tiles(images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [("chosen times over the fixed grids", "steps.png"), ("held-out error vs NFE", "error_vs_nfe.png")]
    _steps_figure(checked, out / "steps.png")
    _error_figure(checked, out / "error_vs_nfe.png")
    if tiles is not None:
        _samples_figure(tiles, out / "grid.png")
        figures.append(("samples", "grid.png"))
    text = _markdown(model, checked, figures).encode()
    return atomic_write(out / "report.md", lambda f: f.write(text))
