"""Channel rules for cutting a tensor into pieces and putting pieces together: split, chunk,
tensor_split, unbind and stack.

A split into literal sizes is the delicate case: the sizes cannot follow a pruning unless they
are a module attribute surgery rewrites (timm's MixConv keeps its sections in ``self.splits``,
Res2Net its width in ``self.width``). Then every piece is pruned on its own (MixConv) or all
pieces alike (an equal-size split); otherwise the split channels are kept.
"""
from __future__ import annotations

import numpy as np
import torch

from .attributes import attribute_holding
from .channels import carrying_dims
from .context import tensor_shape
from .numbers import takes_counts
from .registry import register_function_rule, register_method_rule
from .rules_tensor import tensor_list


def _pieces(ids, dim, sizes):
    bounds = np.cumsum([0] + list(sizes))
    return [np.take(ids, np.arange(bounds[i], bounds[i + 1]), axis=dim) for i in range(len(sizes))]


def _unite_pieces(ctx, vec, count):
    """Position j of every piece goes together, so all pieces keep equal sizes."""
    pieces = vec.reshape(count, -1)
    for piece in pieces[1:]:
        ctx.unite(pieces[0], piece)


def _prepare(ctx, node, dim_index):
    x = node.args[0]
    ids = ctx.ids(x)
    ndim = len(tensor_shape(ctx.value(x)))
    dim = ctx.arg(dim_index, "dim", 0) % ndim
    sizes = [tensor_shape(v)[dim] for v in ctx.value(node)]
    return ids, dim, sizes


@register_function_rule(torch.split)
@register_method_rule("split")
@takes_counts
def split(ctx, node, module=None):
    """``torch.split``: pieces of sizes an attribute holds follow the pruning; other literal
    or computed sizes keep the split channels."""
    ids, dim, sizes = _prepare(ctx, node, 2)
    arg = ctx.arg(1, "split_size_or_sections")
    if ids is None or ids.shape[dim] == 1:
        ctx.fix(ctx.counted(arg), f"their number sizes the pieces of '{node.name}'")
        return [ids for _ in sizes]
    if any(d != dim for d in carrying_dims(ids)):
        ctx.fix(ids, f"split along one of several channel dimensions by '{node.name}'")
        return _pieces(ids, dim, sizes)
    vec = ctx.channel_vector(ids, dim, sum(sizes))
    where = attribute_holding(ctx, arg) if isinstance(arg, (int, list, tuple)) else None
    equal = len(set(sizes)) == 1
    if where is not None and isinstance(arg, int) and equal:
        # split(x, self.width): pieces stay equal, the attribute becomes the kept width
        _unite_pieces(ctx, vec, len(sizes))
        ctx.attr_member(*where, vec[:sizes[0]], source=False)
    elif where is not None and isinstance(arg, (list, tuple)):
        # split(x, self.splits): each piece is pruned on its own, the list follows
        ctx.attr_member(*where, vec, parts=tuple(sizes), source=False)
        ctx.partition(vec, sizes)
    elif _one_attribute_each(ctx, arg, sizes):
        # split(x, [self.dim_conv3, self.dim_untouched]) (FasterNet): one attribute per piece
        bounds = np.cumsum([0] + sizes)
        for i, holder in enumerate(_one_attribute_each(ctx, arg, sizes)):
            ctx.attr_member(*holder, vec[bounds[i]:bounds[i + 1]], source=False)
        ctx.partition(vec, sizes)
    else:
        what = ("sizes computed from a channel count" if ctx.counted(arg).size else
                "literal sizes that are no attribute of its module")
        ctx.fix(ids, f"split into {what} by '{node.name}'")
        ctx.fix(ctx.counted(arg), f"their number sizes the pieces of '{node.name}'")
    return _pieces(ids, dim, sizes)


def _one_attribute_each(ctx, arg, sizes):
    if not isinstance(arg, (list, tuple)) or len(arg) != len(sizes):
        return None
    holders = [attribute_holding(ctx, v) if isinstance(v, int) else None for v in arg]
    if None in holders or len(set(holders)) != len(holders):
        return None
    return holders


@register_function_rule(torch.chunk, torch.tensor_split)
@register_method_rule("chunk", "tensor_split")
def chunk(ctx, node, module=None):
    """``chunk(n)`` / ``tensor_split(n)`` into equal pieces: the pieces are pruned alike."""
    ids, dim, sizes = _prepare(ctx, node, 2)
    if ids is None or ids.shape[dim] == 1:
        return [ids for _ in sizes]
    # chunk(n) cuts the pruned tensor into n equal pieces too, so every piece must lose as
    # many channels as the others. Uniting position j of every piece guarantees that and,
    # unlike per-piece counting, never conflicts with another chunk of the same channels
    # (ShuffleNet chunks its stream once per block, each time after a different shuffle).
    count = ctx.arg(1, "chunks" if node.target in (torch.chunk, "chunk") else
                    "indices_or_sections")
    pieces = _pieces(ids, dim, sizes)
    if isinstance(count, int) and len(set(sizes)) == 1 and len(sizes) == count:
        for piece in pieces[1:]:
            ctx.unite(*np.broadcast_arrays(pieces[0], piece))
    else:
        ctx.fix(ids, f"cut into unequal or listed pieces by '{node.name}'")
    return pieces


@register_function_rule(torch.unbind)
@register_method_rule("unbind")
def unbind(ctx, node, module=None):
    """Unbinding a channel dimension makes one tensor per channel: those channels stay."""
    ids = ctx.ids(node.args[0])
    ndim = len(tensor_shape(ctx.value(node.args[0])))
    dim = ctx.arg(1, "dim", 0) % ndim
    count = len(ctx.value(node))
    if ids is None:
        return [None] * count
    if ids.shape[dim] > 1:
        # Each piece is one channel: the number of pieces is fixed by the code that uses them.
        ctx.fix(ids, f"unbound into single channels by '{node.name}'")
        return [np.take(ids, i, axis=dim) for i in range(count)]
    return [np.squeeze(ids, axis=dim) for _ in range(count)]


@register_function_rule(torch.stack)
def stack(ctx, node, module=None):
    """Stacking needs equal shapes, and what follows (a sum or softmax over the new dim, as in
    SKNet's selective kernel) mixes the pieces position by position: unite them."""
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    parts = tensor_list(ctx, tensors)
    shape = parts[0][1]
    merged = ctx.merge(parts, shape)
    dim = ctx.arg(1, "dim", 0) % (len(shape) + 1)
    merged = merged.reshape((1,) * (len(shape) - merged.ndim) + merged.shape)
    return np.expand_dims(merged, dim)
