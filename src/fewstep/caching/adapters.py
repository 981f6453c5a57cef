"""Block adapters: where a model family's blocks are and what a block takes and returns, read from the family
descriptions (:mod:`fewstep.models.families`), and the wrapper that puts a cache around each block.

A cache never replays a network's ``forward``: it replaces the block lists (``down_blocks``, ``mid_block``,
``up_blocks`` of a U-Net; ``transformer_blocks`` and Flux's ``single_transformer_blocks``) by wrappers that ask a
per-run engine whether to run the real block or return cached (or forecast) features, and the network's own
``forward`` runs around them. A U-Net is seen as ``down``/``mid``/``up`` positions; a transformer as one chain of
blocks (Flux: the double-stream blocks, then the single-stream ones).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fewstep.models.families import FAMILIES, Blocks, ModelFamily, family_of

__all__ = ["ADAPTERS", "BlockAdapter", "BlockCall", "CachedBlock", "adapter_of"]


class Engine(Protocol):
    def block(self, position: Any, block: torch.nn.Module, call: BlockCall) -> Any: ...


@dataclass
class BlockCall:
    """One call of a block: its arguments as the network passed them, and the names of the positional ones."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    takes: tuple[str, ...]
    unbatched: frozenset[str]

    def get(self, name: str) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        if name in self.takes and self.takes.index(name) < len(self.args):
            return self.args[self.takes.index(name)]
        return None

    @property
    def batch(self) -> int:
        return int(self.get("hidden_states").shape[0])

    def run(self, block: torch.nn.Module) -> Any:
        return block(*self.args, **self.kwargs)

    def subset(self, index: torch.Tensor) -> BlockCall:
        """The same call on the samples ``index`` only: every per-sample tensor (first dimension the batch)
        sliced, inside tuples, lists and dicts too; the family's unbatched inputs (Flux's rotary embedding)
        passed as they are."""
        batch = self.batch
        args = tuple(v if i < len(self.takes) and self.takes[i] in self.unbatched else _slice(v, index, batch)
                     for i, v in enumerate(self.args))
        kwargs = {k: v if k in self.unbatched else _slice(v, index, batch) for k, v in self.kwargs.items()}
        return BlockCall(args, kwargs, self.takes, self.unbatched)


def _slice(value: Any, index: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[index] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, tuple | list):
        return type(value)(_slice(v, index, batch) for v in value)
    if isinstance(value, Mapping):
        return {k: _slice(v, index, batch) for k, v in value.items()}
    return value


class CachedBlock(torch.nn.Module):
    """A block whose calls go through a cache engine, transparent to everything else: it shares the real block's
    parameter, buffer and submodule tables (so ``state_dict`` keys, ``named_modules``, attention processors, LoRA
    loading and ``.to()`` see the block as before), attribute reads fall through to the real block (DiT's head reads
    ``transformer_blocks[0].norm1``) and attribute writes go to it (FreeU sets ``b1`` on up blocks)."""

    def __init__(self, block: torch.nn.Module, position: Any, engine: Engine, takes: tuple[str, ...],
                 unbatched: frozenset[str]) -> None:
        super().__init__()
        own = self.__dict__
        own["_parameters"], own["_buffers"], own["_modules"] = block._parameters, block._buffers, block._modules
        own["_non_persistent_buffers_set"] = block._non_persistent_buffers_set
        own["training"] = block.training
        own["_cache"] = (block, position, engine, takes, unbatched)

    @property
    def real(self) -> torch.nn.Module:
        return self.__dict__["_cache"][0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        block, position, engine, takes, unbatched = self.__dict__["_cache"]
        return engine.block(position, block, BlockCall(args, kwargs, takes, unbatched))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_cache"][0], name)

    def __setattr__(self, name: str, value: Any) -> None:
        cache = self.__dict__.get("_cache")
        if cache is None:
            super().__setattr__(name, value)
            return
        setattr(cache[0], name, value)
        if name == "training":
            self.__dict__["training"] = value

    def __delattr__(self, name: str) -> None:
        delattr(self.__dict__["_cache"][0], name)


def _names(blocks: Blocks) -> tuple[str, ...]:
    return tuple(n.rstrip("*") for n in blocks.takes)


@dataclass(frozen=True)
class BlockAdapter:
    """How a cache sees one model family (:meth:`of_family`: read from its entry in the family registry).

    Attributes:
        family: the diffusers class name.
        kind: ``"unet"`` (positions ``("down", i)``, ``("mid", 0)``, ``("up", i)``) or ``"chain"`` (positions
            ``0..L-1`` over the block lists in the order ``forward`` runs them).
        lists: the family's block lists.
        streams: what a chain block returns, in order (``("hidden_states",)`` or
            ``("encoder_hidden_states", "hidden_states")``): the streams a chain cache carries.
        unbatched: block inputs that are not per sample.
        refused: conditioning a cache cannot honour (residuals added between blocks: ControlNet, T2I-Adapter;
            SD3's skipped layers).
    """

    family: str
    kind: str
    lists: tuple[Blocks, ...]
    streams: tuple[str, ...] = ("hidden_states",)
    unbatched: frozenset[str] = frozenset()
    refused: tuple[str, ...] = ()

    @classmethod
    def of_family(cls, family: ModelFamily) -> BlockAdapter:
        """The adapter a family's entry describes: its block lists and :class:`~fewstep.models.families.CacheLayout`
        (a chain carries the streams its blocks return)."""
        layout = family.cache
        if layout is None:
            raise TypeError(f"feature caches cannot wrap {family.name}: {family.no_cache}")
        streams = family.blocks[0].returns if layout.kind == "chain" else ("hidden_states",)
        return cls(family.name, layout.kind, family.blocks, streams, layout.unbatched, layout.refused)

    def positions(self, net: torch.nn.Module) -> list[tuple[Any, torch.nn.Module]]:
        """``(position, block)`` for every block of ``net``, in the order its ``forward`` runs them."""
        out: list[tuple[Any, torch.nn.Module]] = []
        for blocks in self.lists:
            held = _real(getattr(net, blocks.attr))
            if self.kind == "unet":
                role = blocks.attr.split("_")[0]
                items = [held] if blocks.single else list(held)
                out.extend(((role, i), _real(b)) for i, b in enumerate(items) if b is not None)
            else:
                base = len(out)
                out.extend((base + i, _real(b)) for i, b in enumerate(held))
        return out

    def length(self, net: torch.nn.Module) -> int:
        return len(self.positions(net))

    def check_cond(self, cond: Mapping[str, Any] | None) -> None:
        given = sorted(k for k in (cond or {}) if k in self.refused and cond[k] is not None)
        if given:
            raise ValueError(f"a feature cache cannot be used with {given} on {self.family}: they add residuals "
                             f"between the blocks a cache skips")

    def _wrapped_lists(self, net: torch.nn.Module, engine: Engine) -> dict[str, torch.nn.Module]:
        made: dict[str, torch.nn.Module] = {}
        index = 0
        for blocks in self.lists:
            held = getattr(net, blocks.attr)
            takes = _names(blocks)
            if blocks.single:
                if held is not None:
                    made[blocks.attr] = CachedBlock(_real(held), (blocks.attr.split("_")[0], 0), engine, takes,
                                                    self.unbatched)
                continue
            wrapped = []
            for i, b in enumerate(held):
                position = (blocks.attr.split("_")[0], i) if self.kind == "unet" else index
                index += 1
                wrapped.append(CachedBlock(_real(b), position, engine, takes, self.unbatched))
            made[blocks.attr] = torch.nn.ModuleList(wrapped)
        return made

    def wrap(self, net: torch.nn.Module, engine: Engine) -> torch.nn.Module:
        """A shallow copy of ``net`` (same parameters and submodules) whose block lists go through ``engine``;
        ``net`` itself is not modified."""
        if "forward" in net.__dict__:
            raise TypeError(f"this {type(net).__name__}'s forward was replaced on the instance (group offloading, "
                            f"accelerate's cpu offload or another hook library): a per-run copy would bypass it. "
                            f"Put the cache on the pipeline with fewstep.enable_cache(pipe, ...), or cache before "
                            f"offloading")
        clone = copy.copy(net)
        clone._modules = dict(net._modules)  # the copy's own module table: the original keeps its blocks
        for table in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                      "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            if table in net.__dict__:  # hooks registered on the copy stay on the copy
                clone.__dict__[table] = copy.copy(net.__dict__[table])
        for attr, module in self._wrapped_lists(net, engine).items():
            clone._modules[attr] = module
        return clone

    def wrap_in_place(self, net: torch.nn.Module, engine: Engine) -> dict[str, torch.nn.Module | None]:
        """Wrap ``net``'s own block lists (for a pipeline's network); returns what :meth:`unwrap` puts back."""
        original = {b.attr: net._modules[b.attr] for b in self.lists}
        for attr, module in self._wrapped_lists(net, engine).items():
            net._modules[attr] = module
        return original

    @staticmethod
    def unwrap(net: torch.nn.Module, original: Mapping[str, torch.nn.Module | None]) -> None:
        for attr, module in original.items():
            net._modules[attr] = module


def _real(block: Any) -> Any:
    return block.real if isinstance(block, CachedBlock) else block


def _adapters() -> dict[str, BlockAdapter]:
    """A block adapter for every family with a cache layout, in the registry's order."""
    return {f.name: BlockAdapter.of_family(f) for f in FAMILIES.values() if f.cache is not None}


ADAPTERS: dict[str, BlockAdapter] = _adapters()
"""Block adapters by diffusers class name, derived from :data:`fewstep.models.families.FAMILIES` (the entries with a
:class:`~fewstep.models.families.CacheLayout`)."""


def adapter_of(net: Any) -> BlockAdapter:
    """The block adapter of a diffusers network; a ``TypeError`` naming the supported classes for any other."""
    name = type(net).__name__
    try:
        family = family_of(net)
    except ValueError:
        family = None
    if family is None or family.name not in ADAPTERS:
        why = f" ({family.no_cache})" if family is not None and family.no_cache else ""
        raise TypeError(f"feature caches wrap the blocks of {', '.join(ADAPTERS)}; got {name}{why}")
    adapter = ADAPTERS[family.name]
    if adapter.kind == "unet" and any(hasattr(b, "skip_conv") for b in [*net.down_blocks, *net.up_blocks]):
        raise TypeError(f"{name} with skip-sample blocks (SkipDownBlock2D, ...) is not supported by the caches")
    return adapter


