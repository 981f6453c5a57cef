"""The report of a ``fewstep tune`` run: files, valid PNGs, the summary's ratios, the chosen row, bad input."""

import copy

import matplotlib.image as mpimg
import pytest
import torch

from fewstep.schedules import LinearVP
from fewstep.tuning.report import write_tune_report

TUNED4 = [1.0, 0.62, 0.31, 0.09, 0.0]


def _row(solver, grid, holdout, *, kind="fewstep", times=None, calibration=None, fd=None):
    return {"solver": solver, "grid": grid, "kind": kind, "times": times, "calibration": calibration,
            "holdout": holdout, "fd": fd}


def _results():
    """NFE 4: the tuned grid wins and has no FD. NFE 6: the tuned grid lost on held-out seeds, so the plan fell
    back to a fixed grid. Both have diffusers rows."""
    nfe4 = [
        _row("dpmpp_2m", "tuned", 0.040, times=TUNED4, calibration=0.035),
        _row("dpmpp_2m", "tuned_decoupled", 0.043, times=[1.0, 0.58, 0.3, 0.1, 0.0], calibration=0.036, fd=3.1),
        _row("dpmpp_2m", "trailing", 0.065, times=[1.0, 0.75, 0.5, 0.25, 0.0], calibration=0.06, fd=3.9),
        _row("dpmpp_2m", "logsnr", 0.058, times=[1.0, 0.55, 0.22, 0.05, 0.0], calibration=0.055, fd=3.5),
        _row("ddim", "tuned", 0.090, times=[1.0, 0.6, 0.3, 0.1, 0.0], calibration=0.08, fd=5.0),
        _row("ddim", "trailing", 0.120, times=[1.0, 0.75, 0.5, 0.25, 0.0], calibration=0.11, fd=6.0),
        _row("diffusers", "DPM++2M", 0.070, kind="diffusers", fd=4.2),
        _row("diffusers", "UniPC", 0.075, kind="diffusers", fd=4.4),
    ]
    nfe6 = [
        _row("dpmpp_2m", "tuned", 0.031, times=[1.0, 0.7, 0.45, 0.25, 0.12, 0.04, 0.0], calibration=0.02, fd=2.8),
        _row("dpmpp_2m", "trailing", 0.030, times=[1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0], calibration=0.03,
             fd=2.7),
        _row("ddim", "logsnr", 0.050, times=[1.0, 0.6, 0.35, 0.18, 0.08, 0.02, 0.0], calibration=0.045, fd=3.3),
        _row("diffusers", "DPM++2M", 0.036, kind="diffusers", fd=2.9),
    ]
    return [
        {"nfe": 4, "chosen": {"solver": "dpmpp_2m", "grid": "tuned", "times": TUNED4,
                              "model_times": [999.0, 619.0, 309.0, 89.0, 0.0]},
         "rows": nfe4, "teacher_seconds": 12.5, "search_seconds": 40.25},
        {"nfe": 6, "chosen": {"solver": "dpmpp_2m", "grid": "trailing", "times": nfe6[1]["times"],
                              "model_times": None},
         "rows": nfe6, "teacher_seconds": 0.0, "search_seconds": 55.0},
    ]


def _summary_cells(text, nfe):
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {nfe} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _section(text, nfe):
    start = text.index(f"## NFE {nfe}:")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def _images():
    g = torch.Generator().manual_seed(0)
    return {"teacher": torch.rand(8, 1, 8, 8, generator=g) * 2 - 1,
            "NFE 4: tuned": torch.rand(8, 1, 8, 8, generator=g) * 2 - 1,
            "NFE 6: trailing": torch.rand(5, 1, 8, 8, generator=g) * 2 - 1}


def test_files_and_figures(tmp_path):
    out = tmp_path / "report"  # created by the call
    md = write_tune_report(out, "unet_m", _results(), images=_images(), schedule=LinearVP())
    assert md == out / "report.md"
    for name in ("steps.png", "error_vs_nfe.png", "grid.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0, name
        assert f"({name})" in md.read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_without_images_or_schedule(tmp_path):
    write_tune_report(tmp_path, "unet_m", _results())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error_vs_nfe.png", "report.md", "steps.png"]
    assert "grid.png" not in (tmp_path / "report.md").read_text()
    assert mpimg.imread(tmp_path / "steps.png").size > 0


def test_rgb_images(tmp_path):
    images = {"teacher": torch.zeros(3, 3, 8, 8), "NFE 4: tuned": torch.ones(3, 3, 8, 8)}
    write_tune_report(tmp_path, "rgb", _results(), images=images)
    assert mpimg.imread(tmp_path / "grid.png").shape[2] in (3, 4)


def test_summary_ratios(tmp_path):
    results = _results()
    text = write_tune_report(tmp_path, "unet_m", results).read_text()
    for res in results:
        rows = res["rows"]
        chosen = next(r for r in rows if r["kind"] == "fewstep" and r["solver"] == res["chosen"]["solver"]
                      and r["grid"] == res["chosen"]["grid"])
        fixed = min((r for r in rows if r["kind"] == "fewstep" and not r["grid"].startswith("tuned")),
                    key=lambda r: r["holdout"])
        peer = min((r for r in rows if r["kind"] == "diffusers"), key=lambda r: r["holdout"])
        cells = _summary_cells(text, res["nfe"])
        assert cells[1] == f"{res['chosen']['solver']} + {res['chosen']['grid']}"
        assert float(cells[2]) == pytest.approx(chosen["holdout"])
        assert cells[3] == f"{fixed['solver']} x {fixed['grid']}"
        assert float(cells[4]) == pytest.approx(fixed["holdout"])
        assert float(cells[5]) == pytest.approx(chosen["holdout"] / fixed["holdout"], abs=5e-4)
        assert cells[6] == peer["grid"]
        assert float(cells[7]) == pytest.approx(peer["holdout"])
        assert float(cells[8]) == pytest.approx(chosen["holdout"] / peer["holdout"], abs=5e-4)
        fds = [None if s == "—" else float(s) for s in cells[9].split(" / ")]
        assert fds == [chosen["fd"], fixed["fd"], peer["fd"]]
        assert float(cells[10]) == pytest.approx(res["teacher_seconds"], abs=0.05)
        assert float(cells[11]) == pytest.approx(res["search_seconds"], abs=0.05)
    # NFE 4: tuned 0.040 against logsnr 0.058 and DPM++2M 0.070; NFE 6 fell back to the best fixed grid.
    assert _summary_cells(text, 4)[5] == "0.690" and _summary_cells(text, 4)[8] == "0.571"
    assert _summary_cells(text, 4)[9] == "— / 3.5 / 4.2"
    assert _summary_cells(text, 6)[5] == "1.000"


def test_chosen_row_marked_and_rows_sorted(tmp_path):
    results = _results()
    text = write_tune_report(tmp_path, "unet_m", results).read_text()
    for res in results:
        section = _section(text, res["nfe"])
        lines = [ln for ln in section.splitlines() if ln.startswith("| fewstep") or ln.startswith("| diffusers")]
        assert len(lines) == len(res["rows"])
        errors = [float(ln.strip("|").split("|")[4]) for ln in lines]
        assert errors == sorted(errors)
        marked = [ln for ln in lines if "**chosen**" in ln]
        assert len(marked) == 1
        assert f"**{res['chosen']['solver']}** | **{res['chosen']['grid']}**" in marked[0]
    assert "`1, 0.62, 0.31, 0.09, 0`" in text  # the chosen times
    assert "model times: `999, 619, 309, 89, 0`" in text


@pytest.mark.parametrize("mutate, match", [
    (lambda r, im: r.clear(), "empty"),
    (lambda r, im: r[0]["rows"][2].pop("holdout"), "lacks keys"),
    (lambda r, im: r[1].pop("chosen"), "lacks keys"),
    (lambda r, im: r[0]["chosen"].update(grid="karras"), "not among"),
    (lambda r, im: r[0]["rows"][0].update(kind="peer"), "kind"),
    (lambda r, im: r[0]["chosen"].update(times=[0.0, 0.5, 1.0]), "decreasing"),
    (lambda r, im: r[1].update(nfe=4), "repeat an NFE"),
    (lambda r, im: r[0]["rows"][1].update(holdout=float("nan")), "finite"),
    (lambda r, im: im.update(latents=torch.zeros(2, 4, 8, 8)), "image grid"),
])
def test_bad_input_writes_nothing(tmp_path, mutate, match):
    results, images = copy.deepcopy(_results()), _images()
    mutate(results, images)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as err:
        write_tune_report(out, "unet_m", results, images=images)
    assert "\n" not in str(err.value)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(ValueError, match=match):
        write_tune_report(out, "unet_m", results, images=images)
    assert list(out.iterdir()) == []
