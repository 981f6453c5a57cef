"""Quantization through the front doors: ``Plan.quant`` (JSON, ``build`` = ``quantize`` then sample), ``fewstep sample
--quant``, ``fewstep bench --quant`` (weights_bytes and quant_error against the float network's own samples), the
harness's keys, ``fewstep generate --quant`` on a tiny pipeline, and the refusals, all before any work."""

import hashlib
import json

import numpy as np
import pytest
import torch

import fewstep
from fewstep.bench import Experiment, ResultStore, rmse_per_sample, run_sweep, sweep
from fewstep.bench.experiment import QUANT_REV
from fewstep.cli import main
from fewstep.plan import Plan
from fewstep.quant import quantize, weights_bytes
from fewstep.scheduler import FewstepScheduler
from fewstep.zoo import load


@pytest.fixture(scope="module")
def unet_s():
    return load("unet_s")


def snapshot(den):
    return {k: v.clone() for k, v in den.model.state_dict().items()}


# ---------------------------------------------------------------- Plan.quant


def test_plan_quant_round_trips_and_is_left_out_when_unset():
    plan = Plan(model="unet_s", solver="ddim", steps=3, quant="w4a8:calibration=single")
    assert Plan.from_json(plan.to_json()) == plan and plan.to_dict()["quant"] == "w4a8:calibration=single"
    plain = Plan(model="unet_s", solver="ddim", steps=3)
    assert "quant" not in plain.to_dict()  # plans (and bench keys) from before quantization existed are unchanged
    assert Plan.from_dict(plain.to_dict()) == plain
    assert Plan(model="unet_s", solver="ddim", steps=3, quant="none") == plain


@pytest.mark.parametrize("quant,message", [
    ("w8x", "unknown quantization scheme 'w8x'"),
    ("int8wo:fast=true", "takes no knob 'fast'"),
    (8, "plan quant must be a scheme string"),
])
def test_plan_refuses_bad_schemes_at_construction(quant, message):
    with pytest.raises(ValueError, match=message) as err:
        Plan(model="unet_s", steps=3, quant=quant)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("scheme", ["w8", "w4a8", "w8:round=nearest", "fp8wo"])
def test_plan_build_equals_quantize_then_sample(unet_s, scheme):
    """``build`` quantizes a copy of the given network (calibrated on the plan's own solver and times with
    calibrate's default seeds: activation ranges, GPTQ rounding; uncalibrated for round=nearest and fp8wo) and
    samples exactly as quantize-then-sample does."""
    before = snapshot(unet_s)
    plan = Plan(model="unet_s", solver="dpmpp_2m", grid="logsnr", steps=4, quant=scheme)
    sampler = plan.build(unet_s)
    got = sampler.sample(seeds="0-3")
    cal = dict(solver="dpmpp_2m", steps=sampler.times) if scheme in ("w8", "w4a8") else None
    q = quantize(unet_s, scheme, calibration=cal)
    want = fewstep.sample(q, "dpmpp_2m", sampler.times, shape=unet_s.sample_shape, seeds="0-3")
    assert torch.equal(got, want)
    assert sampler.network.quant.scheme == scheme and weights_bytes(sampler.network) == weights_bytes(q)
    assert sampler.network.quant.rounding == ("gptq" if cal else "nearest")
    assert all(torch.equal(v, before[k]) for k, v in unet_s.model.state_dict().items())  # the original untouched
    plain = Plan(model="unet_s", solver="dpmpp_2m", grid="logsnr", steps=4).build(unet_s).sample(seeds="0-3")
    assert not torch.equal(got, plain)


def test_from_plan_refuses_a_quantized_plan():
    with pytest.raises(ValueError, match=r"does not quantize.*fewstep\.quantize") as err:
        FewstepScheduler.from_plan(Plan(model="unet_s", steps=3, quant="int8wo"))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- fewstep sample --quant


def test_sample_quant_is_the_plans_quantized_run(unet_s, tmp_path, capsys):
    out = tmp_path / "q.npz"
    code = main(["sample", "--model", "unet_s", "--solver", "ddim", "--steps", "3", "--seeds", "0-3",
                 "--quant", "int8wo", "--quiet", "--out", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "int8wo (gptq, 2 layers float): weights" in text.out
    want = Plan(model="unet_s", solver="ddim", steps=3, quant="int8wo").build(unet_s).sample(seeds="0-3")
    with np.load(out) as f:
        assert np.array_equal(f["samples"], want.numpy())
    plan = tmp_path / "p.json"
    Plan(model="unet_s", solver="ddim", steps=3, quant="int8wo").save(plan)
    assert main(["sample", "--plan", str(plan), "--seeds", "0-3", "--quiet", "--out", str(tmp_path / "p.npz")]) == 0
    with np.load(tmp_path / "p.npz") as f:
        assert np.array_equal(f["samples"], want.numpy())


@pytest.mark.parametrize("argv,message", [
    (["sample", "--model", "unet_s", "--quant", "w3x"], "unknown quantization scheme 'w3x'"),
    (["sample", "--model", "unet_s", "--quant", "w8:round=nearest:calibration=single"],
     "takes no knob 'calibration'"),
    (["sample", "--plan", "PLAN", "--quant", "w8"], "drop --quant"),
    (["bench", "--models", "unet_s", "--steps", "3", "--quant", "none,int8w"], "did you mean 'int8wo'"),
    (["bench", "--models", "unet_s", "--steps", "3", "--quant", "w4a8:t=0.5"], "t= picks the time"),
    (["generate", "--pipeline", "nowhere", "--prompt", "x", "--quant", "w8a8"], "a pipeline takes uncalibrated"),
    (["generate", "--pipeline", "nowhere", "--prompt", "x", "--quant", "w8:round=gptq"], "rounds weights by GPTQ"),
    (["generate", "--pipeline", "nowhere", "--prompt", "x", "--quant", "fp:e9m9"], "bad scheme"),
    (["generate", "--pipeline", "nowhere", "--prompt", "x", "--plan", "PLAN", "--quant", "w8"], "drop --quant"),
])
def test_bad_schemes_and_conflicts_exit_2_before_any_work(tmp_path, capsys, argv, message):
    plan = tmp_path / "plan.json"
    Plan(model="unet_s", steps=3).save(plan)
    argv = [str(plan) if a == "PLAN" else a for a in argv]
    db, out = tmp_path / "r.sqlite", tmp_path / "x.npz"
    extra = ["--db", str(db)] if argv[0] == "bench" else ["--out", str(out)]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


# ---------------------------------------------------------------- the harness


def test_experiment_quant_is_keyed_only_when_set():
    plain = Experiment("unet_s", "ddim", 3, seeds="0-3")
    assert "quant" not in plain.to_dict() and Experiment("unet_s", "ddim", 3, seeds="0-3", quant="none") == plain
    q = Experiment("unet_s", "ddim", 3, seeds="0-3", quant="w8")
    assert q.to_dict()["quant"] == "w8" and q.key != plain.key and q.label == "ddim [w8]"
    assert Experiment.from_json(q.to_json()) == q and q.unquantized() == plain
    # rows stored before GPTQ and float ends became the defaults (no revision in the key) are other experiments
    first_rev = {k: v for k, v in q.to_dict().items() if k != "quant_rev"}
    assert q.to_dict()["quant_rev"] == QUANT_REV == 2 and Experiment.from_dict(first_rev) == q
    assert hashlib.sha1(json.dumps(first_rev, sort_keys=True).encode()).hexdigest()[:16] != q.key
    plan = Plan(model="unet_s", solver="ddim", steps=3, quant="w8")
    pe = Experiment.of_plan(plan, name="p", seeds="0-3")
    assert pe.quant == "w8" and Experiment.from_json(pe.to_json()) == pe
    assert pe.unquantized().plan == Plan(model="unet_s", solver="ddim", steps=3).to_dict()
    with pytest.raises(ValueError, match="fewstep runs only"):
        Experiment("unet_s", "DDIM", 3, backend="diffusers", quant="w8")
    assert [e.quant for e in sweep(["unet_s"], ["ddim"], [3], quants=["", "none", "w8"])] == ["", "w8"]


def test_bench_quant_rows_record_weights_and_quant_error(tmp_path, capsys):
    """Each quantized row: its weights as stored and its RMSE against the float row's own samples (same noise,
    solver, steps); a 16-bit scheme adds no error to speak of; the report shows them."""
    db = tmp_path / "r.sqlite"
    code = main(["bench", "--models", "unet_s", "--solvers", "ddim", "--steps", "10", "--seeds", "0-7",
                 "--quant", "none,w8,int8wo,w16", "--db", str(db), "--report", str(tmp_path / "rep")])
    assert code == 0, capsys.readouterr().err
    store = ResultStore(db)
    rows = {r["label"]: r for r in store.rows()}
    assert set(rows) == {"ddim", "ddim [w8]", "ddim [int8wo]", "ddim [w16]"}
    plain = rows["ddim"]
    assert "quant_error" not in plain and plain["weights_bytes"] == weights_bytes(load("unet_s"))
    x_float = store.samples(plain["key"])
    for label in ("ddim [w8]", "ddim [int8wo]", "ddim [w16]"):
        r = rows[label]
        want = float(rmse_per_sample(store.samples(r["key"]), x_float).mean())
        assert r["quant_error"] == pytest.approx(want, rel=1e-6) and r["weights_bytes"] < plain["weights_bytes"]
        assert r["nfe"] == plain["nfe"] and r["error"] > 0
    assert 0 < rows["ddim [w8]"]["quant_error"] < 0.15 and 0 < rows["ddim [int8wo]"]["quant_error"] < 0.15
    assert rows["ddim [int8wo]"]["weights_bytes"] <= 0.3 * plain["weights_bytes"]
    assert rows["ddim [w16]"]["quant_error"] < 1e-3  # sanity: 16-bit weights are the float network
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| row | NFE | weights KiB | quant error |" in report and "| ddim [int8wo] | 10 |" in report
    # without the float row in the store, the float run is made (not stored) and gives the same quant error
    alone = ResultStore(tmp_path / "alone.sqlite")
    exps = sweep(["unet_s"], ["ddim"], [10], grid="time_quadratic", seeds="0-7", quants=["w8"])  # the CLI's grid
    assert run_sweep(exps, alone, progress=False) == 1
    (row,) = alone.rows()
    assert row["quant_error"] == pytest.approx(rows["ddim [w8]"]["quant_error"], rel=1e-6)


def test_bench_quantized_plan_rows(tmp_path, capsys):
    plan = tmp_path / "plan_q.json"
    Plan(model="unet_s", solver="ddim", grid="logsnr", steps=3, quant="w8").save(plan)
    db = tmp_path / "r.sqlite"
    assert main(["bench", "--models", "unet_s", "--solvers", "ddim", "--steps", "3", "--grid", "logsnr",
                 "--seeds", "0-7", "--plans", str(plan), "--db", str(db)]) == 0, capsys.readouterr().err
    rows = {r["label"]: r for r in ResultStore(db).rows()}
    # the plan's float counterpart is the plain ddim row's run: same noise, solver, grid and steps
    store = ResultStore(db)
    want = float(rmse_per_sample(store.samples(rows["plan_q"]["key"]), store.samples(rows["ddim"]["key"])).mean())
    assert rows["plan_q"]["quant_error"] == pytest.approx(want, rel=1e-6)
    assert json.loads(json.dumps(rows["plan_q"]["experiment"].plan))["quant"] == "w8"


# ---------------------------------------------------------------- fewstep generate --quant


def test_generate_quantizes_the_pipelines_network(sd_folder, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("out")
    argv = ["generate", "--pipeline", str(sd_folder), "--prompt", "a cat", "--solver", "ddim", "--steps", "3",
            "--seeds", "0-1", "--quiet"]
    assert main([*argv, "--out", str(out / "f.npz")]) == 0
    assert main([*argv, "--quant", "w16", "--out", str(out / "w16.npz")]) == 0
    assert main([*argv, "--quant", "int8wo", "--out", str(out / "i8.npz")]) == 0
    text = capsys.readouterr().out
    assert "network int8wo (" in text and "layers quantized" in text
    with np.load(out / "f.npz") as f, np.load(out / "w16.npz") as a, np.load(out / "i8.npz") as b:
        scale = np.abs(f["latents"]).max()
        assert np.abs(a["latents"] - f["latents"]).max() < 1e-3 * scale  # 16-bit weights: the float pipeline
        assert not np.array_equal(b["latents"], f["latents"])
        assert np.abs(b["latents"] - f["latents"]).max() < 0.2 * scale
    plan = out / "plan.json"
    Plan(model="unet_s", solver="ddim", grid="logsnr", steps=3, quant="int8wo").save(plan)
    assert main(["generate", "--pipeline", str(sd_folder), "--prompt", "a cat", "--plan", str(plan), "--seeds", "0-1",
                 "--quiet", "--out", str(out / "p.npz")]) == 0
    assert "network int8wo (" in capsys.readouterr().out
