"""Per-run cache engines: what the wrapped blocks ask on every call.

An engine holds one branch's state for one run. Each evaluation is opened with :meth:`begin` — the step (grid
index, or the pipeline scheduler's step), the network's time input per sample (the clock forecasts use), the batch
and the number of step slots — then the network's own ``forward`` runs and calls :meth:`block` for each block;
:meth:`end` says whether every sample reused and what share of the network's work was computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fewstep.caching.adapters import BlockAdapter, BlockCall
from fewstep.caching.policies import (
    FirstBlockThreshold,
    Forecast,
    MagnitudeRatio,
    MagnitudeState,
    Scheduled,
    Streams,
)
from fewstep.caching.stats import WorkMeter

__all__ = ["ChainEngine", "ChainRecipe", "Recipe", "UNetEngine", "UNetRecipe"]


class _Meters:
    """Measured work shares of one network, by input shape (measured once, on a full evaluation)."""

    def __init__(self) -> None:
        self.shares: dict[tuple[int, ...], dict[Any, float]] = {}


class _Engine:
    """What both engines share: the evaluation being run and the work it computed."""

    def __init__(self, net: torch.nn.Module, adapter: BlockAdapter, meters: _Meters) -> None:
        self.adapter, self.meters = adapter, meters
        self.parts = dict(adapter.positions(net))
        self.net = net
        self.step, self.slots, self.batch = 0, 1, 0
        self.clock = torch.zeros(0, dtype=torch.float64)
        self.skipped: dict[Any, float] = {}  # position -> share of the batch that skipped it this evaluation
        self._meter: WorkMeter | None = None
        self._shape: tuple[int, ...] = ()

    def begin(self, step: int, clock: torch.Tensor, batch: int, slots: int, shape: tuple[int, ...]) -> None:
        if self._meter is not None:  # an evaluation that raised never ended
            self._meter.disarm()
        self.step, self.slots, self.batch = int(step), int(slots), int(batch)
        self.clock = clock.detach().to("cpu", torch.float64).reshape(-1).expand(batch).clone()
        self.skipped = {}
        self._shape = shape
        self._meter = None
        self._open()

    def _open(self) -> None:
        raise NotImplementedError

    def _arm_if_full(self) -> None:
        """Count the work shares on this evaluation when it computes everything and they are not known yet."""
        if self._shape not in self.meters.shares and self._meter is None:
            self._meter = WorkMeter(self.net, self.parts)
            self._meter.arm()

    def end(self) -> tuple[bool, float]:
        """``(every sample reused, share of the network's work computed)``."""
        if self._meter is not None:
            self._meter.disarm()
            if not self.skipped and self._meter.measured:
                self.meters.shares[self._shape] = {k: self._meter.share([k]) for k in self.parts}
            self._meter = None
        shares = self.meters.shares.get(self._shape)
        if not self.skipped:
            return False, 1.0
        if shares is None:  # not measured (a first evaluation that reused): count blocks instead
            shares = {k: 1.0 / (len(self.parts) + 1) for k in self.parts}
        work = 1.0 - sum(shares.get(k, 0.0) * frac for k, frac in self.skipped.items())
        return self._all_reused(), max(0.0, min(1.0, work))

    def _all_reused(self) -> bool:
        raise NotImplementedError

    def block(self, position: Any, block: torch.nn.Module, call: BlockCall) -> Any:
        raise NotImplementedError


# -- U-Nets: scheduled reuse of whole-batch features ---------------------------------------------------------------

@dataclass(frozen=True)
class UNetRecipe:
    """A U-Net cache: on steps the schedule does not compute in full, the blocks at ``skip`` return their outputs
    of the last full evaluation; the output of ``forecast_at`` (the one the computed blocks read) is forecast to
    the current clock with a Taylor expansion of order ``order`` (0: reused as is)."""

    schedule: Scheduled
    skip: frozenset[Any]
    forecast_at: Any = None
    order: int = 0

    def engine(self, net: torch.nn.Module, adapter: BlockAdapter, meters: _Meters) -> UNetEngine:
        return UNetEngine(self, net, adapter, meters)


class UNetEngine(_Engine):
    def __init__(self, recipe: UNetRecipe, net: torch.nn.Module, adapter: BlockAdapter, meters: _Meters) -> None:
        super().__init__(net, adapter, meters)
        self.recipe = recipe
        self.store: dict[Any, Any] = {}
        self.forecast = Forecast(recipe.order)
        self.stored_batch = -1
        self.full: set[int] = set()
        self._slots_for = -1
        self.reuse = False

    def _open(self) -> None:
        if self.slots != self._slots_for:
            self.full, self._slots_for = self.recipe.schedule.full_set(self.slots), self.slots
        self.reuse = self.step not in self.full and self.stored_batch == self.batch
        if not self.reuse:
            self._arm_if_full()

    def _all_reused(self) -> bool:
        return True

    def block(self, position: Any, block: torch.nn.Module, call: BlockCall) -> Any:
        r = self.recipe
        if self.reuse and position in r.skip:
            self.skipped[position] = 1.0
            if position == r.forecast_at and r.order > 0:
                return self.forecast.predict(None, self.clock, like=(self.store[position],))[0]
            return _clone(self.store[position])  # the network may change what it gets in place (FreeU)
        out = call.run(block)
        if not self.reuse and position in r.skip:
            self.store[position] = _clone(out)  # before a later block changes it in place
            self.stored_batch = self.batch
            if position == r.forecast_at and r.order > 0:
                self.forecast.update(None, (out,), self.clock, self.batch)
        return out


# -- transformers: one chain of blocks -------------------------------------------------------------------------

@dataclass(frozen=True)
class ChainRecipe:
    """A transformer cache over the chain of blocks.

    ``first``: the first block always runs; a :class:`FirstBlockThreshold` decides per sample whether the rest
    runs or its residual (``h_L - h_1``, every stream) is reused / forecast. Otherwise the whole chain is skipped
    on reused steps and its residual (``h_L - h_0``) is reused / forecast, the steps chosen by ``schedule``
    (TaylorSeer) or ``magnitude`` (MagCache); ``record`` keeps the residual's mean token norm per evaluation
    (what :func:`~fewstep.caching.magnitude_curve` reads) and never reuses."""

    first: FirstBlockThreshold | None = None
    schedule: Scheduled | None = None
    magnitude: MagnitudeRatio | None = None
    order: int = 0
    record: list[tuple[float, float]] | None = None

    def engine(self, net: torch.nn.Module, adapter: BlockAdapter, meters: _Meters) -> ChainEngine:
        return ChainEngine(self, net, adapter, meters)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_clone(v) for v in value)
    return value


def _streams(out: Any) -> Streams:
    return tuple(out) if isinstance(out, tuple) else (out,)


def _pack(streams: Streams) -> Any:
    return streams if len(streams) > 1 else streams[0]


def _plus(a: Streams, b: Streams) -> Streams:
    return tuple(x if (x is None or y is None) else x + y for x, y in zip(a, b, strict=True))


def _minus(a: Streams, b: Streams) -> Streams:
    return tuple(None if (x is None or y is None) else x - y for x, y in zip(a, b, strict=True))


class ChainEngine(_Engine):
    def __init__(self, recipe: ChainRecipe, net: torch.nn.Module, adapter: BlockAdapter, meters: _Meters) -> None:
        super().__init__(net, adapter, meters)
        self.recipe = recipe
        self.length = len(self.parts)
        self.hidden = adapter.streams.index("hidden_states")
        self.forecast = Forecast(recipe.order)
        self.magnitude = None if recipe.magnitude is None else MagnitudeState(recipe.magnitude)
        self.full: set[int] = set()
        self._slots_for = -1
        # first-block mode, per sample
        self.ref: torch.Tensor | None = None
        self.streak: torch.Tensor | None = None
        self.reuse_rows = torch.zeros(0, dtype=torch.bool)
        self.r_now: torch.Tensor | None = None
        self.first_out: Streams = ()
        # whole-chain mode
        self.skip_all = False
        self.first_in: Streams = ()

    def _open(self) -> None:
        r = self.recipe
        self.reuse_rows = torch.zeros(self.batch, dtype=torch.bool)
        self.skip_all = False
        if r.first is None:
            ready = self.forecast.ready(self.batch)
            if r.magnitude is not None:
                assert self.magnitude is not None
                self.skip_all = self.magnitude.skip(self.step, self.slots, float(self.clock[0]), ready)
            elif r.schedule is not None:
                if self.slots != self._slots_for:
                    self.full, self._slots_for = r.schedule.full_set(self.slots), self.slots
                self.skip_all = ready and self.step not in self.full
        if not self.skip_all:
            self._arm_if_full()

    def _all_reused(self) -> bool:
        return self.skip_all or bool(self.reuse_rows.all())

    def block(self, position: Any, block: torch.nn.Module, call: BlockCall) -> Any:
        if self.recipe.first is None:
            return self._whole(position, block, call)
        return self._first(position, block, call)

    def _inputs(self, call: BlockCall) -> Streams:
        return tuple(call.get(name) for name in self.adapter.streams)

    def _whole(self, position: int, block: torch.nn.Module, call: BlockCall) -> Any:
        if self.skip_all:
            self.skipped[position] = 1.0
            inputs = self._inputs(call)
            if position == 0:
                return _pack(_plus(inputs, self.forecast.predict(None, self.clock, like=inputs)))
            return _pack(inputs)
        if position == 0:
            self.first_in = self._inputs(call)
        out = call.run(block)
        if position == self.length - 1:
            residual = _minus(_streams(out), self.first_in)
            self.forecast.update(None, residual, self.clock, self.batch)
            if self.recipe.record is not None:
                h = residual[self.hidden]
                assert h is not None
                self.recipe.record.append((float(self.clock[0]), float(h.float().norm(dim=-1).mean())))
            self.first_in = ()
        return out

    def _first(self, position: int, block: torch.nn.Module, call: BlockCall) -> Any:
        rule = self.recipe.first
        assert rule is not None
        if position == 0:
            inputs = self._inputs(call)
            out = call.run(block)
            outs = _streams(out)
            r = outs[self.hidden] - inputs[self.hidden]
            ready = self.forecast.ready_rows(self.batch)
            rows = rule.decide(r, self.ref, self.streak, self.step).cpu()
            self.reuse_rows = rows if ready is None else rows & ready
            self.r_now, self.first_out = r, outs
            return out
        reuse = self.reuse_rows
        inputs = self._inputs(call)
        if bool(reuse.any()):
            self.skipped[position] = float(reuse.float().mean())
        if not bool(reuse.any()):
            out_streams = _streams(call.run(block))
            computed = None
        else:
            kept = inputs
            if position == 1:
                idx = reuse.nonzero().flatten()
                kept = tuple(x if x is None else x.clone() for x in inputs)
                pred = self.forecast.predict(idx, self.clock, like=kept)
                for x, p in zip(kept, pred, strict=True):
                    if x is not None and p is not None:
                        x[idx.to(x.device)] = x[idx.to(x.device)] + p
            computed = (~reuse).nonzero().flatten()
            if computed.numel() == 0:
                if position == self.length - 1:
                    self._commit(computed, kept)
                return _pack(kept)
            sub = _streams(call.subset(computed.to(inputs[self.hidden].device)).run(block))
            merged: list[torch.Tensor | None] = []
            for x, y in zip(kept, sub, strict=True):
                if y is None:
                    merged.append(None)
                    continue
                full = x.clone() if x is not None and position != 1 else x
                full[computed.to(y.device)] = y
                merged.append(full)
            out_streams = tuple(merged)
        if position == self.length - 1:
            self._commit(computed, out_streams)
        return _pack(out_streams)

    def _commit(self, computed: torch.Tensor | None, outs: Streams) -> None:
        """After the last block: the residual of blocks 1.. and the first-block reference of the samples that
        ran them; the reuse streak of every sample."""
        rows = None if computed is None else computed
        if rows is not None and rows.numel() == 0:
            assert self.streak is not None
            self.streak = self.streak + 1
            self.r_now, self.first_out = None, ()
            return
        take: Callable[[torch.Tensor], torch.Tensor] = (lambda v: v) if rows is None else (
            lambda v: v[rows.to(v.device)])
        rest = tuple(None if (o is None or f is None) else take(o) - take(f)
                     for o, f in zip(outs, self.first_out, strict=True))
        self.forecast.update(rows, rest, self.clock, self.batch)
        assert self.r_now is not None
        if self.ref is None or self.ref.shape != self.r_now.shape:
            self.ref = self.r_now.clone()
            self.streak = torch.zeros(self.batch, dtype=torch.long)
        elif rows is None:
            self.ref = self.r_now.clone()
        else:
            self.ref[rows.to(self.ref.device)] = self.r_now[rows.to(self.r_now.device)]
        assert self.streak is not None
        self.streak = torch.where(self.reuse_rows, self.streak + 1, torch.zeros_like(self.streak))
        self.r_now, self.first_out = None, ()


Recipe = UNetRecipe | ChainRecipe
EngineFactory = Callable[[torch.nn.Module, BlockAdapter, _Meters], _Engine]
