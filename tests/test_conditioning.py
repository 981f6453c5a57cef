"""Conditioning sources: class labels parsed once, checked against the model, and the same for a bench row, its
reference and diffusers' row; rows on the model's default conditioning keep their keys."""

import pytest
import torch

from fewstep.bench import Experiment, ResultStore, sweep
from fewstep.bench.runner import Context, run_experiment
from fewstep.conditioning import Labels
from fewstep.plan import Plan
from fewstep.zoo import load


def test_labels_give_the_conditioning_of_the_seeds_in_order():
    den = load("dit_s")
    assert torch.equal(Labels("3").cond(den, 4)["class_labels"], torch.tensor([3, 3, 3, 3]))
    assert torch.equal(Labels("1,4").cond(den, 5)["class_labels"], torch.tensor([1, 4, 1, 4, 1]))
    assert torch.equal(Labels("cycle").cond(den, 12)["class_labels"], torch.arange(12) % 10)
    assert Labels.of("") is None and Labels.of(None) is None and Labels("0-4").fingerprint == "labels=0-4"


@pytest.mark.parametrize(("spec", "model", "match"), [
    ("seven", "dit_s", "labels must be an integer class, a list or range of them, or 'cycle', got 'seven'"),
    ("99", "dit_s", "labels 99 is out of range: this model has classes 0-9"),
    ("3", "unet_s", "labels needs a class-conditional model"),
])
def test_bad_labels_are_refused_in_one_line(spec, model, match):
    with pytest.raises(ValueError, match=match):
        Labels(spec).cond(load(model), 2)


def test_labels_are_part_of_a_rows_key_only_when_set():
    plain = Experiment("dit_s", "ddim", 3, seeds="0-3")
    assert "labels" not in plain.to_dict() and Experiment("dit_s", "ddim", 3, seeds="0-3", labels="") == plain
    three = Experiment("dit_s", "ddim", 3, seeds="0-3", labels="3")
    assert three.key != plain.key and three.label == "ddim [labels=3]"
    assert Experiment.from_json(three.to_json()) == three
    assert {e.labels for e in sweep(["dit_s"], ["ddim"], [3], labels="cycle")} == {"cycle"}
    with pytest.raises(ValueError, match="labels must be an integer class"):
        Experiment("dit_s", "ddim", 3, labels="three")


def test_a_labelled_row_samples_and_is_measured_under_its_labels(tmp_path):
    ctx = Context(ResultStore(tmp_path / "runs.sqlite"))
    exp = Experiment("dit_s", "ddim", 3, seeds="0-3", labels="3")
    record, out = run_experiment(exp, ctx)
    den = load("dit_s")
    cond = {"class_labels": torch.tensor([3, 3, 3, 3])}
    assert torch.equal(out, Plan(model="dit_s", solver="ddim", steps=3).build(den).sample(seeds="0-3", cond=cond))
    _, plain = run_experiment(Experiment("dit_s", "ddim", 3, seeds="0-3"), ctx)
    assert not torch.equal(out, plain)
    # the reference is the labelled one: stored apart from the unconditioned reference of the same seeds
    assert ctx.store.reference("dit_s", "0-3|labels=3") is not None and ctx.store.reference("dit_s", "0-3") is not None
    assert not torch.equal(ctx.store.reference("dit_s", "0-3|labels=3")[0], ctx.store.reference("dit_s", "0-3")[0])
    labelled, unlabelled = ctx.reference(exp), ctx.store.reference("dit_s", "0-3")[0]

    def rmse(a, b):
        return float((a - b).flatten(1).pow(2).mean(1).sqrt().mean())

    assert record["error"] == pytest.approx(rmse(out, labelled)) and record["error"] < rmse(out, unlabelled)
    # the same labels drive diffusers' row: close to the labelled reference, far from the unlabelled one
    peer, peer_out = run_experiment(Experiment("dit_s", "DDIM", 20, seeds="0-3", backend="diffusers", labels="3"), ctx)
    assert peer["nfe"] == 20 and peer["error"] == pytest.approx(rmse(peer_out, labelled))
    assert peer["error"] < 0.5 * rmse(peer_out, unlabelled)


def test_bench_label_runs_labelled_rows_and_refuses_bad_labels_before_any_work(tmp_path, capsys):
    from fewstep.cli import main

    db = tmp_path / "runs.sqlite"
    base = ["bench", "--models", "dit_s", "--solvers", "ddim", "--steps", "3", "--seeds", "0-3", "--db", str(db)]
    assert main([*base, "--label", "3"]) == 0, capsys.readouterr().err
    assert [r["label"] for r in ResultStore(db).rows()] == ["ddim [labels=3]"]
    for argv, message in ((["--label", "99"], "--label 99 is out of range: this model has classes 0-9 (dit_s)"),
                          (["--label", "seven"], "--label must be an integer class"),
                          (["--models", "unet_s", "--label", "3"], "--label needs a class-conditional model")):
        other = tmp_path / "other.sqlite"
        args = [*base[:-1], str(other), *argv]
        if "--models" in argv:
            args = ["bench", "--solvers", "ddim", "--steps", "3", "--seeds", "0-3", "--db", str(other), *argv]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and not other.exists()
