"""Channel rules for tensor plumbing: element-wise ops, cat/split, reshape, permute, indexing, pad.

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
    F.alpha_dropout, F.relu_, F.prelu, torch.zeros_like, torch.ones_like,
)
register_function_rule(*ELEMENTWISE_FUNCTIONS, rule=elementwise)
register_method_rule(
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid",
    "sigmoid_", "tanh", "clamp", "clamp_", "clamp_min", "abs", "neg", "exp", "sqrt", "pow",
    "contiguous", "float", "half", "to", "type_as", "clone", "detach", "masked_fill",
    "zero_", "fill_", "hardtanh_", "sqrt_", "rsqrt", rule=elementwise,
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
    parts = [(ctx.ids(t), tensor_shape(ctx.value(t))) for t in tensors]
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


def _split_sizes(ctx, node, dim):
    return [tensor_shape(v)[dim] for v in ctx.value(node)]


def _split_like(ctx, node, dim_index, dim_name, equal_pieces: bool):
    x = node.args[0]
    ids = ctx.ids(x)
    ndim = len(tensor_shape(ctx.value(x)))
    dim = ctx.arg(dim_index, dim_name, 0) % ndim
    sizes = _split_sizes(ctx, node, dim)
    if ids is None or ids.shape[dim] == 1:
        return [ids for _ in sizes]
    if equal_pieces:
        # chunk(n) cuts the pruned tensor into n equal pieces too, so every piece must lose as
        # many channels as the others. Uniting position j of every piece guarantees that and,
        # unlike per-piece counting, never conflicts with another chunk of the same channels
        # (ShuffleNet chunks its stream once per block, each time after a different shuffle).
        vec = ctx.channel_vector(ids, dim, sum(sizes))
        if len(set(sizes)) == 1:
            pieces = vec.reshape(len(sizes), -1)
            for piece in pieces[1:]:
                ctx.unite(pieces[0], piece)
        else:
            ctx.fix(ids, f"chunked into unequal pieces by '{node.name}'")
    elif not _is_node(ctx.arg(1, "split_size_or_sections")):
        ctx.fix(ids, f"split into literal sizes by '{node.name}'")
    bounds = np.cumsum([0] + sizes)
    return [np.take(ids, np.arange(bounds[i], bounds[i + 1]), axis=dim) for i in range(len(sizes))]


@register_function_rule(torch.split)
@register_method_rule("split")
def split(ctx, node, module=None):
    return _split_like(ctx, node, 2, "dim", equal_pieces=False)


@register_function_rule(torch.chunk, torch.tensor_split)
@register_method_rule("chunk", "tensor_split")
def chunk(ctx, node, module=None):
    return _split_like(ctx, node, 2, "dim", equal_pieces=True)


@register_function_rule(torch.unbind)
@register_method_rule("unbind")
def unbind(ctx, node, module=None):
    ids = ctx.ids(node.args[0])
    dim = ctx.arg(1, "dim", 0) % ids.ndim
    if ids.shape[dim] > 1:
        ctx.fail("unbinding a channel dimension")
    return [np.squeeze(ids, axis=dim) for _ in ctx.value(node)]


def _permute_ids(ids, order):
    return np.transpose(ids, order)


@register_function_rule(torch.permute)
@register_method_rule("permute")
def permute(ctx, node, module=None):
    ids = ctx.ids(node.args[0])
    dims = node.args[1:] if len(node.args) > 2 else ctx.arg(1, "dims")
    dims = [d % ids.ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    return _permute_ids(ids, dims)


@register_function_rule(torch.transpose, torch.swapaxes)
@register_method_rule("transpose", "swapaxes")
def transpose(ctx, node, module=None):
    ids = ctx.ids(node.args[0])
    a, b = ctx.arg(1, "dim0") % ids.ndim, ctx.arg(2, "dim1") % ids.ndim
    order = list(range(ids.ndim))
    order[a], order[b] = order[b], order[a]
    return _permute_ids(ids, order)


def _reshape_to(ctx, node, ids, in_shape, out_shape, literal_out: list[bool] | None):
    """Reshape ids along with the tensor; hold literal sizes of channel dims constant."""
    if ids is None or not carrying_dims(ids):
        # One channel identity (or none) everywhere: it stays everywhere.
        value = NO_CHANNEL if ids is None else int(ids.reshape(-1)[0])
        return np.full((1,) * len(out_shape), value, dtype=np.int64)
    if in_shape[0] != out_shape[0] and 0 not in carrying_dims(ids):
        ctx.fail("reshape that merges the batch dimension with channels")
    full = np.broadcast_to(ids, (1,) + tuple(in_shape[1:]))
    ids = compress(full.reshape((1,) + tuple(out_shape[1:])))
    ids = ctx.roots(ids)
    carrying = carrying_dims(ids)
    literal = [d for d in carrying if literal_out and literal_out[d]]
    if literal and len(literal) == len(carrying):
        # e.g. x.view(n, 512 * 7 * 7): the code fixes the size, so no channel may go.
        ctx.fix(ids, f"reshaped to a literal size by '{node.name}'")
        return ids
    for d in literal:
        # A split such as (groups, C // groups) keeps `groups`: channels at the same position of
        # every group must go together, so the split stays a valid reshape after pruning.
        moved = np.moveaxis(ids, d, 0)
        for row in moved[1:]:
            ctx.unite(moved[0], row)
    return compress(ctx.roots(ids))


def _literal_flags(sizes, ndim):
    flags = []
    for s in sizes:
        flags.append(isinstance(s, int) and s != -1)
    return flags if len(flags) == ndim else None


@register_method_rule("view", "reshape")
def view(ctx, node, module=None):
    x = node.args[0]
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = sizes[0]
    if not sizes and "shape" in node.kwargs:
        sizes = node.kwargs["shape"]
    if len(sizes) == 1 and _is_node(sizes[0]) and not isinstance(ctx.value(sizes[0]), int):
        sizes = ctx.value(sizes[0])  # a torch.Size computed from another tensor: not literal
        literal = [False] * len(sizes)
    else:
        literal = _literal_flags(sizes, len(_out_shape(ctx)))
    return _reshape_to(ctx, node, ctx.ids(x), tensor_shape(ctx.value(x)), _out_shape(ctx), literal)


@register_function_rule(torch.reshape)
def reshape_function(ctx, node, module=None):
    x = node.args[0]
    sizes = ctx.arg(1, "shape")
    literal = _literal_flags(sizes, len(_out_shape(ctx))) if isinstance(sizes, (list, tuple)) else None
    return _reshape_to(ctx, node, ctx.ids(x), tensor_shape(ctx.value(x)), _out_shape(ctx), literal)


@register_function_rule(torch.flatten, torch.squeeze, torch.unsqueeze)
@register_method_rule("flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten")
def shape_only(ctx, node, module=None):
    """Reshapes whose sizes come from the tensor itself: never literal."""
    x = node.args[0]
    return _reshape_to(ctx, node, ctx.ids(x), tensor_shape(ctx.value(x)), _out_shape(ctx), None)


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


register_function_rule(getattr, builtins.len, operator.floordiv, operator.mod, math.ceil,
                       math.floor, builtins.int, rule=no_channel_result)
register_method_rule("size", "dim", "numel", rule=no_channel_result)
