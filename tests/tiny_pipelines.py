"""Tiny random-weight pipelines of the real diffusers / transformers classes, built in the tests (nothing is
downloaded): a CLIP tokenizer made from a character vocabulary, a one-layer CLIP text encoder, a two-level
UNet2DConditionModel and AutoencoderKL. Exactness and call counts are meaningful on them; image quality is not."""

import json
import string
from pathlib import Path

import diffusers
import torch
import transformers

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def clip_tokenizer(folder: Path, max_length: int = 16) -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer with no merges over lowercase letters, digits and a little punctuation."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(set(string.ascii_lowercase + string.digits + "!,.'")):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=max_length)


def stable_diffusion(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline (16x16 images, 8x8x4 latents) to ``folder``; returns it."""
    torch.manual_seed(seed)
    tok = clip_tokenizer(folder / "_tok")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=12, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=12, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=4, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        layers_per_block=1, sample_size=16)
    scheduler = diffusers.DDIMScheduler(**SD_BETAS, prediction_type=prediction_type, clip_sample=False)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def unet2d(channels: int = 1) -> diffusers.UNet2DModel:
    """A tiny unconditional UNet2DModel on 8x8 images with ``channels`` channels."""
    return diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)


def vae() -> diffusers.AutoencoderKL:
    """A two-level AutoencoderKL: 16x16 RGB images <-> 8x8x4 latents."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        layers_per_block=1, sample_size=16).eval()


def sd_unet() -> diffusers.UNet2DConditionModel:
    """An SD 1.x/2.x-style UNet2DConditionModel (cross-attention dim 12) on 8x8x4 latents."""
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=4, attention_head_dim=2).eval()


def sdxl_unet() -> diffusers.UNet2DConditionModel:
    """An SDXL-style UNet2DConditionModel: text_time additions (pooled text embeds of 12 + six time ids)."""
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12, norm_num_groups=4, attention_head_dim=2, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 12).eval()


def sd3_transformer(layers: int = 1) -> diffusers.SD3Transformer2DModel:
    """SD3 on 8x8x4 latents; the last of ``layers`` joint blocks is context-pre-only, as in SD3."""
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16).eval()


def flux_transformer() -> diffusers.FluxTransformer2DModel:
    """Flux with 2x2-packed 4-channel latents (16 packed channels), one double- and one single-stream block."""
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(2, 2, 4)).eval()


def dit_transformer() -> diffusers.DiTTransformer2DModel:
    """A class-conditional DiT with learned sigma (8 output channels for 4) and DiTPipeline's 1000 classes."""
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, norm_num_groups=2, num_embeds_ada_norm=1000).eval()


def sd3_pipeline(layers: int = 1) -> tuple[diffusers.StableDiffusion3Pipeline,
                                           diffusers.FlowMatchEulerDiscreteScheduler, dict, dict]:
    """A StableDiffusion3Pipeline without text encoders (embeddings passed directly) on :func:`sd3_transformer`,
    FlowMatch shift 3; returns ``(pipe, scheduler, cond, uncond)`` with random prompt embeddings (seeded 0)."""
    torch.manual_seed(0)
    net = sd3_transformer(layers)
    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=net, scheduler=base, vae=vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    cond = {"encoder_hidden_states": torch.randn(1, 5, 12), "pooled_projections": torch.randn(1, 12)}
    uncond = {"encoder_hidden_states": torch.randn(1, 5, 12), "pooled_projections": torch.randn(1, 12)}
    return pipe, base, cond, uncond


def sd3_text_pipeline(folder: Path) -> diffusers.StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline on :func:`sd3_transformer` with its two CLIP text encoders (hidden 6 each, so their
    hidden states and pooled projections concatenate to the transformer's 12) and no T5 (its part is zeros, as the
    pipeline makes it)."""
    torch.manual_seed(0)
    encoders, tokenizers = [], []
    for k in range(2):
        tok = clip_tokenizer(folder / f"_tok{k}")
        tokenizers.append(tok)
        encoders.append(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=len(tok), hidden_size=6, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, projection_dim=6, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval())
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=sd3_transformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(),
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_text_pipeline(folder: Path) -> diffusers.StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline on :func:`sdxl_unet` with its two CLIP text encoders (hidden 6 each: 12
    concatenated, the U-Net's cross-attention; CLIP-G's pooled projection 12, its text embeds)."""
    torch.manual_seed(0)
    toks = [clip_tokenizer(folder / f"_tok{k}") for k in range(2)]
    config = dict(vocab_size=len(toks[0]), hidden_size=6, intermediate_size=12, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae(), text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval(),
        text_encoder_2=transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**config, projection_dim=12)).eval(),
        tokenizer=toks[0], tokenizer_2=toks[1], unet=sdxl_unet(),
        scheduler=diffusers.EulerDiscreteScheduler(**SD_BETAS))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_call(cond: dict, uncond: dict, *, steps: int, guidance: float) -> dict:
    """The keywords of a guided 16x16 SD3 pipeline call with the embeddings of :func:`sd3_pipeline`."""
    return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["pooled_projections"],
            "negative_prompt_embeds": uncond["encoder_hidden_states"],
            "negative_pooled_prompt_embeds": uncond["pooled_projections"], "num_inference_steps": steps,
            "guidance_scale": guidance, "height": 16, "width": 16}
