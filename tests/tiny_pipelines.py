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
