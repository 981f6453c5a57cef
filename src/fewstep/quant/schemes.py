"""Quantization schemes: the registry the CLI lists (:data:`KERNEL_SCHEMES`, whose :class:`Kernel` entries hold
every decision about a torchao kernel, and :data:`FAKE_SCHEMES`) and the grammar of a scheme string.

Grammar (:func:`parse_scheme`)::

    scheme := name [":" key "=" value]...          knobs as in fewstep.spec (cache and solver specs)
            | "fp:" format [":" key "=" value]...  the fp family names its format first
    name   := a key of KERNEL_SCHEMES              torchao's real kernels, int8wo | int8dq | fp8wo (nn.Linear
                                                   layers; int8wo stores nn.Conv2d as int8 too, fewstep.quant.conv)
            | "w" N | "w" N "a" M                  fake-quant integers: N-bit weights per output channel (2..16),
                                                   M-bit activations per tensor, calibrated (2..16)
    format := "e" X "m" Y                          fake-quant E<X>M<Y> weights per output channel (e4m3, e5m2, e2m1)
            | search                               the split of bits=B (default 4) minimizing each layer's weight MSE

Knobs of every scheme:

* ``round=gptq`` or ``nearest``: how weights take their grid points. ``gptq`` compensates each weight's rounding
  error on the weights not yet rounded, under Hessians of the layer inputs gathered over the calibration run
  (:mod:`fewstep.quant.gptq`); ``nearest`` rounds each weight alone (what torchao's ``quantize_`` does). Default:
  ``gptq`` when a calibration run is given, ``nearest`` without one (a kernel whose entry says GPTQ does not
  apply, ``fp8wo``: always ``nearest``, and ``round=gptq`` is refused).
* ``group=G`` (fake-quant weight formats): one scale per ``G`` consecutive input columns of each output channel
  (a convolution's columns are channel-major, then kernel positions) instead of one per channel; more scales stored
  (``4 / G`` bytes a weight), less rounding error at low widths (the groups of GPTQ and AWQ's 4-bit weights).
* ``keep_ends=true`` (default) or ``false``: the layers that read the noisy input and write the prediction (the
  family's ``ends``: ``conv_in``/``conv_out``, a transformer's patch embedding and output projection) stay in
  float, as Q-Diffusion and most post-training quantization keep the first and last layers. They hold a tiny share
  of the weights and carry the whole output.

Knobs of the schemes calibrated on a run (activation schemes ``wNaM``, ``fp:...:act=...``, and weight schemes with
``round=gptq``):

* ``calibration=trajectory`` (default) or ``single``: ranges and Hessians over every network evaluation of the
  calibration run, or over the evaluations at one grid time only (:func:`fewstep.quant.calibrate`);
* ``t=<time>``: with ``single``, the schedule time whose nearest grid time is observed (default: the middle step);
* ``split=true`` (default) or ``false``: layers fed a concatenation (a U-Net's skip) quantize each part apart
  (fake-quant schemes: weight scales per part too; torchao's kernels keep one scale per output channel).

The fp family takes ``act=<format>`` (``act=e4m3``, ``act=int8``) to quantize activations too, and ``fp:search``
takes ``bits=B``. Unknown knobs raise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from fewstep.grids import suggest
from fewstep.quant.conv import Int8Conv2d
from fewstep.quant.formats import Format, FPFormat, IntFormat, parse_format
from fewstep.spec import parse_options

__all__ = ["FAKE_SCHEMES", "KERNELS", "KERNEL_SCHEMES", "SCHEMES", "Kernel", "Scheme", "parse_scheme"]


@dataclass(frozen=True)
class Kernel:
    """The registry entry of one torchao real-kernel scheme: everything fewstep decides about it, read from here.

    Attributes:
        name: the scheme's name.
        description: one line for the CLI and the docs.
        config: the ``torchao.quantization`` config class the scheme applies (built with no arguments).
        twin: the fake-quant scheme that simulates it: the same weight format per output channel (:attr:`weight`),
            and quantized activations (per tensor, calibrated) where the kernel quantizes them (per token,
            dynamically). Errors name it where torchao or its kernel is missing.
        gptq: whether GPTQ may re-choose the stored codes on torchao's scales (:mod:`fewstep.quant.gptq`);
            ``False``: weights always round to nearest, ``round=gptq`` is refused and no calibration is taken.
        act: what the kernel does to a layer's input, as :class:`~fewstep.quant.LayerQuant` records it, or ``None``
            (float inputs).
        conv: the module storing an ``nn.Conv2d`` in :attr:`weight`'s format, which the scheme puts in place of
            every convolution (torchao 0.18 has no convolution kernel), or ``None``: convolutions are probed like
            any layer, and stay float where torchao's kernel does not run.
    """

    name: str
    description: str
    config: str
    twin: str
    gptq: bool
    act: str | None = None
    conv: type[Int8Conv2d] | None = None

    @property
    def weight(self) -> Format:
        """The stored weight format: :attr:`twin`'s."""
        fmt = parse_scheme(self.twin).weight
        if fmt is None:
            raise TypeError(f"{self.name}'s twin {self.twin!r} names no weight format")
        return fmt

    @property
    def calibratable(self) -> bool:
        """Whether a calibration run changes the scheme's result: only through GPTQ's Hessians, as the kernels'
        activations are float or quantized dynamically (no calibrated ranges)."""
        return self.gptq


KERNEL_SCHEMES: dict[str, Kernel] = {k.name: k for k in (
    Kernel("int8wo", "int8 weight-only, per output channel: torchao's kernel on nn.Linear, int8-stored nn.Conv2d "
                     "dequantized per call (saves memory, not time)",
           config="Int8WeightOnlyConfig", twin="w8", gptq=True, conv=Int8Conv2d),
    Kernel("int8dq", "torchao int8 dynamic per-token activations x int8 weights (real kernel; nn.Linear layers)",
           config="Int8DynamicActivationInt8WeightConfig", twin="w8a8", gptq=True, act="int8 dynamic"),
    Kernel("fp8wo", "torchao float8 E4M3 weight-only, per output channel (real kernel where the device has it)",
           config="Float8WeightOnlyConfig", twin="fp:e4m3", gptq=False),
)}
"""torchao's real-kernel schemes: name -> :class:`Kernel`, the registry every kernel decision reads."""

FAKE_SCHEMES: dict[str, str] = {
    "w8": "fake-quant int8 weights, symmetric per output channel",
    "w4": "fake-quant int4 weights, symmetric per output channel",
    "w8a8": "fake-quant int8 weights + int8 activations per tensor (calibrated over the trajectory)",
    "w4a8": "fake-quant int4 weights + int8 activations per tensor (calibrated over the trajectory)",
    "fp:e4m3": "fake-quant FP8 E4M3 weights (OCP, max 448) per output channel",
    "fp:e5m2": "fake-quant FP8 E5M2 weights (max 57344) per output channel",
    "fp:e2m1": "fake-quant FP4 E2M1 weights (OCP MX, max 6) per output channel",
    "fp:search": "fake-quant FP weights of bits=B (default 4), exponent/mantissa split searched per layer",
}
"""The listed fake-quant schemes -> one-line descriptions (the grammar's ``wNaM`` and ``fp:eXmY`` take any widths);
their behaviour is what :func:`parse_scheme` reads from the name's formats."""

SCHEMES: dict[str, str] = {**{name: k.description for name, k in KERNEL_SCHEMES.items()}, **FAKE_SCHEMES}
"""Public scheme names -> one-line descriptions (the list the CLI and the docs read): :data:`KERNEL_SCHEMES`'
descriptions, then :data:`FAKE_SCHEMES`. ``wNaM`` and ``fp:eXmY`` take any widths, not only the ones listed."""

KERNELS: dict[str, tuple[str, str]] = {name: (k.config, k.twin) for name, k in KERNEL_SCHEMES.items()}
"""torchao's real-kernel schemes: the torchao config each applies, and the fake-quant scheme that simulates it
(derived from :data:`KERNEL_SCHEMES`)."""

CALIBRATIONS = ("trajectory", "single")
ROUNDINGS = ("gptq", "nearest")


@dataclass(frozen=True)
class Scheme:
    """A parsed scheme: either a torchao ``kernel`` (its registry entry) or fake-quant ``weight`` (and ``act``)
    formats."""

    text: str
    kernel: Kernel | None = None
    weight: Format | None = None
    act: Format | None = None
    search_bits: int | None = None  # fp:search: the width whose exponent/mantissa split each layer chooses
    calibration: str = "trajectory"
    t: float | None = None
    split: bool = True
    round: str | None = None  # None: gptq when calibrated, nearest otherwise
    keep_ends: bool = True
    group: int | None = None  # fake-quant weights: input columns per scale (None: one scale per output channel)

    @property
    def calibrated(self) -> bool:
        """Whether the scheme cannot run without a calibration run: it quantizes activations with calibrated ranges,
        or asks for ``round=gptq``."""
        return self.act is not None or self.round == "gptq"

    @property
    def gptq(self) -> bool:
        """Whether GPTQ can round the scheme's weights: every fake-quant format; a torchao kernel as its entry says
        (:attr:`Kernel.gptq`)."""
        return _gptq_applies(self.kernel)

    @property
    def calibratable(self) -> bool:
        """Whether a calibration run changes the result: :attr:`calibrated`, or weights rounded by GPTQ by default."""
        return self.calibrated or (self.round is None and self.gptq)

    def rounding(self, calibrated: bool) -> str:
        """``"gptq"`` or ``"nearest"``: the weight rounding with (``calibrated``) or without a calibration run."""
        if self.round is not None:
            return self.round
        return "gptq" if calibrated and self.gptq else "nearest"


def _gptq_applies(kernel: Kernel | None) -> bool:
    return kernel is None or kernel.gptq


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be true or false, got {value!r}")


def parse_scheme(text: str) -> Scheme:
    """A scheme string (module docstring's grammar) -> :class:`Scheme`; a one-line ``ValueError`` naming the closest
    known scheme otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"a quantization scheme is a string such as 'w8a8', got {type(text).__name__}")
    name, *items = text.strip().split(":")
    weight: Format | None = None
    act: Format | None = None
    search_bits: int | None = None
    kernel: Kernel | None = None
    if name == "fp":
        if not items or "=" in items[0]:
            raise ValueError(f"bad scheme {text!r}: the fp family names its format first (fp:e4m3, fp:e2m1, "
                             f"fp:search:bits=4)")
        fmt, *items = items
        knobs = parse_options(items)
        if fmt == "search":
            search_bits = knobs.pop("bits", 4)
            if isinstance(search_bits, bool) or not isinstance(search_bits, int) or not 3 <= search_bits <= 16:
                raise ValueError(f"fp:search needs bits=<3..16> (1 sign bit, at least one exponent bit), "
                                 f"got {search_bits!r}")
        else:
            weight = _fp_format(fmt, text)
        if "act" in knobs:
            act = _act_format(knobs.pop("act"), text)
        name = f"fp:{fmt}"
    else:
        knobs = parse_options(items)
        if name in KERNEL_SCHEMES:
            kernel = KERNEL_SCHEMES[name]
        elif m := re.fullmatch(r"w(\d+)(?:a(\d+))?", name):
            weight = _int_format(m[1], "weight", text)
            act = None if m[2] is None else _int_format(m[2], "activation", text)
        else:
            known = list(SCHEMES)
            raise ValueError(f"unknown quantization scheme {text!r}{suggest(name, known)}; known: "
                             f"{', '.join(known)} (wNaM and fp:eXmY take any widths)")
    rnd = knobs.pop("round", None)
    if rnd is not None and rnd not in ROUNDINGS:
        raise ValueError(f"round must be one of {', '.join(ROUNDINGS)}, got {rnd!r}")
    if rnd == "gptq" and kernel is not None and not kernel.gptq:
        raise ValueError(f"{kernel.name} rounds to nearest (GPTQ onto torchao's {kernel.weight.name} tensors is not "
                         f"built); {kernel.twin}:round=gptq simulates it")
    keep_ends = _bool("keep_ends", knobs.pop("keep_ends", True))
    group = None
    if "group" in knobs and kernel is None:
        group = knobs.pop("group")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"group must be a positive number of input columns per scale, got {group!r}")
    calibration, t, split = "trajectory", None, True
    calibratable = act is not None or (rnd != "nearest" and _gptq_applies(kernel))
    if calibratable:
        calibration = knobs.pop("calibration", "trajectory")
        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
        if "t" in knobs:
            t = knobs.pop("t")
            if calibration != "single":
                raise ValueError("t= picks the time of calibration=single; a trajectory calibration sees every time")
            if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
                raise ValueError(f"t must be a schedule time (a number >= 0), got {t!r}")
            t = float(t)
        split = _bool("split", knobs.pop("split", True))
    if knobs:
        what = "a torchao kernel scheme" if kernel is not None else "this scheme"
        extra = "" if calibratable else " (calibration knobs are for calibrated schemes: activations, round=gptq)"
        raise ValueError(f"{what} {name!r} takes no knob {sorted(knobs)[0]!r}{extra}")
    return Scheme(text=text.strip(), kernel=kernel, weight=weight, act=act, search_bits=search_bits,
                  calibration=calibration, t=t, split=split, round=rnd, keep_ends=keep_ends, group=group)


def _int_format(digits: str, what: str, text: str) -> IntFormat:
    bits = int(digits)
    if not 2 <= bits <= 16:
        raise ValueError(f"bad scheme {text!r}: {what} bits must be in [2, 16], got {bits}")
    return IntFormat(bits)


def _fp_format(fmt: str, text: str) -> FPFormat:
    m = re.fullmatch(r"e(\d+)m(\d+)", fmt)
    if m is None:
        known = [k.partition(":")[2] for k in FAKE_SCHEMES if k.startswith("fp:")]
        raise ValueError(f"unknown fp format {fmt!r} in {text!r}{suggest(fmt, known)}; expected e<exp>m<man> "
                         f"(e4m3, e5m2, e2m1) or search")
    try:
        return FPFormat(int(m[1]), int(m[2]))
    except ValueError as err:
        raise ValueError(f"bad scheme {text!r}: {err}") from None


def _act_format(value: Any, text: str) -> Format:
    try:
        return parse_format(str(value))
    except ValueError as err:
        raise ValueError(f"bad act= in {text!r}: {err}") from None
