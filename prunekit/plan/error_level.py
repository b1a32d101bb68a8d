"""Counts from one global level of a criterion's own family (``macs_reduction`` with
``allocation: "criterion"``).

Some criteria do not only rank channels but say how many each group needs for a given
quality level: PFP (Liebenwein et al., ICLR 2020, arXiv:1911.07412) turns an error level eps
into each layer's sample count m_l(eps) and so into a kept count per group, and the paper
finds the one eps for all layers that meets a size budget by a root search (Brent's method on
``budget - size(eps)``, eps in [1e-300, 1e150]). Such a criterion returns
:class:`ScoresWithLevels`: the usual ``{group: scores}`` carrying ``counts_at(level)``,
``{group: kept}`` non-increasing in the level (a larger error keeps fewer channels). Here the
level is found by bisection on the logarithm of the level against prunekit's MACs counter
(:class:`~prunekit.plan.macs.MacsEstimator`, physical removal), so the pruned model removes the
target fraction of the MACs within the usual 1%.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping

import numpy as np

from ..graph import ChannelGraph
from .checks import PlanError, check_ratio
from .macs import MacsTargetWarning, bisect, reduction_of_counts

__all__ = ["ScoresWithLevels", "counts_for_error_level"]


class ScoresWithLevels(dict):
    """``{group name: scores}`` plus ``counts_at(level) -> {group name: kept}`` (groups
    absent keep everything; non-increasing in ``level``), the level interval ``levels``
    searched (positive, searched on a log scale), and the criterion's ``name`` for messages.
    After a search, ``chosen_level`` holds the level the plan used and ``held`` the groups
    held at a count of their own (see :func:`counts_for_error_level`)."""

    def __init__(self, scores: Mapping[str, np.ndarray],
                 counts_at: Callable[[float], Mapping[str, int]],
                 levels: tuple[float, float], criterion: str = "criterion"):
        super().__init__(scores)
        lo, hi = (float(v) for v in levels)
        if not 0 < lo < hi or not math.isfinite(hi):
            raise ValueError(f"levels must be 0 < low < high < inf, got {levels!r}")
        self.counts_at = counts_at
        self.levels = (lo, hi)
        self.criterion = criterion
        self.chosen_level: float | None = None
        self.held: dict[str, int] = {}


def _rounded(graph: ChannelGraph, counts: Mapping[str, int], round_to: int) -> dict[str, int]:
    out = {}
    for name, keep in counts.items():
        size = graph.by_name[name].size
        keep = min(size, max(1, int(keep)))
        if round_to > 1:
            keep = min(size, math.ceil(keep / round_to) * round_to)
        out[name] = keep
    return out


def counts_for_error_level(model, graph: ChannelGraph, scores, example_inputs, target: float,
                           macs_before: int | None = None, round_to: int = 1, *,
                           steps: int = 80, tolerance: float = 0.01) -> dict[str, int]:
    """Kept channels per group at the one level of the criterion's family whose plan removes
    ``target`` of the MACs: the smallest level reaching it (bisection on log(level) over
    ``scores.levels``), within ``[target, target + tolerance]``.

    Groups whose counts change at the same step (ties) take the new count one at a time, the
    largest first, until the target is reached. One channel of a costly group (a residual
    stream read by a whole stage) can remove more than ``tolerance`` by itself: that group is
    then held at its count just below the step and the level of the others is searched again
    (as often as needed), so every group not held follows the one level. A reduction still
    above ``target + tolerance`` warns :class:`MacsTargetWarning`. PlanError when the scores
    carry no family or the target is out of reach at the largest level.
    ``scores.chosen_level`` and ``scores.held`` are set to the level and the held counts used."""
    counts_at = getattr(scores, "counts_at", None)
    if counts_at is None or getattr(scores, "levels", None) is None:
        raise PlanError("allocation 'criterion' needs a criterion whose scores carry a family of "
                        "kept counts over one error level (e.g. 'pfp'); this criterion only "
                        "ranks channels: use allocation 'uniform', 'global' or 'sensitivity'")
    target = check_ratio(target, "macs_reduction")
    name = getattr(scores, "criterion", "criterion")
    reduction = reduction_of_counts(model, graph, scores, example_inputs, macs_before, round_to)
    low, high = (math.log(v) for v in scores.levels)
    held: dict[str, int] = {}

    def counts(t: float) -> dict[str, int]:
        return {**_rounded(graph, counts_at(math.exp(t)), round_to), **held}

    most = reduction(counts(high))
    if most < target:
        raise PlanError(f"macs_reduction {target:.3f} is out of reach by criterion '{name}': at "
                        f"its largest error level ({scores.levels[1]:g}) the plan removes only "
                        f"{most:.3f} of the MACs")
    best = None
    while True:
        if reduction(counts(low)) >= target:
            lo = hi = low
        else:
            lo, hi = bisect(lambda t: reduction(counts(t)) >= target, low, high, steps)
        chosen, below = counts(hi), counts(lo)
        changed = sorted((g for g in chosen if chosen[g] != below.get(g)),
                         key=lambda g: -graph.by_name[g].size)
        trial, last = dict(below), None
        for last in changed:  # groups changing at the same step: one at a time
            trial[last] = chosen[last]
            if reduction(trial) >= target:
                break
        reached = reduction(trial)
        if best is None or reached < best[0]:
            best = (reached, trial, hi, dict(held))
        if reached <= target + tolerance or last is None:
            break
        held[last] = below[last]  # its step alone overshoots: hold it, search the others
        if reduction(counts(high)) < target:
            break  # holding those groups, the others cannot reach the target
    reached, chosen, level, scores.held = best
    scores.chosen_level = math.exp(level)
    if reached > target + tolerance:
        warnings.warn(f"macs_reduction {target:.3f} cannot be reached within {tolerance:.3f} by "
                      f"criterion '{name}''s error level (the next channel is too costly); "
                      f"removing {reached:.3f} of the MACs instead", MacsTargetWarning,
                      stacklevel=2)
    return chosen
