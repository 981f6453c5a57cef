"""The same runs on a CUDA device: the loop, solver families, guidance, the scheduler drop-in. Skipped without a GPU
(CI has none); run on a GPU machine with ``python -m pytest -q tests/test_cuda.py``."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SOLVERS = ["ddim", "euler", "heun", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "deis",
           "ipndm", "sa_solver", "ghvb", "evodiff", "bdia"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_zoo_model_on_cuda_matches_cpu(solver):
    from fewstep import sample, zoo

    den = zoo.load("unet_m")
    cpu = sample(den, solver, 8, shape=(1, 8, 8), seeds="0-7", dtype=torch.float64)
    den.model.to("cuda", torch.float64)
    den.dtype = torch.float64
    try:
        gpu = sample(den, solver, 8, shape=(1, 8, 8), seeds="0-7", dtype=torch.float64, device="cuda")
    finally:
        den.model.to("cpu", torch.float32)
        den.dtype = torch.float32
    assert gpu.device.type == "cuda"
    assert float((gpu.cpu() - cpu).abs().max()) < 1e-6  # same per-seed noise (drawn on the CPU), float64 kernels


def test_scheduler_in_a_pipeline_on_cuda():
    import diffusers

    import tiny_pipelines as tiny
    from fewstep.scheduler import FewstepScheduler

    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny.vae(), text_encoder=None, tokenizer=None, unet=tiny.sd_unet(),
        scheduler=diffusers.DPMSolverMultistepScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    emb = torch.randn(1, 5, 12, device="cuda", dtype=torch.float16)
    outs = []
    for scheduler in (diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
                      FewstepScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")):
        pipe.scheduler = scheduler
        outs.append(pipe(prompt_embeds=emb, negative_prompt_embeds=-emb, num_inference_steps=8, output_type="latent",
                         generator=torch.Generator("cuda").manual_seed(1), height=16, width=16).images.float())
    assert outs[1].device.type == "cuda" and torch.isfinite(outs[1]).all()
    assert float((outs[0] - outs[1]).abs().max() / outs[0].abs().max()) < 1e-2  # float16


@pytest.mark.parametrize("spec", ["block:threshold=0.3", "block:threshold=0.3:order=1", "taylorseer:interval=3",
                                  "deepcache:interval=3"])
def test_caches_on_cuda_match_cpu(spec):
    """Per-sample reuse masks, forecasts and stored features on the model's device; float64 so CPU and GPU
    decisions agree."""
    from fewstep import sample, zoo
    from fewstep.caching import cache_from_spec

    name = "unet_m" if spec.startswith("deepcache") else "dit_s"
    den = zoo.load(name)
    cond = {"class_labels": torch.arange(8) % 10} if name == "dit_s" else None
    kw = {"shape": (1, 8, 8), "seeds": "0-7", "dtype": torch.float64, "cond": cond}
    cached, _ = cache_from_spec(den, spec, solver="dpmpp_2m", steps=12, shape=(1, 8, 8))
    den.model.to(torch.float64)
    den.dtype = torch.float64
    cpu = sample(cached, "dpmpp_2m", 12, **kw)
    den.model.to("cuda")
    try:
        gpu = sample(cached, "dpmpp_2m", 12, device="cuda", **{**kw, "cond": cond and {"class_labels":
                                                                                      cond["class_labels"].cuda()}})
    finally:
        den.model.to("cpu", torch.float32)
        den.dtype = torch.float32
    assert gpu.device.type == "cuda" and float((gpu.cpu() - cpu).abs().max()) < 1e-6


def test_sample_cli_on_cuda_writes_the_cpu_shards(tmp_path):
    """``fewstep sample --device cuda --dtype float64`` to a shard folder: the same samples as on the CPU."""
    import numpy as np

    from fewstep.cli import main
    from fewstep.shards import read_shards

    args = ["sample", "--model", "unet_s", "--steps", "6", "--seeds", "0-9", "--batch-size", "4", "--quiet",
            "--dtype", "float64"]
    assert main([*args, "--device", "cuda", "--out", str(tmp_path / "gpu")]) == 0
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    gpu = np.concatenate([x for _, x in read_shards(tmp_path / "gpu")])
    cpu = np.concatenate([x for _, x in read_shards(tmp_path / "cpu")])
    assert np.abs(gpu - cpu).max() < 1e-6


def test_a_plan_in_half_precision_on_cuda_keeps_a_float32_state():
    from fewstep.plan import Plan

    sampler = Plan(model="unet_s", steps=5, dtype="float16", device="cuda").build()
    x = sampler.sample(seeds="0-3", batch_size=2)
    assert x.device.type == "cuda" and x.dtype == torch.float32 and bool(torch.isfinite(x).all())


def test_a_differentiable_run_on_cuda():
    from fewstep import zoo
    from fewstep.differentiable import run

    den = zoo.load("unet_s")
    den.model.to("cuda")
    x = torch.randn(4, 1, 8, 8, device="cuda")
    times = torch.tensor([0.999, 0.5, 0.1, 0.0], dtype=torch.float64, device="cuda", requires_grad=True)
    run(den, "dpmpp_2m", times, x_init=x).sum().backward()
    assert torch.isfinite(times.grad).all()


@pytest.mark.parametrize("scheme", ["int8wo", "int8dq", "fp8wo", "w4a8", "int8wo:round=nearest"])
def test_a_quantized_plan_on_cuda_is_close_to_the_cpu_one(scheme):
    """Calibration (ranges, GPTQ Hessians and rounding) and torchao's kernels on the GPU: the samples stay close to
    the same plan's on the CPU (kernels and float64 rounding decisions differ, so not bit for bit)."""
    from fewstep import Plan, zoo

    den = zoo.load("unet_m")
    cpu = Plan(model="unet_m", solver="ddim", steps=8, quant=scheme).build(den).sample(seeds="0-7")
    gpu = Plan(model="unet_m", solver="ddim", steps=8, quant=scheme, device="cuda").build().sample(seeds="0-7")
    assert gpu.device.type == "cuda"
    assert float((gpu.cpu().float() - cpu).norm() / cpu.norm()) < 0.05
