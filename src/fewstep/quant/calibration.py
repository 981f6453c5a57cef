"""Activation ranges for quantization, gathered over the sampling trajectory, and the layers fed concatenations.

**Timestep-aware calibration** (:func:`calibrate`, ``mode="trajectory"``). A diffusion network's activations change
range along the sampling trajectory — noise-like inputs early, image-like late — so ranges measured at one time
clip the activations of others. Following *Q-Diffusion: Quantizing Diffusion Models* (Li et al., ICCV 2023), which
draws calibration inputs uniformly over the time steps of the full-precision model's sampling run (and
*Post-training Quantization on Diffusion Models*, Shang et al., CVPR 2023, which first made calibration
time-aware), we run the given solver over the given grid on calibration seeds with the float network and observe
the input of every ``nn.Linear``/``nn.Conv2d`` at **every** network evaluation: each step counts once, and a
layer's range is the union of its per-evaluation ranges.

**Naive calibration at one time** (``mode="single"``), the baseline it is measured against: the same run, but only
the evaluations at one grid time are observed — those at the grid time nearest ``t`` (default: the middle step).
The states are the float network's own trajectory states at that time, so the baseline differs from the
timestep-aware calibration in the times it sees, and in nothing else.

**Split concatenations** (Q-Diffusion's shortcut splitting). A U-Net's up-block resnet reads
``cat([deep features, skip])`` whose two parts have ranges that differ by an order of magnitude; one range for the
whole input wastes most of the levels of the narrower part. During one evaluation a ``TorchFunctionMode`` tags every
tensor ``torch.cat`` makes with its part sizes, and carries the tag through channel-wise operations (group norm,
SiLU and friends, ``contiguous``, casts); a layer whose input carries a tag on its own channel axis is *split*:
each part gets its own range (and, in :func:`fewstep.quant.quantize`, its own weight scales). This finds the
concatenation wherever the model makes it, with no knowledge of a block's channel bookkeeping: in diffusers'
``ResnetBlock2D`` both ``conv1`` (after norm and SiLU) and ``conv_shortcut`` (on the raw concatenation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.overrides import TorchFunctionMode

from fewstep.grids import DEFAULT_GRID, explicit, make_grid
from fewstep.models.adapter import ModelDenoiser
from fewstep.models.base import Cond, Denoiser, Run
from fewstep.models.guidance import ClassifierFreeGuidance

__all__ = ["HESSIAN_COLUMNS", "HESSIAN_SAMPLES", "NEVER_RAN", "TARGETS", "ActivationRanges", "CalibrationSession",
           "InputObserver", "calibrate", "channel_dim", "columns", "find_splits", "layer_rows", "network_of",
           "target_layers"]

TARGETS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
"""The layers quantized: weights always, inputs for the schemes that quantize activations."""

MODES = ("trajectory", "single")

_CATS: frozenset[Callable[..., Any]] = frozenset({torch.cat, torch.concat, torch.concatenate})
# channel-wise operations: output channel c depends on input channel c (group norm, if groups straddle the parts,
# mixes their statistics, but each channel keeps its own affine and the part boundary stays where it was)
_CHANNELWISE: frozenset[Callable[..., Any]] = frozenset({
    F.silu, F.gelu, F.relu, F.mish, F.leaky_relu, F.group_norm, F.dropout, torch.sigmoid, torch.tanh,
    torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16,
    torch.Tensor.clone,
})


def network_of(den: Denoiser, who: str = "quantize") -> ModelDenoiser:
    """The :class:`ModelDenoiser` under ``den``'s guidance, holding an ``nn.Module``; ``TypeError`` otherwise."""
    while isinstance(den, ClassifierFreeGuidance):
        den = den.inner
    if not isinstance(den, ModelDenoiser) or not isinstance(den.model, nn.Module):
        raise TypeError(f"{who} needs a fewstep ModelDenoiser around an nn.Module (from_diffusers, fewstep.zoo.load), "
                        f"optionally under ClassifierFreeGuidance; got {type(den).__name__} (add caches after "
                        f"quantizing)")
    return den


def target_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every ``nn.Linear`` and ``nn.Conv2d`` of ``net``, in module order."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, TARGETS)]


def channel_dim(layer: nn.Module, x: torch.Tensor) -> int:
    """The channel axis of a layer's input: the last for ``nn.Linear``, ``-3`` for ``nn.Conv2d`` (batched or not)."""
    return x.ndim - 1 if isinstance(layer, nn.Linear) else x.ndim - 3


class _CatTracker(TorchFunctionMode):
    """Tags the tensors ``torch.cat`` makes with ``(axis, part sizes)`` and passes tags through channel-wise ops."""

    def __init__(self) -> None:
        super().__init__()
        self._tags: dict[int, tuple[torch.Tensor, int, tuple[int, ...]]] = {}

    def tag_of(self, x: torch.Tensor) -> tuple[int, tuple[int, ...]] | None:
        entry = self._tags.get(id(x))
        return None if entry is None or entry[0] is not x else (entry[1], entry[2])

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.ndim == 0:
            return out
        if func in _CATS:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            if isinstance(dim, int):
                axis = dim % out.ndim
                sizes = tuple(t.shape[axis] for t in tensors
                              if isinstance(t, torch.Tensor) and t.ndim == out.ndim and t.shape[axis] > 0)
                if len(sizes) > 1 and sum(sizes) == out.shape[axis]:
                    self._tags[id(out)] = (out, axis, sizes)  # the reference keeps the id unique while tracking
        elif func in _CHANNELWISE and args and isinstance(args[0], torch.Tensor):
            tag = self.tag_of(args[0])
            if tag is not None and out.shape == args[0].shape:
                self._tags[id(out)] = (out, *tag)
        return out


class CalibrationSession:
    """What the observers of one calibration share: whether this evaluation is observed, the cat tracker of the
    evaluation that finds the splits, whether (and up to how many columns) to gather Hessians."""

    def __init__(self, split: bool, hessians: int = 0, hessian_samples: int = 0) -> None:
        self.split = split
        self.hessians = hessians  # 0: none; else the most columns a layer's Hessian may have
        self.hessian_samples = hessian_samples  # the most samples of one evaluation's batch a Hessian takes
        self.active = False
        self.tracker: _CatTracker | None = None
        self.calls = 0
        self.times: list[float] = []


def columns(layer: nn.Module) -> int:
    """Input columns of a layer's weight matrix: ``in_features``, or ``in_channels / groups x kernel size``."""
    w = layer.weight
    return int(w[0].numel())


def layer_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as the rows its weight matrix multiplies (rows x :func:`columns`): the last axis of a linear
    layer's input, the unfolded patches of an ungrouped convolution's (``F.unfold``, the order of
    ``weight.flatten(1)``)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if x.ndim == 3:
        x = x.unsqueeze(0)
    u = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # B, C k k, L
    return u.transpose(1, 2).reshape(-1, u.shape[1])


class InputObserver:
    """Forward pre-hook on one layer: per-part running min/max of its input over the observed evaluations, and,
    when the session asks, the running sum of ``x x^T`` over its input rows (:func:`layer_rows`)."""

    def __init__(self, session: CalibrationSession) -> None:
        self.session = session
        self.sizes: tuple[int, ...] | None = None
        self.count = 0
        self.lo: list[torch.Tensor] = []
        self.hi: list[torch.Tensor] = []
        self.xtx: torch.Tensor | None = None
        self.rows = 0
        self.no_hessian: str | None = None

    def __call__(self, layer: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        s = self.session
        if s.tracker is not None and s.split and self.sizes is None:
            tag = s.tracker.tag_of(x)
            if tag is not None and tag[0] == channel_dim(layer, x):
                self.sizes = tag[1]
        if not s.active:
            return
        self.count += 1
        parts = x.detach().split(self.sizes, channel_dim(layer, x)) if self.sizes else (x.detach(),)
        for i, part in enumerate(parts):
            lo, hi = torch.aminmax(part.float())
            if i < len(self.lo):
                self.lo[i], self.hi[i] = torch.minimum(self.lo[i], lo), torch.maximum(self.hi[i], hi)
            else:
                self.lo.append(lo)
                self.hi.append(hi)
        if s.hessians and self.no_hessian is None:
            self._hessian(layer, x.detach())

    def _hessian(self, layer: nn.Module, x: torch.Tensor) -> None:
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or not isinstance(layer.padding, tuple)
                                             or layer.padding_mode != "zeros"):
            self.no_hessian = "a grouped convolution, or one padded other than by explicit zeros"
            return
        if columns(layer) > self.session.hessians:
            self.no_hessian = f"{columns(layer)} input columns, over the Hessian limit of {self.session.hessians}"
            return
        batched = x.ndim == 4 if isinstance(layer, nn.Conv2d) else x.ndim > 1  # an unbatched conv input is C, H, W
        stride = -(-x.shape[0] // self.session.hessian_samples) if batched else 1
        x = x[::stride] if stride > 1 else x  # every k-th sample: both halves of a batched guided pass
        # products in the input's precision (float32 at least), summed over evaluations in float64
        r = layer_rows(layer, x if x.dtype == torch.float64 else x.float())
        xtx = (r.T @ r).double()
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.rows += r.shape[0]


class _Observed(Denoiser):
    """``den`` with its network's observers switched on at the observed times (every time: ``at=None``) and the
    cat tracker on during the first evaluation."""

    def __init__(self, inner: Denoiser, session: CalibrationSession, at: float | None) -> None:
        self.inner, self.session, self.at = inner, session, at
        self.schedule, self.required_cond = inner.schedule, inner.required_cond

    def for_run(self, run: Run) -> Denoiser:
        return _Observed(self.inner.for_run(run), self.session, self.at)

    def __call__(self, x: torch.Tensor, t: float, cond: Cond = None) -> torch.Tensor:
        s = self.session
        s.calls += 1
        s.active = self.at is None or t == self.at
        if s.active:
            s.times.append(float(t))
        if s.calls > 1 or not s.split:
            return self.inner(x, t, cond)
        with _CatTracker() as tracker:
            s.tracker = tracker
            try:
                return self.inner(x, t, cond)
            finally:
                s.tracker = None


@dataclass(frozen=True)
class ActivationRanges:
    """What :func:`calibrate` observed.

    Attributes:
        mode: ``"trajectory"`` or ``"single"``.
        ranges: layer name -> ``(lo, hi)`` of its input, one pair per part (one part unless split).
        splits: layer name -> channel sizes of the concatenated parts of its input (split layers only).
        counts: layer name -> network evaluations it was observed in (a guided run evaluates twice per call).
        nfe: denoiser evaluations of the calibration run.
        times: the time of every observed denoiser evaluation.
        hessians: layer name -> mean ``x x^T`` of its input rows over the observed evaluations (float64; gathered
            with ``hessians=True``, for :func:`fewstep.quant.gptq.gptq_round`).
        no_hessian: layer name -> why it has no Hessian (grouped convolution, too many columns).
    """

    mode: str
    ranges: dict[str, tuple[tuple[float, float], ...]]
    splits: dict[str, tuple[int, ...]]
    counts: dict[str, int]
    nfe: int
    times: tuple[float, ...]
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    no_hessian: dict[str, str] = field(default_factory=dict)


NEVER_RAN = "no Hessian: the layer never ran during calibration"

HESSIAN_SAMPLES = 32
"""Default most samples of each evaluation's batch a Hessian is gathered from (every k-th; Q-Diffusion calibrates
on 5120 inputs drawn over the trajectory; 32 samples x every step of a 10-step run x the positions of a feature map
is already more). The ranges see the whole batch."""

HESSIAN_COLUMNS = 4096
"""Default largest Hessian gathered (columns of a layer's weight matrix): 4096^2 float64 values are 128 MiB. Wider
layers are rounded to nearest (listed in ``ActivationRanges.no_hessian``)."""


def _attach(net: nn.Module, session: CalibrationSession) -> tuple[dict[str, InputObserver], list[Any]]:
    observers: dict[str, InputObserver] = {}
    handles = []
    for name, layer in target_layers(net):
        observers[name] = InputObserver(session)
        handles.append(layer.register_forward_pre_hook(observers[name]))
    if not observers:
        for h in handles:
            h.remove()
        raise ValueError(f"{type(net).__name__} has no nn.Linear or nn.Conv2d layer to quantize")
    return observers, handles


def calibrate(
    den: Denoiser,
    solver: Any,
    steps: int | torch.Tensor | Sequence[float],
    *,
    seeds: str | int | Sequence[int] = "1000-1127",
    cond: Cond = None,
    shape: Sequence[int] | None = None,
    grid: str = DEFAULT_GRID,
    mode: str = "trajectory",
    t: float | None = None,
    split: bool = True,
    hessians: bool = False,
    hessian_columns: int = HESSIAN_COLUMNS,
    hessian_samples: int = HESSIAN_SAMPLES,
) -> ActivationRanges:
    """Input ranges of every ``nn.Linear``/``nn.Conv2d`` of ``den``'s network over a sampling run (module docstring).

    Runs :func:`fewstep.sample` with ``solver`` over ``steps`` (a step count on ``grid``, or explicit times) from the
    calibration ``seeds`` (by default 128 seeds apart from the usual evaluation seeds 0..: ranges are extremes, and
    extremes of a few samples clip the tails of others), with ``cond``, and observes the
    float network's layer inputs at every evaluation (``mode="trajectory"``) or at the grid time nearest ``t`` only
    (``mode="single"``; default the middle step). ``shape`` defaults to ``den``'s ``sample_shape``.

    ``hessians=True`` also gathers, at the same evaluations, each layer's mean ``x x^T`` over its input rows (the
    GPTQ Hessian, :mod:`fewstep.quant.gptq`), for layers of at most ``hessian_columns`` input columns, from at most
    ``hessian_samples`` samples of each evaluation's batch (every k-th).

    The network is observed through forward pre-hooks that are removed before returning: its parameters and hooks
    are as they were (do not sample with the same network from another thread meanwhile).
    """
    from fewstep.sample import sample

    model_den = network_of(den, "calibrate")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if t is not None and mode != "single":
        raise ValueError("t= picks the time of mode='single'; a trajectory calibration sees every time")
    if not isinstance(split, bool):
        raise ValueError(f"split must be true or false, got {split!r}")
    if shape is None:
        shape = model_den.sample_shape
    schedule = den.schedule
    if isinstance(steps, bool):
        raise TypeError("steps must be a step count or a list of times")
    times = make_grid(grid, schedule, steps) if isinstance(steps, int) else explicit(schedule, steps)
    at = None
    if mode == "single":
        starts = times.tolist()[:-1]  # every step evaluates at its start; the last grid time is only reached
        target = starts[len(starts) // 2] if t is None else float(t)
        if t is not None and not schedule.t_min * (1 - 1e-12) <= target <= schedule.t_max * (1 + 1e-12):
            raise ValueError(f"t={t} is outside the schedule's times [{schedule.t_min:g}, {schedule.t_max:g}]")
        at = min(starts, key=lambda s: abs(s - target))
    for key, value in (("hessian_columns", hessian_columns), ("hessian_samples", hessian_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    session = CalibrationSession(split, hessian_columns if hessians else 0, hessian_samples)
    observers, handles = _attach(model_den.model, session)
    try:
        with torch.no_grad():
            sample(_Observed(den, session, at), solver, times, shape=shape, seeds=seeds, cond=cond)
    finally:
        for h in handles:
            h.remove()
    return ActivationRanges(
        mode=mode,
        ranges={name: tuple((float(lo), float(hi)) for lo, hi in zip(o.lo, o.hi, strict=True))
                for name, o in observers.items() if o.count},
        splits={name: o.sizes for name, o in observers.items() if o.sizes is not None},
        counts={name: o.count for name, o in observers.items()},
        nfe=session.calls,
        times=tuple(session.times),
        hessians={name: o.xtx / o.rows for name, o in observers.items() if o.xtx is not None and o.rows},
        no_hessian={name: o.no_hessian for name, o in observers.items() if o.no_hessian is not None},
    )


def find_splits(den: Denoiser, *, cond: Cond = None, shape: Sequence[int] | None = None,
                t: float | None = None) -> dict[str, tuple[int, ...]]:
    """Layer name -> channel sizes of the concatenated parts of its input, for every layer of ``den``'s network fed a
    concatenation (through channel-wise ops), found in one evaluation at ``t`` (default ``t_max``) on seeded noise of
    ``shape`` (default ``sample_shape``). The U-Net up blocks' skip concatenations, and also, for instance, the
    sine|cosine halves of a sinusoidal time embedding."""
    model_den = network_of(den, "find_splits")
    if shape is None:
        shape = model_den.sample_shape
    t = den.schedule.t_max if t is None else float(t)
    session = CalibrationSession(split=True)
    observers, handles = _attach(model_den.model, session)
    param = next(model_den.model.parameters(), None)
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)) * den.schedule.prior_std(t)
    x = x.to(device=None if param is None else param.device)
    try:
        with torch.no_grad():
            _Observed(den, session, at=-1.0)(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return {name: o.sizes for name, o in observers.items() if o.sizes is not None}
