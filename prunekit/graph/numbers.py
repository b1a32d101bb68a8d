"""Channel counts used as numbers: ``x.shape[1]``, ``x.size(1)``, ``x.numel()`` and what is
computed from them.

A pruned model computes these from its smaller tensors, so a forward that only reshapes with
them stays correct, but one that divides by them (``x / x.shape[1]``), builds a tensor of that
size (``torch.arange(C)``) or asserts on them computes something else once channels go. Each
non-tensor value of the trace therefore carries the channel variables whose number it depends
on (its *taint*); a rule that may take such numbers as sizes says so
(:func:`takes_counts`), and anywhere else the counted channels are fixed.

A taint is a 1-D int array of channel variables, or a list of taints for a sequence (a
``torch.Size``, a tuple of sizes).
"""
from __future__ import annotations

import builtins
import operator

import numpy as np
import torch

EMPTY = np.zeros(0, dtype=np.int64)


def takes_counts(rule):
    """Mark ``rule`` as one whose non-tensor arguments may be channel counts used as sizes
    (reshapes, splits): the rule itself keeps them consistent, so they are not fixed."""
    rule.prunekit_takes_counts = True
    return rule


def accepts_counts(rule) -> bool:
    """Whether ``rule`` was marked with :func:`takes_counts`."""
    return bool(getattr(rule, "prunekit_takes_counts", False))


def flat(taint) -> np.ndarray:
    """Every channel variable a taint (scalar or sequence) depends on."""
    if taint is None:
        return EMPTY
    if isinstance(taint, list):
        parts = [flat(t) for t in taint]
        return np.unique(np.concatenate(parts)) if parts else EMPTY
    return taint


def _per_dim(ids, ndim: int) -> list[np.ndarray]:
    if ids is None:
        return [EMPTY] * ndim
    out = []
    for d in range(ndim):
        if d < ids.ndim and ids.shape[d] > 1:
            values = np.unique(ids)
            out.append(values[values >= 0])
        else:
            out.append(EMPTY)
    return out


def _node_args(node):
    found = []

    def walk(a):
        if hasattr(a, "op") and hasattr(a, "name"):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                walk(x)
        elif isinstance(a, dict):
            for x in a.values():
                walk(x)

    walk((node.args, dict(node.kwargs)))
    return found


def count_taint(node, value_of, ids_of, taint_of):
    """The taint of a non-tensor node's value (None when it counts no channel).

    ``value_of(arg)`` gives an argument's example value, ``ids_of(arg)`` a tensor argument's
    channel ids, ``taint_of(arg)`` a non-tensor argument's taint.
    """
    args = node.args
    first = args[0] if args else None
    tensor = value_of(first) if first is not None else None
    if isinstance(tensor, torch.Tensor):
        per = _per_dim(ids_of(first), tensor.dim())
        if node.target is builtins.getattr and args[1] == "shape":
            return per
        if node.op == "call_method" and node.target == "size":
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
            return per if dim is None else per[dim]
        if node.target in ("numel", torch.numel):
            return flat(per)
        if node.target is builtins.len:
            return per[0] if per else None
    if node.target is operator.getitem and first is not None:
        container = taint_of(first)
        index = args[1]
        if isinstance(container, list) and isinstance(index, (int, slice)):
            try:
                return container[index]
            except IndexError:
                return None
    taints = [flat(taint_of(a)) for a in _node_args(node)]
    taints = [t for t in taints if t.size]
    return np.unique(np.concatenate(taints)) if taints else None


def argument_counts(node, taint_of) -> np.ndarray:
    """The channel variables counted by any non-tensor argument of ``node``."""
    taints = [flat(taint_of(a)) for a in _node_args(node)]
    taints = [t for t in taints if t.size]
    return np.unique(np.concatenate(taints)) if taints else EMPTY
