"""Quantization of a Denoiser's network: torchao's real kernels, and fake-quant formats to measure quality at any
width, with activation ranges calibrated over the sampling trajectory.

``quantize(den, scheme, calibration=...)`` returns a new Denoiser on a quantized copy of the network
(:mod:`fewstep.quant.apply`); :data:`SCHEMES` lists the schemes (grammar, and the registry entries that hold what
each torchao kernel scheme does: :mod:`fewstep.quant.schemes`); :func:`calibrate` gathers activation ranges over a
run (:mod:`fewstep.quant.calibration`); :func:`quantize_int` and :func:`quantize_fp` round tensors to a format
(:mod:`fewstep.quant.formats`); :class:`Int8Conv2d` is ``int8wo``'s int8-stored convolution
(:mod:`fewstep.quant.conv`).
"""

from fewstep.quant.apply import ActQuant, QuantizedDenoiser, quantize, weights_bytes
from fewstep.quant.calibration import ActivationRanges, calibrate, find_splits, target_layers
from fewstep.quant.conv import Int8Conv2d
from fewstep.quant.formats import FPFormat, IntFormat, fp_max, fp_values, quantize_fp, quantize_int
from fewstep.quant.kernels import quiet_import_noise
from fewstep.quant.records import LayerQuant, QuantInfo
from fewstep.quant.schemes import KERNELS, SCHEMES, Scheme, parse_scheme

quiet_import_noise()  # torchao is imported by diffusers when it loads any model; keep its known noise off stderr

__all__ = [
    "KERNELS",
    "SCHEMES",
    "ActQuant",
    "ActivationRanges",
    "FPFormat",
    "Int8Conv2d",
    "IntFormat",
    "LayerQuant",
    "QuantInfo",
    "QuantizedDenoiser",
    "Scheme",
    "calibrate",
    "find_splits",
    "fp_max",
    "fp_values",
    "parse_scheme",
    "quantize",
    "quantize_fp",
    "quantize_int",
    "target_layers",
    "weights_bytes",
]
