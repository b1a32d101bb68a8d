"""Pruning plans: how many channels each group keeps, and which (by score).

A plan is ``{group name: sorted kept channel indices}`` — plain JSON. Rules every plan obeys:

* fixed channels (model input/output, ignored layers, literal sizes in the code) are kept;
* a group never loses all its channels: a ratio r in [0, 1) removes ``floor(r * n)`` channels,
  so at least one stays; an explicit plan that keeps none is an error;
* blocks (grouped convolutions, GroupNorm) lose the same number of channels each;
* with ``round_to=k`` the kept count is rounded up to a multiple of k (capped at the size).

Which channels a count keeps is the top of the scores, unless the scores also *choose*: a
criterion whose kept set depends on the count (Central Filter keeps one centre per cluster of
similar maps, the clusters depending on how many go) returns scores with a
``choose(group, keep) -> kept indices or None`` method (:func:`chosen`); the scores still rank
the channels wherever the chooser declines (None) and in the MACs searches.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..graph import ChannelGraph, ChannelGroup
from ..graph.groups import STRADDLING
from .checks import PlanError

__all__ = ["chosen", "keep_count", "make_plan", "select"]


def keep_count(group: ChannelGroup, ratio: float, round_to: int = 1) -> int:
    n = group.size
    keep = n - math.floor(ratio * n + 1e-9)
    step = _block_count(group)
    multiple = math.lcm(round_to, step) if round_to > 1 else step
    keep = min(n, max(multiple, math.ceil(keep / multiple) * multiple))
    return max(keep, int(group.fixed.sum()))


def _block_count(group: ChannelGroup) -> int:
    return max([int(b.max()) + 1 for b in group.blocks if b.max() >= 0] + [1])


def select(group: ChannelGroup, scores: np.ndarray, keep: int) -> list[int]:
    """Keep the ``keep`` highest-scoring channels; fixed ones always, blocks evenly."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (group.size,):
        raise PlanError(f"criterion gave {scores.shape} scores for group '{group.name}' "
                        f"of {group.size} channels")
    ranked = np.where(group.fixed, np.inf, scores)
    if not group.blocks:
        order = np.argsort(-ranked, kind="stable")
        return _keep_every_member_alive(group, ranked, set(int(i) for i in order[:keep]))
    blocks = _effective_blocks(group)
    if blocks is None:
        return list(range(group.size))  # no consistent block structure: keep the group
    count = int(blocks.max()) + 1
    members = [np.flatnonzero(blocks == b) for b in range(count)]
    free = np.flatnonzero(blocks < 0)  # channels outside the grouped layer: no constraint
    if len({len(m) for m in members}) > 1:
        return list(range(group.size))
    share = keep * (group.size - len(free)) / group.size
    per_block = max(int(share // count), 1, max(int(group.fixed[m].sum()) for m in members))
    while per_block < len(members[0]):
        kept = set()
        for m in members:
            kept.update(int(i) for i in m[np.argsort(-ranked[m], kind="stable")][:per_block])
        n_free = max(keep - len(kept), int(group.fixed[free].sum()), 0)
        kept.update(int(i) for i in free[np.argsort(-ranked[free], kind="stable")][:n_free])
        if _every_member_alive(group, kept):
            return sorted(kept)
        per_block += 1  # a layer would be emptied: keep one more per block
    return list(range(group.size))


def chosen(group: ChannelGroup, scores, keep: int) -> list[int] | None:
    """The kept indices the scores' own ``choose`` gives for ``keep`` channels of ``group``
    (None: it has none, declines, or the group has blocks, whose even-per-block rule the
    scores' ranking handles); a PlanError when the choice breaks the plan's rules."""
    choose = getattr(scores, "choose", None)
    if choose is None or group.blocks:
        return None
    kept = choose(group, keep)
    if kept is None:
        return None
    kept = sorted(int(i) for i in kept)
    who = getattr(scores, "criterion", "the criterion")
    if len(set(kept)) != keep or not all(0 <= i < group.size for i in kept):
        raise PlanError(f"{who} chose {len(set(kept))} distinct channels in 0..{group.size - 1} "
                        f"for group '{group.name}' instead of {keep}: {kept[:8]}...")
    missing = sorted(set(np.flatnonzero(group.fixed).tolist()) - set(kept))
    if missing:
        raise PlanError(f"{who} removed fixed channels {missing[:8]} of group '{group.name}'")
    if not _every_member_alive(group, set(kept)):
        return None  # a layer of the group would be emptied: rank instead
    return kept


def _every_member_alive(group: ChannelGroup, kept: set[int]) -> bool:
    for member, pos in group.members:
        mine = np.unique(pos[pos >= 0])
        if member.role == "out" and mine.size and not kept.intersection(mine.tolist()):
            return False
    return True


def _keep_every_member_alive(group: ChannelGroup, ranked: np.ndarray, kept: set[int]) -> list[int]:
    """A group can span layers of different widths (a residual stream that grows stage by
    stage): keep each layer's best channel if the global choice left that layer empty."""
    for member, pos in group.members:
        mine = np.unique(pos[pos >= 0])
        if mine.size and not kept.intersection(mine.tolist()):
            kept.add(int(mine[np.argmax(ranked[mine])]))
    return sorted(kept)


def _effective_blocks(group: ChannelGroup) -> np.ndarray | None:
    """The block label of each channel (-1: outside every block), or None when the group's
    grouped layers disagree or a channel straddles two blocks: then it stays whole."""
    first = group.blocks[0]
    if any((b == STRADDLING).any() for b in group.blocks):
        return None
    for other in group.blocks[1:]:
        if not np.array_equal(first, other):
            return None
    return first


def make_plan(graph: ChannelGraph, scores: dict[str, np.ndarray], ratios: dict[str, float],
              round_to: int = 1, counts: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Kept channel indices for every group that loses at least one channel.

    ``ratios`` (fraction removed) or ``counts`` (channels kept, e.g. from a paper's width
    formula) say how many; ``scores`` say which.
    """
    if not isinstance(round_to, int) or round_to < 1:
        raise PlanError(f"round_to must be a positive int, got {round_to!r}")
    wanted = {name: keep_count(graph.by_name[name], r, round_to) for name, r in ratios.items()}
    for name, keep in (counts or {}).items():
        group = graph.by_name[name]
        if not 1 <= keep <= group.size:
            raise PlanError(f"group '{name}' of {group.size} channels cannot keep {keep}; "
                            "keep at least one channel and at most all of them")
        wanted[name] = keep
    plan: dict[str, list[int]] = {}
    for group in graph.groups:  # trace order: a required channel's group is planned first
        if group.name not in wanted or wanted[group.name] >= group.size:
            continue
        locked = _locked_by_requirements(graph, group, plan)
        view = group if not locked.any() else _with_fixed(group, locked)
        keep = max(wanted[group.name], int(view.fixed.sum()))
        if keep < group.size:
            kept = chosen(view, scores, keep)
            if kept is None:
                kept = select(view, scores[group.name], keep)
            if len(kept) < group.size:
                plan[group.name] = kept
    return plan


def _locked_by_requirements(graph: ChannelGraph, group: ChannelGroup, plan) -> np.ndarray:
    """Channels that may not go because a channel they require is kept."""
    locked = np.zeros(group.size, dtype=bool)
    for (ga, ca), (gb, cb) in getattr(graph, "requirements", ()):
        if ga == group.index:
            other = graph.groups[gb]
            kept_there = plan.get(other.name)
            if kept_there is None or cb in set(kept_there):
                locked[ca] = True
    return locked


def _with_fixed(group: ChannelGroup, locked: np.ndarray) -> ChannelGroup:
    return dataclasses.replace(group, fixed=group.fixed | locked)
