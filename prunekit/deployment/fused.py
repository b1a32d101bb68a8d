"""A :class:`~prunekit.nn.StripeConv2d` with its epilogue fused at module level: the folded
BatchNorm's shift as the bias (which the C kernel already writes as the accumulators' initial
value, so it costs nothing), then an optional residual add and an optional ReLU applied to the
kernel's fresh output *in place*, right after the kernel returns.

What is fused where (kept honest, because the C kernel has no post-accumulation hook):

* bias: inside ``stripe_kernel.c`` (the accumulators start at the bias);
* residual add and ReLU: here, in place on the kernel's output (``add_`` / ``relu_``: no extra
  tensor, one pass over the output while it is still warm in cache). ``stripe_kernel.c`` is
  left unchanged, so its pure-PyTorch fallback needs no twin of a new C epilogue.

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
        if self._native_applies(x):
            out = self._native_plan()(x)  # a fresh tensor nobody else holds: safe in place
            if residual is not None:
                if residual.shape == out.shape:
                    out.add_(residual)
                else:  # broadcasting add (never in place: the result's shape may differ)
                    out = out + residual
            return out.relu_() if self.relu else out
        out = self.forward_torch(x)
        if residual is not None:
            out = out + residual
        return torch.relu(out) if self.relu else out

    def extra_repr(self) -> str:
        fused = [name for name, on in (("residual", self.residual), ("relu", self.relu)) if on]
        return super().extra_repr() + (f", fused={'+'.join(fused)}" if fused else "")
