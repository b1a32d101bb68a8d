"""Pruning plans: how many channels each group keeps (allocation), and which (selection).

A plan is ``{group name: sorted kept channel indices}`` — plain JSON.

* :mod:`.target`: :class:`PlanTarget` and :func:`resolve_counts` / :func:`resolve_plan`, the one
  place every target kind (uniform or per-group ratios, global ranking, MACs reduction,
  CHIP/HRank strings, explicit counts or plan) becomes kept counts and kept indices;
* :mod:`.allocate`: counts from ratios, and from one global ranking;
* :mod:`.macs`: :class:`MacsEstimator`, :func:`counts_for_macs` and
  :func:`counts_for_global_macs` (MACs targets, uniform or global allocation);
* :mod:`.curves`: :func:`counts_for_curves` (MACs targets by measured sensitivity curves);
* :mod:`.paper_ratios`: CHIP's and HRank's per-layer strings;
* :mod:`.criterion_counts`: counts a criterion decides itself (``counts_from: criterion``);
* :mod:`.error_level`: counts at one global level of a criterion's family (PFP's error level,
  ``allocation: criterion``);
* :mod:`.select`: kept indices from scores and counts (fixed channels, blocks, requirements);
* :mod:`.validate`: a plan checked against its graph before surgery.
"""
from .checks import PlanError, check_ratio
from .select import chosen, keep_count, make_plan, select
from .validate import validate_plan
from .allocate import global_counts, ratio_counts, ratios_for_groups
from .macs import MacsEstimator, MacsTargetWarning, counts_for_global_macs, counts_for_macs
from .curves import counts_for_curves
from .paper_ratios import chip_resnet_counts, conv_rate_counts, parse_ratio_list
from .criterion_counts import COUNT_SOURCES, ScoresWithCounts, criterion_counts
from .error_level import ScoresWithLevels, counts_for_error_level
from .latency_plan import LatencyTargetWarning, counts_for_latency
from .latency_table import LatencyTable
from .target import ALLOCATIONS, TARGET_KINDS, PlanTarget, group_ratios, resolve_counts, resolve_plan

__all__ = ["ALLOCATIONS", "COUNT_SOURCES", "chosen", "ScoresWithCounts", "ScoresWithLevels", "counts_for_error_level", "criterion_counts", "counts_for_curves", "counts_for_global_macs", "MacsEstimator", "PlanError", "PlanTarget", "TARGET_KINDS", "check_ratio",
           "MacsTargetWarning", "chip_resnet_counts", "conv_rate_counts", "counts_for_macs", "global_counts",
           "group_ratios", "keep_count", "make_plan", "parse_ratio_list", "ratio_counts",
           "ratios_for_groups", "resolve_counts", "resolve_plan", "select", "validate_plan",
           "LatencyTable", "LatencyTargetWarning", "counts_for_latency"]
