"""FewstepScheduler in real diffusers pipelines, per family: parity with the matching diffusers scheduler and
agreement with ``fewstep.sample`` on the same network, guidance and noise (docs/pipelines.md).

Tiny random-weight instances of the real classes (tests/tiny_pipelines.py), float32, 5 steps, guidance 3, one seed:
exactness and call counts are meaningful on them, image quality is not.

    python benchmarks/pipelines.py
"""

import sys
import warnings
from pathlib import Path

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_pipelines as tiny  # noqa: E402
from fewstep import ClassifierFreeGuidance, from_diffusers, sample  # noqa: E402
from fewstep.scheduler import FewstepScheduler  # noqa: E402

STEPS, GUIDANCE = 5, 3.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def embeds(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    return [torch.randn(*s) for s in shapes]


def families() -> list[tuple]:
    """(family, pipeline, base scheduler, peer solver, pipeline kwargs, fewstep cond, uncond, latent shape, den kw)."""
    torch.manual_seed(0)
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    e, ne = embeds((1, 5, 12), (1, 5, 12))
    p, npool = embeds((1, 12), (1, 12))
    out = []
    for pred in ("epsilon", "v_prediction"):
        base = diffusers.DPMSolverMultistepScheduler(**sd, prediction_type=pred)
        pipe = diffusers.StableDiffusionPipeline(vae=tiny.vae(), text_encoder=None, tokenizer=None, unet=tiny.sd_unet(),
                                                 scheduler=base, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
        out.append((f"SD 1.x/2.x UNet ({pred})", pipe, base, "dpmpp_2m",
                    dict(prompt_embeds=e, negative_prompt_embeds=ne, height=16, width=16),
                    {"encoder_hidden_states": e}, {"encoder_hidden_states": ne}, (1, 4, 8, 8), {}))
    base = diffusers.EulerDiscreteScheduler(**sd, timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=tiny.vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=tiny.sdxl_unet(), scheduler=base)
    ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    out.append(("SDXL UNet", pipe, base, "euler",
                dict(prompt_embeds=e, negative_prompt_embeds=ne, pooled_prompt_embeds=p,
                     negative_pooled_prompt_embeds=npool, height=16, width=16),
                {"encoder_hidden_states": e, "added_cond_kwargs": {"text_embeds": p, "time_ids": ids}},
                {"encoder_hidden_states": ne, "added_cond_kwargs": {"text_embeds": npool, "time_ids": ids}},
                (1, 4, 8, 8), {}))
    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.StableDiffusion3Pipeline(transformer=tiny.sd3_transformer(), scheduler=base, vae=tiny.vae(),
                                              text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                              text_encoder_3=None, tokenizer_3=None)
    out.append(("SD3 transformer (shift 3)", pipe, base, "euler",
                dict(prompt_embeds=e, negative_prompt_embeds=ne, pooled_prompt_embeds=p,
                     negative_pooled_prompt_embeds=npool, height=16, width=16),
                {"encoder_hidden_states": e, "pooled_projections": p},
                {"encoder_hidden_states": ne, "pooled_projections": npool}, (1, 4, 8, 8), {}))
    base = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                     max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = diffusers.FluxPipeline(scheduler=base, vae=tiny.vae(), text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=tiny.flux_transformer())
    out.append(("Flux transformer (dynamic shift)", pipe, base, "euler",
                dict(prompt_embeds=e, pooled_prompt_embeds=p, height=32, width=32),
                {"encoder_hidden_states": e, "pooled_projections": p}, None, (1, 4, 16, 16), {"image_seq_len": 64}))
    return out


def run(pipe, scheduler, kwargs):  # noqa: ANN001, ANN201
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    extra = {} if isinstance(pipe, diffusers.FluxPipeline) else {"guidance_scale": GUIDANCE}
    x = pipe(num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(1),
             **extra, **kwargs).images
    if isinstance(pipe, diffusers.FluxPipeline):
        x = pipe._unpack_latents(x, kwargs["height"], kwargs["width"], pipe.vae_scale_factor)
    return x


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' notes on the tiny configs
    print(f"| family | vs diffusers ({STEPS} steps, same method) "
          "| vs fewstep.sample: euler / dpmpp_2m / heun / unipc |")
    print("|---|---|---|")
    for name, pipe, base, peer, kwargs, cond, uncond, shape, den_kw in families():
        want = run(pipe, type(base).from_config(base.config), kwargs)
        parity = rel(run(pipe, FewstepScheduler.from_config(base.config, solver=peer), kwargs), want)
        net = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        den = from_diffusers(net, base.config, **den_kw)
        if uncond is not None:
            den = ClassifierFreeGuidance(den, GUIDANCE, uncond=uncond)
        cells = []
        for solver in ("euler", "dpmpp_2m", "heun", "unipc"):
            scheduler = FewstepScheduler.from_config(base.config, solver=solver)
            got = run(pipe, scheduler, kwargs)
            x_init = randn_tensor(shape, generator=torch.Generator().manual_seed(1))
            ref = sample(den, solver, torch.tensor(scheduler._plan.times, dtype=torch.float64), x_init=x_init,
                         cond=cond)
            cells.append(f"{rel(got, ref):.1e}")
        print(f"| {name} | {type(base).__name__} = fewstep {peer}: {parity:.1e} | {' / '.join(cells)} |")


if __name__ == "__main__":
    main()
