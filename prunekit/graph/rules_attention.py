"""Channel rules for the ops of attention blocks: softmax / log_softmax, L2 normalisation and
matrix products.

Over a dimension without channels (ResNeSt's and SKNet's radix / path dimension once the
reshape united its groups, a spatial softmax in global-context attention) they act on every
channel alone, so channels pass through. Over the channel dimension every output depends on
all channels, and a zeroed channel still counts where a removed one does not: those channels
are kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import operator

import numpy as np

from .channels import NO_CHANNEL, vector_along
from .context import is_carrying, tensor_shape
from .registry import register_function_rule, register_method_rule, register_module_rule


def _implicit_dim(ndim: int) -> int:
    # torch's legacy choice when a softmax is called without dim
    return 0 if ndim in (0, 1, 3) else 1


def normalised_over(ctx, node, dim, what: str):
    """Output ids of an op that normalises ``node.args[0]`` along ``dim``."""
    x = node.args[0]
    ids = ctx.ids(x)
    ndim = len(tensor_shape(ctx.value(x)))
    if ids is None or ndim == 0:
        return ids
    dim = _implicit_dim(ndim) if dim is None else dim % ndim
    if is_carrying(ids, dim):
        ctx.fix(ids, f"normalised by a {what} over channels ('{node.name}')")
    return ids


@register_function_rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
@register_method_rule("softmax", "log_softmax")
def softmax_function(ctx, node, module=None):
    """``F.softmax(x, dim)`` and its method / log variants."""
    return normalised_over(ctx, node, ctx.arg(1, "dim"), "softmax")


@register_module_rule(nn.Softmax)
@register_module_rule(nn.LogSoftmax)
def softmax_module(ctx, node, module):
    """``nn.Softmax`` / ``nn.LogSoftmax``."""
    return normalised_over(ctx, node, module.dim, "softmax")


@register_function_rule(F.normalize)
def normalize(ctx, node, module=None):
    """``F.normalize(x, p, dim)``: an L2 normalisation along ``dim``."""
    return normalised_over(ctx, node, ctx.arg(2, "dim", 1), "norm")


@register_function_rule(torch.matmul, operator.matmul, torch.bmm)
@register_method_rule("matmul", "bmm")
def matmul(ctx, node, module=None):
    """``a @ b``: batch dimensions broadcast like an element-wise op; the contracted dimension
    sums products, so its channels are paired position by position (a zeroed channel adds
    nothing, as a removed one); rows keep ``a``'s channels, columns ``b``'s. (Global-context
    attention: ``x.reshape(B, 1, C, HW) @ softmax(attn).reshape(B, 1, HW, 1)``.)"""
    a, b = node.args[:2]
    sa, sb = tensor_shape(ctx.value(a)), tensor_shape(ctx.value(b))
    if len(sa) < 2 or len(sb) < 2:
        ctx.fail("a matrix product with a 1-D operand")
    ia, ib = _padded(ctx.ids(a), len(sa)), _padded(ctx.ids(b), len(sb))
    contracted_a, contracted_b = _contract(ctx, node, ia, -1, sa[-1], ib, -2, sb[-2])
    return _product(ctx, node, ia, sa, contracted_a, ib, sb, contracted_b)


def _contract(ctx, node, ia, dim_a, len_a, ib, dim_b, len_b):
    """Pair the channels of two operands along a summed dimension, position by position."""
    contracted_a, contracted_b = is_carrying(ia, dim_a), is_carrying(ib, dim_b)
    if contracted_a or contracted_b:
        try:
            va, vb = vector_along(ia, dim_a, len_a), vector_along(ib, dim_b, len_b)
            if (va < 0).any() or (vb < 0).any():
                raise ValueError("a contracted channel meets a value without channel")
            ctx.unite(va, vb)
        except ValueError:
            reason = f"contracted with values prunekit cannot pair in '{node.name}'"
            ctx.fix(ia, reason)
            ctx.fix(ib, reason)
    return contracted_a, contracted_b


def _product(ctx, node, ia, sa, contracted_a, ib, sb, contracted_b):
    """Rows keep ``a``'s channels, columns ``b``'s; batch dimensions broadcast."""
    rows = np.full(ia.shape[:-1] + (1,), NO_CHANNEL) if contracted_a else ia
    cols = np.full(ib.shape[:-2] + (1,) + ib.shape[-1:], NO_CHANNEL) if contracted_b else ib
    return ctx.merge([(rows, tuple(sa[:-1]) + (1,)), (cols, tuple(sb[:-2]) + (1,) + sb[-1:])],
                     tensor_shape(ctx.value(node)))


_SDPA = getattr(F, "scaled_dot_product_attention", None)


def scaled_dot_product_attention(ctx, node, module=None):
    """``softmax(q @ k^T * scale) @ v``: q and k are paired along their last dimension, and
    the default scale ``1 / sqrt(E)`` counts those channels, so without an explicit ``scale``
    they are kept; the softmax runs over key positions, which must not be channels; the output
    carries ``v``'s channels."""
    q, k, v = node.args[:3]
    shapes = [tensor_shape(ctx.value(t)) for t in (q, k, v)]
    if any(len(s) < 2 for s in shapes):
        ctx.fail("attention with a 1-D operand")
    iq, ik, iv = (_padded(ctx.ids(t), len(s)) for t, s in zip((q, k, v), shapes))
    contracted, _ = _contract(ctx, node, iq, -1, shapes[0][-1], ik, -1, shapes[1][-1])
    if contracted and ctx.arg(6, "scale") is None:
        reason = f"their number sets the default scale of '{node.name}'"
        ctx.fix(iq, reason)
        ctx.fix(ik, reason)
    if is_carrying(ik, -2) or is_carrying(iv, -2):
        ctx.fix(ik, f"softmax over them as key positions in '{node.name}'")
        ctx.fix(iv, f"softmax over them as key positions in '{node.name}'")
    for extra in list(node.args[3:4]) + [node.kwargs.get("attn_mask")]:
        ctx.fix(ctx.ids(extra), f"attention mask of '{node.name}'")
    return _product(ctx, node, iq, shapes[0], True, iv, shapes[2], is_carrying(iv, -2))


if _SDPA is not None:
    register_function_rule(_SDPA, rule=scaled_dot_product_attention)


def _padded(ids, ndim):
    if ids is None:
        return np.full((1,) * ndim, NO_CHANNEL, dtype=np.int64)
    return ids.reshape((1,) * (ndim - ids.ndim) + ids.shape)
