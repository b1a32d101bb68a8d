"""Channel rules for tensor plumbing: element-wise ops, cat, indexing, pad, reductions.

Each rule maps the channel ids of a node's inputs to the ids of its output (see channels.py).
"""
from __future__ import annotations

import builtins
import math
import operator

import numpy as np
import torch
import torch.nn.functional as F

from .channels import NO_CHANNEL, carrying_dims, compress
from .context import tensor_shape
from .registry import register_function_rule, register_method_rule


def _is_node(x) -> bool:
    return hasattr(x, "op") and hasattr(x, "name")


def _tensor_args(ctx, node):
    """(ids, shape) of every tensor among the node's positional and keyword arguments."""
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if _is_node(a) and isinstance(ctx.value(a), torch.Tensor):
            out.append((ctx.ids(a), tensor_shape(ctx.value(a))))
    return out


def _out_shape(ctx):
    return tensor_shape(ctx.value(ctx.node))


def tensor_list(ctx, tensors) -> list[tuple]:
    """(ids, shape) of each tensor of a list argument: a literal list of nodes, or one node
    whose value is a list (the pieces of a split passed on whole)."""
    if _is_node(tensors):
        ids = ctx.ids(tensors)
        ids = ids if isinstance(ids, list) else [None] * len(ctx.value(tensors))
        return [(i, tensor_shape(v)) for i, v in zip(ids, ctx.value(tensors))]
    return [(ctx.ids(t), tensor_shape(ctx.value(t))) for t in tensors]


# ---- element-wise -----------------------------------------------------------------------------
def elementwise(ctx, node, module=None):
    """add/sub/mul/div/where/...: broadcast, and operands' channels at one position are united."""
    return ctx.merge(_tensor_args(ctx, node), _out_shape(ctx))


ELEMENTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.neg, torch.add, torch.sub, torch.mul, torch.div,
    torch.where, torch.neg, torch.maximum, torch.minimum, torch.clamp, torch.clip, torch.abs,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.sqrt, torch.rsqrt, torch.pow,
    F.relu, F.relu6, F.elu, F.selu, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout2d,
    F.alpha_dropout, F.relu_, F.prelu, torch.zeros_like, torch.ones_like, operator.invert,
    operator.pow, operator.pos, operator.abs, operator.ipow, operator.floordiv, operator.mod,
    operator.and_, operator.or_, operator.xor, operator.eq, operator.ne, operator.lt, operator.le,
    operator.gt, operator.ge, torch.logical_not, torch.logical_and, torch.logical_or,
    torch.erf, torch.log, torch.sin, torch.cos, torch.square, torch.reciprocal, torch.addcmul,
    torch.addcdiv, torch.lerp,
)
register_function_rule(*ELEMENTWISE_FUNCTIONS, rule=elementwise)
register_method_rule(
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid",
    "sigmoid_", "tanh", "clamp", "clamp_", "clamp_min", "abs", "neg", "exp", "sqrt", "pow",
    "contiguous", "float", "half", "to", "type_as", "clone", "detach", "masked_fill",
    "zero_", "fill_", "hardtanh_", "sqrt_", "rsqrt", "bool", "int", "long", "double",
    "square", "reciprocal", "sin", "cos", "log", "erf", "logical_not", "masked_fill_",
    "hardswish", "hardsigmoid", "silu", "gelu", "softplus", "mish", "exp_", "mul_", "clamp_max",
    "addcmul", "addcmul_", "addcdiv", "lerp",
    rule=elementwise,
)


def _stochastic_depth():
    try:
        from torchvision.ops import stochastic_depth
        return (stochastic_depth,)
    except ImportError:  # torchvision is optional
        return ()


register_function_rule(*_stochastic_depth(), rule=elementwise)


# ---- shape plumbing -----------------------------------------------------------------------------
@register_function_rule(torch.cat, torch.concat)
def concatenate(ctx, node, module=None):
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = ctx.arg(1, "dim", 0)
    out_shape = _out_shape(ctx)
    dim %= len(out_shape)
    parts = tensor_list(ctx, tensors)
    if not any(ids is not None and ids.shape[dim] > 1 or
               (ids is not None and shape[dim] == 1 and (ids >= 0).any()) for ids, shape in parts):
        # Concatenating along a dimension without channels (e.g. spatial): like element-wise.
        aligned = [(ids, tuple(out_shape[:dim]) + (1,) + tuple(out_shape[dim + 1:]))
                   for ids, _ in parts]
        return ctx.merge(aligned, tuple(out_shape[:dim]) + (1,) + tuple(out_shape[dim + 1:]))
    pieces = []
    for ids, shape in parts:
        ids = ids if ids is not None else np.full((1,) * len(out_shape), NO_CHANNEL)
        target = [1 if ids.shape[d] == 1 else ids.shape[d] for d in range(len(out_shape))]
        target[dim] = shape[dim]
        pieces.append(np.broadcast_to(ids, target))
    # other carrying dims must agree between pieces; broadcast them against each other.
    common = [max(p.shape[d] for p in pieces) for d in range(len(out_shape))]
    pieces = [np.broadcast_to(p, [p.shape[d] if d == dim else common[d]
                                  for d in range(len(out_shape))]) for p in pieces]
    return compress(np.concatenate(pieces, axis=dim))


@register_function_rule(operator.getitem)
def getitem(ctx, node, module=None):
    container, index = node.args
    value = ctx.value(container)
    ids = ctx.ids(container)
    if isinstance(ids, list):
        return ids[index]
    if not isinstance(value, torch.Tensor) or ids is None:
        return None
    return _index_ids(ctx, ids, tensor_shape(value), index)


def _index_ids(ctx, ids, shape, index):
    index = index if isinstance(index, tuple) else (index,)
    if any(_is_node(i) or isinstance(i, (torch.Tensor, list)) for i in index):
        for d, i in enumerate(index):
            if (_is_node(i) or isinstance(i, (torch.Tensor, list))) and d < ids.ndim and ids.shape[d] > 1:
                ctx.fail("indexing a channel dimension with a tensor")
    n_explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (len(shape) - n_explicit))
        else:
            expanded.append(i)
    d = 0
    result = ids
    axis = 0
    for i in expanded:
        if i is None:
            result = np.expand_dims(result, axis)
            axis += 1
            continue
        if result.shape[axis] == 1:
            if isinstance(i, int):
                result = np.squeeze(result, axis)
            else:
                axis += 1
        else:
            if isinstance(i, int):
                result = np.take(result, i, axis=axis)
            elif isinstance(i, slice):
                picked = np.arange(shape[d])[i]
                if len(picked) != shape[d]:
                    # A literal slice picks positions, and positions move when channels go:
                    # keep every channel of the sliced dimension.
                    ctx.fix(result, "sliced with literal indices")
                result = np.take(result, picked, axis=axis)
                axis += 1
            else:
                ctx.fail(f"unsupported index {i!r} on a channel dimension")
        d += 1
    return compress(result)


@register_function_rule(F.pad)
def pad(ctx, node, module=None):
    """Constant padding: padded channel slots are zeros the code places at literal offsets."""
    x = node.args[0]
    widths = ctx.arg(1, "pad")
    ids = ctx.ids(x)
    in_shape = tensor_shape(ctx.value(x))
    ndim = len(in_shape)
    result = ids
    for k in range(len(widths) // 2):
        d = ndim - 1 - k
        before, after = widths[2 * k], widths[2 * k + 1]
        if (before or after) and result.shape[d] > 1 or (d == 1 and (before or after)):
            vec = np.broadcast_to(result, [in_shape[j] if j == d else result.shape[j]
                                           for j in range(ndim)])
            zeros_shape = list(vec.shape)
            if before < 0 or after < 0:
                # A literal crop would cut other channels once some are gone: keep them all.
                ctx.fix(vec, f"channels cropped with literal widths by '{node.name}'")
            lo = max(before, 0)
            hi = max(after, 0)
            core = np.take(vec, np.arange(max(-before, 0), in_shape[d] - max(-after, 0)), axis=d)
            slots = []
            for width in (lo, hi):
                zeros_shape[d] = width
                fresh = ctx.new_vars(int(np.prod(zeros_shape))).reshape(zeros_shape)
                # The literal widths cannot follow a pruning, so these slots are never removed.
                ctx.fix(fresh, f"zero channels padded with literal widths by '{node.name}'")
                slots.append(fresh)
            result = compress(np.concatenate([slots[0], core, slots[1]], axis=d))
    return result


# ---- reductions ---------------------------------------------------------------------------------
def _reduction(ctx, node, dims, keepdim):
    x = node.args[0]
    ids = ctx.ids(x)
    ndim = len(tensor_shape(ctx.value(x)))
    if ids is None:
        return None
    if dims is None:
        dims = list(range(ndim))
    dims = [d % ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    reduced_channels = [d for d in dims if ids.shape[d] > 1]
    if reduced_channels:
        # A mean/max over channels changes when a zeroed channel is dropped, so keep them all.
        ctx.fix(ids, f"reduced over channels by '{node.name}'")
    result = ids
    for d in sorted(dims, reverse=True):
        result = np.take(result, [0], axis=d) if result.shape[d] > 1 else result
        if reduced_channels:
            result = np.full(result.shape, NO_CHANNEL, dtype=np.int64)
        if not keepdim:
            result = np.squeeze(result, d)
    return compress(result)


@register_function_rule(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var)
@register_method_rule("mean", "sum", "amax", "amin", "std", "var")
def reduction(ctx, node, module=None):
    return _reduction(ctx, node, ctx.arg(1, "dim"), ctx.arg(2, "keepdim", False))


@register_function_rule(torch.norm)
@register_method_rule("norm")
def norm(ctx, node, module=None):
    """``x.norm(p=2, dim=(1, 2), keepdim=True)`` (ConvNeXt-V2's GRN): a reduction."""
    return _reduction(ctx, node, ctx.arg(2, "dim"), ctx.arg(3, "keepdim", False))


@register_function_rule(torch.cumsum, torch.cumprod)
@register_method_rule("cumsum", "cumprod")
def cumulative(ctx, node, module=None):
    """Along a dimension without channels every channel stays by itself; along channels each
    output depends on all earlier channels, so they are kept."""
    ids = ctx.ids(node.args[0])
    dim = ctx.arg(1, "dim")
    if ids is not None and ids.shape[dim % ids.ndim] > 1:
        ctx.fix(ids, f"accumulated over channels by '{node.name}'")
    return ids


# ---- spatial ops (channels untouched) ------------------------------------------------------------
def spatial(ctx, node, module=None):
    x = node.args[0]
    ids = ctx.ids(x)
    if ids is not None and any(d >= 2 for d in carrying_dims(ids)):
        ctx.fail("a spatial op on a tensor whose channels spread over spatial dimensions")
    out = _out_shape(ctx)
    return ids if ids is None or ids.ndim == len(out) else ctx.fail("rank-changing spatial op")


register_function_rule(
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.interpolate, F.upsample,
    rule=spatial,
)


def no_channel_result(ctx, node, module=None):
    """Shape queries and Python arithmetic: the result carries no channels."""
    return None


register_function_rule(getattr, builtins.len, math.ceil, math.floor, builtins.int,
                       rule=no_channel_result)
register_method_rule("size", "dim", "numel", rule=no_channel_result)
