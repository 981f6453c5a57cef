"""Conditioning sources: what a run conditions on, as one object that gives the conditioning for a list of seeds
and its own fingerprint for a store.

A source is parsed once, at the edge (a ``--label`` flag, an experiment's ``labels`` field), and checked against
the model before anything runs. Today there is one kind, :class:`Labels` (class labels of a class-conditional
model: a DiT, or a U-Net with class embeddings); ``None`` is the model's own default conditioning (a DiT's null
label). The negative conditioning of guidance is the model's default null condition
(:class:`~fewstep.models.ClassifierFreeGuidance`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.models.base import Cond, Denoiser
from fewstep.noise import parse_seeds

__all__ = ["Labels", "class_count"]


def class_count(den: Denoiser, *, what: str = "labels") -> int:
    """The number of classes of a class-conditional model (a DiT's null label sits at index ``num_classes``; a
    class-conditional ``UNet2DModel`` has none); a one-line ``ValueError`` for other models."""
    default = getattr(den, "default_cond", {}) or {}
    config = getattr(getattr(den, "model", None), "config", {})
    if "class_labels" in default:
        return int(default["class_labels"])
    if getattr(config, "num_class_embeds", None):
        return int(config.num_class_embeds)
    raise ValueError(f"{what} needs a class-conditional model (e.g. dit_s); this one takes no class labels")


@dataclass(frozen=True)
class Labels:
    """Class labels for the seeds of a run, from a spec: an int (``"3"``), a list or range (``"0-4"``,
    ``"1,3,5"``) cycled over the seeds, or ``"cycle"`` (every class in turn). ``what`` names the source in errors
    (``"--label"`` on the command line)."""

    spec: str
    what: str = "labels"

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ValueError(f"{self.what} must be an integer class, a list or range of them, or 'cycle', "
                             f"got {self.spec!r}")
        if self.spec != "cycle":
            self.values()

    def values(self) -> list[int]:
        """The listed classes (not for ``cycle``)."""
        try:
            return parse_seeds(self.spec)
        except ValueError:
            raise ValueError(f"{self.what} must be an integer class, a list or range of them, or 'cycle', "
                             f"got {self.spec!r}") from None

    def check(self, den: Denoiser) -> int:
        """The model's class count, once the labels are known to be in its range (else a one-line error)."""
        classes = class_count(den, what=self.what)
        if self.spec != "cycle":
            bad = [v for v in self.values() if not 0 <= v < classes]
            if bad:
                raise ValueError(f"{self.what} {bad[0]} is out of range: this model has classes 0-{classes - 1}")
        return classes

    def cond(self, den: Denoiser, n: int) -> Cond:
        """``{"class_labels": ...}`` for ``n`` seeds, in seed order."""
        classes = self.check(den)
        if self.spec == "cycle":
            return {"class_labels": torch.arange(n) % classes}
        values = self.values()
        return {"class_labels": torch.tensor(values)[torch.arange(n) % len(values)]}

    @property
    def fingerprint(self) -> str:
        """What the conditioning depends on, for a store's keys: the spec."""
        return f"labels={self.spec}"

    @classmethod
    def of(cls, spec: str | None, *, what: str = "labels") -> Labels | None:
        """The source of an optional spec: ``None`` or ``""`` is the model's default conditioning."""
        return None if spec is None or spec == "" else cls(spec, what)
