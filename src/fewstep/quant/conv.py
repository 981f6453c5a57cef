"""An int8 weight-only ``nn.Conv2d``: what ``int8wo`` does to convolutions, which torchao 0.18 has no kernel for.

:class:`Int8Conv2d` stores each weight as one int8 code and one float32 scale per output channel (buffers, so the
network's ``state_dict`` and :func:`fewstep.quant.weights_bytes` really shrink, about 4x against float32), and in
every forward dequantizes the weight to the input's float dtype and runs the float convolution.

It saves memory, not time: on a CPU (and on a GPU too, without a fused int8 convolution) each call pays the
dequantization — one multiply per weight — on top of the same float convolution, so it runs a little *slower* than
the float layer it replaces. Its outputs equal those of the float layer with the weights fake-quantized by ``w8``
(:func:`fewstep.quant.quantize_int` per output channel) up to the order of float operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fewstep.quant.formats import IntFormat, absmax_scale

__all__ = ["Int8Conv2d"]

_INT8 = IntFormat(8)


class Int8Conv2d(nn.Module):
    """A weight-only int8 2-D convolution (module docstring): ``W_hat[o] = s_o q[o]``, ``q`` int8 in [-128, 127],
    ``s_o = max |W[o]| / 127`` (symmetric, per output channel), the bias kept as it was.

    Made with :meth:`from_float`; ``weight`` is the dequantized weight (read-only, made on access), for code that
    reads a convolution's weight shape or dtype.
    """

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"Int8Conv2d replaces an nn.Conv2d, got {type(conv).__name__}")
        for key in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                    "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, key, getattr(conv, key))
        w = conv.weight.detach()
        scale = absmax_scale(w, _INT8.max_value, axis=0).reshape(-1).float()  # float32 whatever the network's dtype
        q = torch.round(w.to(scale.dtype) / scale.view(-1, 1, 1, 1)).clamp(-128, 127).to(torch.int8)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                                requires_grad=conv.bias.requires_grad)

    @classmethod
    def from_float(cls, conv: nn.Conv2d) -> Int8Conv2d:
        """The int8 copy of ``conv`` (on its device; ``conv`` itself is not modified)."""
        return cls(conv)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """``s_o q[o]`` in ``dtype`` (computed in float32, or float64 for a float64 layer)."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.qweight.to(work) * self.scale.to(work).view(-1, 1, 1, 1)).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized(self.scale.dtype if self.bias is None else self.bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, bias, self.stride, (0, 0), self.dilation, self.groups)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, int8 weights, per-channel float32 scales")
