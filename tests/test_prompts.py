"""Prompts as a conditioning source: encoded by the pipeline's own encoder bit for bit, once per prompt, cycled
over the seeds; a loaded pipeline is a model; guided tuning uses the negative prompt, and conditioning that carries
an autograd graph is detached instead of crashing the gradient refinement."""

import pytest
import torch

import fewstep
from fewstep.conditioning import Prompts, detached
from fewstep.pipelines import load_pipeline


@pytest.fixture(scope="module")
def pipe(sd_folder):
    return load_pipeline(sd_folder)


def test_a_loaded_pipeline_is_a_model(pipe, sd_folder):
    den = fewstep.from_diffusers(pipe)
    ref = fewstep.from_diffusers(str(sd_folder))
    x = torch.randn(2, *den.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = Prompts(("a red 3",)).cond(pipe, 2)
    assert den.model is pipe.unet and den.scheduler_config["_class_name"] == "DDIMScheduler"
    assert torch.equal(den(x, 0.5, cond), ref(x, 0.5, cond))


def test_prompts_are_the_pipelines_own_encoding_cycled_over_the_seeds(pipe, monkeypatch):
    source = Prompts(("a red 3", "the digit seven"), negative="blurry")
    with torch.no_grad():
        first, negative = pipe.encode_prompt("a red 3", "cpu", 1, True, negative_prompt="blurry")
        second, _ = pipe.encode_prompt("the digit seven", "cpu", 1, True)
    got = source.cond(pipe, 5)["encoder_hidden_states"]
    assert got.shape == (5, *first.shape[1:]) and not got.requires_grad
    for k, want in enumerate([first, second, first, second, first]):
        assert torch.equal(got[k:k + 1], want)
    assert torch.equal(source.negative_cond(pipe)["encoder_hidden_states"], negative)
    calls = []
    real = type(pipe).encode_prompt
    monkeypatch.setattr(type(pipe), "encode_prompt", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k))
    source.cond(pipe, 7)  # encoded once per prompt text and encoder: nothing new
    Prompts(("a red 3", "a blue 4")).cond(pipe, 2)
    assert calls == ["a blue 4"]
    assert source.fingerprint != Prompts(("a red 3", "the digit seven")).fingerprint  # the negative counts


def test_bad_prompt_sources_are_refused_in_one_line(pipe, tmp_path):
    from tiny_pipelines import sd3_pipeline

    with pytest.raises(ValueError, match="one or more non-empty prompts"):
        Prompts(())
    with pytest.raises(ValueError, match="one or more non-empty prompts"):
        Prompts(("a red 3", "  "))
    with pytest.raises(ValueError, match="no such file"):
        Prompts.from_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        Prompts.from_file(tmp_path / "empty.txt")
    (tmp_path / "two.txt").write_text("a red 3\n\nthe digit seven\n")
    assert Prompts.from_file(tmp_path / "two.txt").texts == ("a red 3", "the digit seven")
    with pytest.raises(ValueError, match="tokens, more than the tokenizer's 16: it would be truncated"):
        Prompts(("a very long prompt about a digit",)).cond(pipe, 1)
    with pytest.raises(ValueError, match="need a text-to-image pipeline with a tokenizer and a text encoder"):
        Prompts(("a red 3",)).cond(sd3_pipeline()[0], 1)


def test_conditioning_with_a_graph_is_detached(pipe):
    emb, _ = pipe.encode_prompt("a red 3", "cpu", 1, False)  # outside no_grad: it carries the encoder's graph
    assert emb.requires_grad
    out = detached({"encoder_hidden_states": emb, "added": {"text_embeds": emb}, "n": 3})
    assert not out["encoder_hidden_states"].requires_grad and not out["added"]["text_embeds"].requires_grad
    assert out["n"] == 3 and torch.equal(out["encoder_hidden_states"], emb)


def test_guided_tuning_on_a_pipeline_uses_the_negative_prompt_and_survives_a_graph(pipe):
    den = fewstep.from_diffusers(pipe)
    emb, _ = pipe.encode_prompt("a red 3", "cpu", 1, False)  # with a graph: this crashed refine_by_gradient
    kw = {"solvers": ("dpmpp_2m",), "shape": den.sample_shape, "seeds": range(2), "holdout": range(100, 102),
          "cond": {"encoder_hidden_states": emb}, "holdout_cond": {"encoder_hidden_states": emb}, "guidance": 3.0,
          "candidates": 6, "iterations": 2, "diffusers": False}
    empty = fewstep.tune(den, "sd", 3, uncond=Prompts(("a red 3",)).negative_cond(pipe), **kw)
    blurry = fewstep.tune(den, "sd", 3, uncond=Prompts(("a red 3",), negative="blurry").negative_cond(pipe), **kw)
    assert empty.plan.guidance == 3.0 and [r.holdout for r in empty.rows] != [r.holdout for r in blurry.rows]
    with pytest.raises(ValueError, match="needs uncond="):  # the pipeline's UNet has no null condition of its own
        fewstep.tune(den, "sd", 3, **kw)
    with pytest.raises(ValueError, match="uncond= is the negative conditioning of guidance"):
        fewstep.tune(den, "sd", 3, uncond={"encoder_hidden_states": emb}, **{**kw, "guidance": None})


def test_cli_tunes_a_pipeline_on_prompts_and_writes_plans_and_decoded_grids(sd_folder, tmp_path, capsys):
    from fewstep.cli import main
    from fewstep.plan import Plan

    (tmp_path / "cal.txt").write_text("a red 3\nthe digit seven\n")
    (tmp_path / "held.txt").write_text("a blue 4\n")
    out = tmp_path / "plans"
    argv = ["tune", "--model", str(sd_folder), "--prompts", str(tmp_path / "cal.txt"), "--holdout-prompts",
            str(tmp_path / "held.txt"), "--negative-prompt", "blurry", "--guidance", "3", "--nfe", "3",
            "--solvers", "dpmpp_2m", "--compare", "", "--seeds", "0-1", "--holdout", "100-101", "--candidates", "6",
            "--iterations", "2", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    plan = Plan.load(out / "plan_nfe3.json")
    assert plan.model == str(sd_folder) and plan.guidance == 3.0
    assert (out / "grid.png").is_file() and "dpmpp_2m" in (out / "report.md").read_text()


@pytest.mark.parametrize(("extra", "message"), [
    (["--prompt", "a red 3", "--prompts", "p.txt"], "give --prompt or --prompts, not both"),
    (["--prompt", "a red 3", "--label", "3"], "give one"),
    (["--holdout-prompts", "p.txt"], "--holdout-prompts goes with --prompt or --prompts"),
    (["--prompt", "a red 3", "--negative-prompt", "blurry"], "give --guidance too"),
    (["--prompts", "missing.txt"], "--prompts missing.txt: no such file"),
    (["--prompt", "a very long prompt about a digit"], "it would be truncated"),
])
def test_cli_refuses_bad_prompt_input_before_any_work(sd_folder, tmp_path, capsys, monkeypatch, extra, message):
    from fewstep.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "plans"
    assert main(["tune", "--model", str(sd_folder), "--nfe", "3", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (out / "tune.sqlite").exists()


def test_cli_refuses_prompts_on_a_model_that_is_no_pipeline(tmp_path, capsys):
    from fewstep.cli import main

    assert main(["tune", "--model", "unet_s", "--prompt", "a red 3", "--out", str(tmp_path / "p")]) == 2
    assert "is not a diffusers pipeline folder" in capsys.readouterr().err


def test_cli_samples_a_pipeline_on_prompts_as_the_plan_does(pipe, sd_folder, tmp_path, capsys):
    import numpy as np

    from fewstep.cli import main
    from fewstep.plan import Plan

    base = ["sample", "--model", str(sd_folder), "--prompt", "a red 3", "--negative-prompt", "blurry", "--guidance",
            "3", "--steps", "4", "--seeds", "0-1", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "x.npz")]) == 0, capsys.readouterr().err
    source = Prompts(("a red 3",), negative="blurry")
    den = fewstep.from_diffusers(pipe)
    want = Plan(model=str(sd_folder), steps=4, guidance=3.0).build(den, uncond=source.negative_cond(pipe)).sample(
        seeds=[0, 1], cond=source.cond(pipe, 2))
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "x.npz")["samples"]), want)
    assert main([*base, "--out", str(tmp_path / "x.png")]) == 0
    assert "images (decoded by the pipeline's VAE)" in capsys.readouterr().out and (tmp_path / "x.png").is_file()
    assert main(["sample", "--model", "unet_s", "--prompt", "a red 3", "--out", str(tmp_path / "y.npz")]) == 2
    assert "is not a diffusers pipeline folder" in capsys.readouterr().err
    bad = ["sample", "--model", "dit_s", "--prompt", "a red 3", "--label", "3", "--out", str(tmp_path / "y.npz")]
    assert main(bad) == 2
    assert "give one" in capsys.readouterr().err and not (tmp_path / "y.npz").exists()


def test_sd3_prompts_are_its_own_encoding_and_drive_its_transformer(tmp_path):
    from tiny_pipelines import sd3_text_pipeline

    pipe = sd3_text_pipeline(tmp_path)
    source = Prompts(("a red 3", "the digit seven"), negative="blurry")
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt("a red 3", None, None, device="cpu",
                                                          do_classifier_free_guidance=True, negative_prompt="blurry")
    cond = source.cond(pipe, 3)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert torch.equal(cond["encoder_hidden_states"][:1], emb) and torch.equal(cond["pooled_projections"][2:], pooled)
    negative = source.negative_cond(pipe)
    assert torch.equal(negative["encoder_hidden_states"], neg) and torch.equal(negative["pooled_projections"],
                                                                               neg_pooled)
    den = fewstep.from_diffusers(pipe)
    x = torch.randn(3, *den.sample_shape, generator=torch.Generator().manual_seed(0))
    out = fewstep.sample(fewstep.ClassifierFreeGuidance(den, 4.0, uncond=negative), "dpmpp_2m", 3, x_init=x,
                         cond=cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_pipelines_whose_prompts_are_not_encoded_yet_are_refused_in_one_line():
    class FluxLike:  # a CLIP and a T5 encoder on a transformer: Flux, whose network also needs ids and guidance
        tokenizer, text_encoder, text_encoder_2, transformer = object(), object(), object(), object()

        def encode_prompt(self, *args, **kwargs):
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="encoding prompts for FluxLike is not supported yet"):
        Prompts(("a red 3",)).cond(FluxLike(), 1)


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_sdxl_prompts_are_what_its_own_call_passes_its_unet(tmp_path, negative):
    """The pipeline's guided call, with the U-Net's keywords captured: its embeddings, pooled text embeds and time
    ids are Prompts' (the empty negative prompt as zeros, the pipeline's force_zeros_for_empty_prompt)."""
    from tiny_pipelines import sdxl_text_pipeline

    pipe = sdxl_text_pipeline(tmp_path)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        pipe("a red 3", negative_prompt=negative or None, num_inference_steps=1, guidance_scale=3.0,
             output_type="latent")
    finally:
        handle.remove()
    call = seen[0]
    source = Prompts(("a red 3",), negative=negative)
    cond, uncond = source.cond(pipe, 1), source.negative_cond(pipe)
    assert torch.equal(call["encoder_hidden_states"], torch.cat([uncond["encoder_hidden_states"],
                                                                 cond["encoder_hidden_states"]]))
    for key in ("text_embeds", "time_ids"):
        assert torch.equal(call["added_cond_kwargs"][key], torch.cat([uncond["added_cond_kwargs"][key],
                                                                      cond["added_cond_kwargs"][key]]))
    assert not uncond["encoder_hidden_states"].any() if negative == "" else uncond["encoder_hidden_states"].any()
    den = fewstep.from_diffusers(pipe)
    x = torch.randn(2, *den.sample_shape, generator=torch.Generator().manual_seed(0))
    out = fewstep.sample(fewstep.ClassifierFreeGuidance(den, 3.0, uncond=uncond), "dpmpp_2m", 3, x_init=x,
                         cond=source.cond(pipe, 2))
    assert torch.isfinite(out).all()


def test_sample_guidance_without_prompts_needs_a_null_condition(tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "x.npz"
    assert main(["sample", "--model", "unet_s", "--guidance", "3", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--guidance needs a model with a null condition" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["sample", "--model", "dit_s", "--guidance", "3", "--label", "3", "--steps", "3", "--seeds", "0-1",
                 "--quiet", "--out", str(out)]) == 0
