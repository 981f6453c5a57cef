"""One ``Plan``: JSON round trips, ``build()`` gives the sampler ``sample()`` would run, ``FewstepScheduler.from_plan``
reproduces it inside a pipeline, ``fewstep sample --plan`` and ``fewstep generate --plan`` run it, and ``fewstep bench
--plans`` measures it beside the fixed solvers."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import tiny_pipelines as tiny
from fewstep import ClassifierFreeGuidance, from_diffusers, sample, zoo
from fewstep.caching import make_cache
from fewstep.grids import make_grid
from fewstep.plan import Plan
from fewstep.scheduler import FewstepScheduler


@pytest.fixture(scope="module")
def unet():
    return zoo.load("unet_s")


def test_json_round_trip(tmp_path):
    plan = Plan(model="unet_s", solver="sa_solver", solver_options={"tau": 0.0}, grid="karras",
                grid_options={"rho": 5.0}, steps=7, cache="taylorseer:interval=3", dtype="float64")
    assert Plan.from_json(plan.to_json()) == plan
    path = plan.save(tmp_path / "p.json")
    assert Plan.load(path) == plan and path.read_text().startswith("{")
    times = Plan(model="unet_s", grid="explicit", times=[0.9, 0.5, 0.2, 0.0])
    assert times.steps == 3 and Plan.from_dict(times.to_dict()) == times


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"solver": "dpmpp2m", "steps": 5}, "dpmpp_2m"),
    ({"solver_options": {"bogus": 1}, "steps": 5}, "bogus"),
    ({"grid": "karas", "steps": 5}, "karras"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"grid": "explicit"}, "needs times"),
    ({"grid": "explicit", "times": [0.5, 0.9]}, "strictly decreasing"),
    ({"steps": 5, "times": [0.9, 0.0]}, "times are for grid='explicit'"),
    ({"steps": 5, "dtype": "float8"}, "dtype"),
    ({"steps": 5, "solver_options": {"eta": float("nan")}}, "finite"),
])
def test_bad_plans_are_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Plan(model="unet_s", **kwargs)


def test_bad_plan_files_are_refused(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"format": "fewstep.plan/1", "model": "unet_s", "steps": 5, "stepz": 4}')
    with pytest.raises(ValueError, match="unknown plan keys \\['stepz'\\]"):
        Plan.load(path)
    path.write_text('{"model": "unet_s"}')
    with pytest.raises(ValueError, match="not a fewstep plan"):
        Plan.load(path)


def test_build_is_the_sampler_sample_would_run(unet):
    shape = unet.sample_shape
    plan = Plan(model="unet_s", solver="unipc", grid="logsnr", steps=6)
    want = sample(unet, "unipc", 6, grid="logsnr", shape=shape, seeds="0-3")
    assert torch.equal(plan.build(unet).sample(seeds="0-3"), want)
    assert torch.equal(Plan.from_json(plan.to_json()).build().sample(seeds="0-3"), want)  # loads the model itself
    times = make_grid("time_quadratic", unet.schedule, 5).tolist()
    explicit = Plan(model="unet_s", solver="dpmpp_2m", grid="explicit", times=times)
    assert torch.equal(explicit.build(unet).sample(seeds="0-3"), sample(unet, "dpmpp_2m", times, shape=shape,
                                                                       seeds="0-3"))
    cached = Plan(model="unet_s", solver="ddim", steps=9, cache="taylorseer:interval=3")
    assert torch.equal(cached.build(unet).sample(seeds="0-3"),
                       sample(make_cache(unet, "taylorseer", interval=3), "ddim", 9, grid="time_quadratic",
                              shape=shape, seeds="0-3"))


def test_guided_plan(unet):
    dit = zoo.load("dit_s")
    plan = Plan(model="dit_s", solver="dpmpp_2m", steps=5, guidance=3.0)
    cond = {"class_labels": torch.tensor([1, 2])}
    want = sample(ClassifierFreeGuidance(dit, 3.0), "dpmpp_2m", 5, grid="time_quadratic", shape=dit.sample_shape,
                  seeds="0-1", cond=cond)
    assert torch.equal(plan.build(dit).sample(seeds="0-1", cond=cond), want)


@pytest.mark.parametrize("explicit", [False, True])
def test_from_plan_reproduces_sample_in_a_pipeline(explicit):
    torch.manual_seed(0)
    unet, vae = tiny.sd_unet(), tiny.vae()
    base = diffusers.DDIMScheduler(**tiny.SD_BETAS, clip_sample=False)
    den = from_diffusers(unet, base.config)
    if explicit:
        times = make_grid("time_quadratic", den.schedule, 6).tolist()
        times[2] = 0.5 * (times[1] + times[3])  # a grid no name makes, as a tuner would return
        plan = Plan(model="sd", solver="dpmpp_2m", grid="explicit", times=times)
    else:
        plan = Plan(model="sd", solver="dpmpp_2m", grid="karras", steps=6)
    scheduler = FewstepScheduler.from_plan(plan, base)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    emb, neg = torch.randn(1, 5, 12), torch.randn(1, 5, 12)
    got = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=6, guidance_scale=3.0,
               output_type="latent", generator=torch.Generator().manual_seed(1), height=16, width=16).images
    guided = ClassifierFreeGuidance(den, 3.0, uncond={"encoder_hidden_states": neg})
    x_init = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    sampler = plan.build(den, shape=(4, 8, 8))
    out = sample(guided, sampler.solver, sampler.times, x_init=x_init, cond={"encoder_hidden_states": emb})
    assert float((got - out).abs().max() / out.abs().max()) < 1e-5
    if explicit:
        with pytest.raises(ValueError, match="samples its plan's 6 steps"):
            scheduler.set_timesteps(8)
    with pytest.raises(ValueError, match="enable_cache"):
        FewstepScheduler.from_plan(Plan(model="sd", steps=4, cache="deepcache:interval=2"), base)


def test_cli_sample_runs_a_plan(tmp_path, capsys):
    from fewstep.cli import main

    plan = Plan(model="unet_s", solver="deis", grid="logsnr", steps=5)
    path = plan.save(tmp_path / "p.json")
    assert main(["sample", "--plan", str(path), "--seeds", "0-3", "--quiet", "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["sample", "--model", "unet_s", "--solver", "deis", "--grid", "logsnr", "--steps", "5", "--seeds",
                 "0-3", "--quiet", "--out", str(tmp_path / "b.npz")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["samples"], b["samples"])
    capsys.readouterr()
    assert main(["sample", "--plan", str(path), "--solver", "ddim", "--out", str(tmp_path / "c.npz")]) == 2
    assert "drop --solver" in capsys.readouterr().err
    assert main(["sample", "--out", str(tmp_path / "c.npz")]) == 2
    assert "give --model" in capsys.readouterr().err
    assert not (tmp_path / "c.npz").exists()


def test_cli_generate_runs_a_plan(sd_folder, tmp_path, capsys):
    """``generate --plan`` = the same flags: solver, named grid and steps, cache and guidance on the pipeline, dtype
    as the weights'; and explicit times (here the karras grid's own) = that named grid."""
    from fewstep.cli import main
    from fewstep.pipelines import load_pipeline

    argv = ["generate", "--pipeline", str(sd_folder), "--prompt", "a cat", "--seeds", "0-1", "--quiet"]
    plan = Plan(model=str(sd_folder), solver="dpmpp_2m", grid="karras", steps=4, cache="taylorseer:interval=2",
                guidance=3.0)
    path = plan.save(tmp_path / "p.json")
    assert main([*argv, "--plan", str(path), "--out", str(tmp_path / "a.npz")]) == 0
    assert "dpmpp_2m on the karras grid of" in capsys.readouterr().out
    assert main([*argv, "--solver", "dpmpp_2m", "--grid", "karras", "--steps", "4", "--cache",
                 "taylorseer:interval=2", "--guidance", "3", "--out", str(tmp_path / "b.npz")]) == 0
    pipe = load_pipeline(sd_folder)
    times = make_grid("karras", from_diffusers(pipe.unet, pipe.scheduler.config).schedule, 4).tolist()
    explicit = Plan(model="sd", solver="dpmpp_2m", grid="explicit", times=times)
    assert main([*argv, "--plan", str(explicit.save(tmp_path / "e.json")), "--out", str(tmp_path / "e.npz")]) == 0
    assert main([*argv, "--solver", "dpmpp_2m", "--grid", "karras", "--steps", "4",
                 "--out", str(tmp_path / "f.npz")]) == 0
    with (np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b, np.load(tmp_path / "e.npz") as e,
          np.load(tmp_path / "f.npz") as f):
        assert np.array_equal(a["latents"], b["latents"]) and int(a["network_calls"]) == int(b["network_calls"])
        assert np.array_equal(e["latents"], f["latents"]) and np.array_equal(e["timesteps"], f["timesteps"])
        assert not np.array_equal(a["latents"], f["latents"])  # the cache and the guidance did act
    half = Plan(model="sd", solver="unipc", grid="logsnr", steps=3, dtype="bfloat16")  # the weights' dtype
    assert main([*argv, "--plan", str(half.save(tmp_path / "h.json")), "--out", str(tmp_path / "h.npz")]) == 0
    assert main([*argv, "--solver", "unipc", "--grid", "logsnr", "--steps", "3", "--dtype", "bfloat16",
                 "--out", str(tmp_path / "i.npz")]) == 0
    with np.load(tmp_path / "h.npz") as h, np.load(tmp_path / "i.npz") as i:
        assert np.array_equal(h["latents"], i["latents"])


@pytest.mark.parametrize(("argv", "plan", "message"), [
    (["--solver", "ddim"], {}, "drop --solver"),
    (["--steps", "4", "--grid", "karras"], {}, "drop --steps, --grid"),
    (["--option", "eta=1"], {}, "drop --option"),
    (["--cache", "none"], {}, "drop --cache"),
    (["--guidance", "2"], {}, "drop --guidance"),
    (["--dtype", "float32", "--device", "cpu"], {}, "drop --dtype, --device"),
    ([], {"dtype": "float64"}, "a pipeline runs in float32, float16, bfloat16, the plan asks for float64"),
    ([], {"cache": "deepcach"}, "unknown cache 'deepcach'"),
    ([], {"grid_options": {"rhoo": 7}}, "rhoo"),
])
def test_cli_generate_refuses_what_a_plan_gives(tmp_path, capsys, monkeypatch, argv, plan, message):
    """Refused before the pipeline loads: 'nowhere' is no pipeline folder, and that is not the error."""
    from fewstep.cli import main

    monkeypatch.chdir(tmp_path)
    path = Plan(model="sd", grid="karras", steps=4, **plan).save(tmp_path / "p.json")
    code = main(["generate", "--pipeline", "nowhere", "--prompt", "x", "--plan", str(path), *argv, "--out", "x.png"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_cli_generate_refuses_a_plan_device_it_lacks(tmp_path, capsys):
    from fewstep.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    path = Plan(model="sd", steps=4, device="cuda").save(tmp_path / "p.json")
    code = main(["generate", "--pipeline", "nowhere", "--prompt", "x", "--plan", str(path), "--out",
                 str(tmp_path / "x.png")])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err


def test_cli_bench_runs_plans_beside_the_solvers(unet, tmp_path, capsys):
    """A ``--plans`` row is the plan's own ``build(den).sample`` against the bench's reference, labelled by the file's
    stem; it resumes like any row, and an edited plan is a new experiment."""
    from fewstep.bench import Experiment, ResultStore, rmse_per_sample, sweep
    from fewstep.cli import main
    from fewstep.hooks import NFECounter

    times = make_grid("time_quadratic", unet.schedule, 4).tolist()
    times[2] = 0.5 * (times[1] + times[3])
    plan = Plan(model="unet_s", solver="dpmpp_2m", grid="explicit", times=times)
    path = plan.save(tmp_path / "plan_nfe4.json")
    db = tmp_path / "r.sqlite"
    argv = ["bench", "--models", "unet_s", "--solvers", "ddim", "--steps", "3", "--seeds", "0-7", "--plans",
            str(path), "--db", str(db)]
    assert main([*argv, "--report", str(tmp_path / "report")]) == 0
    assert "2 experiments run here" in capsys.readouterr().out
    assert "| plan_nfe4 |" in (tmp_path / "report" / "report.md").read_text()
    store = ResultStore(db, readonly=True)
    rows = {r["label"]: r for r in store.rows()}
    assert set(rows) == {"ddim", "plan_nfe4"} and rows["plan_nfe4"]["experiment"].plan == plan.to_dict()
    counter = NFECounter()
    own = plan.build(unet).sample(seeds="0-7", hooks=[counter])
    ref = store.reference("unet_s", "0-7")[0]
    assert rows["plan_nfe4"]["error"] == float(rmse_per_sample(own, ref).mean())
    assert rows["plan_nfe4"]["nfe"] == counter.nfe == 4
    assert torch.equal(store.samples(rows["plan_nfe4"]["key"]), own)
    store.close()
    assert main(argv) == 0 and "0 experiments run here" in capsys.readouterr().out
    Plan(model="unet_s", solver="ddim", grid="explicit", times=times).save(path)  # edited in place: rerun
    assert main(argv) == 0 and "1 experiments run here" in capsys.readouterr().out
    # the keys of plan-free experiments are as before plans existed; a plan runs on its own model
    assert "plan" not in Experiment("unet_s", "ddim", 10).to_dict()
    exps = sweep(["unet_m"], ["ddim"], [3], seeds="0-7", plans={"p": plan})
    assert [(e.model, e.label) for e in exps] == [("unet_m", "ddim"), ("unet_s", "p")]
    assert Experiment.from_json(exps[1].to_json()) == exps[1]
    with pytest.raises(ValueError, match="label of another unet_s row"):
        sweep(["unet_s"], ["ddim"], [3], plans={"ddim": plan})
    assert main([*argv[:-4], "--plans", f"{path},{tmp_path / 'x' / path.name}", "--db", str(db)]) == 2
    assert "two plan files are named 'plan_nfe4'" in capsys.readouterr().err
