"""One place that turns a pruning target into kept channel counts, and counts into a plan.

A :class:`PlanTarget` holds exactly one target kind:

* ``ratio`` (uniform fraction removed from every prunable group) and/or ``ratios`` (per group
  or producing module, fnmatch patterns; ``ratio`` is then the default),
* ``global_ratio`` (that fraction of all prunable channels by one global ranking of the
  per-group-normalised scores, no group losing more than ``max_ratio``),
* ``macs_reduction`` (per-group counts that remove that fraction of the MACs, within 1%),
* ``chip_sparsity`` / ``conv_rates`` (CHIP's and HRank's per-layer strings),
* ``counts`` (channels kept per group name) or ``plan`` (kept indices per group, explicit),
* ``counts_from: "criterion"`` (each group keeps the channels the criterion chooses, as many
  as it decides: EPruner's exemplars; see :mod:`prunekit.plan.criterion_counts`).
* ``latency_reduction`` (that fraction of the *measured* latency removed, with the
  ``latency_*`` options; see :mod:`prunekit.plan.latency_plan` and :mod:`prunekit.latency_target`).

plus how counts are rounded (``round_to``), which modules keep their outputs (``ignore``),
how much less the residual streams lose (``stream_scale``, for ratio and MACs targets; see
:mod:`prunekit.plan.streams`), and how a MACs target is shared among the groups
(``allocation``: ``"uniform"``, one ratio for all groups; ``"global"``, one global ranking of
the per-group-normalised scores; ``"sensitivity"``, each group's measured cost curve, see
:mod:`prunekit.plan.curves` and :func:`prunekit.sensitivity.measure_sensitivity`;
``"criterion"``, one global level of the criterion's own family of counts, PFP's error level,
see :mod:`prunekit.plan.error_level`).
:func:`resolve_counts` gives the counts on a :class:`~prunekit.graph.ChannelGraph`;
:func:`resolve_plan` the kept indices, choosing channels by the criterion's scores.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
from torch import nn

from ..graph import ChannelGraph
from .allocate import global_counts, ratio_counts, ratios_for_groups
from .checks import PlanError, check_ratio
from .criterion_counts import COUNT_SOURCES, criterion_counts
from .curves import counts_for_curves
from .error_level import counts_for_error_level
from .latency_plan import check_latency_options
from .macs import counts_for_global_macs, counts_for_macs
from .paper_ratios import chip_resnet_counts, conv_rate_counts
from .select import make_plan
from .streams import scaled_ratios, stream_groups
from .validate import validate_plan

__all__ = ["ALLOCATIONS", "TARGET_KINDS", "PlanTarget", "group_ratios", "resolve_counts", "resolve_plan"]

#: The target keys, one of which a PlanTarget holds (``ratio`` may come with ``ratios``).
TARGET_KINDS = ("ratio", "ratios", "macs_reduction", "chip_sparsity", "conv_rates",
                "global_ratio", "counts", "plan", "counts_from", "latency_reduction")
_RATIO_TARGETS = ("ratio", "macs_reduction", "global_ratio")
#: How a macs_reduction target is shared among the groups.
ALLOCATIONS = ("uniform", "global", "sensitivity", "criterion")


@dataclass(frozen=True)
class PlanTarget:
    """What to prune to; the ``plan`` section of a recipe (see the module doc)."""

    ratio: float | None = None
    ratios: Mapping[str, float] | None = None
    macs_reduction: float | None = None
    global_ratio: float | None = None
    chip_sparsity: str | None = None
    conv_rates: str | None = None
    counts: Mapping[str, int] | None = None
    plan: Mapping[str, list[int]] | None = None
    counts_from: str | None = None   # "criterion": the criterion decides each group's count
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    normalize: str | None = "mean"   # global_ratio: per-group score normalisation
    max_ratio: float = 0.9           # global_ratio: the most any group may lose
    stream_scale: float = 1.0        # ratio/macs_reduction: residual streams' ratio factor
    allocation: str = "uniform"      # macs_reduction: uniform, global, sensitivity, criterion
    sensitivity_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)  # measured per group
    sensitivity_metric: str = "auto"  # loss (labels), kl (no labels), auto
    latency_reduction: float | None = None  # measured, see prunekit.plan.latency_plan
    latency_batch: int = 1            # latency_reduction: the batch size timed
    latency_tolerance: float = 0.05   # latency_reduction: relative to the target
    latency_steps: int = 6            # latency_reduction: measured plans at most
    latency_samples: int = 8          # latency_reduction: grid points per layer width
    latency_allocation: str = "greedy"  # latency_reduction: greedy or uniform
    latency_rounding: str = "auto"    # latency_reduction: auto (measured multiples) or off
    latency_thinning: float = 1.0     # latency_reduction (greedy): penalty on thin layers
    latency_kernel: str = "onednn"    # latency_reduction: the convs timed, onednn or native

    def __post_init__(self) -> None:
        given = [k for k in TARGET_KINDS if getattr(self, k) is not None]
        if len(given) > 1 and set(given) != {"ratio", "ratios"}:
            raise PlanError(f"the plan has several targets {given}; keep one")
        if self.counts_from is not None and self.counts_from not in COUNT_SOURCES:
            raise PlanError(f"counts_from must be one of {list(COUNT_SOURCES)} (the criterion "
                            f"decides each group's kept count), got {self.counts_from!r}")
        for key in _RATIO_TARGETS:
            value = getattr(self, key)
            if value is not None:
                check_ratio(value, key)
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool) \
                or self.round_to < 1:
            raise PlanError(f"round_to must be a positive int, got {self.round_to!r}")
        object.__setattr__(self, "ignore", tuple(self.ignore or ()))
        scale = self.stream_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not 0 <= scale <= 1:
            raise PlanError(f"stream_scale must be a number in [0, 1] (0 keeps the residual "
                            f"streams, 1 prunes them like the other groups), got {scale!r}")
        if scale != 1 and given and set(given) - {"ratio", "ratios", "macs_reduction"}:
            raise PlanError(f"stream_scale applies to ratio and macs_reduction targets, not "
                            f"{given[0]}")
        if self.allocation not in ALLOCATIONS:
            raise PlanError(f"allocation must be one of {list(ALLOCATIONS)}, got "
                            f"{self.allocation!r}")
        if self.allocation != "uniform" and given and given != ["macs_reduction"]:
            raise PlanError(f"allocation '{self.allocation}' shares a macs_reduction target; "
                            f"for {given[0]} leave it 'uniform'")
        if self.allocation != "uniform" and scale != 1:
            raise PlanError(f"stream_scale scales the uniform allocation's ratio; allocation "
                            f"'{self.allocation}' sets each group's count itself")
        ratios = self.sensitivity_ratios
        if isinstance(ratios, (int, float)) or not ratios or any(
                isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1
                for r in ratios):
            raise PlanError(f"sensitivity_ratios must be fractions in (0, 1), got {ratios!r}")
        object.__setattr__(self, "sensitivity_ratios", tuple(float(r) for r in ratios))
        check_latency_options(self)
        if self.sensitivity_metric not in ("auto", "loss", "kl"):
            raise PlanError(f"sensitivity_metric must be 'auto', 'loss' or 'kl', got "
                            f"{self.sensitivity_metric!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "PlanTarget":
        """A target from a recipe's ``plan`` section; unknown keys are an error."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise PlanError(f"unknown plan keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The non-default entries (JSON)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def kind(self) -> str | None:
        """The target's key (``"ratio"`` also for ratio + ratios), or None when empty."""
        for key in TARGET_KINDS:
            if getattr(self, key) is not None:
                return key
        return None

    @property
    def asks_for_removal(self) -> bool:
        """Whether the target wants some channels removed (a ratio above 0, a paper string,
        counts or an explicit plan; False for an all-zero ratio target or no target)."""
        kind = self.kind
        if kind is None:
            return False
        if kind in ("ratio", "ratios"):
            return bool((self.ratio or 0) > 0 or any(v > 0 for v in (self.ratios or {}).values()))
        if kind in _RATIO_TARGETS:
            return getattr(self, kind) > 0
        return True

    @property
    def needs_sensitivity(self) -> bool:
        """Whether the counts come from measured sensitivity curves (they need data)."""
        return self.kind == "macs_reduction" and self.allocation == "sensitivity"

    @property
    def needs_scores(self) -> bool:
        """Whether the counts depend on the criterion's scores (global ranking, MACs search,
        counts the criterion decides)."""
        return self.kind in ("global_ratio", "macs_reduction", "counts_from",
                             "latency_reduction")


def resolve_counts(graph: ChannelGraph, model: nn.Module, target: PlanTarget,
                   scores: Mapping[str, np.ndarray] | None = None, example_inputs=None, *,
                   macs_before: int | None = None, curves=None, latency=None) -> dict[str, int]:
    """Channels kept per group name for ``target`` (groups absent keep everything).

    ``scores`` are needed for ``global_ratio`` and ``macs_reduction``, ``example_inputs`` for
    ``macs_reduction``, ``curves`` (:func:`prunekit.sensitivity.measure_sensitivity`) for the
    sensitivity allocation; ``counts_from="criterion"`` reads the counts the scores carry
    (:class:`~prunekit.plan.criterion_counts.ScoresWithCounts`). An explicit ``plan``
    target gives the sizes of its kept lists.
    """
    kind = target.kind
    if kind is None:
        raise PlanError("the plan needs one of " + ", ".join(TARGET_KINDS))
    if target.needs_scores and scores is None:
        raise PlanError(f"a {kind} target ranks channels: pass the criterion's scores")
    if kind in ("ratio", "ratios"):
        return ratio_counts(graph, None, group_ratios(graph, target), target.round_to)
    if kind == "global_ratio":
        return global_counts(graph, scores, target.global_ratio, normalize=target.normalize,
                             max_ratio=target.max_ratio)
    if kind == "macs_reduction":
        if example_inputs is None:
            raise PlanError("a macs_reduction target needs the example inputs")
        if target.allocation == "sensitivity":
            if curves is None:
                raise PlanError("the sensitivity allocation needs each group's measured curve: "
                                "pass sensitivity data to prune() (a few held-out batches)")
            return counts_for_curves(model, graph, scores, example_inputs,
                                     target.macs_reduction, curves,
                                     macs_before=macs_before, round_to=target.round_to)
        if target.allocation == "criterion":
            return counts_for_error_level(model, graph, scores, example_inputs,
                                          target.macs_reduction, macs_before, target.round_to)
        if target.allocation == "global":
            return counts_for_global_macs(model, graph, scores, example_inputs,
                                          target.macs_reduction, macs_before,
                                          normalize=target.normalize,
                                          max_ratio=target.max_ratio)
        scale = {name: target.stream_scale for name in stream_groups(graph)}
        return counts_for_macs(model, graph, scores, example_inputs, target.macs_reduction,
                               macs_before, target.round_to, group_scale=scale)
    if kind == "latency_reduction":  # measured: prunekit.latency_target.LatencySearch
        if latency is None:
            raise PlanError("a latency_reduction target is measured: use prunekit.prune")
        return latency(graph, model, scores, example_inputs)
    if kind == "chip_sparsity":
        return chip_resnet_counts(graph, model, target.chip_sparsity)
    if kind == "conv_rates":
        return conv_rate_counts(graph, model, target.conv_rates)
    if kind == "counts":
        return {str(k): int(v) for k, v in target.counts.items()}
    if kind == "counts_from":
        return criterion_counts(graph, scores, target.round_to)
    return {str(k): len(v) for k, v in target.plan.items()}


def resolve_plan(graph: ChannelGraph, model: nn.Module, target: PlanTarget,
                 scores: Mapping[str, np.ndarray] | None = None, example_inputs=None, *,
                 macs_before: int | None = None, curves=None,
                 latency=None) -> dict[str, list[int]]:
    """Kept channel indices per group for ``target``, the channels chosen by ``scores``
    (an explicit ``plan`` target is validated and returned as it is)."""
    if target.kind == "plan":
        validate_plan(graph, dict(target.plan))  # before int(): 2.7 must not become 2
        return {str(k): [int(i) for i in v] for k, v in target.plan.items()}
    if scores is None:
        raise PlanError("choosing which channels to keep needs the criterion's scores")
    if target.kind in ("ratio", "ratios"):
        # Through the ratios, exactly as make_plan has always derived ratio counts.
        return make_plan(graph, scores, group_ratios(graph, target), target.round_to)
    counts = resolve_counts(graph, model, target, scores, example_inputs,
                            macs_before=macs_before, curves=curves, latency=latency)
    return make_plan(graph, scores, {}, target.round_to, counts=counts)


def group_ratios(graph: ChannelGraph, target: PlanTarget) -> dict[str, float]:
    """The per-group removal ratios a ratio target asks for ({} for other targets), the
    residual streams' scaled by ``stream_scale``."""
    if target.kind in ("ratio", "ratios"):
        ratios = ratios_for_groups(graph, target.ratio, target.ratios)
        return scaled_ratios(graph, ratios, target.stream_scale)
    return {}

