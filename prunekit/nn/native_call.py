"""When a conv module runs on the native stripe kernel (:mod:`.stripe_native`), and the cached
kernel plan of its weights: shared by :class:`~prunekit.nn.StripeConv2d` and the deployed
dense :class:`~prunekit.deployment.native_dense.NativeConv2d`."""
from __future__ import annotations

import torch
from torch.utils import _python_dispatch

from .stripe_native import NativeStripePlan, library

__all__ = ["NativeCall", "dense_geometry", "plain_cpu_inference", "takes_dense_conv"]


def dense_geometry(conv: torch.nn.Module) -> bool:
    """Whether the kernel computes this dense conv's geometry (an ``nn.Conv2d`` with groups 1,
    zero padding given as numbers, square stride / dilation / kernel, symmetric padding)."""
    return isinstance(conv, torch.nn.Conv2d) and conv.groups == 1 \
        and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) \
        and NativeStripePlan.supports(conv.stride, conv.padding, conv.dilation,
                                      conv.kernel_size)


def takes_dense_conv(conv: torch.nn.Module) -> bool:
    """Whether the kernel can run the dense ``conv`` here: its geometry, float32 weights on
    the CPU, and the kernel built."""
    return dense_geometry(conv) and conv.weight.dtype == torch.float32 \
        and conv.weight.device.type == "cpu" and library() is not None


def plain_cpu_inference(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether a conv call on ``x`` with ``params`` (its weight, bias, ...) may run the C
    kernel: plain float32 CPU inference on a 4-D tensor, never under tracing, scripting, ONNX
    export or a dispatch mode (FLOP counting, fake tensors), and never when autograd needs the
    op's graph. (Cheapest checks first: at batch 1 this is a visible part of a layer's
    latency. ONNX export needs no check of its own: the TorchScript exporter traces, so the
    tracing state is set, and the dynamo exporter calls with fake or functional tensors.)"""
    if type(x) is not torch.Tensor or x.dtype != torch.float32 or x.device.type != "cpu" \
            or x.dim() != 4:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p is not None and p.requires_grad for p in params)):
        return False
    if torch.jit.is_scripting() or torch._C._get_tracing_state() is not None:
        return False
    return _python_dispatch._get_current_dispatch_mode() is None


class NativeCall:
    """Mixin for a conv module (``weight``, optional ``bias``) that may run on the kernel:
    :meth:`native_plan_for` returns the cached :class:`NativeStripePlan` when a call may use
    it, else None. The plan copies the weights, so it is rebuilt when ``weight`` or ``bias``
    is replaced or changed in place (storage and version counter). Parameters are read from
    ``_parameters`` directly: ``nn.Module.__getattr__`` costs ~1 us a lookup, and at batch 1
    a layer's whole kernel call can be 20 us."""

    use_native = True  # set False on an instance (or a class) to force the torch path

    def _build_native_plan(self) -> "NativeStripePlan":
        raise NotImplementedError

    def _native_geometry(self) -> bool:
        """Whether the kernel computes this module's geometry."""
        raise NotImplementedError

    def _native_supported(self) -> bool:
        supported = self.__dict__.get("_native_ok")
        if supported is None:
            supported = self.__dict__["_native_ok"] = bool(self._native_geometry()) \
                and library() is not None
        return supported

    def native_plan_for(self, x: torch.Tensor, *extra: torch.Tensor | None
                        ) -> "NativeStripePlan | None":
        """The plan when this call on ``x`` (and ``extra`` operands, e.g. a residual) may run
        the kernel, else None."""
        if not self.use_native:
            return None
        params = self._parameters
        weight, bias = params["weight"], params.get("bias")
        if not plain_cpu_inference(x, weight, bias, *extra) or not self._native_supported():
            return None
        return self._native_plan()

    def _native_plan(self) -> "NativeStripePlan":
        """The plan for the current weights (built if needed), whatever the input."""
        params = self._parameters
        weight, bias = params["weight"], params.get("bias")
        key = (weight.data_ptr(), weight._version,
               None if bias is None else (bias.data_ptr(), bias._version))
        cached = self.__dict__.get("_native_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_native_cache"] = (key, self._build_native_plan())
        return cached[1]

    def __getstate__(self):
        # the plan holds ctypes pointers into this instance's tensors: a copy or a pickle
        # must rebuild its own, never carry (or fail on) this one
        state = self.__dict__.copy()
        state.pop("_native_cache", None)
        state.pop("_native_ok", None)
        return state
