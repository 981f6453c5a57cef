"""torchao's real kernels (int8 weight-only, int8 dynamic activation x int8 weight, float8 weight-only), applied to
the layers whose kernel runs on this device, and the import noise of torchao 0.18 kept off the user's terminal.
What each kernel scheme applies is its registry entry (:class:`~fewstep.quant.schemes.Kernel`). torchao 0.18 has no
int8 convolution: ``int8wo``'s entry stores convolutions as :class:`~fewstep.quant.conv.Int8Conv2d` (int8 weights
dequantized in each forward: a memory saving, not a speed-up).

torchao is imported only here, and only when a real-kernel scheme is applied (diffusers 0.42 also imports it when
it loads a model, if it is installed).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fewstep.quant.calibration import NEVER_RAN, target_layers
from fewstep.quant.conv import Int8Conv2d
from fewstep.quant.gptq import gptq_round
from fewstep.quant.records import LayerQuant
from fewstep.quant.schemes import Kernel

__all__ = ["apply_kernel", "int8_storage", "probe_kernel", "quiet_import_noise"]


class _KnownNoise(logging.Filter):
    """Drops log records containing every fragment of one of ``patterns`` (and nothing else)."""

    def __init__(self, *patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(all(f in message for f in pattern) for pattern in self.patterns)


_NOISE = {
    # torchao's optional CUDA extensions, announced one line each on a machine that cannot load them
    "torchao": (("Failed to load", "torchao", "_C"),),
    # torch's deprecation notice to library authors when torchao registers its enums for torch.compile
    "torch.utils._pytree": (("is an Enum subclass and is now natively supported",),),
    # diffusers 0.42 looking for a torchao tensor class that torchao 0.18 moved (only torchao-serialized
    # checkpoints would need it; fewstep loads safetensors)
    "diffusers.quantizers.torchao.torchao_quantizer": (("Unable to import `torchao` Tensor objects",),),
    # transformers 5 announcing, when diffusers probes its image processors (which torchao's presence makes it
    # do), that without torchvision they fall back to their PIL versions: fewstep uses no image processor
    "transformers.utils.import_utils": (("requires torchvision (not installed); falling back to",),),
}


def quiet_import_noise() -> None:
    """Filter the specific warnings that importing torchao 0.18 (directly, or through diffusers 0.42 loading any
    model) prints on every run — missing optional CUDA extensions, a torch deprecation aimed at torchao, a
    diffusers/torchao version mismatch — so that a command's stderr holds only what it has to say. Every other
    record of those loggers passes. Idempotent."""
    for name, patterns in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise(*patterns))


def _torchao(kernel: Kernel) -> tuple[Any, Any]:
    """torchao's config for ``kernel`` and its ``quantize_``; ``ValueError`` naming the fake-quant twin when torchao
    is not installed."""
    quiet_import_noise()
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ValueError(f"scheme {kernel.name!r} needs torchao (pip install torchao==0.18.0); the fake-quant "
                         f"scheme {kernel.twin!r} simulates it without") from None
    return getattr(tq, kernel.config)(), tq.quantize_


def _signature(layer: nn.Module) -> tuple[Any, ...]:
    w = layer.weight
    extra = (layer.stride, layer.padding, layer.dilation, layer.groups) if isinstance(layer, nn.Conv2d) else ()
    return type(layer), tuple(w.shape), w.dtype, w.device, layer.bias is None, extra


def probe_kernel(layer: nn.Module, config: Any, quantize_: Any) -> str | None:
    """``None`` when torchao's kernel quantizes and runs a copy of ``layer`` on its device and dtype, else why not."""
    probe = nn.Sequential(copy.deepcopy(layer))
    w = layer.weight
    shape = (2, layer.in_features) if isinstance(layer, nn.Linear) else (1, layer.in_channels, 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype=w.dtype, device=w.device)
    try:
        quantize_(probe, config, filter_fn=lambda m, fqn: m is probe[0])
        with torch.no_grad():
            out = probe(x)
        if not bool(torch.isfinite(out).all()):
            return "non-finite output"
    except Exception as err:  # noqa: BLE001  (any failure of the kernel means: not on this device)
        first = (str(err).strip().splitlines() or [""])[0][:100]
        return f"{type(err).__name__}: {first}" if first else type(err).__name__
    return None


def apply_kernel(net: nn.Module, kernel: Kernel, *, keep: Mapping[str, str] | None = None,
                 hessians: Mapping[str, torch.Tensor] | None = None
                 ) -> tuple[dict[str, LayerQuant], dict[str, str], dict[str, str]]:
    """torchao's ``quantize_`` with ``kernel.config`` on every layer of ``net`` (in place: pass a copy) whose kernel
    runs here, probed once per layer shape on a copy of the layer (:func:`probe_kernel`); layers it cannot run stay
    float, listed with the reason in the second dict (torchao 0.18 has no int8 or float8 convolution), as do the
    layers in ``keep`` (name -> why). A kernel with a ``conv`` module (``int8wo``: fewstep's
    :class:`~fewstep.quant.conv.Int8Conv2d`, int8 storage, float compute: memory, not speed) replaces every
    ``nn.Conv2d`` by it instead. ``ValueError`` naming the device and the fake-quant twin when torchao's kernel runs
    on none of its layers: the device lacks the kernel.

    With ``hessians`` (layer name -> Hessian of its inputs), the int8 codes are then re-chosen by GPTQ
    (:func:`_gptq_codes`) on torchao's own scales; the third dict lists the layers rounded to nearest and why."""
    keep = dict(keep or {})
    config, quantize_ = _torchao(kernel)
    probes: dict[tuple[Any, ...], str | None] = {}
    ok: list[tuple[str, nn.Module]] = []
    convs: list[str] = []
    skipped: dict[str, str] = {}
    reasons: list[tuple[bool, str]] = []
    targets = target_layers(net)
    for name, layer in targets:
        if name in keep:
            skipped[name] = keep[name]
            continue
        if kernel.conv is not None and type(layer) is nn.Conv2d and name:  # a submodule: replaced below
            convs.append(name)
            continue
        key = _signature(layer)
        if key not in probes:
            probes[key] = probe_kernel(layer, config, quantize_)
            if probes[key] is not None:
                reasons.append((not isinstance(layer, nn.Linear), probes[key]))
        if probes[key] is None:
            ok.append((name, layer))
        else:
            skipped[name] = f"no torchao {kernel.name} kernel for this layer ({probes[key]})"
    if not ok and (reasons or not convs):  # torchao's kernel runs on none of the layers it is for
        param = next(net.parameters())
        why = min(reasons)[1] if reasons else "no nn.Linear or nn.Conv2d layers"  # a Linear layer's reason first
        raise ValueError(f"scheme {kernel.name!r} has no torchao kernel on this device ({param.device.type}, "
                         f"{str(param.dtype).removeprefix('torch.')} layers: {why}); the fake-quant scheme "
                         f"{kernel.twin!r} simulates it")
    originals = {} if hessians is None else {name: layer.weight.detach().clone() for name, layer in ok}
    originals.update({} if hessians is None else {name: net.get_submodule(name).weight.detach().clone()
                                                  for name in convs})
    chosen = {id(layer) for _, layer in ok}
    if chosen:
        quantize_(net, config, filter_fn=lambda m, fqn: id(m) in chosen)
    fmt = kernel.weight
    layers = {name: LayerQuant(type(layer.weight).__name__, fmt.bits, layer.weight.shape[0], kernel.act, None,
                               type(config).__name__) for name, layer in ok}
    for name in convs:
        assert kernel.conv is not None  # convs is filled only for a kernel with a conv module
        parent, _, child = name.rpartition(".")
        conv = kernel.conv(net.get_submodule(name))
        setattr(net.get_submodule(parent) if parent else net, child, conv)
        layers[name] = LayerQuant(fmt.name, fmt.bits, conv.out_channels, None, None, type(conv).__name__)
    nearest: dict[str, str] = {}
    for name, w in originals.items():
        hessian = hessians.get(name) if hessians is not None else None
        why = NEVER_RAN if hessian is None else _gptq_codes(net.get_submodule(name), w, hessian)
        if why is not None:
            nearest[name] = why
    return {name: layers[name] for name, _ in targets if name in layers}, skipped, nearest


def int8_storage(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(codes, scales)`` of a layer's int8 weight, stored as ``W_hat = scales * codes`` per output channel (codes
    int8 in [-128, 127], scales rows x 1), that can be rewritten in place: fewstep's :class:`Int8Conv2d`, or torchao
    0.18's symmetric ``Int8Tensor`` (``qdata``, ``scale``, zero ``zero_point``); ``None`` for any other storage."""
    if isinstance(layer, Int8Conv2d):
        return layer.qweight, layer.scale.view(-1, 1)
    w = layer.weight
    codes, scale, zero = (getattr(w, a, None) for a in ("qdata", "scale", "zero_point"))
    if not isinstance(codes, torch.Tensor) or not isinstance(scale, torch.Tensor) or codes.dtype != torch.int8:
        return None
    if codes.shape != w.shape or scale.shape != (w.shape[0], 1):
        return None
    if isinstance(zero, torch.Tensor) and bool(zero.any()):
        return None
    return codes, scale


def _gptq_codes(layer: nn.Module, w: torch.Tensor, hessian: torch.Tensor) -> str | None:
    """Rewrite a quantized layer's int8 codes by GPTQ (:mod:`fewstep.quant.gptq`) from its float weight ``w``, on the
    scales torchao (or :class:`Int8Conv2d`) chose; ``None`` when done, else why the codes stay round-to-nearest."""
    storage = int8_storage(layer)
    if storage is None:
        return f"GPTQ needs per-channel int8 codes; {type(layer.weight).__name__} stores otherwise"
    codes, scale = storage
    s = scale.detach().double()

    def rnd(x: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        return torch.round(x / sc).clamp(-128, 127) * sc

    q = gptq_round(w.flatten(1).double(), hessian.to(w.device), s, rnd)
    with torch.no_grad():
        codes.copy_(torch.round(q / s).clamp(-128, 127).to(torch.int8).view_as(codes))
    return None
