"""Channel variables: the bookkeeping under the channel dependency graph.

Every channel slot of every traced tensor is a *variable* (an int). A convolution creates fresh
variables for its output channels; a residual add *unites* the variables of its two operands
position by position (they must lose the same channels); a concatenation places variables side by
side. After tracing, each union-find class is one prunable channel, seen at every place it
appears.

A tensor's variables are held in a numpy int array ``ids`` that broadcasts against the tensor:
a size-1 entry means "the same variables all along this dimension", so a conv output
``(N, C, H, W)`` has ``ids.shape == (1, C, 1, 1)``. ``NO_CHANNEL`` (-1) marks a slot that carries
no channel identity (a shape, a value shared by every channel). ``CONSTANT`` (-3) marks a slot of
a tensor the forward made itself (``torch.arange(16.)``, a fx ``_tensor_constant``) or a
parameter prunekit cannot map: its values sit at fixed positions, so a channel that meets one
element-wise can never be removed.
"""
from __future__ import annotations

import numpy as np

NO_CHANNEL = -1
CONSTANT = -3


class UnionFind:
    """Disjoint sets over growing integer ids with path halving and union by size."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []

    def make(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        self.size.extend([1] * count)
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return ra

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """Class representative of every entry (negative markers stay)."""
        flat = ids.reshape(-1)
        out = np.fromiter((self.find(int(v)) if v >= 0 else int(v) for v in flat),
                          dtype=np.int64, count=flat.size)
        return out.reshape(ids.shape)

    def all_roots(self) -> np.ndarray:
        """Representative of every variable at once (pointer jumping in numpy)."""
        parent = np.asarray(self.parent, dtype=np.int64)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand


def no_channels(ndim: int) -> np.ndarray:
    return np.full((1,) * ndim, NO_CHANNEL, dtype=np.int64)


def constant_ids(ndim: int) -> np.ndarray:
    return np.full((1,) * ndim, CONSTANT, dtype=np.int64)


def channel_ids(vars_: np.ndarray, ndim: int, dim: int) -> np.ndarray:
    """Place a 1-D array of variables on dimension ``dim`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[dim] = len(vars_)
    return np.asarray(vars_, dtype=np.int64).reshape(shape)


def carrying_dims(ids: np.ndarray) -> list[int]:
    """Dimensions along which the variables change (channel-carrying dimensions)."""
    return [d for d in range(ids.ndim) if ids.shape[d] > 1]


def compress(ids: np.ndarray) -> np.ndarray:
    """Collapse every dimension along which all entries are equal back to size 1."""
    for d in range(ids.ndim):
        if ids.shape[d] > 1:
            first = np.take(ids, [0], axis=d)
            if np.array_equal(np.broadcast_to(first, ids.shape), ids):
                ids = first
    return ids


def vector_along(ids: np.ndarray, dim: int, length: int) -> np.ndarray:
    """The variables along ``dim`` (length ``length``), requiring no other channel dimension."""
    others = [d for d in carrying_dims(ids) if d != dim % ids.ndim]
    if others:
        raise ValueError(f"channel variables spread over dims {others} besides dim {dim}")
    vec = ids.reshape(-1) if ids.shape[dim] > 1 else np.full(1, ids.reshape(-1)[0])
    return np.broadcast_to(vec, (length,)).copy() if vec.size == 1 else vec.copy()
