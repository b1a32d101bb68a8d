"""MACs targets: the MACs a plan would leave (without building the model) and the per-group
counts that remove a given fraction of the MACs."""
from __future__ import annotations

import warnings

import numpy as np

from ..graph import ChannelGraph, kept_positions
from ..measure import count_macs, macs_by_module
from ..utils import as_tuple
from .allocate import global_counts
from .checks import PlanError, check_ratio
from .select import keep_count, make_plan

__all__ = ["MacsEstimator", "MacsTargetWarning", "counts_for_global_macs", "counts_for_macs"]


class MacsEstimator:
    """MACs of the model a plan would produce, without building it.

    A convolution or linear layer's MACs scale with the kept fraction of its output rows times
    the kept fraction of its input columns (spatial sizes do not change), so per-layer MACs
    measured once on the unpruned model give every candidate plan's MACs exactly.
    """

    def __init__(self, model, graph, example_inputs, macs_before: int | None = None):
        self.graph = graph
        self.base = macs_by_module(model, example_inputs)
        total = macs_before if macs_before is not None else count_macs(model, example_inputs)
        self.other = total - sum(self.base.values())
        self.layers = {}
        for member, roots in graph.tensor_members():
            if member.tensor.endswith("weight") and member.role in ("out", "in") \
                    and member.module in self.base:
                self.layers.setdefault(member.module, []).append(roots)

    def __call__(self, plan: dict[str, list[int]]) -> float:
        removed = self.graph.removed_roots(plan)
        total = float(self.other)
        for module, macs in self.base.items():
            fraction = 1.0
            for roots in self.layers.get(module, ()):
                fraction *= len(kept_positions(roots, removed)) / len(roots)
            total += macs * fraction
        return total


def bisect(reaches, lo: float, hi: float, steps: int) -> tuple[float, float]:
    """``(lo, hi)`` after ``steps`` halvings of ``[lo, hi]`` keeping ``reaches(hi)`` true and
    ``reaches(lo)`` false (the MACs searches: a ratio, a global ratio, a price on MACs)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return lo, hi


def reduction_of_counts(model, graph: ChannelGraph, scores, example_inputs,
                        macs_before: int | None = None, round_to: int = 1):
    """``reduction(counts)``: the fraction of the MACs a plan with those kept counts (channels
    chosen by ``scores``) removes, estimated without building the model."""
    example_inputs = as_tuple(example_inputs)
    if macs_before is None:
        macs_before = count_macs(model, example_inputs)
    estimate = MacsEstimator(model, graph, example_inputs, macs_before)

    def reduction(counts: dict[str, int]) -> float:
        return 1 - estimate(make_plan(graph, scores, {}, round_to, counts=counts)) / macs_before

    return reduction


class MacsTargetWarning(UserWarning):
    """A MACs target was not met within its tolerance (the reduction reached is named)."""


def counts_for_macs(model, graph: ChannelGraph, scores: dict[str, np.ndarray], example_inputs,
                    target: float, macs_before: int | None = None, round_to: int = 1, *,
                    steps: int = 16, tolerance: float = 0.01,
                    group_scale: dict[str, float] | None = None) -> dict[str, int]:
    """Kept channels per group that remove ``target`` of the MACs (to within one channel).

    Bisection on the uniform ratio finds the largest ratio that stays below the target; then
    groups lose one more channel each, in turn (largest group first), until the reduction lands
    in [target, target + tolerance] — a uniform ratio alone moves in steps of whole channels of
    every group at once, which on small networks overshoots by several points.
    ``group_scale`` multiplies the uniform ratio per group (the residual streams' stream_scale).
    """
    target = check_ratio(target, "macs_reduction")
    reduction = reduction_of_counts(model, graph, scores, example_inputs, macs_before, round_to)
    scale = group_scale or {}

    def uniform(r: float) -> dict[str, int]:
        return {g.name: keep_count(g, r * scale.get(g.name, 1.0), round_to)
                for g in graph.prunable_groups()}

    most = reduction(uniform(0.999))
    if most < target:
        raise PlanError(f"macs_reduction {target:.3f} is out of reach: pruning every prunable "
                        f"group as far as allowed removes only {most:.3f}")
    lo, hi = bisect(lambda r: reduction(uniform(r)) >= target, 0.0, 0.999, steps)
    counts = uniform(lo)
    current = reduction(counts)
    step = max(round_to, 1)
    order = sorted(graph.prunable_groups(), key=lambda g: -g.size)
    progressed = True
    while progressed:
        progressed = False
        for g in order:
            if g.blocks or counts[g.name] - step < max(1, int(g.fixed.sum())) \
                    or scale.get(g.name, 1.0) == 0:  # a stream kept whole stays whole
                continue
            trial = {**counts, g.name: counts[g.name] - step}
            value = reduction(trial)
            if value >= target:
                if value <= target + tolerance:
                    return trial
                continue  # this group's channels are too costly for the remaining gap
            if value > current:
                counts, current, progressed = trial, value, True
    # No combination lands within the tolerance (channels too coarse): the nearest above it,
    # said out loud, since the caller asked for a reduction "within 1%".
    counts = uniform(hi)
    warnings.warn(f"macs_reduction {target:.3f} cannot be reached within {tolerance:.3f} at "
                  f"this model's channel granularity; removing {reduction(counts):.3f} of the "
                  "MACs instead", MacsTargetWarning, stacklevel=2)
    return counts


def counts_for_global_macs(model, graph: ChannelGraph, scores: dict[str, np.ndarray],
                           example_inputs, target: float, macs_before: int | None = None, *,
                           normalize: str | None = "mean", max_ratio: float = 0.9,
                           steps: int = 24, tolerance: float = 0.01) -> dict[str, int]:
    """Kept channels per group removing ``target`` of the MACs by one global ranking of the
    per-group-normalised scores (:func:`prunekit.plan.global_counts`): the fewest channels
    of the ranking whose removal reaches the target (bisection to one channel). When that
    last channel overshoots the tolerance (a costly channel of a small model), a
    :class:`MacsTargetWarning` says by how much."""
    target = check_ratio(target, "macs_reduction")
    reduction = reduction_of_counts(model, graph, scores, example_inputs, macs_before)

    def counts_at(r: float) -> dict[str, int]:
        return global_counts(graph, scores, r, normalize=normalize, max_ratio=max_ratio)

    most = reduction(counts_at(0.999))
    if most < target:
        raise PlanError(f"macs_reduction {target:.3f} is out of reach by a global ranking: "
                        f"with no group losing more than max_ratio={max_ratio} of its "
                        f"channels, at most {most:.3f} of the MACs go")
    _, hi = bisect(lambda r: reduction(counts_at(r)) >= target, 0.0, 0.999, steps)
    counts = counts_at(hi)
    reached = reduction(counts)
    if reached > target + tolerance:
        warnings.warn(f"macs_reduction {target:.3f} cannot be reached within {tolerance:.3f} "
                      f"by the global ranking (its next channel is too costly); removing "
                      f"{reached:.3f} of the MACs instead", MacsTargetWarning, stacklevel=2)
    return counts
