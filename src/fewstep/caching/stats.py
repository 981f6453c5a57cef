"""What a cache reports: per-evaluation reuse and the share of the network's work actually computed (work: the share of
a full evaluation's multiply-accumulates, counted by :class:`WorkMeter`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["CacheStats", "WorkMeter"]


class CacheStats:
    """Counts evaluations of the last run: ``full`` and ``reused`` (per grid step in ``steps``), and ``work``,
    the summed fraction of the network actually computed (of its multiply-accumulates, :class:`WorkMeter`; 1 per
    full evaluation). An evaluation counts as reused when every sample of it reused cached features; a partly
    reused batch counts as full with ``work < 1``. Under guidance each branch reports its own evaluations."""

    def __init__(self) -> None:
        self.full = self.reused = 0
        self.work = 0.0
        self.steps: list[tuple[int, bool]] = []

    def on_start(self, grid: torch.Tensor) -> None:
        self.full = self.reused = 0
        self.work = 0.0
        self.steps = []

    def on_cache(self, step: int, reused: bool, work: float) -> None:
        self.reused += int(reused)
        self.full += int(not reused)
        self.work += work
        self.steps.append((step, reused))

    @property
    def mean_work(self) -> float:
        """Mean fraction of the network computed per evaluation (1 when nothing was reused or nothing ran)."""
        calls = self.full + self.reused
        return self.work / calls if calls else 1.0

    @property
    def reused_steps(self) -> list[int]:
        return sorted({s for s, r in self.steps if r})


def _attention_macs(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Multiply-accumulates of the two attention products (``Q K^T`` and ``A V``) of a diffusers attention module
    called on ``hidden_states`` (and ``encoder_hidden_states``): ``2 B S_q S_k d``. Joint attention (SD3, Flux
    double blocks: added K/V projections) attends over image and text tokens together."""
    hs = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hs, torch.Tensor):
        return 0
    inner = getattr(module, "inner_dim", None)
    if inner is None:
        heads, head_dim = getattr(module, "heads", None), getattr(module, "head_dim", None)
        if heads is None or head_dim is None:
            return 0
        inner = heads * head_dim
    batch = hs.shape[0]
    tokens = hs.shape[2] * hs.shape[3] if hs.ndim == 4 else hs.shape[1]
    ehs = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    if isinstance(ehs, torch.Tensor) and getattr(module, "add_k_proj", None) is not None:
        q = k = tokens + ehs.shape[1]
    else:
        q, k = tokens, (ehs.shape[1] if isinstance(ehs, torch.Tensor) else tokens)
    return 2 * batch * q * k * int(inner)


class WorkMeter:
    """Multiply-accumulates of a network, in total and inside given parts (its blocks), counted on a forward:
    convolutions and linear layers (:attr:`DENSE`) by their output size, attention products by their token counts
    (the products of diffusers ``Attention`` modules, counted when the module's body ran: when one of its own
    layers did, so an attention a hook answered from a cache counts zero; an attention this does not recognise
    counts as zero). Counted only on the thread that armed it, so concurrent runs sharing the modules do not add to
    it. This is the unit of every cache's ``work`` (fewstep's and diffusers' hooks alike): the share of a full
    evaluation's multiply-accumulates that an evaluation computed."""

    DENSE: tuple[type[torch.nn.Module], ...] = (torch.nn.Conv2d, torch.nn.Linear)

    def __init__(self, net: torch.nn.Module, parts: dict[Any, torch.nn.Module]) -> None:
        self.net, self.parts = net, parts
        self.total = 0
        self.inside: dict[Any, int] = {}
        self._handles: list[Any] = []
        self._thread = 0
        self._dense_calls = 0
        self._open: list[int] = []  # dense calls counted when each attention in progress began

    @property
    def measured(self) -> bool:
        return self.total > 0

    def arm(self) -> None:
        """Count the next forwards (until :meth:`disarm`), from zero."""
        self.reset()
        owner: dict[int, Any] = {}
        for key, part in self.parts.items():
            for m in part.modules():
                owner[id(m)] = key
        for mod in self.net.modules():
            name = type(mod).__name__
            if isinstance(mod, self.DENSE):
                self._handles.append(mod.register_forward_hook(self._dense_hook(owner.get(id(mod)))))
            elif name.endswith("Attention") and hasattr(mod, "to_q"):
                self._handles.append(mod.register_forward_pre_hook(self._attention_begins))
                self._handles.append(mod.register_forward_hook(self._attention_hook(owner.get(id(mod))),
                                                               with_kwargs=True))

    def reset(self) -> None:
        """Count from zero again, on the calling thread (the hooks stay armed)."""
        self._thread = threading.get_ident()
        self.total, self.inside = 0, {}
        self._dense_calls, self._open = 0, []

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _add(self, key: Any, macs: int) -> None:
        if threading.get_ident() != self._thread:
            return
        self.total += macs
        if key is not None:
            self.inside[key] = self.inside.get(key, 0) + macs

    def _dense_hook(self, key: Any) -> Callable[[torch.nn.Module, Any, torch.Tensor], None]:
        def hook(m: torch.nn.Module, inp: Any, out: torch.Tensor) -> None:
            per_out = m.in_features if isinstance(m, torch.nn.Linear) else (
                m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
            if threading.get_ident() == self._thread:
                self._dense_calls += 1
            self._add(key, out.numel() * per_out)
        return hook

    def _attention_begins(self, m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() == self._thread:
            self._open.append(self._dense_calls)

    def _attention_hook(self, key: Any) -> Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def hook(m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if threading.get_ident() != self._thread or not self._open:
                return
            if self._dense_calls > self._open.pop():  # its projections ran: the products were computed
                self._add(key, _attention_macs(m, args, kwargs))
        return hook

    def share(self, keys: Iterable[Any]) -> float:
        """Fraction of the network's work inside the parts ``keys``."""
        if not self.total:
            return 0.0
        return sum(self.inside.get(k, 0) for k in keys) / self.total
