"""``--device`` and ``--dtype`` on ``fewstep bench`` and ``fewstep tune``: a run in another dtype or on another device
is another experiment (another tune), the defaults leave every key and number as it was, and a device that is not
there is refused before any work. The CUDA tests run only where there is one."""

import dataclasses

import pytest
import torch

from fewstep import sample, zoo
from fewstep.bench import Experiment, ResultStore, sweep
from fewstep.cli import main
from fewstep.grids import make_grid
from fewstep.noise import SampleNoise
from fewstep.plan import Plan, place
from fewstep.schedules import DiscreteVP
from fewstep.tuning import tune
from fewstep.tuning.store import TuneStore
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
SCHED = DiscreteVP.named("linear")


def _placed(name: str, device: str, dtype: torch.dtype) -> object:
    den = zoo.load(name)
    place(den, torch.device(device), dtype)
    return den


def _bench_samples(den: object, solver: str, steps: int, seeds: int, dtype: torch.dtype) -> torch.Tensor:
    """What the bench runs for a fewstep row: its noise at t_max in the state dtype, on the row's grid."""
    s = den.schedule
    x = SampleNoise(list(range(seeds)), den.sample_shape, dtype=dtype).draw() * s.prior_std(s.t_max)
    return sample(den, solver, make_grid("time_quadratic", s, steps), x_init=x, seeds=list(range(seeds)))


def test_default_dtype_and_device_leave_experiment_keys_as_they_were():
    base = Experiment("unet_m", "ddim", 5, seeds="0-15", cache="deepcache:interval=3")
    explicit = Experiment("unet_m", "ddim", 5, seeds="0-15", cache="deepcache:interval=3", dtype="float32",
                          device="cpu")
    assert explicit.key == base.key and explicit.to_json() == base.to_json()
    assert not {"dtype", "device"} & set(base.to_dict())
    f64, gpu = dataclasses.replace(base, dtype="float64"), dataclasses.replace(base, device="cuda")
    both = dataclasses.replace(base, dtype="float16", device="cuda")
    assert len({base.key, f64.key, gpu.key, both.key}) == 4
    assert f64.label == "ddim+deepcache:interval=3 [float64]"
    assert both.label == "ddim+deepcache:interval=3 [cuda, float16]"
    assert Experiment.from_json(both.to_json()) == both  # read back without a CUDA device
    peers = sweep(["unet_m"], ["ddim"], [5], with_diffusers=True, dtype="bfloat16")
    assert [e.label for e in peers] == ["ddim [bfloat16]", "diffusers:DDIM [bfloat16]"]
    assert [e.key for e in sweep(["unet_m"], ["ddim"], [5], with_diffusers=True, dtype="float32", device="cpu")] == \
        [e.key for e in sweep(["unet_m"], ["ddim"], [5], with_diffusers=True)]


def test_a_plan_experiment_takes_its_plans_dtype_and_device():
    plan = Plan(model="unet_s", steps=4, dtype="float16", device="cuda")
    exp = Experiment.of_plan(plan, name="p")
    assert (exp.dtype, exp.device, exp.label) == ("float16", "cuda", "p")
    assert not {"dtype", "device"} & set(exp.to_dict())  # the plan in the key carries them, as before
    assert Experiment.from_json(exp.to_json()) == exp
    with pytest.raises(ValueError, match="differ from its plan's"):
        dataclasses.replace(exp, device="cpu")


@pytest.mark.parametrize("bad, match", [({"dtype": "float8"}, "dtype must be one of float32, float64"),
                                        ({"dtype": None}, "dtype must be one of"),
                                        ({"device": "nonsense"}, "not a torch device: 'nonsense'"),
                                        ({"device": torch.device("cpu")}, "device must be a torch device name")])
def test_a_bad_dtype_or_device_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Experiment("unet_m", "ddim", 5, **bad)
    with pytest.raises(ValueError, match=match):
        sweep(["unet_m"], ["ddim"], [5], **bad)
    den = AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.3), SCHED)
    with pytest.raises(ValueError, match=match):
        tune(den, "gmm", 3, shape=(4,), **bad)


def test_tune_refuses_a_network_that_is_not_where_it_runs():
    with pytest.raises(ValueError, match="runs in float64, the network is in float32"):
        tune(zoo.load("unet_s"), "unet_s", 3, shape=(1, 8, 8), dtype="float64")


def _refused(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize("flags, match", [
    (["--device", "nonsense"], "not a torch device: 'nonsense'"),
    pytest.param(["--device", "cuda"], "cuda: no CUDA device is available here", marks=NO_CUDA),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
])
@pytest.mark.parametrize("command", ["bench", "tune"])
def test_a_device_that_is_not_there_is_refused_before_any_work(command, flags, match, tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work began")

    monkeypatch.setattr(zoo, "load", no_work)
    argv = {"bench": ["bench", "--models", "unet_s", "--solvers", "ddim", "--steps", "2", "--db",
                      str(tmp_path / "r.sqlite")],
            "tune": ["tune", "--model", "unet_s", "--nfe", "3", "--out", str(tmp_path / "plans")]}[command]
    assert match in _refused(capsys, [*argv, *flags])
    assert list(tmp_path.iterdir()) == []


def test_bench_in_float64_is_another_experiment_and_float32_is_unchanged(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    argv = ["bench", "--models", "unet_s", "--solvers", "ddim", "--steps", "3", "--seeds", "0-3", "--with-diffusers",
            "--db", str(db)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "2 experiments run here" in capsys.readouterr().out
    assert main([*argv, "--dtype", "float64"]) == 0, capsys.readouterr().err
    assert "2 experiments run here" in capsys.readouterr().out
    assert main([*argv, "--dtype", "float64", "--device", "cpu"]) == 0
    assert "0 experiments run here" in capsys.readouterr().out
    store = ResultStore(db, readonly=True)
    rows = {r["label"]: r for r in store.rows()}
    assert set(rows) == {"ddim", "diffusers:DDIM", "ddim [float64]", "diffusers:DDIM [float64]"}
    assert rows["ddim"]["key"] == Experiment("unet_s", "ddim", 3, "time_quadratic", "0-3").key
    assert rows["ddim [float64]"]["experiment"].dtype == "float64"
    # each row is the run of its own dtype (samples are stored in float32)
    f32 = _bench_samples(zoo.load("unet_s"), "ddim", 3, 4, torch.float32)
    f64 = _bench_samples(_placed("unet_s", "cpu", torch.float64), "ddim", 3, 4, torch.float64)
    assert f32.dtype == torch.float32 and f64.dtype == torch.float64
    assert torch.equal(store.samples(rows["ddim"]["key"]), f32)
    assert torch.equal(store.samples(rows["ddim [float64]"]["key"]), f64.float())
    for label in ("ddim", "diffusers:DDIM"):  # one reference for both: the errors agree to float32 round-off
        assert rows[f"{label} [float64]"]["nfe"] == rows[label]["nfe"]
        assert rows[f"{label} [float64]"]["error"] == pytest.approx(rows[label]["error"], rel=1e-4)
    store.close()


def test_tune_in_float64_is_another_tune_carrying_its_dtype(tmp_path):
    den = AnalyticDenoiser(gaussian_mixture(dim=4, components=3, std=0.3), SCHED)
    kw = {"solvers": ("ddim", "dpmpp_2m"), "shape": (4,), "seeds": range(4), "holdout": range(100, 108),
          "candidates": 8, "diffusers": False}
    store = TuneStore(tmp_path / "tune.sqlite")
    f32 = tune(den, "gmm", 3, store=store, **kw)
    assert tune(den, "gmm", 3, dtype="float32", device="cpu", **kw).rows == f32.rows
    f64 = tune(den, "gmm", 3, dtype="float64", store=store, **kw)
    assert store.count()[0] == 2  # a teacher per dtype
    assert (f32.plan.dtype, f64.plan.dtype, f64.plan.device) == ("float32", "float64", "cpu")
    assert [(r["solver"], r["grid"]) for r in f64.rows] == [(r["solver"], r["grid"]) for r in f32.rows]
    assert [r["holdout"] for r in f64.rows] != [r["holdout"] for r in f32.rows]
    assert all(type(r[k]) is float for r in f64.rows for k in ("calibration", "holdout"))
    assert tune(den, "gmm", 3, dtype="float64", store=store, **kw).rows == f64.rows  # resumed from its own teacher
    store.close()


def test_cli_tune_in_float64_writes_float64_plans(tmp_path, capsys):
    out = tmp_path / "plans"
    argv = ["tune", "--model", "unet_s", "--nfe", "3", "--solvers", "ddim", "--compare", "", "--seeds", "1000-1003",
            "--holdout", "2000-2003", "--candidates", "6", "--iterations", "2", "--no-diffusers", "--out", str(out)]
    assert main([*argv, "--dtype", "float64"]) == 0, capsys.readouterr().err
    plan = Plan.load(out / "plan_nfe3.json")
    assert (plan.dtype, plan.device) == ("float64", "cpu")
    assert plan.build().sample(seeds="0-1").dtype == torch.float64
    assert main(argv) == 0, capsys.readouterr().err  # float32 beside it: its own teacher, its own plan
    assert Plan.load(out / "plan_nfe3.json").dtype == "float32"
    assert TuneStore(out / "tune.sqlite").count()[0] == 2


@CUDA
def test_bench_on_cuda_matches_the_cpu(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    argv = ["bench", "--models", "unet_s", "--solvers", "ddim", "--steps", "3", "--seeds", "0-3", "--with-diffusers",
            "--dtype", "float64", "--db", str(db)]
    assert main([*argv, "--device", "cuda"]) == 0, capsys.readouterr().err
    assert main(argv) == 0, capsys.readouterr().err
    store = ResultStore(db, readonly=True)
    rows = {r["label"]: r for r in store.rows()}
    for label in ("ddim", "diffusers:DDIM"):
        gpu, cpu = rows[f"{label} [cuda, float64]"], rows[f"{label} [float64]"]
        assert gpu["nfe"] == cpu["nfe"] and gpu["peak_cuda_mb"] > 0
        assert float((store.samples(gpu["key"]) - store.samples(cpu["key"])).abs().max()) < 1e-5
    store.close()


@CUDA
def test_tune_on_cuda_matches_the_cpu():
    kw = {"solvers": ("ddim",), "shape": (1, 8, 8), "seeds": range(1000, 1004), "holdout": range(4), "candidates": 8,
          "iterations": 4, "dtype": "float64"}
    gpu = tune(_placed("unet_s", "cuda", torch.float64), "unet_s", 4, device="cuda", **kw)
    cpu = tune(_placed("unet_s", "cpu", torch.float64), "unet_s", 4, **kw)
    assert (gpu.plan.device, gpu.plan.dtype) == ("cuda", "float64")
    assert all(x.device.type == "cpu" for x in gpu.samples.values())
    fixed = [(g, c) for g, c in zip(gpu.rows, cpu.rows, strict=True) if g["grid"] not in ("tuned", "tuned_decoupled")]
    assert fixed and all(g["holdout"] == pytest.approx(c["holdout"], rel=1e-6) for g, c in fixed)
    assert gpu.plan.build().sample(seeds="0-1").device.type == "cuda"


@CUDA
def test_cli_tune_on_cuda_in_half_precision(tmp_path, capsys):
    out = tmp_path / "plans"
    assert main(["tune", "--model", "unet_s", "--nfe", "4", "--solvers", "ddim,dpmpp_2m", "--seeds", "1000-1003",
                 "--holdout", "2000-2003", "--candidates", "8", "--iterations", "3", "--device", "cuda", "--dtype",
                 "float16", "--out", str(out)]) == 0, capsys.readouterr().err
    plan = Plan.load(out / "plan_nfe4.json")
    assert (plan.device, plan.dtype) == ("cuda", "float16")
