"""Checking a plan against its graph before any tensor is touched."""
from __future__ import annotations

import numpy as np

from ..graph import ChannelGraph
from ..graph.groups import STRADDLING
from .checks import PlanError

__all__ = ["validate_plan"]


def _indices(name: str, kept) -> np.ndarray:
    """The kept indices as int64, refusing anything that is not a whole number (0.5 or 2.7
    would otherwise be truncated silently)."""
    values = np.asarray(kept)
    if values.dtype == bool or (values.size and not (
            np.issubdtype(values.dtype, np.integer) or (
                np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values))
                and np.all(np.isfinite(values))))):
        raise PlanError(f"plan for group '{name}' must list whole channel indices, got "
                        f"{list(kept)[:8]!r}")
    return values.astype(np.int64).reshape(-1)


def validate_plan(graph: ChannelGraph, plan: dict[str, list[int]]) -> None:
    """Reject plans that would empty a group, drop fixed channels or break block structure."""
    for name, kept in plan.items():
        if name not in graph.by_name:
            raise PlanError(f"plan names unknown group '{name}'")
        group = graph.by_name[name]
        kept = _indices(name, kept)
        if kept.size == 0:
            raise PlanError(f"plan keeps no channel of group '{name}': that would empty "
                            f"{', '.join(group.modules()[:4])}; keep at least one")
        if kept.min() < 0 or kept.max() >= group.size or len(set(kept.tolist())) != kept.size:
            raise PlanError(f"plan for group '{name}' has invalid or repeated indices "
                            f"(group has {group.size} channels)")
        mask = np.zeros(group.size, dtype=bool)
        mask[kept] = True
        for member, pos in group.members:
            if member.role == "out" and (pos >= 0).all() and not mask[pos].any():
                raise PlanError(f"plan for group '{name}' keeps none of the channels of "
                                f"{member.module}: that would empty the layer; keep at least one")
        if (group.fixed & ~mask).any():
            reasons = "; ".join(group.fixed_reasons)
            raise PlanError(f"plan removes fixed channels of group '{name}' ({reasons})")
        for (ga, ca), (gb, cb) in getattr(graph, "requirements", ()):
            if ga == group.index and ca not in set(kept.tolist()):
                other = graph.groups[gb]
                if cb in set(plan.get(other.name, range(other.size))):
                    raise PlanError(f"plan removes channel {ca} of group '{name}' but keeps "
                                    f"channel {cb} of group '{other.name}', whose values it "
                                    "carries (e.g. through a zero-padding shortcut)")
        for blocks in group.blocks:
            if (blocks == STRADDLING).any():
                if not mask.all():
                    raise PlanError(f"group '{name}' has channels shared between blocks of a "
                                    "grouped layer (a channel shuffle before or after it); it "
                                    "cannot lose channels")
                continue
            inside = mask & (blocks >= 0)
            counts = np.bincount(blocks[inside], minlength=int(blocks.max()) + 1)
            if len(set(counts.tolist())) > 1:
                raise PlanError(f"plan for group '{name}' keeps unequal counts per block "
                                f"{counts.tolist()}; grouped layers need equal counts")
