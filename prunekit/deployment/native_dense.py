"""Dense convolutions on prunekit's direct C kernel, layer by layer where it is measured faster.

Why a second kernel for dense convs: PyTorch and oneDNN choose their convolution by heuristics
tuned for wide layers, which suit a pruned network badly. At batch 1 PyTorch sends every conv
whose input holds at most 20480 floats (all of CIFAR ResNet-56's) to im2col + GEMM
(``aten::_slow_conv2d_forward``), and oneDNN's blocked layouts round channel counts up to
multiples of its vector width, so a conv pruned from 16 -> 16 to 12 -> 11 channels costs about
what the unpruned one did. The stripe kernel (``prunekit/nn/stripe_kernel.c``) vectorises along
the output row instead, so its time follows the multiply-adds whatever the channel counts; a
dense conv is a StripeConv2d that keeps every stripe. Measured here (AMD EPYC, 1 thread, the
L1 50%-MACs ResNet-56 and the unpruned one, both deployed): every 3x3 conv on this kernel made
the pruned network 1.6x (batch 1) and 1.4x (batch 64) faster and the unpruned one 1.4x faster
at batch 1 but 1.07x slower at batch 64, so the choice is made per layer, by timing, not
assumed: :func:`~prunekit.deployment.layout.time_layers` times each eligible conv both ways on
its own input from the example (interleaved rounds), and
:func:`~prunekit.deployment.layout.choose_channels_last` then times the whole network with the
faster choices against the oneDNN layouts.

:class:`NativeConv2d` is a :class:`~.fused_dense.FusedConv2d` (it holds the dense weight):
under autograd, tracing, ONNX export, a dispatch mode, another device or dtype it is the plain
conv (+ add + ReLU), so exports and counts see an ordinary convolution.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import native_call, stripe_native
from .fused_dense import FusedConv2d

__all__ = ["NativeConv2d", "eligible", "native_twins", "swap_modules"]


class NativeConv2d(native_call.NativeCall, FusedConv2d):
    """``relu?(conv(x) + bias [+ residual])`` computed by the stripe kernel with every stripe
    kept (exactly the dense conv; float32 rounding differs by the summation order)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, relu: bool | None = None,
                  residual: bool | None = None) -> "NativeConv2d":
        """A native copy of ``conv`` (a plain or fused dense conv), its epilogue kept unless
        ``relu`` / ``residual`` are given."""
        relu = getattr(conv, "relu", False) if relu is None else relu
        residual = getattr(conv, "residual", False) if residual is None else residual
        module = super().from_conv(conv, relu=relu, residual=residual)
        module.use_onednn = getattr(conv, "use_onednn", True)
        return module

    supports = staticmethod(native_call.dense_geometry)

    def _native_geometry(self) -> bool:
        return self.supports(self)

    def _build_native_plan(self) -> stripe_native.NativeStripePlan:
        weight = self.weight.detach()
        f, c, kh, kw = weight.shape
        # rows in (tap, filter) order, the layout StripeConv2d keeps its stripes in
        rows = weight.permute(2, 3, 0, 1).reshape(kh * kw * f, c)
        segments = tuple((i, j, (i * kw + j) * f, (i * kw + j + 1) * f)
                         for i in range(kh) for j in range(kw))
        return stripe_native.NativeStripePlan(
            rows, torch.arange(f).repeat(kh * kw), segments, self.bias, f, self.stride,
            self.padding, self.dilation, self.kernel_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        plan = self.native_plan_for(x, residual)
        if plan is not None:
            return plan(x, residual, self.relu)
        return super().forward(x, residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", native"


def eligible(module: nn.Module) -> bool:
    """A dense conv of the deployed graph the kernel can take over (float32, on the CPU, the
    kernel built)."""
    return type(module) in (nn.Conv2d, FusedConv2d) and native_call.takes_dense_conv(module)


def native_twins(model: nn.Module, names=None) -> dict[str, NativeConv2d]:
    """Name -> native copy of every eligible dense conv of ``model`` (of ``names`` only, when
    given: a cached decision; names that are no longer eligible are left out)."""
    modules = dict(model.named_modules())
    chosen = modules if names is None else {n: modules[n] for n in names if n in modules}
    return {name: NativeConv2d.from_conv(m).eval() for name, m in chosen.items() if eligible(m)}


def swap_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put ``replacements`` in place (by name); returns the modules they replaced."""
    from ..utils import set_submodule

    previous = {}
    for name, module in replacements.items():
        previous[name] = model.get_submodule(name)
        set_submodule(model, name, module)
    return previous
