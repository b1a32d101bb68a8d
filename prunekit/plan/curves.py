"""Sensitivity allocation: per-group counts that meet a MACs target with the least predicted
accuracy cost, given each group's measured cost curve.

A curve maps kept channels to the loss increase measured when that group alone is pruned to
that count (:func:`prunekit.sensitivity.measure_sensitivity`); between measured counts it is
interpolated linearly, and it is made non-increasing in the kept count (keeping more channels
never predicts a larger drop). The allocation minimises the sum of the groups' predicted costs
subject to the MACs target: for a price ``lam`` on MACs, each group independently keeps the
count minimising ``cost_g(k) - lam * saved_g(k)`` (``saved_g`` the MACs pruning that group alone
to ``k`` removes); ``lam`` is bisected with the exact estimate of the whole plan, and the last
few channels are placed, cheapest predicted cost per MAC first, until the reduction lands in
``[target, target + tolerance]``. Groups are never pruned beyond their most-pruned measured
count (no extrapolation). Equal predicted costs (a flat or noisy curve, clipped at 0) are
settled towards equal ratios by a tie-breaking term ``1e-4 * max cost * removed fraction^2``.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from ..graph import ChannelGraph
from .checks import PlanError, check_ratio
from .macs import MacsTargetWarning, bisect, reduction_of_counts
from .select import keep_count

__all__ = ["Curve", "counts_for_curves"]

#: A measured curve: ``[(kept channels, cost), ...]`` (the unpruned count costs 0).
Curve = Sequence[tuple[int, float]]


def _dense_curve(size: int, curve: Curve, allowed: np.ndarray) -> np.ndarray:
    """Predicted cost at each allowed kept count (linear between measurements, monotone)."""
    points = sorted({int(k): float(c) for k, c in curve}.items())
    if not points or points[-1][0] != size:
        points.append((size, 0.0))
    ks = np.array([k for k, _ in points], dtype=np.float64)
    cs = np.array([max(c, 0.0) for _, c in points], dtype=np.float64)
    cost = np.interp(allowed.astype(np.float64), ks, cs)
    # keeping fewer never costs less: a running max from the large counts downwards
    order = np.argsort(-allowed, kind="stable")
    cost[order] = np.maximum.accumulate(cost[order])
    return cost


def counts_for_curves(model, graph: ChannelGraph, scores: Mapping[str, np.ndarray],
                      example_inputs, target: float, curves: Mapping[str, Curve], *,
                      macs_before: int, round_to: int = 1, tolerance: float = 0.01,
                      steps: int = 40) -> dict[str, int]:
    """Kept channels per group (see the module doc) removing ``target`` of the MACs."""
    target = check_ratio(target, "macs_reduction")
    reduction = reduction_of_counts(model, graph, scores, example_inputs, macs_before, round_to)

    options = {}  # group -> (allowed kept counts descending, predicted cost, MACs saved)
    for g in graph.prunable_groups():
        if g.name not in curves:
            continue
        measured = [int(k) for k, _ in curves[g.name]]
        floor = max(min(measured), keep_count(g, 0.999, round_to))
        allowed = np.array(sorted({keep_count(g, r, round_to) for r in
                                   np.arange(0, g.size) / g.size} | {g.size}, reverse=True))
        allowed = allowed[allowed >= floor]
        if len(allowed) < 2:
            continue
        one = reduction({g.name: int(allowed[-1])})
        removed = (g.size - allowed) / max(g.size - int(allowed[-1]), 1)
        options[g.name] = (allowed, _dense_curve(g.size, curves[g.name], allowed),
                           one * removed)
    if not options:
        raise PlanError("no prunable group has a sensitivity curve: nothing to allocate")
    scale = max([float(cost.max()) for _, cost, _ in options.values()] + [0.0]) or 1.0
    for name, (allowed, cost, saved) in options.items():
        removed = 1 - allowed / graph.by_name[name].size
        options[name] = (allowed, cost + 1e-4 * scale * removed ** 2, saved)

    def choose(lam: float) -> dict[str, int]:
        counts = {}
        for name, (allowed, cost, saved) in options.items():
            i = int(np.argmin(cost - lam * saved))
            if allowed[i] < graph.by_name[name].size:
                counts[name] = int(allowed[i])
        return counts

    deepest = {name: int(allowed[-1]) for name, (allowed, _, _) in options.items()}
    if reduction(deepest) < target:
        raise PlanError(f"macs_reduction {target:.3f} is out of reach with the measured ratios: "
                        f"pruning every group to its most-pruned measured count removes "
                        f"{reduction(deepest):.3f}; measure larger ratios")
    hi = 1.0
    while reduction(choose(hi)) < target:
        hi *= 4
    lo, _ = bisect(lambda lam: reduction(choose(lam)) >= target, 0.0, hi, steps)
    counts = choose(lo)
    current = reduction(counts)
    if current >= target:
        return counts
    # Place the last channels one at a time, cheapest predicted cost per MAC saved first;
    # the step that crosses the target is the cheapest one landing within the tolerance.
    full = {name: graph.by_name[name].size for name in options}
    while True:
        steps_ = []
        for name, (allowed, cost, saved) in options.items():
            k = counts.get(name, full[name])
            i = int(np.searchsorted(-allowed, -k))
            if i + 1 < len(allowed):
                price = (cost[i + 1] - cost[i]) / max(saved[i + 1] - saved[i], 1e-15)
                steps_.append((price, name, int(allowed[i + 1])))
        if not steps_:
            break
        steps_.sort()
        overshoot = None
        for _, name, k in steps_:  # the cheapest step that does not jump past the window
            trial = {**counts, name: k}
            value = reduction(trial)
            if value > target + tolerance:
                overshoot = overshoot or (trial, value)
                continue
            if value >= target:
                return trial
            counts = trial
            break
        else:
            trial, value = overshoot
            warnings.warn(f"macs_reduction {target:.3f} cannot be reached within "
                          f"{tolerance:.3f} at this model's channel granularity; removing "
                          f"{value:.3f} of the MACs instead", MacsTargetWarning, stacklevel=2)
            return trial
    raise PlanError(f"macs_reduction {target:.3f} is out of reach with the measured ratios "
                    f"(at most {reduction(counts):.3f}); measure larger ratios")
