"""``quantize(den, scheme)``: a new Denoiser on a quantized copy of the network; the original is never modified.

Fake-quant schemes store each layer's weights rounded to the format in the network's own float dtype (per output
channel; per output channel and input part for a layer fed a concatenation, found while calibrating,
:mod:`fewstep.quant.calibration`), and quantize each layer's input per tensor (per part) with the calibrated range
in a forward pre-hook: they measure the quality of a format at any width, not its speed. torchao's schemes store
real int8/float8 tensors and run torchao's kernels (:mod:`fewstep.quant.kernels`); ``int8wo`` stores convolutions,
which torchao cannot, as int8 too (:mod:`fewstep.quant.conv`).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fewstep.models.adapter import ModelDenoiser
from fewstep.models.base import Denoiser
from fewstep.models.guidance import ClassifierFreeGuidance
from fewstep.quant.calibration import NEVER_RAN, ActivationRanges, calibrate, channel_dim, network_of, target_layers
from fewstep.quant.conv import Int8Conv2d
from fewstep.quant.formats import Format, FPFormat, IntFormat, absmax_scale, quantize_fp, quantize_int
from fewstep.quant.gptq import gptq_round
from fewstep.quant.kernels import apply_kernel
from fewstep.quant.records import LayerQuant, QuantInfo
from fewstep.quant.schemes import Scheme, parse_scheme

__all__ = ["CALIBRATION_KEYS", "ActQuant", "QuantizedDenoiser", "ends_of", "quantize", "rebuild", "round_to",
           "scale_count", "scale_matrix", "weights_bytes"]

CALIBRATION_KEYS = ("solver", "steps", "seeds", "cond", "shape", "grid")
"""What ``calibration=`` may hold: :func:`fewstep.quant.calibrate`'s run (``solver`` and ``steps`` required)."""

SCALE_BYTES = 4
"""Bytes of one stored fake-quant scale (float32, as torchao stores a float32 network's)."""


class QuantizedDenoiser(ModelDenoiser):
    """A :class:`ModelDenoiser` on a quantized network; ``quant`` says how (:class:`QuantInfo`)."""

    def __init__(self, *args: Any, quant: QuantInfo, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quant = quant

    def __repr__(self) -> str:
        return f"QuantizedDenoiser({type(self.model).__name__}, {self.quant.scheme!r}, {self.schedule!r})"


class ActQuant:
    """Forward pre-hook fake-quantizing a layer's input with fixed ranges, one per part of a split input.

    Integers: asymmetric per tensor, ``s = (hi - lo) / (2^b - 1)``, zero point ``z = round(-lo / s)`` (the range
    widened to hold 0, so zero padding stays exact); floating point: symmetric, ``s = max(|lo|, |hi|) / max``.
    """

    def __init__(self, fmt: Format, ranges: tuple[tuple[float, float], ...], sizes: tuple[int, ...] | None) -> None:
        self.fmt, self.sizes = fmt, sizes
        self.params: list[tuple[float, float]] = []
        for lo, hi in ranges:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            if isinstance(fmt, IntFormat):
                s = (hi - lo) / (2**fmt.bits - 1) or 1.0
                self.params.append((s, float(round(-lo / s))))
            else:
                self.params.append((max(-lo, hi) / fmt.max_value or 1.0, 0.0))

    def _q(self, x: torch.Tensor, i: int) -> torch.Tensor:
        s, z = self.params[i]
        if isinstance(self.fmt, IntFormat):
            return quantize_int(x, self.fmt.bits, scale=s, zero_point=z)
        return quantize_fp(x, self.fmt.exp_bits, self.fmt.man_bits, scale=s)

    def __call__(self, layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if self.sizes is None:
            return (self._q(x, 0), *args[1:])
        dim = channel_dim(layer, x)
        parts = [self._q(p, i) for i, p in enumerate(x.split(self.sizes, dim))]
        return (torch.cat(parts, dim), *args[1:])


def _check_calibration(scheme: Scheme, calibration: Any) -> dict[str, Any] | None:
    if calibration is None:
        if scheme.act is not None:
            raise ValueError(f"scheme {scheme.text!r} quantizes activations with calibrated ranges: pass "
                             f"calibration=dict(solver=..., steps=..., seeds=...) (the run the ranges come from)")
        if scheme.calibrated:
            raise ValueError(f"scheme {scheme.text!r} rounds weights by GPTQ under Hessians of a calibration run: "
                             f"pass calibration=dict(solver=..., steps=..., seeds=...), or use round=nearest")
        return None
    if not isinstance(calibration, Mapping):
        raise TypeError(f"calibration must be a dict with keys {', '.join(CALIBRATION_KEYS)}, "
                        f"got {type(calibration).__name__}")
    if not scheme.calibratable:
        raise ValueError(f"scheme {scheme.text!r} rounds weights to nearest and leaves activations in float: it "
                         f"takes no calibration; drop it (or use round=gptq, or a scheme such as 'w8a8')")
    unknown = sorted(set(calibration) - set(CALIBRATION_KEYS))
    if unknown:
        raise ValueError(f"unknown calibration key {unknown[0]!r}; expected {', '.join(CALIBRATION_KEYS)}")
    missing = [k for k in ("solver", "steps") if k not in calibration]
    if missing:
        raise ValueError(f"calibration needs {' and '.join(missing)} (the sampling run the ranges come from)")
    return dict(calibration)


def ends_of(den: ModelDenoiser, net: nn.Module) -> dict[str, str]:
    """The layers of ``net`` that read the noisy input and write the prediction, by its family's ``ends``
    (:mod:`fewstep.models.families`), with why each stays in float; empty for a network outside the families."""
    family = den.family
    if family is None:
        return {}
    names = dict(target_layers(net))
    why = ("reads the noisy input", "writes the prediction")
    return {name: f"kept in float (keep_ends): {why[min(i, 1)]}" for i, name in enumerate(family.ends)
            if name in names}


def quantize(den: Denoiser | str | os.PathLike, scheme: str, *, calibration: Mapping[str, Any] | None = None
             ) -> Denoiser:
    """``den`` with its network replaced by a quantized deep copy (:data:`~fewstep.quant.SCHEMES`; grammar and knobs
    in :mod:`fewstep.quant.schemes`). The original network's parameters stay bit-identical.

    Args:
        den: a :class:`ModelDenoiser` (or :class:`ClassifierFreeGuidance` over one, which is rebuilt around the
            quantized denoiser), or a zoo model name / diffusers folder (:func:`fewstep.zoo.load`).
        scheme: e.g. ``"int8wo"``, ``"w4a8"``, ``"fp:e2m1"``, ``"w8a8:calibration=single"``, ``"w4:round=nearest"``.
        calibration: the sampling run that calibrates the scheme:
            ``dict(solver=..., steps=..., seeds=..., cond=..., shape=..., grid=...)``
            (:func:`~fewstep.quant.calibrate`'s arguments). It gathers the activation ranges of the schemes that
            quantize activations, and the layer Hessians by which weights are rounded (GPTQ,
            :mod:`fewstep.quant.gptq`; every scheme whose weights GPTQ can round, all but ``fp8wo``
            (:attr:`~fewstep.quant.Scheme.gptq`), rounds by GPTQ when given a calibration, to nearest without). The
            scheme's knobs choose trajectory or single time.

    Returns:
        A :class:`QuantizedDenoiser` (``.quant`` says what was done), under the same guidance as ``den``.
    """
    parsed = parse_scheme(scheme)
    if isinstance(den, str | os.PathLike):
        from fewstep.zoo import load

        den = load(den)
    if isinstance(den, nn.Module):
        raise TypeError("quantize takes a Denoiser: wrap the network first, fewstep.from_diffusers(model, scheduler)")
    inner = network_of(den)
    cal = _check_calibration(parsed, calibration)
    rounding = parsed.rounding(cal is not None)
    ranges = None
    if cal is not None:
        solver, steps = cal.pop("solver"), cal.pop("steps")
        ranges = calibrate(den, solver, steps, mode=parsed.calibration, t=parsed.t, split=parsed.split,
                           hessians=rounding == "gptq", **cal)
    net = copy.deepcopy(inner.model)
    keep = ends_of(inner, net) if parsed.keep_ends else {}
    hessians = ranges.hessians if ranges is not None and rounding == "gptq" else None
    if parsed.kernel is not None:
        layers, skipped, nearest = apply_kernel(net, parsed.kernel, keep=keep, hessians=hessians)
    else:
        layers, skipped, nearest = _apply_fake(net, parsed, ranges, keep=keep, hessians=hessians)
    if ranges is not None and hessians is not None:
        nearest = {**nearest, **{k: v for k, v in ranges.no_hessian.items() if k in nearest}}
    info = QuantInfo(parsed.text, layers, skipped, ranges, rounding, nearest)
    return _rewrap(den, rebuild(inner, net, info))


def rebuild(den: ModelDenoiser, net: nn.Module, info: QuantInfo) -> QuantizedDenoiser:
    """A :class:`QuantizedDenoiser` on ``net`` (a quantized copy of ``den``'s network) described by ``info``, with
    everything else of ``den``: schedule, prediction, native time, dtype, family, and what ``from_diffusers``
    attached."""
    new = QuantizedDenoiser(net, den.schedule, prediction=den.prediction, native_time=den.native_time,
                            dtype=den.dtype, default_cond=den.default_cond, family=den.family,
                            sigma_data=den.sigma_data, quant=info)
    for key, value in vars(den).items():  # what from_diffusers attaches (shift_size, scheduler_config)
        if key not in vars(new):
            setattr(new, key, value)
    return new




def _rewrap(den: Denoiser, inner: QuantizedDenoiser) -> Denoiser:
    if isinstance(den, ClassifierFreeGuidance):
        return ClassifierFreeGuidance(_rewrap(den.inner, inner), den.scale, uncond=den.uncond)
    return inner


# --- fake quantization --------------------------------------------------------------------------------------------

def scale_matrix(w: torch.Tensor, fmt: Format, sizes: tuple[int, ...] | None = None, group: int | None = None
                 ) -> torch.Tensor:
    """Per-element scales of ``w``'s rows x columns matrix (``w.flatten(1)``): per output channel, and per input
    part (channel ``sizes`` along axis 1) for a layer fed a concatenation, and per ``group`` consecutive columns of
    a part (``None``: the whole part), ``max |w| / fmt.max_value`` over those weights of the channel."""
    parts = (w,) if sizes is None else w.split(sizes, 1)
    top = fmt.max_value
    scales = []
    for p in parts:
        cols = p.flatten(1)
        for chunk in (cols,) if group is None else cols.split(group, 1):
            scales.append(absmax_scale(chunk, top, axis=0).expand_as(chunk))
    return torch.cat(scales, 1)


def scale_count(w: torch.Tensor, sizes: tuple[int, ...] | None = None, group: int | None = None) -> int:
    """How many scales :func:`scale_matrix` stores for ``w``: output channels x parts x groups per part."""
    per_channel = w[0].numel() // w.shape[1]  # kernel positions per input channel
    widths = [w.shape[1]] if sizes is None else list(sizes)
    return w.shape[0] * sum(1 if group is None else math.ceil(c * per_channel / group) for c in widths)


def round_to(x: torch.Tensor, scales: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``x`` rounded to nearest on ``fmt``'s grid times ``scales`` (broadcast against ``x``)."""
    if isinstance(fmt, IntFormat):
        return quantize_int(x, fmt.bits, scale=scales)
    return quantize_fp(x, fmt.exp_bits, fmt.man_bits, scale=scales)


def _fake_round(w: torch.Tensor, fmt: Format, sizes: tuple[int, ...] | None, hessian: torch.Tensor | None,
                group: int | None = None) -> torch.Tensor:
    """``w`` on ``fmt``'s grid (per output channel, part and group): to nearest, or by GPTQ under ``hessian``."""
    w2 = w.detach().flatten(1)
    scales = scale_matrix(w.detach(), fmt, sizes, group)
    if hessian is None:
        q = round_to(w2, scales, fmt)
    else:
        q = gptq_round(w2, hessian, scales, lambda x, s: round_to(x, s, fmt))
    return q.view_as(w).to(w.dtype)


def _search(w: torch.Tensor, bits: int, sizes: tuple[int, ...] | None, group: int | None) -> FPFormat:
    """The ``E<e>M<bits-1-e>`` format (``e = 1 .. bits - 1``) with the least weight MSE rounded to nearest
    (*LLM-FP4: 4-Bit Floating-Point Quantized Transformers*, Liu et al., EMNLP 2023, search the exponent width per
    layer; ties go to the fewer exponent bits)."""
    best, best_err = None, math.inf
    ref = w.detach().double()
    for e in range(1, bits):
        fmt = FPFormat(e, bits - 1 - e)
        err = float((_fake_round(w, fmt, sizes, None, group).double() - ref).square().mean())
        if err < best_err:
            best, best_err = fmt, err
    assert best is not None
    return best


def _apply_fake(net: nn.Module, scheme: Scheme, ranges: ActivationRanges | None, *, keep: Mapping[str, str],
                hessians: Mapping[str, torch.Tensor] | None
                ) -> tuple[dict[str, LayerQuant], dict[str, str], dict[str, str]]:
    layers: dict[str, LayerQuant] = {}
    skipped: dict[str, str] = dict(keep)
    nearest: dict[str, str] = {}
    for name, layer in target_layers(net):
        if name in keep:
            continue
        w = layer.weight
        sizes = ranges.splits.get(name) if ranges is not None else None
        # a grouped conv's weight does not span the concatenated channels: only its input is split
        w_sizes = sizes if sizes is not None and w.shape[1] == sum(sizes) else None
        fmt: Format = _search(w, scheme.search_bits, w_sizes, scheme.group) if scheme.search_bits else scheme.weight
        hessian = None if hessians is None else hessians.get(name)
        if hessians is not None and hessian is None:
            nearest[name] = NEVER_RAN
        with torch.no_grad():
            w.copy_(_fake_round(w, fmt, w_sizes, hessian, scheme.group))
        act = None
        if scheme.act is not None and ranges is not None:
            if name in ranges.ranges:
                layer.register_forward_pre_hook(ActQuant(scheme.act, ranges.ranges[name], sizes))
                act = scheme.act.name
            else:
                skipped[name] = "input not quantized: the layer never ran during calibration"
        layers[name] = LayerQuant(fmt.name, fmt.bits, scale_count(w, w_sizes, scheme.group), act, sizes)
    return layers, skipped, nearest


# --- storage ------------------------------------------------------------------------------------------------------

def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor as stored: a tensor subclass (torchao's) by its inner tensors (int8 data, scales)."""
    # a traceable wrapper subclass (torch's protocol, whose test torch keeps private): it flattens to inner tensors
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__") and hasattr(t, "__tensor_unflatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weights_bytes(den: Denoiser | nn.Module) -> int:
    """Bytes of the network's stored weights (every parameter, once) as its format stores them: a fake-quant weight
    at its bits per value (int8 and fp8: 1 byte, int4 and fp4: 1/2) plus its float32 scales, a torchao weight by
    its int8/float8 data and scales, an :class:`~fewstep.quant.conv.Int8Conv2d` by its int8 codes (1 byte a weight)
    and float32 scales, everything else (biases, norms, float layers) at its dtype's size."""
    if isinstance(den, nn.Module):
        net, info = den, None
    else:
        inner = network_of(den, "weights_bytes")
        net, info = inner.model, getattr(inner, "quant", None)
    fake: dict[int, LayerQuant] = {}
    if info is not None:
        modules = dict(net.named_modules())
        for name, rec in info.layers.items():
            if rec.kernel is None and name in modules:
                fake[id(modules[name].weight)] = rec
    total = 0
    for p in net.parameters():
        rec = fake.get(id(p))
        if rec is None:
            total += _stored_bytes(p)
        else:
            total += math.ceil(p.numel() * rec.bits / 8) + SCALE_BYTES * rec.scales
    for m in net.modules():  # int8 convolutions keep their weights in buffers: int8 codes and float32 scales
        if isinstance(m, Int8Conv2d):
            total += _stored_bytes(m.qweight) + _stored_bytes(m.scale)
    return total
