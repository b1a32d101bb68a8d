"""ChannelGraph: the coupled channel groups of a model, and a readable account of them."""
from __future__ import annotations

from dataclasses import dataclass, field

import copy
import warnings

import numpy as np
import torch
from torch import nn

from ..utils import as_tuple
from .builder import record_channels
from .channels import NO_CHANNEL, UnionFind
from .context import AttrMember, Member, TraceState


STRADDLING = -2  # block label of a group whose channels straddle a grouped layer's blocks


@dataclass
class ChannelGroup:
    """Channels that must be removed together, wherever they appear.

    ``channels[i]`` is one channel: removing it removes every position that carries it in every
    member (a conv's output row, the next conv's input column, the BN entries, ...).
    """

    index: int
    name: str
    channels: np.ndarray
    fixed: np.ndarray
    fixed_reasons: list[str]
    members: list[tuple[Member, np.ndarray]]  # member, channel index per position (-1: other group)
    blocks: list[np.ndarray] = field(default_factory=list)  # block id per channel, one per constraint

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def prunable(self) -> bool:
        return not bool(self.fixed.all())

    def producers(self) -> list[tuple[Member, np.ndarray]]:
        return [(m, pos) for m, pos in self.members if m.role == "out"]

    def feature_maps(self) -> list[tuple[str, np.ndarray]]:
        """(fx node, group channel index per channel of its output) for every feature map in
        which layers consume this group's channels — after BN and activation, and after the
        residual add for a residual stream: where activation-based criteria (CHIP, HRank,
        APoZ) look. Maps of one group can differ in width (a stream growing stage by stage)."""
        seen: dict[str, np.ndarray] = {}
        for m, pos in self.members:
            if m.role == "in" and m.input_node and (pos >= 0).all() and m.blocks == 1:
                seen.setdefault(m.input_node, pos)
        return list(seen.items())

    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for m, _ in self.members:
            seen.setdefault(m.module, None)
        return list(seen)


class ChannelGraph:
    """The channel dependency graph of ``model`` for ``example_inputs`` (traced with torch.fx).

    Build it with :func:`build_graph`; groups are in ``self.groups``. It refers to tensors by
    qualified name, so it also applies to a deep copy of the model it was built from.
    """

    def __init__(self, model: nn.Module, state: TraceState, gm=None):
        self.model_type = type(model).__name__
        self.state = state
        self.traced = gm
        uf = state.uf
        table = uf.all_roots()

        def roots(ids: np.ndarray) -> np.ndarray:
            return np.where(ids >= 0, table[np.maximum(ids, 0)], NO_CHANNEL)

        self.member_roots = [roots(m.ids) for m in state.members]
        self.attr_roots = [roots(a.ids) for a in state.attr_members]
        self.fixed_roots: dict[int, str] = {}
        for v, reason in state.fixed.items():
            self.fixed_roots.setdefault(uf.find(v), reason)
        self.groups = self._make_groups()
        self.by_name = {g.name: g for g in self.groups}
        self.unreached = _unreached_modules(model, state)

    # ------------------------------------------------------------------------------------------
    def _make_groups(self) -> list[ChannelGroup]:
        sources = [(m, r) for m, r in zip(self.state.members, self.member_roots)
                   if m.role in ("out", "param")]
        sources += [(a, r) for a, r in zip(self.state.attr_members, self.attr_roots) if a.source]
        # Channels produced by one layer belong to one group; shared channels join groups.
        valid = [r[r >= 0] for _, r in sources]
        flat = np.concatenate(valid) if valid else np.zeros(0, dtype=np.int64)
        order, first_seen = np.unique(flat, return_index=True)
        order = order[np.argsort(first_seen, kind="stable")]  # first appearance, trace order
        slot = {int(r): i for i, r in enumerate(order.tolist())}
        link = UnionFind()
        link.make(len(order))
        cell = self._partition_cells()
        for roots in valid:
            heads: dict[tuple, int] = {}
            for r in np.unique(roots).tolist():
                # Pieces of a split whose sizes follow the pruning (MixConv) are groups of their
                # own, so a ratio prunes each piece by itself.
                head = heads.setdefault(cell.get(r, ()), slot[r])
                link.union(head, slot[r])
        components: dict[int, list[int]] = {}
        for r in order.tolist():
            components.setdefault(link.find(slot[r]), []).append(r)

        uf = self.state.uf
        groups = []
        channel_of: dict[int, tuple[int, int]] = {}
        for gi, roots in enumerate(components.values()):
            for ci, r in enumerate(roots):
                channel_of[r] = (gi, ci)
            groups.append(roots)

        members_per_group: list[list] = [[] for _ in groups]
        known = np.array(sorted(channel_of), dtype=np.int64)
        group_of = np.array([channel_of[r][0] for r in known.tolist()], dtype=np.int64)
        index_of = np.array([channel_of[r][1] for r in known.tolist()], dtype=np.int64)
        for m, roots in zip(self.state.members, self.member_roots):
            at = np.clip(np.searchsorted(known, roots), 0, max(len(known) - 1, 0))
            hit = (roots >= 0) & (known[at] == roots) if len(known) else roots < -1
            gis = np.where(hit, group_of[at], -1)
            for gi in np.unique(gis[gis >= 0]).tolist():
                members_per_group[gi].append((m, np.where(gis == gi, index_of[at], -1)))

        result = []
        names: set[str] = set()
        for gi, roots in enumerate(groups):
            fixed = np.array([r in self.fixed_roots for r in roots], dtype=bool)
            reasons = sorted({self.fixed_roots[r] for r in roots if r in self.fixed_roots})
            members = members_per_group[gi]
            name = _group_name(members, gi, names)
            names.add(name)
            result.append(ChannelGroup(gi, name, np.array(roots, dtype=np.int64), fixed,
                                       reasons, members))
        self._attach_blocks(result, channel_of)
        # One-way requirements between channels: (group, channel) -> (group, channel).
        self.requirements = []
        for a, b in self.state.requirements:
            ra, rb = uf.find(a), uf.find(b)
            if ra != rb and ra in channel_of and rb in channel_of:
                self.requirements.append((channel_of[ra], channel_of[rb]))
        return result

    def _partition_cells(self) -> dict[int, tuple]:
        """Which piece of which rewritable split each channel identity lies in."""
        cell: dict[int, tuple] = {}
        for pi, (ids, sizes) in enumerate(self.state.partitions):
            bounds = np.cumsum([0] + list(sizes))
            roots = self.state.uf.roots(ids)
            for j in range(len(sizes)):
                for r in np.unique(roots[bounds[j]:bounds[j + 1]]).tolist():
                    if r >= 0:
                        cell[r] = cell.get(r, ()) + ((pi, j),)
        return cell

    def _attach_blocks(self, groups, channel_of) -> None:
        uf = self.state.uf
        for ids, count in self.state.divisions:
            roots = uf.roots(ids)
            per_block = len(roots) // count
            rows = np.sort(roots.reshape(count, per_block), axis=1)
            if (rows >= 0).all() and (rows == rows[:1]).all():
                # Every channel sits in every block as often (ResNeSt's radix groups feeding
                # a conv with groups=radix): any removal keeps the blocks equal.
                continue
            spanned = {channel_of[int(r)][0] for r in roots if r >= 0 and int(r) in channel_of}
            if len(spanned) > 1:
                # A grouped layer whose blocks mix channels of several groups: equal counts
                # per block would tie the groups' plans together; keep those channels instead.
                for gi in spanned:
                    group = groups[gi]
                    for r in roots:
                        if r >= 0 and channel_of.get(int(r), (None,))[0] == gi:
                            group.fixed[channel_of[int(r)][1]] = True
                    reason = "input of a grouped layer that mixes several channel groups"
                    if reason not in group.fixed_reasons:
                        group.fixed_reasons.append(reason)
                continue
            target = None
            block_of = None
            for p, r in enumerate(roots):
                if r < 0 or int(r) not in channel_of:
                    continue
                gi, ci = channel_of[int(r)]
                if target is None:
                    target = gi
                    block_of = np.full(groups[gi].size, -1, dtype=np.int64)
                if block_of[ci] >= 0 and block_of[ci] != p // per_block:
                    # One channel in two blocks (a shuffle met a grouped layer): no per-block
                    # count can be honoured; STRADDLING marks the group as unprunable.
                    block_of[:] = STRADDLING
                    break
                block_of[ci] = p // per_block
            if target is not None:
                groups[target].blocks.append(block_of)

    # ------------------------------------------------------------------------------------------
    def group(self, name_or_module: str) -> ChannelGroup:
        """The group named ``name_or_module``, or the group of that module's output channels."""
        if name_or_module in self.by_name:
            return self.by_name[name_or_module]
        for g in self.groups:
            if any(m.module == name_or_module for m, _ in g.producers()):
                return g
        raise KeyError(f"no channel group named or produced by '{name_or_module}'; "
                       f"groups: {', '.join(g.name for g in self.groups)}")

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def tensor_members(self) -> list[tuple[Member, np.ndarray]]:
        """Every (tensor member, channel identity per position) pair the trace recorded: a
        conv's output rows, the next layer's input columns, norm entries, bare parameters."""
        return list(zip(self.state.members, self.member_roots))

    def attribute_members(self) -> list[tuple[AttrMember, np.ndarray]]:
        """Every (integer attribute member, channel identity per position) pair, e.g. a
        ZeroPadShortcut's output width."""
        return list(zip(self.state.attr_members, self.attr_roots))

    def module_meta(self, module: str) -> dict:
        """What the trace recorded about ``module`` (e.g. ``{"kind": "depthwise"}``)."""
        return self.state.module_meta.get(module, {})

    def removed_roots(self, plan: dict[str, list[int]]) -> set[int]:
        """Channel identities removed by ``plan`` (group name -> kept channel indices)."""
        removed: set[int] = set()
        for name, kept in plan.items():
            group = self.by_name[name]
            keep = np.zeros(group.size, dtype=bool)
            keep[np.asarray(kept, dtype=np.int64)] = True
            removed.update(int(r) for r in group.channels[~keep])
        return RemovedChannels(removed)

    def explain(self) -> str:
        lines = [f"ChannelGraph of {self.model_type}: {len(self.groups)} groups, "
                 f"{len(self.prunable_groups())} prunable"]
        for g in self.groups:
            status = "fixed" if not g.prunable else (
                f"prunable, {int(g.fixed.sum())} fixed" if g.fixed.any() else "prunable")
            extra = f"; blocks {[int(b.max()) + 1 for b in g.blocks]}" if g.blocks else ""
            lines.append(f"[{g.index}] {g.name}: {g.size} channels ({status}{extra})")
            if g.fixed_reasons:
                lines.append(f"      fixed because: {'; '.join(g.fixed_reasons)}")
            by_role: dict[str, dict[str, None]] = {}
            for m, pos in g.members:
                partial = "" if (pos >= 0).all() else f"[{int((pos >= 0).sum())}/{len(pos)}]"
                by_role.setdefault(m.role, {})[f"{m.module or m.tensor}{partial}"] = None
            for role in ("out", "param", "norm", "in"):
                if role in by_role:
                    names = list(by_role[role])
                    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)"
                                                    if len(names) > 8 else "")
                    lines.append(f"      {role:5s} {shown}")
        if self.unreached:
            lines.append("not reached by the trace (left unpruned): " + ", ".join(self.unreached))
        return "\n".join(lines)


class RemovedChannels(frozenset):
    """Removed channel identities, with a sorted array of them made once for lookups
    (surgery and MACs estimates test hundreds of members against one set)."""

    _sorted: np.ndarray | None = None

    def sorted_array(self) -> np.ndarray:
        if self._sorted is None:
            self._sorted = np.sort(np.fromiter(self, dtype=np.int64, count=len(self)))
        return self._sorted


def kept_positions(roots: np.ndarray, removed: set[int]) -> np.ndarray:
    """Positions of a member (channel identity per position) that survive ``removed``."""
    if not removed:
        return np.arange(len(roots))
    table = removed.sorted_array() if isinstance(removed, RemovedChannels) else \
        np.sort(np.fromiter(removed, dtype=np.int64, count=len(removed)))
    at = np.minimum(np.searchsorted(table, roots), len(table) - 1)
    return np.flatnonzero(table[at] != roots)


def _group_name(members, index, taken) -> str:
    producers = [m for m, _ in members if m.role == "out"]
    base = producers[0].module if producers else (members[0][0].module if members else "")
    base = base or f"group{index}"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}#{k}", k + 1
    return name


def _unreached_modules(model: nn.Module, state: TraceState) -> list[str]:
    touched_modules = {t.rsplit(".", 1)[0] for t in state.touched_tensors}
    return [name for name, mod in model.named_modules()
            if name and any(True for _ in mod.parameters(recurse=False))
            and name not in touched_modules and not _param_free_use(mod)]


def _param_free_use(mod) -> bool:
    # Modules whose parameters carry no channel structure (PReLU with one slope) are fine.
    return isinstance(mod, nn.PReLU) and mod.num_parameters == 1


def build_graph(model: nn.Module, example_inputs, *, leaf_modules=(), ignore=()) -> ChannelGraph:
    """Trace ``model`` with torch.fx and group every channel that must be removed together.

    ``ignore`` names modules whose output channels are kept (e.g. the classifier, the stem);
    ``leaf_modules`` names modules traced as one call (they need a registered module rule).
    """
    gm, state = record_channels(model, example_inputs, leaf_modules=leaf_modules,
                                fixed_modules=set(ignore))
    graph = ChannelGraph(model, state, gm)
    if graph.unreached and not model.training:
        # Auxiliary heads (GoogLeNet, Inception) run only in training mode; a graph that misses
        # them would leave them reading channels that no longer exist. Trace a training-mode
        # copy (batch of 2 for BatchNorm) and keep it if it reaches them.
        trainee = copy.deepcopy(model).train()
        inputs = as_tuple(example_inputs)
        inputs = tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) else t for t in inputs)
        try:
            gm2, state2 = record_channels(trainee, inputs, leaf_modules=leaf_modules,
                                          fixed_modules=set(ignore))
        except Exception as exc:  # e.g. an auxiliary head needs a larger example input
            warnings.warn(f"modules {graph.unreached[:4]} run only in training mode and could "
                          f"not be traced in it ({type(exc).__name__}: {str(exc)[:200]}); they "
                          "are left unpruned and will not fit the pruned model in training "
                          "mode. Use a larger example input, or remove them.")
            return graph
        trained = ChannelGraph(model, state2, gm2)
        if len(trained.unreached) < len(graph.unreached):
            graph = trained
    return graph


def explain(model: nn.Module, example_inputs, **kwargs) -> str:
    """Print and return a readable list of the channel groups of ``model``."""
    text = build_graph(model, example_inputs, **kwargs).explain()
    print(text)
    return text


__all__ = ["ChannelGraph", "ChannelGroup", "Member", "AttrMember", "build_graph", "explain",
           "kept_positions", "NO_CHANNEL"]
