"""Train the zoo's models on sklearn's bundled 8x8 digits, reproducibly, and save them in diffusers' layout.

Each diffusion model is a diffusers ``UNet2DModel`` saved with ``save_pretrained`` (``unet/``) beside its
scheduler config (``scheduler/``), so ``from_diffusers(folder)`` and diffusers' own pipelines load it offline.
Recipe (measured feasible on 2 CPU cores): AdamW, linear warm-up then cosine decay, batch 128, EMA 0.999 of the
weights (the EMA is what is saved), fixed seed, one thread.

    fewstep zoo train unet_m            # or: python -m fewstep.zoo.train unet_m
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fewstep.data import digits_tensor
from fewstep.zoo import stamp_digests, write_card

__all__ = ["SPECS", "ModelSpec", "classifier_split", "train"]

WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelSpec:
    """What a zoo model is and how it is trained."""

    name: str
    kind: str  # "eps" | "v" | "flow" | "classifier"
    channels: tuple[int, ...] = (32, 64)
    iters: int = 5000
    lr: float = 1e-3
    seed: int = 0
    description: str = ""
    extra: dict = field(default_factory=dict)


SPECS: dict[str, ModelSpec] = {
    "unet_s": ModelSpec("unet_s", "eps", (16, 32), 6000, 2e-3, description="smallest of the eps family"),
    "unet_m": ModelSpec("unet_m", "eps", (32, 64), 5000, 1e-3, description="middle of the eps family (default)"),
    "unet_l": ModelSpec("unet_l", "eps", (64, 128), 4000, 5e-4, description="largest of the eps family"),
    "unet_v": ModelSpec("unet_v", "v", (32, 64), 4000, 1e-3, description="v-prediction, same size as unet_m"),
    "unet_flow": ModelSpec("unet_flow", "flow", (32, 64), 4000, 1e-3,
                           description="rectified flow (velocity), same size as unet_m"),
    "unet_mr": ModelSpec("unet_mr", "eps", (32, 64), 5000, 1e-3, extra={"multires": True},
                         description="unet_m trained on 8x8 digits and on their 4x4 average-pooled versions (half "
                                     "the batches each): a multi-resolution model for bottleneck sampling"),
    "dit_s": ModelSpec("dit_s", "dit", (64,), 5000, 1e-3,
                       description="class-conditional DiT (diffusers DiTTransformer2DModel, patch 2, 4 blocks, "
                                   "width 64); pass class_labels 0-9; label 10 = unconditional (10 % label "
                                   "dropout; weak alone, FD ~100) for guidance"),
    "classifier": ModelSpec("classifier", "classifier", (), 3000, 2e-3,
                            description="digits classifier; its 64-d penultimate features define the FD metric"),
}


def classifier_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The classifier's fixed split of the digits: 1400 for training, 397 held out."""
    data, labels = digits_tensor()
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(1234))
    return (data[perm[:1400]], labels[perm[:1400]]), (data[perm[1400:]], labels[perm[1400:]])


def _unet(channels: tuple[int, ...]):  # noqa: ANN202
    import diffusers

    n = len(channels)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=channels,
                                 layers_per_block=1, down_block_types=("DownBlock2D",) * n,
                                 up_block_types=("UpBlock2D",) * n, norm_num_groups=8)


def _dit(width: int):  # noqa: ANN202
    import diffusers

    return diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=width // 4, in_channels=1,
                                           out_channels=1, num_layers=4, sample_size=8, patch_size=2,
                                           num_embeds_ada_norm=10, norm_num_groups=8)


def _lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(name: str, out_dir: Path | None = None, *, iters: int | None = None, log_every: int = 500) -> Path:
    """Train zoo model ``name`` (see :data:`SPECS`) for ``iters`` iterations (default: the spec's) and save it
    under ``out_dir`` (default: the package's weights). The FD written into model cards is measured on the bench
    side: :func:`fewstep.bench.cards.evaluate`."""
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if name not in SPECS:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(SPECS)}")
    import diffusers

    from fewstep.zoo.classifier import DigitsClassifier

    spec = SPECS[name]
    iters = spec.iters if iters is None else iters
    out = Path(out_dir or WEIGHTS) / name
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot write the model to {out}: it is a file")
    out.mkdir(parents=True, exist_ok=True)  # before training: a bad --out must not cost the run
    torch.manual_seed(spec.seed)
    torch.set_num_threads(1)
    data, labels = digits_tensor()
    g = torch.Generator().manual_seed(spec.seed)
    held_out = None
    if spec.kind == "classifier":  # train on 1400 digits, report accuracy on the other 397
        (data, labels), held_out = classifier_split()
    if spec.kind == "classifier":
        model = DigitsClassifier()
    elif spec.kind == "dit":
        model = _dit(spec.channels[0])
    else:
        model = _unet(spec.channels)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0 if spec.kind != "classifier" else 1e-4)
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)
    t0 = time.time()
    running = 0.0
    for step in range(iters):
        for group in opt.param_groups:
            group["lr"] = _lr(step, iters, spec.lr)
        idx = torch.randint(0, data.shape[0], (128,), generator=g)
        x0 = data[idx]
        if spec.extra.get("multires") and step % 2 == 1:
            x0 = torch.nn.functional.avg_pool2d(x0, 2)
        if spec.kind == "classifier":
            # light augmentation: small noise, so features are robust to sampler noise
            inp = x0 + 0.1 * torch.randn(x0.shape, generator=g)
            loss = torch.nn.functional.cross_entropy(model(inp), labels[idx])
        else:
            eps = torch.randn(x0.shape, generator=g)
            if spec.kind == "flow":
                t = torch.rand(128, generator=g)
                xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
                pred = model(xt, t * 1000).sample
                target = eps - x0
            else:
                n = torch.randint(0, 1000, (128,), generator=g)
                a = ac[n].sqrt()[:, None, None, None]
                s = (1 - ac[n]).sqrt()[:, None, None, None]
                xt = a * x0 + s * eps
                # the DiT's label embedding drops 10 % of the labels to its null class while training
                pred = model(xt, n, class_labels=labels[idx]).sample if spec.kind == "dit" else model(xt, n).sample
                target = a * eps - s * x0 if spec.kind == "v" else eps
            loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(0.999).add_(v.detach(), alpha=0.001)
                else:
                    ema[k].copy_(v)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(f"{name}: step {step + 1}/{iters} loss {running:.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.load_state_dict(ema)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    card = {"name": name, "kind": spec.kind, "params": sum(p.numel() for p in model.parameters()),
            "iters": iters, "final_loss_ema": round(running, 5), "train_seconds": round(time.time() - t0, 1),
            "command": f"fewstep zoo train {name}", "description": spec.description, "spec": asdict(spec)}
    if spec.kind == "classifier":
        model.save(out)
        with torch.no_grad():
            card["train_accuracy"] = float((model(data).argmax(1) == labels).float().mean())
            card["held_out_accuracy"] = float((model(held_out[0]).argmax(1) == held_out[1]).float().mean())
    else:
        model.save_pretrained(out / ("transformer" if spec.kind == "dit" else "unet"))
        if spec.kind == "flow":
            sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        else:
            sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                            beta_end=0.02, prediction_type="v_prediction" if spec.kind == "v"
                                            else "epsilon", clip_sample=False)
        sched.save_pretrained(out / "scheduler")
    write_card(out, card)
    stamp_digests(out)  # the card carries the sha256 of the weights it describes; checked on every load
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a zoo model on sklearn digits.")
    parser.add_argument("name", choices=list(SPECS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    print(train(args.name, args.out, iters=args.iters))


if __name__ == "__main__":
    main()
