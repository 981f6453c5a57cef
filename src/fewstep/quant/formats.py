"""Number formats for fake quantization: round a float tensor to the values a low-bit format can hold, in float.

Two families, both written from their definitions:

* **integers** of ``bits`` bits times a scale: symmetric signed ``q in [-2^(b-1), 2^(b-1) - 1]``, ``x_hat = s q``
  (weights, per output channel), or asymmetric unsigned with a zero point ``z``: ``q in [0, 2^b - 1]``,
  ``x_hat = s (q - z)`` (activations, per tensor);
* **floating point** ``E<e>M<m>`` (one sign bit, ``e`` exponent bits, ``m`` mantissa bits, bias ``2^(e-1) - 1``) times
  a scale: normal values ``(1 + M / 2^m) 2^(E - bias)``, subnormals ``(M / 2^m) 2^(1 - bias)`` for the exponent field
  ``E = 0``; rounding to nearest (ties to even), saturating at the format's largest finite value.

Which codes a format reserves (and so its largest value, :func:`fp_max`) follows the format's own standard:

* ``e >= 5``: IEEE 754 — the all-ones exponent field is inf/NaN (E5M2: 57344; E5M10 = float16: 65504);
* ``e == 4``: the OCP 8-bit floating point spec's E4M3 — no inf, only the all-ones code is NaN (E4M3: 448);
* ``e <= 3``: the OCP Microscaling (MX) spec's FP6/FP4 — every code finite (E3M2: 28, E2M3: 7.5, E2M1: 6, whose
  magnitudes are ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``).

References:
    *OCP 8-bit Floating Point Specification (OFP8)*, Open Compute Project, 2023 (E4M3, E5M2).
    *OCP Microscaling Formats (MX) Specification v1.0*, Open Compute Project, 2023 (FP6 E3M2/E2M3, FP4 E2M1).
    *FP8 Quantization: The Power of the Exponent*, Kuzmin et al., NeurIPS 2022 (the exponent/mantissa split as a
    per-layer choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FPFormat", "IntFormat", "absmax_scale", "fp_max", "fp_values", "parse_format", "quantize_fp",
           "quantize_int"]


def _bits(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


@dataclass(frozen=True)
class IntFormat:
    """``bits``-bit integers times a scale (see :func:`quantize_int`)."""

    bits: int

    def __post_init__(self) -> None:
        _bits("integer bits", self.bits, 2, 16)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def max_value(self) -> float:
        """The largest code a symmetric scale maps the absolute maximum to: ``2^(b-1) - 1``."""
        return float(2 ** (self.bits - 1) - 1)


@dataclass(frozen=True)
class FPFormat:
    """``E<exp_bits>M<man_bits>`` floating point times a scale (see :func:`quantize_fp`)."""

    exp_bits: int
    man_bits: int

    def __post_init__(self) -> None:
        _bits("exponent bits", self.exp_bits, 1, 8)
        _bits("mantissa bits", self.man_bits, 0, 23)

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def name(self) -> str:
        return f"e{self.exp_bits}m{self.man_bits}"

    @property
    def max_value(self) -> float:
        return fp_max(self.exp_bits, self.man_bits)


Format = IntFormat | FPFormat


def parse_format(text: str) -> Format:
    """``"int8"`` -> ``IntFormat(8)``, ``"e4m3"`` -> ``FPFormat(4, 3)``; ``ValueError`` otherwise."""
    import re

    if isinstance(text, str):
        if m := re.fullmatch(r"int(\d+)", text):
            return IntFormat(int(m[1]))
        if m := re.fullmatch(r"e(\d+)m(\d+)", text):
            return FPFormat(int(m[1]), int(m[2]))
    raise ValueError(f"unknown number format {text!r}: expected int<bits> (int8) or e<exp>m<man> (e4m3, e2m1)")


def fp_max(exp_bits: int, man_bits: int) -> float:
    """The largest finite value of ``E<exp_bits>M<man_bits>`` (the codes each standard reserves: module docstring)."""
    bias = 2 ** (exp_bits - 1) - 1
    top = 2**exp_bits - 1  # the all-ones exponent field
    if exp_bits >= 5:  # IEEE 754: the top field is inf/NaN
        return (2 - 2.0**-man_bits) * 2.0 ** (top - 1 - bias)
    if exp_bits == 4:  # OCP E4M3: only the all-ones code is NaN
        if man_bits == 0:
            return 2.0 ** (top - 1 - bias)
        return (2 - 2.0 ** (1 - man_bits)) * 2.0 ** (top - bias)
    return (2 - 2.0**-man_bits) * 2.0 ** (top - bias)  # OCP MX FP6/FP4: every code finite


def fp_values(exp_bits: int, man_bits: int) -> list[float]:
    """Every non-negative finite value of ``E<exp_bits>M<man_bits>``, ascending, enumerated code by code (the
    reference :func:`quantize_fp` is tested against)."""
    FPFormat(exp_bits, man_bits)
    bias, top = 2 ** (exp_bits - 1) - 1, fp_max(exp_bits, man_bits)
    out = set()
    for field in range(2**exp_bits):
        for mant in range(2**man_bits):
            frac = mant / 2**man_bits
            value = frac * 2.0 ** (1 - bias) if field == 0 else (1 + frac) * 2.0 ** (field - bias)
            if value <= top:
                out.add(value)
    return sorted(out)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def absmax_scale(x: torch.Tensor, top: float, axis: int | None = None) -> torch.Tensor:
    """``max |x| / top`` over the whole tensor (``axis=None``) or per index of ``axis`` (shaped to broadcast against
    ``x``); 1 where the maximum is 0, so all-zero channels stay zero instead of dividing by zero."""
    a = x.detach().to(_work_dtype(x)).abs()
    if axis is None:
        amax = a.amax()
    else:
        axis = axis % x.ndim
        amax = a.amax(dim=[d for d in range(x.ndim) if d != axis], keepdim=True) if x.ndim > 1 else a
    scale = amax / top
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int(
    x: torch.Tensor,
    bits: int,
    *,
    scale: torch.Tensor | float | None = None,
    zero_point: torch.Tensor | float | None = None,
    axis: int | None = None,
) -> torch.Tensor:
    """``x`` rounded to ``bits``-bit integers times ``scale``, returned in float (``x``'s dtype).

    * symmetric (``zero_point=None``): ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)``, ``x_hat = s q``;
    * asymmetric (``zero_point=z``): ``q = clamp(round(x / s) + z, 0, 2^b - 1)``, ``x_hat = s (q - z)``.

    Rounding is to nearest, ties to even. ``scale`` defaults to the symmetric absolute-maximum scale
    ``max |x| / (2^(b-1) - 1)``, over the whole tensor or per index of ``axis`` (``axis=0``: per output channel of a
    weight); a given ``scale`` broadcasts against ``x``. Values between grid points move by at most ``s / 2``;
    values beyond the range saturate.
    """
    fmt = IntFormat(bits)
    work = _work_dtype(x)
    if scale is None:
        if zero_point is not None:
            raise ValueError("an asymmetric quantization needs its scale with its zero point")
        scale = absmax_scale(x, fmt.max_value, axis)
    s = torch.as_tensor(scale, dtype=work, device=x.device)
    y = x.to(work) / s
    if zero_point is None:
        q = torch.round(y).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return (q * s).to(x.dtype)
    z = torch.as_tensor(zero_point, dtype=work, device=x.device)
    q = (torch.round(y) + z).clamp(0, 2**bits - 1)
    return ((q - z) * s).to(x.dtype)


def quantize_fp(
    x: torch.Tensor,
    exp_bits: int,
    man_bits: int,
    *,
    scale: torch.Tensor | float | None = None,
    axis: int | None = None,
    max_value: float | None = None,
) -> torch.Tensor:
    """``x / scale`` rounded to the nearest ``E<exp_bits>M<man_bits>`` value (ties to even, subnormals kept,
    saturating at ``max_value``, default :func:`fp_max`), times ``scale``, in float (``x``'s dtype). NaN stays NaN.

    In the binade ``[2^k, 2^(k+1))`` the format's step is ``2^(k - m)``; below the smallest normal ``2^(1 - bias)``
    the step stays ``2^(1 - bias - m)`` (subnormals). ``scale`` defaults to ``max |x| / max_value`` over the whole
    tensor or per index of ``axis``, so the largest magnitude lands on the format's largest value.
    """
    fmt = FPFormat(exp_bits, man_bits)
    top = fmt.max_value if max_value is None else float(max_value)
    if not (math.isfinite(top) and top > 0):
        raise ValueError(f"max_value must be a positive finite number, got {max_value!r}")
    work = _work_dtype(x)
    if scale is None:
        scale = absmax_scale(x, top, axis)
    s = torch.as_tensor(scale, dtype=work, device=x.device)
    y = x.to(work) / s
    a = y.abs().clamp(max=top)
    e_min = 2 - 2 ** (exp_bits - 1)  # 1 - bias: the exponent of the smallest normal value
    # floor(log2 a) exactly: frexp gives a = f 2^k with f in [0.5, 1)
    exponent = (torch.frexp(a).exponent - 1).clamp(min=e_min)
    step = torch.ldexp(torch.ones_like(a), exponent - man_bits)
    q = (torch.round(a / step) * step).clamp(max=top)
    return (torch.copysign(q, y) * s).to(x.dtype)
