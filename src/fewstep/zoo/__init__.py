"""Models to run on: exact analytic denoisers and small trained models shipped with fewstep.

The trained models live in ``zoo/weights/<name>/`` in diffusers' ``save_pretrained`` layout (``unet/`` +
``scheduler/``) with a ``card.json``; :func:`load` builds a Denoiser from one offline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fewstep.zoo.analytic import AnalyticDenoiser, GaussianMixture, digits, gaussian, gaussian_mixture

__all__ = ["WEIGHTS", "AnalyticDenoiser", "GaussianMixture", "digits", "gaussian", "gaussian_mixture",
           "list_models", "load", "load_classifier", "model_path", "read_card", "stamp_digests", "verify_digests",
           "write_card"]

WEIGHTS = Path(__file__).parent / "weights"


def list_models() -> dict[str, dict[str, Any]]:
    """``{name: card}`` of every shipped model (diffusion models and the FD classifier)."""
    return {card.parent.name: read_card(card.parent) for card in sorted(WEIGHTS.glob("*/card.json"))}


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_card(folder: str | Path, card: dict[str, Any]) -> Path:
    """Write ``card.json`` into ``folder`` atomically (a crash never leaves a truncated card behind)."""
    from fewstep.outputs import atomic_write

    text = json.dumps(card, indent=2).encode()
    return atomic_write(Path(folder) / "card.json", lambda f: f.write(text))


def read_card(folder: str | Path) -> dict[str, Any]:
    """The ``card.json`` of a model folder; a one-line ``ValueError`` when it is not a JSON object."""
    from fewstep.models.diffusers import load_json

    return load_json(Path(folder) / "card.json")


def stamp_digests(folder: str | Path) -> dict[str, str]:
    """Write the sha256 of every ``.safetensors`` file under ``folder`` into its ``card.json`` (``"sha256"``:
    relative path -> hex digest); returns them. Run after (re)training a model."""
    folder = Path(folder)
    card = read_card(folder)
    card["sha256"] = {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*.safetensors"))}
    write_card(folder, card)
    return card["sha256"]


def verify_digests(folder: str | Path) -> None:
    """Check the weights of a shipped model against the sha256 digests in its card.

    ``ValueError`` when the card lists no digests, a listed file is missing or differs, or a ``.safetensors``
    file is present that the card does not list (weights swapped or added after shipping).
    """
    folder = Path(folder)
    expected = read_card(folder).get("sha256")
    if not isinstance(expected, dict) or not expected:
        raise ValueError(f"{folder / 'card.json'} lists no sha256 digests of its weights")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")}
    extra = sorted(present - set(expected))
    if extra:
        raise ValueError(f"{folder} holds weights its card does not list: {', '.join(extra)}")
    for rel, digest in expected.items():
        path = folder / rel
        if not path.is_file():
            raise ValueError(f"{folder}: weights file {rel} listed in its card is missing")
        if _sha256(path) != digest:
            raise ValueError(f"{path} does not match the sha256 in its card (modified or corrupted weights)")


def load(name_or_path: str | Path):  # noqa: ANN201  (a ModelDenoiser; imported lazily)
    """A :class:`~fewstep.models.ModelDenoiser` for a zoo model name or a local diffusers folder (offline).

    A folder with a ``card.json`` (every shipped model) has its weights checked against the card's sha256
    digests first (:func:`verify_digests`)."""
    from fewstep.models import from_diffusers

    folder = model_path(name_or_path)
    if (folder / "card.json").is_file():
        verify_digests(folder)
    return from_diffusers(str(folder))


def load_classifier():  # noqa: ANN201
    """The shipped digits classifier (features for the FD metric), checked against its card's sha256."""
    from fewstep.zoo.classifier import DigitsClassifier

    folder = WEIGHTS / "classifier"
    if not (folder / "model.safetensors").is_file():
        raise ValueError("the digits classifier is not shipped in this install (zoo/weights/classifier)")
    verify_digests(folder)
    return DigitsClassifier.load(folder)
