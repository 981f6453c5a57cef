"""Reports from the results database: a Markdown table, PNG plots and image grids."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.bench.store import ResultStore
from fewstep.noise import parse_seeds
from fewstep.outputs import atomic_write, mosaic

__all__ = ["image_grid", "pareto_front", "write_report"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (cost, quality) when both are to be minimised, by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def image_grid(cells: dict[tuple[str, int], torch.Tensor], path: Path, *, title: str = "") -> None:
    """One row per solver, one column per NFE, same seeds in every cell; labels drawn with PIL."""
    from PIL import Image, ImageDraw

    rows = sorted({r for r, _ in cells}, key=lambda r: (r.startswith("diffusers"), r))
    cols = sorted({c for _, c in cells})
    tiles = {k: mosaic(v[:8], cols=4) for k, v in cells.items()}
    first = next(iter(tiles.values()))
    th, tw = first.shape[:2]
    left, top = 170, 34
    mode, white, black = ("RGB", (255, 255, 255), (0, 0, 0)) if first.ndim == 3 else ("L", 255, 0)
    img = Image.new(mode, (left + len(cols) * (tw + 8), top + len(rows) * (th + 8)), white)
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill=black)
    for j, c in enumerate(cols):
        draw.text((left + j * (tw + 8) + tw // 2 - 18, top - 14), f"NFE {c}", fill=black)
    for i, r in enumerate(rows):
        draw.text((4, top + i * (th + 8) + th // 2 - 6), r[:26], fill=black)
        for j, c in enumerate(cols):
            if (r, c) in tiles:
                img.paste(Image.fromarray(tiles[(r, c)]), (left + j * (tw + 8), top + i * (th + 8)))
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def _plot(series: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str, title: str,
          front: list[tuple[float, float]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, pts in sorted(series.items()):
        pts = sorted(p for p in pts if p[1] is not None and p[1] > 0)
        if pts:
            style = "--" if label.startswith("diffusers") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], color="k", lw=2.5, alpha=0.25, label="Pareto front")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def _slope(rows: list[dict[str, Any]]) -> str:
    """Observed order: -d log(error) / d log(NFE) between the two largest NFE of a solver."""
    pts = sorted((r["nfe"], r["error"]) for r in rows if r["error"] and r["error"] > 0)
    if len(pts) < 2 or pts[-1][0] == pts[-2][0]:
        return "-"
    (n1, e1), (n2, e2) = pts[-2], pts[-1]
    return f"{math.log(e1 / e2) / math.log(n2 / n1):.2f}"


def _quant_table(rows: list[dict[str, Any]]) -> list[str]:
    """The quantized rows of one model beside their float counterparts (the same experiment without ``quant``):
    stored weights, the error quantization adds, error against the reference, FD and wall time. Nothing when no row
    is quantized."""
    quant = [r for r in rows if r.get("quant_error") is not None]
    if not quant:
        return []
    by_key = {r["key"]: r for r in rows}
    shown: list[dict[str, Any]] = []
    for r in sorted(quant, key=lambda r: (r["nfe"], r["label"])):
        plain = by_key.get(r["experiment"].unquantized().key)
        if plain is not None and plain not in shown:
            shown.append(plain)
        shown.append(r)

    def kb(r: dict[str, Any]) -> str:
        return "-" if r.get("weights_bytes") is None else f"{r['weights_bytes'] / 1024:,.1f}"

    lines = ["Quantization: weights as stored (KiB); quant error: mean per-sample RMSE against the same run on the "
             "float network from the same noise (what quantization adds); error: against the reference, as above.",
             "", "| row | NFE | weights KiB | quant error | error | FD | wall s |", "|---|---|---|---|---|---|---|"]
    for r in shown:
        q = "-" if r.get("quant_error") is None else f"{r['quant_error']:.3g}"
        lines.append(f"| {r['label']} | {r['nfe']} | {kb(r)} | {q} | {r['error']:.3g} | {r['fd']:.3g} | "
                     f"{r['wall_seconds']:.3g} |")
    return [*lines, ""]


def _cache_table(rows: list[dict[str, Any]]) -> list[str]:
    """The cached rows of one model (fewstep's caches and diffusers' hooks) beside the uncached ones: work in one
    unit for both, reused evaluations, error, FD, model and wall time. Nothing when no row is cached."""
    cached = [r for r in rows if r.get("cache_work") is not None]
    if not cached:
        return []
    plain = [r for r in rows if not r["experiment"].cache and r["experiment"].backend == "fewstep"
             and any(c["experiment"].solver == r["experiment"].solver and c["nfe"] == r["nfe"] for c in cached)]
    lines = ["Caches: work is the share of a full evaluation's multiply-accumulates that each network evaluation "
             "computed, averaged over the run (convolutions, linear layers and attention products, counted by one "
             "meter for fewstep's caches and diffusers' hooks alike; 1 for the uncached rows); reused: evaluations "
             "answered from the cache.", "",
             "| row | NFE | work | reused | error | FD | model s | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(plain + cached, key=lambda r: (r["nfe"], r.get("cache_work", 1.0) != 1.0, r["label"])):
        work, reused = r.get("cache_work", 1.0), r.get("cache_reused", 0)
        lines.append(f"| {r['label']} | {r['nfe']} | {work:.3f} | {reused} | {r['error']:.3g} | {r['fd']:.3g} | "
                     f"{r['model_seconds']:.3g} | {r['wall_seconds']:.3g} |")
    return [*lines, ""]


def write_report(store: ResultStore, out_dir: str | Path) -> Path:
    """Write ``report.md``, ``error_vs_nfe.png``, ``fd_vs_nfe.png``, ``pareto.png`` and one ``grid_<model>.png``
    per model into ``out_dir``; returns the Markdown path."""
    out = Path(out_dir)
    rows = store.rows()
    if not rows:
        raise ValueError(f"no results in {store.path}; run `fewstep bench` first")
    out.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_model[r["experiment"].model].append(r)
    lines = ["# fewstep benchmark report", "",
             f"Database: `{store.path}`. Error: mean per-sample RMSE at t = 0 against an adaptive dopri5 solution of "
             "the probability-flow ODE from the same noise (rtol 1e-5). FD: Fréchet distance in the digits "
             "classifier's features against 899 real digits; floor: the same for real digits at the same N. "
             "Model time: seconds inside the network. Rows `diffusers:` run diffusers' schedulers on the same "
             "network and noise (trailing spacing, pinned configs). Error slope: -d log(error)/d log(NFE) between "
             "the two largest NFE run (the observed order on this model, pre-asymptotic at few steps).", ""]
    for model, mrows in by_model.items():
        nfes = sorted({r["nfe"] for r in mrows})
        labels = sorted({r["label"] for r in mrows}, key=lambda s: (s.startswith("diffusers"), s))
        cell = {(r["label"], r["nfe"]): r for r in mrows}
        floor = np.mean([r["fd_floor"] for r in mrows])
        seeds = mrows[0]["experiment"].seeds
        lines += [f"## {model}", "",
                  f"Real-vs-real FD floor at N = {len(parse_seeds(seeds))} (seeds {seeds}): {floor:.3f}", "",
                  "| solver | " + " | ".join(f"NFE {n}: error / FD" for n in nfes) + " | error slope |",
                  "|---|" + "---|" * (len(nfes) + 1)]
        for lab in labels:
            vals = [f"{cell[(lab, n)]['error']:.3g} / {cell[(lab, n)]['fd']:.3g}" if (lab, n) in cell else "-"
                    for n in nfes]
            lines.append(f"| {lab} | " + " | ".join(vals) + f" | {_slope([r for r in mrows if r['label'] == lab])} |")
        lines.append("")
        err_series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        fd_series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        cost_series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in mrows:
            err_series[r["label"]].append((r["nfe"], r["error"]))
            fd_series[r["label"]].append((r["nfe"], r["fd"]))
            cost_series[r["label"]].append((r["model_seconds"], r["fd"]))
        pts = [(r["model_seconds"], r["fd"]) for r in mrows]
        front = [pts[i] for i in pareto_front(pts)]
        safe = "".join(c if c.isalnum() else "_" for c in model)
        _plot(err_series, out / f"error_vs_nfe_{safe}.png", "NFE", "RMSE vs reference", f"{model}: error vs NFE")
        _plot(fd_series, out / f"fd_vs_nfe_{safe}.png", "NFE", "FD (digits classifier)", f"{model}: FD vs NFE")
        _plot(cost_series, out / f"pareto_{safe}.png", "model time (s)", "FD", f"{model}: quality vs model time",
              front)
        image_grid({(r["label"], r["nfe"]): store.samples(r["key"]) for r in mrows}, out / f"grid_{safe}.png",
                   title=f"{model}: first 8 seeds, rows = solvers, columns = NFE")
        frontier = ", ".join(f"{mrows[i]['label']} @ NFE {mrows[i]['nfe']}" for i in pareto_front(pts))
        lines += _quant_table(mrows)
        lines += _cache_table(mrows)
        lines += [f"Pareto front (FD vs model time): {frontier}.", "",
                  f"![error vs NFE](error_vs_nfe_{safe}.png) ![FD vs NFE](fd_vs_nfe_{safe}.png)", "",
                  f"![Pareto](pareto_{safe}.png)", "", f"![samples](grid_{safe}.png)", ""]
    text = "\n".join(lines).encode()
    return atomic_write(out / "report.md", lambda f: f.write(text))
