"""What channel rules see and record while the traced model runs once on example inputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .channels import CONSTANT, NO_CHANNEL, UnionFind, carrying_dims, compress, vector_along
from .errors import UnsupportedOpError
from .numbers import flat


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
    """A module attribute that counts kept channels (e.g. zero-padding widths).

    With ``parts`` the attribute is a list of sizes (a split's sections): part ``i`` counts
    the kept channels among ``ids[sum(parts[:i]):sum(parts[:i + 1])]``. ``source`` says
    whether the attribute's channels form a group of their own (a module that creates
    channels, like a zero-padding shortcut) or only follow channels made elsewhere.
    """

    module: str
    attr: str
    ids: np.ndarray
    parts: tuple[int, ...] = ()
    source: bool = True


@dataclass
class TraceState:
    """Everything recorded while tracing; turned into groups by :mod:`prunekit.graph.groups`."""

    uf: UnionFind = field(default_factory=UnionFind)
    members: list[Member] = field(default_factory=list)
    attr_members: list[AttrMember] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)
    divisions: list[tuple[np.ndarray, int]] = field(default_factory=list)
    partitions: list[tuple[np.ndarray, tuple]] = field(default_factory=list)
    # (channels a size was computed from, channels of the dimension it sizes, node)
    count_checks: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    requirements: list[tuple[int, int]] = field(default_factory=list)
    module_meta: dict[str, dict] = field(default_factory=dict)
    touched_tensors: set[str] = field(default_factory=set)


class RuleContext:
    """The API channel rules use: fresh variables, unions, members and constraints."""

    def __init__(self, state: TraceState, node, env_ids, env_vals, root=None, counts=None):
        self.state = state
        self.node = node
        self._env_ids = env_ids
        self._env_vals = env_vals
        self.root = root  # the model being traced (its modules' attributes)
        self._counts = counts or {}

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

    def taint(self, arg):
        """The raw count taint of a non-tensor node argument (see :mod:`.numbers`)."""
        return self._counts.get(arg.name) if hasattr(arg, "op") and hasattr(arg, "name") else None

    def counted(self, arg) -> np.ndarray:
        """Channel variables whose number the non-tensor argument ``arg`` depends on (e.g. it
        is ``x.shape[1] // 2``); empty for literals and numbers unrelated to channels."""
        found = []

        def walk(a):
            if hasattr(a, "op") and hasattr(a, "name"):
                found.append(flat(self._counts.get(a.name)))
            elif isinstance(a, (list, tuple)):
                for x in a:
                    walk(x)

        walk(arg)
        found = [f for f in found if f.size]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)

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
        A constant the forward made itself (``CONSTANT`` slots) that spans a channel dimension
        holds one value per position, and positions move when channels go: the channels it
        meets are fixed.
        """
        ndim = len(out_shape)
        padded = []
        for ids, shape in operands:
            if ids is None:
                continue
            ids = ids.reshape((1,) * (ndim - ids.ndim) + ids.shape)
            padded.append((ids, (1,) * (ndim - len(shape)) + tuple(shape)))
        channel_dims = {d for ids, _ in padded for d in carrying_dims(ids)}
        self._fix_met_constants(padded, channel_dims)
        aligned = []
        for ids, shape in padded:
            spans = [d for d in channel_dims if ids.shape[d] == 1 and out_shape[d] > 1]
            if any(shape[d] == 1 for d in spans):
                # broadcast across channels: one channel serves them all
                self.fix(ids, "broadcast across channels in an element-wise op")
                ids = np.where(ids == CONSTANT, CONSTANT, NO_CHANNEL)
            elif spans and ids.reshape(-1)[0] >= 0:
                # Every position holds the same channel (expanded to a literal count, or tied
                # together by reshapes such as two channel shuffles): the other operand's
                # channels meet it position by position, so they are united with it and
                # none can go on its own.
                self.fix(ids, "one channel fills every channel position of an element-wise "
                              "operand")
            aligned.append(ids)
        if not aligned:
            return np.full((1,) * ndim, NO_CHANNEL, dtype=np.int64)
        arrays = np.broadcast_arrays(*aligned)
        result = arrays[0].copy()
        for other in arrays[1:]:
            self.unite(result, other)
            marker = np.where((result == CONSTANT) | (other == CONSTANT), CONSTANT, NO_CHANNEL)
            result = np.where(result >= 0, result, np.where(other >= 0, other, marker))
        return compress(result)

    def _fix_met_constants(self, padded, channel_dims) -> None:
        for ids, shape in padded:
            if not (ids == CONSTANT).any() or not any(shape[d] > 1 for d in channel_dims):
                continue  # no constant, or the same constant for every channel
            for other, _ in padded:
                if other is ids:
                    continue
                mine, theirs = np.broadcast_arrays(ids, other)
                self.fix(theirs[mine == CONSTANT],
                         f"meets, in '{self.node.name}', a constant made inside forward (one "
                         "value per channel position, which cannot follow a pruning)")

    # ---- recording ----------------------------------------------------------------------------
    def member(self, tensor: str, dim: int, ids, role: str, module: str, blocks: int = 1):
        vec = np.asarray(ids, dtype=np.int64).reshape(-1)
        first = self.node.args[0] if self.node.args else None
        source = first.name if hasattr(first, "op") else ""
        self.state.members.append(Member(tensor, dim, vec, role, module, blocks,
                                         self.node.name, source))
        self.state.touched_tensors.add(tensor)

    def attr_member(self, module: str, attr: str, ids, parts=(), source: bool = True) -> None:
        ids = np.asarray(ids).reshape(-1)
        for other in self.state.attr_members:
            if (other.module, other.attr) != (module, attr):
                continue
            # One module called twice: both calls must keep the same counts.
            if other.parts == tuple(parts) and other.ids.size == ids.size:
                self.unite(other.ids, ids)
            else:
                reason = f"'{module}.{attr}' sizes calls with different channel counts"
                self.fix(other.ids, reason)
                self.fix(ids, reason)
            return
        self.state.attr_members.append(AttrMember(module, attr, ids, tuple(parts), source))

    def requires(self, channel: int, other: int) -> None:
        """Removing ``channel`` is allowed only if ``other`` is removed too (one-way)."""
        if channel >= 0 and other >= 0:
            self.state.requirements.append((int(channel), int(other)))

    def partition(self, ids, sizes) -> None:
        """``ids`` are cut into pieces of ``sizes`` whose sizes follow the pruning: each piece
        becomes a group of its own (pruned by itself, e.g. proportionally by a ratio)."""
        self.state.partitions.append((np.asarray(ids).reshape(-1).copy(), tuple(sizes)))

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
