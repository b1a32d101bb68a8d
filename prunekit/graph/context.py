"""What channel rules see and record while the traced model runs once on example inputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .channels import NO_CHANNEL, UnionFind, carrying_dims, compress, vector_along
from .errors import UnsupportedOpError


@dataclass
class Member:
    """One tensor dimension whose positions are channels: ``tensor`` sliced along ``dim``.

    ``ids[p]`` is the channel variable at position ``p``. ``role`` is ``"out"`` for a producer
    (conv/linear output), ``"in"`` for a consumer, ``"norm"`` for per-channel affine/statistics,
    ``"param"`` for a bare parameter used in forward. ``blocks > 1`` marks a grouped conv's input
    dimension: the weight holds ``in/blocks`` columns per block of output rows.
    """

    tensor: str
    dim: int
    ids: np.ndarray
    role: str
    module: str
    blocks: int = 1
    node: str = ""        # the fx node that recorded it
    input_node: str = ""  # the fx node whose output it reads (consumers: the feature map)


@dataclass
class AttrMember:
    """A module attribute that counts kept channels (e.g. zero-padding widths)."""

    module: str
    attr: str
    ids: np.ndarray


@dataclass
class TraceState:
    """Everything recorded while tracing; turned into groups by :mod:`prunekit.graph.groups`."""

    uf: UnionFind = field(default_factory=UnionFind)
    members: list[Member] = field(default_factory=list)
    attr_members: list[AttrMember] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)
    divisions: list[tuple[np.ndarray, int]] = field(default_factory=list)
    requirements: list[tuple[int, int]] = field(default_factory=list)
    module_meta: dict[str, dict] = field(default_factory=dict)
    touched_tensors: set[str] = field(default_factory=set)


class RuleContext:
    """The API channel rules use: fresh variables, unions, members and constraints."""

    def __init__(self, state: TraceState, node, env_ids, env_vals):
        self.state = state
        self.node = node
        self._env_ids = env_ids
        self._env_vals = env_vals

    # ---- inputs -------------------------------------------------------------------------------
    def ids(self, arg):
        """Channel ids of a node argument (None for non-tensors and literals)."""
        return self._env_ids.get(arg.name) if hasattr(arg, "name") and hasattr(arg, "op") else None

    def value(self, arg):
        """The concrete value an argument had (example run)."""
        if hasattr(arg, "op") and hasattr(arg, "name"):
            return self._env_vals[arg.name]
        return arg

    def arg(self, index: int, name: str, default=None):
        """Positional-or-keyword argument of the current node."""
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def fail(self, detail: str):
        raise UnsupportedOpError(self.node, detail)

    # ---- variables ----------------------------------------------------------------------------
    def new_vars(self, count: int) -> np.ndarray:
        return self.state.uf.make(count)

    def fix(self, ids, reason: str) -> None:
        """These channels can never be removed (model input/output, literal sizes, ...)."""
        if ids is None:
            return
        for v in np.unique(np.asarray(ids)):
            if v >= 0:
                self.state.fixed.setdefault(int(v), reason)

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        """Same-shaped arrays: position-wise, both channels must be removed together."""
        for x, y in zip(a.reshape(-1), b.reshape(-1)):
            if x >= 0 and y >= 0:
                self.state.uf.union(int(x), int(y))

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return self.state.uf.roots(ids)

    def merge(self, operands: list[tuple[np.ndarray, tuple]], out_shape: tuple) -> np.ndarray:
        """Ids of an element-wise op's output; operands are (ids, real shape) pairs.

        A channel dimension an operand broadcasts from size 1 is shared by all output channels,
        so it is not united with them; it is fixed instead, because removing it would empty it.
        """
        ndim = len(out_shape)
        padded = []
        for ids, shape in operands:
            if ids is None:
                continue
            ids = ids.reshape((1,) * (ndim - ids.ndim) + ids.shape)
            padded.append((ids, (1,) * (ndim - len(shape)) + tuple(shape)))
        channel_dims = {d for ids, _ in padded for d in carrying_dims(ids)}
        aligned = []
        for ids, shape in padded:
            if any(shape[d] == 1 and out_shape[d] > 1 for d in channel_dims):
                self.fix(ids, "broadcast across channels in an element-wise op")
                ids = np.full(ids.shape, NO_CHANNEL, dtype=np.int64)
            aligned.append(ids)
        if not aligned:
            return np.full((1,) * ndim, NO_CHANNEL, dtype=np.int64)
        arrays = np.broadcast_arrays(*aligned)
        result = arrays[0].copy()
        for other in arrays[1:]:
            self.unite(result, other)
            result = np.where(result >= 0, result, other)
        return compress(result)

    # ---- recording ----------------------------------------------------------------------------
    def member(self, tensor: str, dim: int, ids, role: str, module: str, blocks: int = 1):
        vec = np.asarray(ids, dtype=np.int64).reshape(-1)
        first = self.node.args[0] if self.node.args else None
        source = first.name if hasattr(first, "op") else ""
        self.state.members.append(Member(tensor, dim, vec, role, module, blocks,
                                         self.node.name, source))
        self.state.touched_tensors.add(tensor)

    def attr_member(self, module: str, attr: str, ids) -> None:
        self.state.attr_members.append(AttrMember(module, attr, np.asarray(ids).reshape(-1)))

    def requires(self, channel: int, other: int) -> None:
        """Removing ``channel`` is allowed only if ``other`` is removed too (one-way)."""
        if channel >= 0 and other >= 0:
            self.state.requirements.append((int(channel), int(other)))

    def divisible(self, ids, blocks: int) -> None:
        """Every one of ``blocks`` equal slices of ``ids`` must keep the same number."""
        if blocks > 1:
            self.state.divisions.append((np.asarray(ids).reshape(-1).copy(), blocks))

    def meta(self, module: str, **info) -> None:
        self.state.module_meta.setdefault(module, {}).update(info)

    def channel_vector(self, ids, dim: int, length: int) -> np.ndarray:
        """Variables along ``dim``; fails clearly when channels also spread over other dims."""
        if ids is None:
            return np.full(length, NO_CHANNEL, dtype=np.int64)
        try:
            return vector_along(ids, dim, length)
        except ValueError as exc:
            self.fail(str(exc))


def tensor_shape(value) -> tuple:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def is_carrying(ids, dim: int) -> bool:
    return ids is not None and dim % ids.ndim in carrying_dims(ids)
