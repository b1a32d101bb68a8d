"""A dense ``nn.Conv2d`` with its epilogue fused: ``relu?(conv(x) + bias [+ residual])`` as one
oneDNN convolution with post-ops on CPU, the plain operations elsewhere.

Eager PyTorch runs a conv, then the residual add and the ReLU as two more passes over the
output (in a deployed ResNet-56 at batch 64 about 12% of the time). oneDNN applies both as
post-ops of the convolution, while each output tile is still in registers: the same ops
PyTorch's own inductor backend emits for this pattern (``torch.ops.mkldnn.
_convolution_pointwise``, unary ``relu`` and binary ``add`` with a ``relu`` after it).

The fused op runs only for plain float32 CPU inference with oneDNN enabled, zero padding and
a residual of the output's exact shape and layout; anything else (autograd, tracing, ONNX
export, a dispatch mode such as a FLOP counter, another device or dtype) takes the plain path,
so exports and counts see ``conv + add + relu``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils import _python_dispatch

__all__ = ["FusedConv2d"]


def _onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


class FusedConv2d(nn.Conv2d):
    """``relu?(conv(x) + bias [+ residual])``; ``residual`` is the second argument when
    :attr:`residual` is True (the deployment transform rewires the add's other operand)."""

    def __init__(self, *args, relu: bool = False, residual: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = bool(relu)
        self.residual = bool(residual)
        # False: always the plain ops (deploy sets it by measurement: see .layout)
        self.use_onednn = True

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, relu: bool = False,
                  residual: bool = False) -> "FusedConv2d":
        """A fused copy of ``conv`` (same weights, stride, padding, dilation and groups)."""
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype, relu=relu,
                     residual=residual)
        with torch.no_grad():
            module.weight.copy_(conv.weight)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        module.requires_grad_(conv.weight.requires_grad)
        module.train(conv.training)
        return module

    def _fused_applies(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        if not self.use_onednn or type(x) is not torch.Tensor or x.device.type != "cpu" or x.dtype != torch.float32 \
                or x.dim() != 4 or self.weight.dtype != torch.float32:
            return False
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or (
                residual is not None and residual.requires_grad)):
            return False
        if torch.jit.is_scripting() or torch._C._get_tracing_state() is not None \
                or torch.onnx.is_in_onnx_export() \
                or _python_dispatch._get_current_dispatch_mode() is not None:
            return False
        if residual is not None:
            layout = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                      and not x.is_contiguous() else torch.contiguous_format)
            if type(residual) is not torch.Tensor or residual.dtype != torch.float32 \
                    or residual.device.type != "cpu" \
                    or not residual.is_contiguous(memory_format=layout):
                return False
        return _onednn_available()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self._fused_applies(x, residual):
            args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, self.weight, self.bias, *args, "relu" if self.relu else "none", [], "")
            if residual.shape == self._out_shape(x):
                return torch.ops.mkldnn._convolution_pointwise.binary(
                    x, residual, self.weight, self.bias, *args, "add", None,
                    "relu" if self.relu else None, [], "")
        out = self._conv_forward(x, self.weight, self.bias)
        if (not torch.is_grad_enabled() or not out.requires_grad) \
                and torch._C._get_tracing_state() is None:
            # a fresh output nobody else holds: in place, as the unfused graph would be
            if residual is not None:
                same = residual.shape == out.shape and residual.dtype == out.dtype
                out = out.add_(residual) if same else out + residual
            return out.relu_() if self.relu else out
        if residual is not None:
            out = out + residual
        return torch.relu(out) if self.relu else out

    def _out_shape(self, x: torch.Tensor) -> torch.Size:
        size = [x.shape[0], self.out_channels]
        for i in range(2):
            k = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            size.append((x.shape[2 + i] + 2 * self.padding[i] - k) // self.stride[i] + 1)
        return torch.Size(size)

    def extra_repr(self) -> str:
        fused = [name for name, on in (("residual", self.residual), ("relu", self.relu)) if on]
        return super().extra_repr() + (f", fused={'+'.join(fused)}" if fused else "")
