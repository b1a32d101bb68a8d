"""Execution of stripe-wise pruned convolutions (SWP, "Pruning Filter in Filter",
Meng et al., NeurIPS 2020).

A KxK convolution ``W ∈ R^{N×C×K×K}`` is a sum over the K*K kernel positions
(i, j) of 1x1 convolutions applied to the input shifted by (i*d, j*d).  A
*stripe* is one (output filter n, kernel position (i, j)) pair together with its
C_in weights ``W[n, :, i, j]``.  SWP removes stripes; :class:`StripeConv2d`
computes only the kept ones:

    xt = pad(x.transpose(0, 1))                          # [C_in, N, Hp, Wp], once
    for each kernel position (i, j) with at least one kept stripe:
        xs  = xt[:, :, i*d : i*d + s*(H_out-1)+1 : s, j*d : ... : s]   # strided, shifted view
        y   = W_ij @ xs.reshape(C_in, N*H_out*W_out)        # [n_ij, N*H_out*W_out], one GEMM
        out.index_add_(0, out_index_ij, y)                  # scatter rows into the kept filters
    out -> [N, C_out, H_out, W_out] (+ bias)

Unlike the reference implementation (``fxmeng/Pruning-Filter-in-Filter``,
``FilterStripe.forward``), every position is evaluated directly on the strided
output grid (no full-resolution 1x1 conv followed by sub-sampling, which wastes
s^2 work in stride-s layers), there is no ``.item()`` and no data-dependent
shape in ``forward`` (the per-position segment boundaries are Python constants
fixed at construction), so the module exports with ``torch.jit.trace`` and
``torch.onnx.export`` (opset 17, dynamo=False; each ``index_add`` becomes a
``ScatterElements`` into zeros followed by ``Add``, exact here because the
indices inside one kernel position are unique; verified with onnxruntime).

Filters with no kept stripe output zeros (plus their bias).  Those output
channels carry no information and could afterwards be removed entirely by
ordinary channel pruning (together with the matching input channels of the
consumer), as the reference does with ``prune_out``.

Measured formulations (CPU, ``torch.set_num_threads(1)``, machine shared with
another job so numbers are noisy; 3x3 conv, stride 1, pad 1, random 50% of the
stripes kept; milliseconds per forward; dense = ``F.conv2d`` with masked
weights, i.e. oneDNN/MKL-DNN):

    shape (C, H, W), batch     dense   (a1) 1x1 conv   (a3) matmul      (b) im2col  (a4) cat+
                                       + index_add     + index_add      of used     scatter_add
                                       per position    per position     positions
    16x32x32, N=1              0.105   0.286           0.264            0.250       0.430
    16x32x32, N=64             10.0    27.9            12.9             38.7        44.6
    32x16x16, N=1              0.106   0.256           0.252            0.247       0.333
    32x16x16, N=64             3.45    11.7            7.16             9.15        20.0
    64x8x8,   N=1              0.113   0.263           0.253            0.256       0.257
    64x8x8,   N=64             2.73    7.48            4.74             5.42        11.1

Chosen: (a3) in channel-major form (``[C, N*HW]`` layout, ``torch.mm`` per
position, ``index_add`` on rows, one transpose back to NCHW at the end).  The
NCHW ``torch.matmul`` variant measured above is only fast when the weight does
not require grad (matmul stops folding the batch into one GEMM otherwise: ~2x
slower as an ``nn.Parameter``); the channel-major form is not affected.
Module as shipped, 50% stripes kept, 3x3, pad 1, dense = nn.Conv2d (ms):

    layer                    N=1: dense / stripe     N=64: dense / stripe
    16->16 32x32 s1          0.128 / 0.342           9.9*  / 15.7
    32->32 16x16 s1          0.098 / 0.326           2.96  / 7.43
    64->64  8x8  s1          0.113 / 0.307           2.81  / 5.35
    16->32 32x32 s2          0.115 / 0.328           2.32  / 7.48
    32->64 16x16 s2          0.083 / 0.294           1.88  / 4.52
    (* dense 16x32x32 N=64 ranged 4.5-10 ms between runs: shared machine.)

So this pure-torch formulation, with half the MACs, is ~1.6-3.5x *slower* than the
dense oneDNN convolution (per-position copies of the shifted input and K*K small GEMMs +
scatters dominate). It stays the path for autograd, tracing, ONNX export and non-CPU
devices; CPU float32 inference runs the fused C kernel instead (``stripe_native.py``,
``stripe_kernel.c``: padded phase planes, register-blocked FMAs over the kept stripes only),
which is faster than dense; measured in ``benchmarks/results/stripe_speed.md``.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import set_submodule
from . import native_call, stripe_native
from .registry import register_replacement

__all__ = ["StripeConv2d", "stripe_prune_model"]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _resolve_padding(padding, kernel_size, dilation, stride) -> tuple[int, int, int, int]:
    """Return F.pad order (left, right, top, bottom)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' requires stride 1")
            th = dilation[0] * (kernel_size[0] - 1)
            tw = dilation[1] * (kernel_size[1] - 1)
            return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        raise ValueError(f"unsupported padding {padding!r}")
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


@register_replacement  # a saved model may hold it in place of a Conv2d
class StripeConv2d(native_call.NativeCall, nn.Module):
    """A Conv2d of which only some stripes (filter n, kernel position (i, j)) remain.

    Output equals ``F.conv2d(x, W * stripe_mask[:, None], bias, stride, padding,
    dilation)``.  Build it with :meth:`from_dense`.

    Storage:
      * ``weight``  – Parameter ``[stripe_count, C_in]``, the kept stripes packed
        in (i, j, filter) order (the reference's ``_break`` order);
      * ``out_index`` – long buffer ``[stripe_count]``, output filter of each stripe;
      * ``stripe_mask`` – bool buffer ``[C_out, kh, kw]``;
      * ``bias`` – Parameter ``[C_out]`` or None;
      * ``segments`` – Python tuple of ``(i, j, lo, hi)``: rows ``lo:hi`` of
        ``weight`` are the stripes at kernel position (i, j) (empty positions are
        omitted).  Constants, so forward has static shapes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size,
                 stripe_mask: torch.Tensor, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self._pad = _resolve_padding(padding, self.kernel_size, self.dilation, self.stride)
        kh, kw = self.kernel_size
        mask = torch.as_tensor(stripe_mask).detach().to(device="cpu").bool()
        if tuple(mask.shape) != (self.out_channels, kh, kw):
            raise ValueError(f"stripe_mask must have shape {(self.out_channels, kh, kw)}, "
                             f"got {tuple(mask.shape)}")
        segments = []
        indices = []
        lo = 0
        for i in range(kh):
            for j in range(kw):
                idx = mask[:, i, j].nonzero().flatten()
                n = int(idx.numel())
                if n:
                    segments.append((i, j, lo, lo + n))
                    indices.append(idx)
                    lo += n
        self.segments: tuple[tuple[int, int, int, int], ...] = tuple(segments)
        out_index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
        self.register_buffer("stripe_mask", mask.to(device))
        self.register_buffer("out_index", out_index.to(device=device, dtype=torch.long))
        # What the buffers must hold, kept apart from them (a loader may replace the buffers
        # before filling them): the segments above were derived from exactly these.
        self._derived = {"stripe_mask": mask.clone(), "out_index": out_index.clone()}
        self.weight = nn.Parameter(torch.zeros(lo, self.in_channels, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_dense(cls, conv: nn.Conv2d, stripe_mask: torch.Tensor) -> "StripeConv2d":
        """Keep the stripes of ``conv`` where ``stripe_mask`` ``[out, kh, kw]`` is True."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError("StripeConv2d supports groups=1 only")
        if conv.padding_mode != "zeros":
            raise ValueError("StripeConv2d supports padding_mode='zeros' only")
        w = conv.weight.detach()
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stripe_mask,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if m.segments:
                rows = [w[m.out_index[lo:hi], :, i, j] for (i, j, lo, hi) in m.segments]
                m.weight.copy_(torch.cat(rows, 0))
            if conv.bias is not None:
                m.bias.copy_(conv.bias.detach())
        return m

    # ------------------------------------------------------------- save / load
    def prunekit_init(self) -> dict:
        """Constructor arguments as JSON (for :func:`prunekit.io.save`)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "bias": self.bias is not None,
                "stripe_mask": self.stripe_mask.to(torch.uint8).tolist()}

    @classmethod
    def prunekit_build(cls, original: nn.Module, init: dict) -> "StripeConv2d":
        """An empty module of the saved shape (:func:`prunekit.io.load` fills the weights)."""
        return cls(init["in_channels"], init["out_channels"], init["kernel_size"],
                   torch.tensor(init["stripe_mask"], dtype=torch.bool), stride=init["stride"],
                   padding=init["padding"], dilation=init["dilation"], bias=init["bias"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # stripe_mask and out_index are derived from the constructor's mask (which also fixes
        # the segments the forward uses): stored copies that disagree would route stripes to
        # the wrong filters and silently compute something else, so they are refused.
        for name, derived in self._derived.items():
            stored = state_dict.get(prefix + name)
            if stored is not None and (stored.shape != derived.shape or not torch.equal(
                    stored.detach().to("cpu", derived.dtype), derived)):
                error_msgs.append(f"{prefix}{name} disagrees with the stripe mask this "
                                  "StripeConv2d was built with (an edited or corrupt file)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ------------------------------------------------------------- properties
    @property
    def stripe_count(self) -> int:
        return int(self.weight.shape[0])

    @property
    def total_stripes(self) -> int:
        return self.out_channels * self.kernel_size[0] * self.kernel_size[1]

    def output_hw(self, input_hw) -> tuple[int, int]:
        h, w = _pair(input_hw)
        return self._out_hw(h, w)

    def _out_hw(self, h, w):
        # Plain arithmetic (no int()) so traced sizes stay symbolic under tracing.
        left, right, top, bottom = self._pad
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
        wo = (w + left + right - dw * (kw - 1) - 1) // sw + 1
        return ho, wo

    def macs(self, input_hw) -> int:
        """Multiply-accumulates: sum over kept stripes of C_in * H_out * W_out."""
        ho, wo = self.output_hw(input_hw)
        return self.stripe_count * self.in_channels * ho * wo

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight ``W * mask[:, None]`` ``[out, in, kh, kw]``."""
        kh, kw = self.kernel_size
        w = self.weight.new_zeros(self.out_channels, self.in_channels, kh, kw)
        for (i, j, lo, hi) in self.segments:
            w[self.out_index[lo:hi], :, i, j] = self.weight[lo:hi]
        return w

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        s += (f", stripes={self.stripe_count}/{self.total_stripes}, "
              f"positions={len(self.segments)}/{self.kernel_size[0] * self.kernel_size[1]}")
        return s

    # ---------------------------------------------------------------- forward
    def _native_geometry(self) -> bool:
        return stripe_native.NativeStripePlan.supports(self.stride, self.padding, self.dilation,
                                                       self.kernel_size)

    def _build_native_plan(self) -> "stripe_native.NativeStripePlan":
        return stripe_native.NativeStripePlan(
            self.weight, self.out_index, self.segments, self.bias, self.out_channels,
            self.stride, self.padding, self.dilation, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.native_plan_for(x)
        if plan is not None:
            return plan(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The pure-torch formulation (autograd, any device, tracing and export)."""
        n, c, h, w = x.shape
        ho, wo = self._out_hw(h, w)
        sh, sw = self.stride
        dh, dw = self.dilation
        # Channel-major layout [C, N, H, W]: each kernel position is then ONE plain 2-D
        # GEMM [n_ij, C] @ [C, N*H_out*W_out] (torch.matmul on [N, C, L] would not fold
        # the batch into one GEMM when the weight requires grad -> ~2x slower) and the
        # scatter is a row index_add.
        xt = x.transpose(0, 1)
        if any(self._pad):
            xt = F.pad(xt, self._pad)
        out = x.new_zeros(self.out_channels, n * ho * wo)
        for (i, j, lo, hi) in self.segments:
            r0, c0 = i * dh, j * dw
            xs = xt[:, :, r0:r0 + sh * (ho - 1) + 1:sh, c0:c0 + sw * (wo - 1) + 1:sw]
            y = torch.mm(self.weight[lo:hi], xs.reshape(c, n * ho * wo))
            out.index_add_(0, self.out_index[lo:hi], y)
        out = out.view(self.out_channels, n, ho, wo).transpose(0, 1).contiguous()
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


def stripe_prune_model(model: nn.Module,
                       masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Replace, in place, the Conv2d modules named in ``masks`` by StripeConv2d.

    ``masks`` maps a module name (as in ``model.named_modules()``) to a boolean
    stripe mask ``[out, kh, kw]`` (True = keep).  Filters with no kept stripe
    produce zeros (plus bias); they can later be removed by channel pruning.
    Returns ``model``.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise KeyError(f"no module named {name!r}")
        conv = modules[name]
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{name!r} is {type(conv).__name__}, not nn.Conv2d")
        set_submodule(model, name, StripeConv2d.from_dense(conv, mask))
    return model
