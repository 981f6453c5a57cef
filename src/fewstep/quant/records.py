"""What a quantization did, layer by layer (read by :func:`fewstep.quant.weights_bytes` and the harness)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fewstep.quant.calibration import ActivationRanges

__all__ = ["LayerQuant", "QuantInfo"]


@dataclass(frozen=True)
class LayerQuant:
    """How one layer is stored and run.

    Attributes:
        weight: the weight format (``"int4"``, ``"e2m1"``, or the torchao tensor class, ``"Int8Tensor"``).
        bits: bits per stored weight.
        scales: number of weight scales stored (output channels x parts).
        act: the activation format, or ``None`` (float inputs; ``"int8 dynamic"`` for torchao's int8dq).
        split: channel sizes of the input parts quantized apart, or ``None``.
        kernel: the torchao config that quantized the layer (``"Int8Conv2d"``: fewstep's int8 weight-only
            convolution, :mod:`fewstep.quant.conv`), or ``None`` for fake quantization.
    """

    weight: str
    bits: int
    scales: int
    act: str | None = None
    split: tuple[int, ...] | None = None
    kernel: str | None = None


@dataclass(frozen=True)
class QuantInfo:
    """What :func:`fewstep.quant.quantize` did: the scheme, each quantized layer, the layers (or inputs) left in
    float and why, the calibration (ranges, Hessians), how weights were rounded (``"gptq"`` or ``"nearest"``), and
    the layers rounded to nearest under ``gptq`` and why (no Hessian)."""

    scheme: str
    layers: dict[str, LayerQuant]
    skipped: dict[str, str]
    calibration: ActivationRanges | None = None
    rounding: str = "nearest"
    nearest: dict[str, str] = field(default_factory=dict)
