"""Pruning methods that need more than one-shot scoring, e.g. pruning during training.

* :mod:`prunekit.methods.soft`: soft filter pruning (SFP, FPGM-soft, ASFP) as a
  :func:`prunekit.train.fit` hook, plus :func:`soft_prune` (train + physical removal).
"""
from .soft import (SOFT_SCHEDULES, SoftPruning, asymptotic_rate, finalize, soft_prune,
                   zero_masked_channels)

__all__ = ["SOFT_SCHEDULES", "SoftPruning", "asymptotic_rate", "finalize", "soft_prune",
           "zero_masked_channels"]
