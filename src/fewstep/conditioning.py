"""Conditioning sources: what a run conditions on, as one object that gives the conditioning for a list of seeds
and its own fingerprint for a store.

A source is parsed once, at the edge (a ``--label`` or ``--prompts`` flag, an experiment's ``labels`` field), and
checked against the model before anything runs. :class:`Labels`: class labels of a class-conditional model (a DiT,
or a U-Net with class embeddings), whose negative for guidance is the model's default null condition.
:class:`Prompts`: text prompts of a text-to-image pipeline, encoded by the pipeline's own encoders (once per prompt
and pipeline: Stable Diffusion 1.x/2.x, SDXL and SD3), with the negative prompt's conditioning for guidance. ``None`` is
the model's own default conditioning (a DiT's null label).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep.models.base import Cond, Denoiser
from fewstep.noise import parse_seeds

__all__ = ["Labels", "Prompts", "class_count", "detached"]


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


def detached(cond: Cond) -> Cond:
    """``cond`` with every tensor (in nested mappings too) detached from its autograd graph: embeddings computed
    with gradients on (``pipe.encode_prompt`` outside ``no_grad``) would otherwise tie every run to the text
    encoder's graph, and a differentiable run would backward through it twice."""
    if isinstance(cond, torch.Tensor):
        return cond.detach()
    if isinstance(cond, Mapping):
        return {k: detached(v) for k, v in cond.items()}
    return cond


# encoded prompts, by pipeline (dropped with it: its encoders, and for SDXL its default size, make the encoding) and
# by prompt text
_ENCODED: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Prompts:
    """Text prompts for the seeds of a run, cycled over them as :class:`Labels` are, and a negative prompt (``""``:
    the empty prompt, the unconditional branch of classifier-free guidance).

    :meth:`cond` and :meth:`negative_cond` encode with the pipeline's own ``encode_prompt`` under ``no_grad``, once
    per prompt text and pipeline, into the keywords the pipeline passes its network: Stable Diffusion 1.x/2.x
    (``encoder_hidden_states``), SDXL (also ``added_cond_kwargs``: pooled embeddings and the default call's time
    ids) and SD3 (also ``pooled_projections``; T5's part is zeros without T5, as in the pipeline). Other families
    (Flux's ids and guidance, PixArt, Sana) are refused in one line: pass their embeddings as ``cond`` instead.
    ``what`` names the source in errors (``"--prompts"``)."""

    texts: tuple[str, ...]
    negative: str = ""
    what: str = "prompts"

    def __post_init__(self) -> None:
        texts = (self.texts,) if isinstance(self.texts, str) else tuple(self.texts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"{self.what} must be one or more non-empty prompts, got {list(texts)!r}")
        if not isinstance(self.negative, str):
            raise ValueError(f"the negative prompt must be a string, got {self.negative!r}")
        object.__setattr__(self, "texts", tuple(t.strip() for t in texts))

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, negative: str = "", what: str = "--prompts") -> Prompts:
        """One prompt per line of a text file (blank lines skipped); a missing or empty file is a one-line error."""
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"{what} {file}: no such file")
        texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"{what} {file}: the file holds no prompt (one per line)")
        return cls(tuple(texts), negative, what)

    @property
    def fingerprint(self) -> str:
        """What the conditioning depends on, for a store's keys: a digest of the prompts and the negative prompt."""
        digest = hashlib.sha256("\n".join([*self.texts, "", self.negative]).encode()).hexdigest()[:16]
        return f"prompts={digest}"

    def check(self, pipe: Any) -> None:
        """A one-line error unless ``pipe`` encodes prompts the way :meth:`cond` reads them, and every prompt fits
        its tokenizers (a longer one would be truncated silently)."""
        layout = _layout(pipe, self.what)
        for name, limit in layout.tokenizers(pipe):
            tokenizer = getattr(pipe, name)
            for text in (*self.texts, self.negative):
                count = len(tokenizer(text).input_ids)
                if count > limit:
                    raise ValueError(f"{self.what}: {text!r} is {count} tokens, more than the tokenizer's {limit}: "
                                     f"it would be truncated; shorten it")

    def _encoded(self, pipe: Any, text: str) -> dict[str, Any]:
        cache = _ENCODED.setdefault(pipe, {})
        if text not in cache:
            with torch.no_grad():
                cache[text] = detached(_layout(pipe, self.what).encode(pipe, text))
        return cache[text]

    def cond(self, pipe: Any, n: int) -> Cond:
        """The conditioning of ``n`` seeds, prompt ``k % len(texts)`` for seed ``k``: the keywords the pipeline
        passes its network (``encoder_hidden_states``; SD3 also ``pooled_projections``)."""
        self.check(pipe)
        return _stack([self._encoded(pipe, self.texts[k % len(self.texts)]) for k in range(n)])

    def negative_cond(self, pipe: Any) -> Cond:
        """The negative prompt's conditioning (batch 1, broadcast over the seeds): guidance's unconditional branch."""
        self.check(pipe)
        return _stack([self._encoded(pipe, self.negative)])


def _encode_sd(pipe: Any, text: str) -> dict[str, torch.Tensor]:
    """Stable Diffusion 1.x/2.x: one CLIP encoder's hidden states."""
    emb, _ = pipe.encode_prompt(text, pipe.text_encoder.device, 1, False)
    return {"encoder_hidden_states": emb}


def _encode_sdxl(pipe: Any, text: str) -> dict[str, Any]:
    """SDXL: both CLIP encoders' hidden states, and ``added_cond_kwargs``: CLIP-G's pooled projection and the six
    time ids of the pipeline's default call (original and target size the default image size, no crop). The empty
    negative prompt is zeros where the pipeline's ``force_zeros_for_empty_prompt`` says so, as its call does."""
    emb, _, pooled, _ = pipe.encode_prompt(text, None, device=pipe.text_encoder.device, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    if text == "" and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        emb, pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
    size = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=emb.dtype, device=emb.device)
    return {"encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def _encode_sd3(pipe: Any, text: str) -> dict[str, torch.Tensor]:
    """SD3: CLIP-L and CLIP-G hidden states beside T5's (zeros without T5, as the pipeline does), and the pooled
    CLIP projections."""
    emb, _, pooled, _ = pipe.encode_prompt(text, None, None, device=pipe.text_encoder.device, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    return {"encoder_hidden_states": emb, "pooled_projections": pooled}


@dataclass(frozen=True)
class _Layout:
    """How one kind of pipeline encodes a prompt: the components it needs, and the reading of its
    ``encode_prompt`` into the network's keywords."""

    needs: tuple[str, ...]
    encode: Callable[[Any, str], dict[str, Any]]

    def tokenizers(self, pipe: Any) -> list[tuple[str, int]]:
        """The pipeline's tokenizers and how many tokens each takes (T5's: the pipeline's default 256)."""
        out = [(n, int(getattr(pipe, n).model_max_length)) for n in ("tokenizer", "tokenizer_2")
               if getattr(pipe, n, None) is not None]
        if getattr(pipe, "tokenizer_3", None) is not None:
            out.append(("tokenizer_3", 256))
        return out


_SD3, _SDXL, _SD = (_Layout(("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"), _encode_sd3),
                    _Layout(("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"), _encode_sdxl),
                    _Layout(("tokenizer", "text_encoder"), _encode_sd))


def _layout(pipe: Any, what: str) -> _Layout:
    """The layout of ``pipe``: SD3's (a third encoder slot, T5, which may be empty), SDXL's (a U-Net with a second
    CLIP encoder), or Stable Diffusion 1.x/2.x's (one CLIP encoder); other pipelines (Flux, PixArt, Sana) are refused
    in one line."""
    if not hasattr(pipe, "encode_prompt") or getattr(pipe, "tokenizer", None) is None or \
            getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"{what} need a text-to-image pipeline with a tokenizer and a text encoder; "
                         f"{type(pipe).__name__} has none")
    if hasattr(pipe, "text_encoder_3"):
        layout = _SD3
    elif getattr(pipe, "text_encoder_2", None) is None:
        layout = _SD
    elif getattr(pipe, "unet", None) is not None:
        layout = _SDXL
    else:
        raise ValueError(f"{what}: encoding prompts for {type(pipe).__name__} is not supported yet (Stable "
                         f"Diffusion 1.x/2.x, SDXL and SD3 pipelines are); pass its embeddings as cond instead")
    missing = [n for n in layout.needs if getattr(pipe, n, None) is None]
    if missing:
        raise ValueError(f"{what}: {type(pipe).__name__} has no {', '.join(missing)} to encode prompts with")
    return layout


def _stack(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-seed encodings as one batch, key by key (nested mappings too: SDXL's ``added_cond_kwargs``)."""
    return {key: _stack([p[key] for p in parts]) if isinstance(parts[0][key], Mapping)
            else torch.cat([p[key] for p in parts]) for key in parts[0]}
