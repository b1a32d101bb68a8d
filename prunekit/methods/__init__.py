"""Pruning methods that need more than one-shot scoring, e.g. pruning during training.

* :mod:`prunekit.methods.soft`: soft filter pruning (SFP, FPGM-soft, ASFP) as a
  :func:`prunekit.train.fit` hook, plus :func:`soft_prune` (train + physical removal).
* :mod:`prunekit.methods.lfpc`: LFPC's learned per-group criteria (Gumbel-softmax sampler
  trained on a validation split), then SFP with those criteria: :func:`lfpc_prune`.
"""
from .lfpc import (CriteriaSampler, CriteriaSearch, PerGroupCriterion, lfpc_prune,
                   linear_temperature, plot_choices)
from .soft import (SOFT_SCHEDULES, SoftPruning, asymptotic_rate, finalize, soft_prune,
                   zero_masked_channels)

__all__ = ["SOFT_SCHEDULES", "CriteriaSampler", "CriteriaSearch", "PerGroupCriterion",
           "SoftPruning", "asymptotic_rate", "finalize", "lfpc_prune", "linear_temperature",
           "plot_choices", "soft_prune", "zero_masked_channels"]
