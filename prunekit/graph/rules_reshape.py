"""Channel rules for reshaping: permute/transpose, view/reshape/flatten/unflatten, expand.

A reshape moves channel variables with the tensor. Literal sizes on channel dimensions hold:
all channels when every channel dimension is literal, or channels at the same position of
each literal group otherwise (``(groups, C // groups)``). Sizes computed from a channel count
follow the pruning; they are checked against the channels they size once the trace is done.
"""
from __future__ import annotations

import numpy as np
import torch

from .channels import NO_CHANNEL, carrying_dims, compress
from .context import tensor_shape
from .numbers import takes_counts
from .registry import register_function_rule, register_method_rule


def _is_node(x) -> bool:
    return hasattr(x, "op") and hasattr(x, "name")


def _out_shape(ctx):
    return tensor_shape(ctx.value(ctx.node))


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
    if in_shape and out_shape and in_shape[0] == out_shape[0] and ids.shape[0] == 1:
        # The batch dimension stays: reshape one sample's ids only.
        full = np.broadcast_to(ids, (1,) + tuple(in_shape[1:]))
        ids = compress(full.reshape((1,) + tuple(out_shape[1:])))
    elif 0 in carrying_dims(ids) or (in_shape and in_shape[0] == 1):
        # A parameter (no batch dimension: ConvNeXt's gamma.reshape(1, -1, 1, 1)) or a batch
        # of one merged with other dimensions.
        ids = compress(np.broadcast_to(ids, tuple(in_shape)).reshape(tuple(out_shape)))
    else:
        ctx.fail("reshape that merges the batch dimension with channels")
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
    ids = compress(ctx.roots(ids))
    if literal and not carrying_dims(ids):
        # The unions tied every channel to every other (a second channel shuffle of a stream
        # the first one already paired up): they can only go all at once, so none goes.
        ctx.fix(ids, f"grouped by literal sizes in '{node.name}' so that all its channels "
                     "must go together")
    return ids


def _literal_flags(sizes, ndim):
    flags = []
    for s in sizes:
        flags.append(isinstance(s, int) and s != -1)
    return flags if len(flags) == ndim else None


@register_method_rule("view", "reshape")
@takes_counts
def view(ctx, node, module=None):
    x = node.args[0]
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = sizes[0]
    if not sizes and "shape" in node.kwargs:
        sizes = node.kwargs["shape"]
    if len(sizes) == 1 and _is_node(sizes[0]) and not isinstance(ctx.value(sizes[0]), int):
        counted = ctx.taint(sizes[0])
        sizes = ctx.value(sizes[0])  # a torch.Size computed from another tensor: not literal
        literal = [False] * len(sizes)
    else:
        counted = [ctx.counted(s) for s in sizes]
        literal = _literal_flags(sizes, len(_out_shape(ctx)))
    ids = _reshape_to(ctx, node, ctx.ids(x), tensor_shape(ctx.value(x)), _out_shape(ctx), literal)
    return _sized_by_counts(ctx, ids, counted)


def _sized_by_counts(ctx, ids, counted):
    """A size computed from a channel count (``x.reshape(B, C // r, ...)`` with ``C =
    y.shape[1]``) follows the pruning of the channels it counts; it must be the channels the
    reshaped dimension holds, which is checked once the trace is complete."""
    if not isinstance(counted, list) or ids is None:
        return ids
    for d, vars_ in enumerate(counted[:ids.ndim]):
        vars_ = np.asarray(vars_ if vars_ is not None else [], dtype=np.int64).reshape(-1)
        if vars_.size:
            held = np.unique(ids) if ids.shape[d] > 1 else np.zeros(0, dtype=np.int64)
            ctx.state.count_checks.append((vars_, held[held >= 0], ctx.node.name))
    return ids


@register_function_rule(torch.reshape)
@takes_counts
def reshape_function(ctx, node, module=None):
    x = node.args[0]
    sizes = ctx.arg(1, "shape")
    literal = _literal_flags(sizes, len(_out_shape(ctx))) if isinstance(sizes, (list, tuple)) else None
    counted = [ctx.counted(s) for s in sizes] if isinstance(sizes, (list, tuple)) else \
        ctx.taint(sizes)
    ids = _reshape_to(ctx, node, ctx.ids(x), tensor_shape(ctx.value(x)), _out_shape(ctx), literal)
    return _sized_by_counts(ctx, ids, counted)


@register_function_rule(torch.flatten, torch.squeeze, torch.unsqueeze)
@register_method_rule("flatten", "squeeze", "unsqueeze", "view_as", "reshape_as")
def shape_only(ctx, node, module=None):
    """Reshapes whose sizes come from the tensor itself: never literal."""
    x = node.args[0]
    return _reshape_to(ctx, node, ctx.ids(x), tensor_shape(ctx.value(x)), _out_shape(ctx), None)


@register_function_rule(torch.unflatten)
@register_method_rule("unflatten")
@takes_counts
def unflatten(ctx, node, module=None):
    """``x.unflatten(1, (radix, -1))``: the literal sizes hold like a view's."""
    x = node.args[0]
    in_shape, out_shape = tensor_shape(ctx.value(x)), _out_shape(ctx)
    dim = ctx.arg(1, "dim") % len(in_shape)
    sizes = list(ctx.arg(2, "sizes"))
    literal = [False] * dim + [isinstance(v, int) and v != -1 for v in sizes]
    literal += [False] * (len(out_shape) - len(literal))
    ids = _reshape_to(ctx, node, ctx.ids(x), in_shape, out_shape, literal)
    counted = [np.zeros(0, dtype=np.int64)] * dim + [ctx.counted(v) for v in sizes]
    return _sized_by_counts(ctx, ids, counted)


@register_method_rule("expand", "expand_as")
@takes_counts
def expand(ctx, node, module=None):
    """Broadcasting made explicit: the ids already broadcast along the expanded dims.

    One channel expanded to a size that follows another tensor's channels (``expand_as(y)``,
    ``expand(-1, y.size(1), ...)``) serves whichever channels remain, like a broadcast; expanded
    to a literal size it fills a fixed number of positions (see ``RuleContext.merge``).
    """
    x = node.args[0]
    ids = ctx.ids(x)
    if ids is None:
        return None
    out_shape = _out_shape(ctx)
    ndim = len(out_shape)
    ids = ids.reshape((1,) * (ndim - ids.ndim) + ids.shape)
    in_shape = (1,) * (ndim - len(tensor_shape(ctx.value(x)))) + tensor_shape(ctx.value(x))
    grown = [d for d in range(1, ndim) if in_shape[d] == 1 and out_shape[d] > 1]
    value = int(ids.reshape(-1)[0])
    if grown and not carrying_dims(ids) and value >= 0 and _size_follows_channels(ctx, node):
        ctx.fix(ids, f"one channel expanded across channels by '{node.name}'")
        return np.full_like(ids, NO_CHANNEL)
    return ids


def _size_follows_channels(ctx, node) -> bool:
    if node.target == "expand_as":
        other = ctx.ids(node.args[1]) if len(node.args) > 1 else ctx.ids(node.kwargs["other"])
        return other is not None and bool(carrying_dims(other))
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = sizes[0]
    return any(ctx.counted(v).size for v in sizes)
