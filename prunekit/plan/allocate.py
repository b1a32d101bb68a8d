"""Allocations: how many channels each group keeps, from uniform or per-group ratios or from
one global ranking of all channels."""
from __future__ import annotations

import math
from fnmatch import fnmatchcase

import numpy as np

from ..graph import ChannelGraph, ChannelGroup
from .checks import PlanError, check_ratio
from .select import keep_count

__all__ = ["global_counts", "ratio_counts", "ratios_for_groups"]


def ratios_for_groups(graph: ChannelGraph, ratio: float | None = None,
                      ratios: dict[str, float] | None = None) -> dict[str, float]:
    """Per-group removal ratios from a uniform ``ratio`` and/or a ``ratios`` mapping.

    Keys of ``ratios`` are group names or module names (fnmatch patterns allowed); a module
    name selects the group of that module's output channels. A key matching nothing is an
    error listing the prunable groups.
    """
    result: dict[str, float] = {}
    if ratio is not None:
        check_ratio(ratio)
        result = {g.name: ratio for g in graph.prunable_groups()}
    for key, value in (ratios or {}).items():
        check_ratio(value, f"ratio for '{key}'")
        hits = [g for g in graph.prunable_groups() if _matches(g, key)]
        if not hits:
            names = ", ".join(g.name for g in graph.prunable_groups())
            raise PlanError(f"'{key}' names no prunable channel group or producing module; "
                            f"prunable groups: {names}")
        for g in hits:
            result[g.name] = value
    return result


def _matches(group: ChannelGroup, key: str) -> bool:
    if fnmatchcase(group.name, key):
        return True
    return any(fnmatchcase(m.module, key) for m, _ in group.producers())


def global_counts(graph: ChannelGraph, scores: dict[str, np.ndarray], ratio: float, *,
                  normalize: str | None = "mean", max_ratio: float = 0.9) -> dict[str, int]:
    """Channels kept per group when ``ratio`` of all prunable channels go by one global ranking.

    Scores are first normalised per group (``"mean"``: divided by the group's mean score,
    ``"max"``: by its max, ``"l2"``: by its L2 norm, None: raw) because criteria differ in scale
    from layer to layer; no group loses more than ``max_ratio`` of its channels.
    """
    check_ratio(ratio)
    check_ratio(max_ratio, "max_ratio")
    entries = []
    for g in graph.prunable_groups():
        s = np.asarray(scores[g.name], dtype=np.float64)
        scale = {"mean": np.abs(s).mean(), "max": np.abs(s).max(), "l2": np.linalg.norm(s),
                 None: 1.0}.get(normalize, None)
        if scale is None:
            raise PlanError(f"normalize must be 'mean', 'max', 'l2' or None, got {normalize!r}")
        s = s / scale if scale > 0 else s
        entries.extend((value, g.name) for value, fixed in zip(s, g.fixed) if not fixed)
    entries.sort(key=lambda e: e[0])
    budget = math.floor(ratio * len(entries))
    removed = {g.name: 0 for g in graph.prunable_groups()}
    limit = {g.name: math.floor(max_ratio * g.size) for g in graph.prunable_groups()}
    for _, name in entries:
        if budget == 0:
            break
        if removed[name] < limit[name]:
            removed[name] += 1
            budget -= 1
    return {name: graph.by_name[name].size - r for name, r in removed.items() if r}


def ratio_counts(graph: ChannelGraph, ratio: float | None = None,
                 ratios: dict[str, float] | None = None, round_to: int = 1) -> dict[str, int]:
    """Channels kept per group for a uniform ``ratio`` and/or per-group ``ratios`` (the counts
    :func:`prunekit.plan.make_plan` derives from the same ratios)."""
    return {name: keep_count(graph.by_name[name], r, round_to)
            for name, r in ratios_for_groups(graph, ratio, ratios).items()}
