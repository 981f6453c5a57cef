"""Model-card quality numbers: the FD of a zoo model's many-step samples, written into its ``card.json``.

It lives on the bench side (it needs :class:`~fewstep.metrics.DigitsFD`) so that the dependency runs one way:
``fewstep.bench`` uses ``fewstep.zoo``, never the reverse.

    fewstep zoo evaluate unet_m
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fewstep.zoo import read_card, write_card

__all__ = ["evaluate"]


def evaluate(name: str, folder: Path | None = None, *, steps: int = 1000, n: int = 512) -> dict[str, Any]:
    """FD of ``steps``-step sampling (DDPM ancestral for eps/v models, Euler for flow) of ``n`` samples against
    real digits, next to the real-vs-real floor at the same ``n``; written into the model's ``card.json``."""
    from fewstep.hooks import ProgressBar
    from fewstep.metrics import DigitsFD
    from fewstep.sample import sample
    from fewstep.zoo import WEIGHTS, load

    folder = Path(folder or WEIGHTS / name)
    den = load(folder)
    solver = "euler" if den.prediction == "flow" else "ddpm"
    # the class-conditional DiT samples the ten classes in turn (its null-label, unconditional mode saw only 10 %
    # of training and is much weaker: FD ~100)
    cond = {"class_labels": torch.arange(n) % 10} if den.default_cond else None
    x = sample(den, solver, steps, shape=(1, 8, 8), seeds=range(100_000, 100_000 + n), grid="time_uniform",
               hooks=[ProgressBar(f"{name} {solver}-{steps}")], cond=cond)
    fd = DigitsFD()
    result = {"schedule": repr(den.schedule), "prediction": den.prediction,
              "fd_1000_step": round(fd(x), 4), "fd_floor": round(fd.floor(n), 4), "fd_samples": n,
              "fd_solver": f"{solver}, {steps} steps, time_uniform grid"
              + (", class labels 0-9 in turn" if cond else "")}
    card = read_card(folder)
    card.update(result)
    write_card(folder, card)
    return result
