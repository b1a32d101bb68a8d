"""Kept counts decided by the criterion itself (target ``counts_from: criterion``).

Most criteria only rank channels and leave "how many" to the target (a ratio, a MACs budget).
Some decide both: EPruner keeps exactly the exemplars affinity propagation finds in each layer,
so each layer's width is the number of exemplars. Such a criterion returns its scores as
:class:`ScoresWithCounts`: the usual ``{group: scores}`` (ranked like any scores, so the same
criterion still works with a ratio target) carrying ``keep_counts``, the channels kept per group
it decided (groups absent keep everything). The counts travel with the scores because the
scores are what :func:`prunekit.plan.resolve_plan` receives; no second pass over the model.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ..graph import ChannelGraph
from .checks import PlanError

__all__ = ["COUNT_SOURCES", "ScoresWithCounts", "criterion_counts"]

#: The values of ``PlanTarget.counts_from``.
COUNT_SOURCES = ("criterion",)


class ScoresWithCounts(dict):
    """``{group name: scores}`` plus ``keep_counts``: ``{group name: channels kept}`` for the
    groups whose width the criterion decided, and the criterion's ``name`` for messages."""

    def __init__(self, scores: Mapping[str, np.ndarray], keep_counts: Mapping[str, int],
                 criterion: str = "criterion"):
        super().__init__(scores)
        self.keep_counts = {str(k): int(v) for k, v in keep_counts.items()}
        self.criterion = criterion


def criterion_counts(graph: ChannelGraph, scores, round_to: int = 1) -> dict[str, int]:
    """The kept counts the criterion decided, rounded up to a multiple of ``round_to``
    (capped at the group size; the extra channels are the best-scored others).

    A PlanError when the scores carry no counts (a criterion that only ranks), when a count
    names an unknown group or is outside 1..size, or when every count keeps its whole group:
    the criterion then removes nothing, and the run would report an unpruned model as pruned.
    """
    counts = getattr(scores, "keep_counts", None)
    if counts is None:
        raise PlanError("target counts_from 'criterion' needs a criterion that decides how many "
                        "channels each group keeps (e.g. 'epruner'); this criterion only ranks "
                        "channels: give a ratio or macs_reduction target instead")
    name = getattr(scores, "criterion", "criterion")
    out = {}
    for group_name, keep in counts.items():
        group = graph.by_name.get(group_name)
        if group is None:
            raise PlanError(f"criterion '{name}' decided a count for unknown group "
                            f"'{group_name}'")
        if not 1 <= keep <= group.size:
            raise PlanError(f"criterion '{name}' keeps {keep} of the {group.size} channels of "
                            f"group '{group_name}'; a group keeps at least one and at most all")
        if round_to > 1:
            keep = min(group.size, math.ceil(keep / round_to) * round_to)
        out[group_name] = keep
    if not any(keep < graph.by_name[g].size for g, keep in out.items()):
        rounding = f", round_to={round_to}" if round_to > 1 else ""
        raise PlanError(f"criterion '{name}' keeps every channel of every group it decides "
                        f"({len(out)} groups{rounding}): nothing would be removed (for "
                        "epruner: a larger beta keeps fewer exemplars)")
    return out
