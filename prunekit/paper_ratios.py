"""Per-layer pruning settings written the way papers write them (CHIP, HRank strings).

The code lives in :mod:`prunekit.plan.paper_ratios`; this module keeps the names importable
from ``prunekit.paper_ratios``.
"""
from .plan.paper_ratios import chip_resnet_counts, conv_rate_counts, parse_ratio_list

__all__ = ["chip_resnet_counts", "conv_rate_counts", "parse_ratio_list"]
