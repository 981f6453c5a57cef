"""Feature caches on random-weight copies of the architectures people run: the share of the network's work
skipped at a setting, and what it buys in CPU wall-clock.

Each model is a real diffusers class (SDXL-style ``UNet2DConditionModel`` with ``added_cond_kwargs``, DiT,
PixArt, SD3 and Flux transformers) with random weights at a reduced width and depth, on 32x32 latents (Flux:
64x64, i.e. 1024 packed tokens); text conditioning is random. Random weights make the samples meaningless, so
only the counted work (multiply-accumulates and attention products actually computed) and the time are reported;
exactness without reuse is what the tests pin (tests/test_caching_families.py). Time: median of ``--repeats``
rotations of the whole 20-step dpmpp_2m run, one thread, batch 2.

    python benchmarks/caching_architectures.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import diffusers
import torch

from fewstep import from_diffusers, sample
from fewstep.caching import CacheStats, cache_from_spec, magnitude_curve, make_cache

DDPM = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def _g(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def models() -> list[tuple[str, torch.nn.Module, dict[str, Any], dict[str, Any], tuple[int, ...]]]:
    torch.manual_seed(0)
    sdxl = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64, attention_head_dim=(4, 8, 8),
        addition_embed_type="text_time", addition_time_embed_dim=16, projection_class_embeddings_input_dim=32 + 6 * 16,
        norm_num_groups=32)
    sdxl_cond = {"encoder_hidden_states": _g(1, 77, 64, seed=1),
                 "added_cond_kwargs": {"text_embeds": _g(1, 32, seed=2),
                                       "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]])}}
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4,
                                          out_channels=8, num_layers=12, sample_size=32, patch_size=2,
                                          num_embeds_ada_norm=1000)
    pixart = diffusers.PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4,
                                                out_channels=8, num_layers=12, sample_size=32, patch_size=2,
                                                cross_attention_dim=128, caption_channels=64)
    pixart_cond = {"encoder_hidden_states": _g(1, 120, 64, seed=3), "encoder_attention_mask": torch.ones(1, 120)}
    sd3 = diffusers.SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=12,
                                          attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                          caption_projection_dim=128, pooled_projection_dim=32, out_channels=4,
                                          pos_embed_max_size=32)
    sd3_cond = {"encoder_hidden_states": _g(1, 77, 64, seed=4), "pooled_projections": _g(1, 32, seed=5)}
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=4, num_single_layers=8,
                                            attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                            pooled_projection_dim=32, guidance_embeds=False,
                                            axes_dims_rope=(8, 12, 12))
    flux_cond = {"encoder_hidden_states": _g(1, 128, 64, seed=6), "pooled_projections": _g(1, 32, seed=7)}
    return [("SDXL-style UNet2DConditionModel", sdxl, DDPM, sdxl_cond, (4, 32, 32)),
            ("DiTTransformer2DModel", dit, DDPM, {"class_labels": torch.tensor([1])}, (4, 32, 32)),
            ("PixArtTransformer2DModel", pixart, DDPM, pixart_cond, (4, 32, 32)),
            ("SD3Transformer2DModel", sd3, FLOW, sd3_cond, (4, 32, 32)),
            ("FluxTransformer2DModel", flux, FLOW, flux_cond, (4, 64, 64))]


UNET = ["deepcache:interval=3", "encoder:interval=3", "taylorseer:interval=3:order=2", "taylorseer:interval=3:branch=0"]
CHAIN = ["block:threshold=0.1", "block:threshold=0.3", "taylorseer:interval=3:order=2", "magcache:threshold=0.1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=None, help="comma-separated class names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | params (M) | cache | work computed | work skipped | time (s) | speedup |")
    print("|---|---|---|---|---|---|---|")
    for name, net, config, cond, shape in models():
        if args.models and not any(m in name for m in args.models.split(",")):
            continue
        net.eval()
        den = from_diffusers(net, config, image_seq_len=(shape[1] // 2) * (shape[2] // 2)) if config is FLOW \
            else from_diffusers(net, config)
        params = sum(p.numel() for p in net.parameters()) / 1e6
        specs = UNET if name.startswith("SDXL") else CHAIN
        dens: dict[str, Any] = {"none": den}
        for spec in specs:
            if spec.startswith("magcache"):  # its curve from two seeds (the conditioning is one prompt)
                curve = magnitude_curve(den, "dpmpp_2m", args.steps, shape=shape, seeds="1000-1001", cond=cond)
                spec_den = make_cache(den, "magcache", curve=curve, threshold=float(spec.split("=")[1]))
                dens[spec] = spec_den
                continue
            dens[spec], _ = cache_from_spec(den, spec, solver="dpmpp_2m", steps=args.steps, shape=shape, cond=cond)
        times: dict[str, list[float]] = {k: [] for k in dens}
        works: dict[str, float] = {}
        for _ in range(args.repeats):
            for key, d in dens.items():
                stats = CacheStats()
                t0 = time.perf_counter()
                with torch.no_grad():
                    sample(d, "dpmpp_2m", args.steps, shape=shape, seeds="0-1", cond=cond, grid="time_quadratic",
                           hooks=[stats])
                times[key].append(time.perf_counter() - t0)
                works[key] = stats.mean_work
        base = statistics.median(times["none"])
        for key in dens:
            t = statistics.median(times[key])
            print(f"| {name} | {params:.1f} | {key} | {works[key]:.2f} | {1 - works[key]:.2f} | {t:.2f} | "
                  f"{base / t:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
