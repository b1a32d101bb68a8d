"""A :class:`~prunekit.nn.StripeConv2d` with its epilogue fused: the folded BatchNorm's shift as
the bias (the C kernel's accumulators start at it, so it costs nothing), then an optional
residual add and an optional ReLU, both applied by the kernel as it writes its outputs.

What is fused where:

* bias: inside ``stripe_kernel.c`` (the accumulators start at the bias);
* residual add and ReLU: inside ``stripe_kernel.c`` too, in the epilogue that writes each
  block of outputs from the block buffer (still in L1), so neither costs a pass over the
  output. A residual the kernel cannot read as a plain NCHW float32 array of the output's
  shape (broadcasting, channels_last, another dtype) is added after the kernel instead.

On the pure-PyTorch path (autograd, tracing, ONNX export, other devices and dtypes) the same
operations run out of place, so the exported graph is the plain ``conv + add + relu``.
"""
from __future__ import annotations

import torch

from ..nn.stripe import StripeConv2d

__all__ = ["FusedStripeConv2d"]


class FusedStripeConv2d(StripeConv2d):
    """``relu?(stripe_conv(x) + bias [+ residual])``; ``residual`` is the second argument
    when :attr:`residual` is True (the deployment transform rewires the add's other operand)."""

    def __init__(self, *args, relu: bool = False, residual: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = bool(relu)
        self.residual = bool(residual)

    @classmethod
    def from_stripe(cls, conv: StripeConv2d, weight: torch.Tensor, bias: torch.Tensor | None,
                    *, relu: bool = False, residual: bool = False) -> "FusedStripeConv2d":
        """A fused copy of ``conv`` holding ``weight`` (``[stripe_count, C_in]``) and ``bias``."""
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stripe_mask,
                     stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                     bias=bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
                     relu=relu, residual=residual)
        module.use_native = conv.use_native
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        module.requires_grad_(False)  # an inference module: keeps the native kernel eligible
        return module

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        plan = self.native_plan_for(x, residual)
        if plan is not None:
            return plan(x, residual, self.relu)
        out = self.forward_torch(x)
        if residual is not None:
            out = out + residual
        return torch.relu(out) if self.relu else out

    def extra_repr(self) -> str:
        fused = [name for name, on in (("residual", self.residual), ("relu", self.relu)) if on]
        return super().extra_repr() + (f", fused={'+'.join(fused)}" if fused else "")
