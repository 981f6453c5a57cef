"""Models to run on: exact analytic denoisers and small trained models shipped with fewstep.

The trained models live in ``zoo/weights/<name>/`` in diffusers' ``save_pretrained`` layout (``unet/`` +
``scheduler/``) with a ``card.json``; :func:`load` builds a Denoiser from one offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fewstep.zoo.analytic import AnalyticDenoiser, GaussianMixture, digits, gaussian, gaussian_mixture

__all__ = ["WEIGHTS", "AnalyticDenoiser", "GaussianMixture", "digits", "gaussian", "gaussian_mixture",
           "list_models", "load", "load_classifier", "model_path"]

WEIGHTS = Path(__file__).parent / "weights"


def list_models() -> dict[str, dict[str, Any]]:
    """``{name: card}`` of every shipped model (diffusion models and the FD classifier)."""
    cards = {}
    for card in sorted(WEIGHTS.glob("*/card.json")):
        with open(card) as f:
            cards[card.parent.name] = json.load(f)
    return cards


def model_path(name_or_path: str | Path) -> Path:
    """The folder of a zoo model name, or a given folder; ``ValueError`` with a suggestion otherwise."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if any((WEIGHTS / str(name_or_path) / sub).is_dir() for sub in ("unet", "transformer")):
        return WEIGHTS / str(name_or_path)
    from fewstep.grids import suggest

    known = [n for n, c in list_models().items() if c.get("kind") != "classifier"]
    raise ValueError(f"unknown model {str(name_or_path)!r}{suggest(str(name_or_path), known)}; "
                     f"zoo models: {', '.join(known) or 'none'} (or pass a diffusers model folder)")


def load(name_or_path: str | Path):  # noqa: ANN201  (a ModelDenoiser; imported lazily)
    """A :class:`~fewstep.models.ModelDenoiser` for a zoo model name or a local diffusers folder (offline)."""
    from fewstep.models import from_diffusers

    return from_diffusers(str(model_path(name_or_path)))


def load_classifier():  # noqa: ANN201
    """The shipped digits classifier (features for the FD metric)."""
    from fewstep.zoo.classifier import DigitsClassifier

    folder = WEIGHTS / "classifier"
    if not (folder / "model.safetensors").is_file():
        raise ValueError("the digits classifier is not shipped in this install (zoo/weights/classifier)")
    return DigitsClassifier.load(folder)
