"""``prunekit.prune``: graph -> scores -> plan -> surgery, with MACs/params before and after."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .criteria import get_criterion
from .graph import build_graph
from .measure import count_macs, count_params, macs_by_module
from .plan import (PlanError, check_ratio, keep_count, make_plan, ratios_for_groups,
                   validate_plan)
from .surgery import apply_plan, kept_positions, removed_channel_roots


def reduction(before: int, after: int) -> float:
    """Fraction removed: ``1 - after / before``."""
    return 1 - after / before


@dataclass
class PruningResult:
    """What a pruning did: the plan (JSON-serialisable) and the model's size before and after."""

    plan: dict[str, list[int]]
    group_sizes: dict[str, int]
    criterion: str
    ratios: dict[str, float]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    unreached_modules: list[str] = field(default_factory=list)

    macs_reduction = property(lambda self: reduction(self.macs_before, self.macs_after))
    params_reduction = property(lambda self: reduction(self.params_before, self.params_after))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["macs_reduction"] = self.macs_reduction
        d["params_reduction"] = self.params_reduction
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        return (f"{self.criterion}: MACs {self.macs_before:,} -> {self.macs_after:,} "
                f"(-{100 * self.macs_reduction:.1f}%), params {self.params_before:,} -> "
                f"{self.params_after:,} (-{100 * self.params_reduction:.1f}%), "
                f"{len(self.plan)} groups pruned")


def _module_names(model: nn.Module, ignore) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for item in ignore:
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError("an ignored module is not part of the model")
            out.append(names[id(item)])
        else:
            if item not in dict(model.named_modules()):
                raise ValueError(f"ignore names unknown module '{item}'")
            out.append(item)
    return out


def prune(model: nn.Module, example_inputs, *, criterion="l1", ratio: float | None = None,
          ratios: dict[str, float] | None = None, macs_reduction: float | None = None,
          ignore=(), round_to: int = 1, calibration=None, leaf_modules=(),
          plan: dict[str, list[int]] | None = None) -> PruningResult:
    """Physically remove channels from ``model`` (in place) and report what changed.

    Exactly one target: ``ratio`` (uniform fraction removed from every prunable group, in
    [0, 1)), ``ratios`` (per group or module name, fnmatch patterns allowed; may be combined
    with ``ratio`` as the default), ``macs_reduction`` (the uniform ratio that removes this
    fraction of MACs, found by bisection), or an explicit ``plan``.
    ``ignore``: modules (or names) whose output channels are kept, e.g. the classifier.
    ``calibration``: data for activation-based criteria (an iterable of input batches).
    """
    targets = [ratio is not None or ratios is not None, macs_reduction is not None,
               plan is not None]
    if sum(targets) != 1:
        raise PlanError("give exactly one target: ratio/ratios, macs_reduction or plan")
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    ignore = _module_names(model, ignore)
    graph = build_graph(model, example_inputs, leaf_modules=leaf_modules, ignore=ignore)
    crit = get_criterion(criterion)
    macs_before, params_before = count_macs(model, example_inputs), count_params(model)

    group_ratios: dict[str, float] = {}
    if plan is None:
        if getattr(crit, "needs_data", False) and calibration is None:
            raise ValueError(f"criterion '{crit.name}' needs calibration data (calibration=...)")
        if getattr(crit, "needs_data", False):
            scores = crit.score(graph, model, calibration)
        else:
            scores = crit.score(graph, model)
        counts = None
        if macs_reduction is not None:
            counts = _counts_for_macs(model, graph, scores, example_inputs,
                                      check_ratio(macs_reduction, "macs_reduction"),
                                      macs_before, round_to)
        else:
            group_ratios = ratios_for_groups(graph, ratio, ratios)
        plan = make_plan(graph, scores, group_ratios, round_to, counts=counts)
    validate_plan(graph, plan)
    apply_plan(model, graph, plan)
    return PruningResult(
        plan={k: [int(i) for i in v] for k, v in plan.items()},
        group_sizes={g.name: g.size for g in graph.groups},
        criterion=getattr(crit, "name", str(crit)), ratios=group_ratios,
        macs_before=macs_before, macs_after=count_macs(model, example_inputs),
        params_before=params_before, params_after=count_params(model),
        unreached_modules=graph.unreached)


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
        for member, roots in zip(graph.state.members, graph.member_roots):
            if member.tensor.endswith("weight") and member.role in ("out", "in") \
                    and member.module in self.base:
                self.layers.setdefault(member.module, []).append(roots)

    def __call__(self, plan: dict[str, list[int]]) -> float:
        removed = removed_channel_roots(self.graph, plan)
        total = float(self.other)
        for module, macs in self.base.items():
            fraction = 1.0
            for roots in self.layers.get(module, ()):
                fraction *= len(kept_positions(roots, removed)) / len(roots)
            total += macs * fraction
        return total


def _counts_for_macs(model, graph, scores, example_inputs, target, macs_before, round_to,
                     steps: int = 16, tolerance: float = 0.01) -> dict[str, int]:
    """Kept channels per group that remove ``target`` of the MACs (to within one channel).

    Bisection on the uniform ratio finds the largest ratio that stays below the target; then
    groups lose one more channel each, in turn (largest group first), until the reduction lands
    in [target, target + tolerance] — a uniform ratio alone moves in steps of whole channels of
    every group at once, which on small networks overshoots by several points.
    """
    estimate = MacsEstimator(model, graph, example_inputs, macs_before)

    def reduction(counts: dict[str, int]) -> float:
        plan = make_plan(graph, scores, {}, round_to, counts=counts)
        return 1 - estimate(plan) / macs_before

    def uniform(r: float) -> dict[str, int]:
        return {g.name: keep_count(g, r, round_to) for g in graph.prunable_groups()}

    lo, hi = 0.0, 0.999
    if reduction(uniform(hi)) < target:
        raise PlanError(f"macs_reduction {target:.3f} is out of reach: pruning every prunable "
                        f"group as far as allowed removes only {reduction(uniform(hi)):.3f}")
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reduction(uniform(mid)) >= target else (mid, hi)
    counts = uniform(lo)
    current = reduction(counts)
    step = max(round_to, 1)
    order = sorted(graph.prunable_groups(), key=lambda g: -g.size)
    progressed = True
    while progressed:
        progressed = False
        for g in order:
            if g.blocks or counts[g.name] - step < max(1, int(g.fixed.sum())):
                continue
            trial = {**counts, g.name: counts[g.name] - step}
            value = reduction(trial)
            if value >= target:
                if value <= target + tolerance:
                    return trial
                continue  # this group's channels are too costly for the remaining gap
            if value > current:
                counts, current, progressed = trial, value, True
    return uniform(hi)  # no combination lands within the tolerance: the nearest above it
