"""Channel importance criteria: each a small class with a ``name`` and a ``score`` method.

``score(graph, model, calibration=None)`` returns ``{group name: scores}`` with one score per
channel of the group; higher means more important (kept first). ``get_criterion("l1")`` looks
one up by name; options go as keyword arguments (``get_criterion("chip", round_decimals=4)``)
or build the class directly.

Registered names:

* weights only: ``l1``, ``l2`` (SFP), ``fpgm`` (FPGM, incl. FPGM-mix), ``bn_scale`` (Network
  Slimming), ``random``; group-aware ``group_l1`` / ``group_l2`` (every parameter coupled to
  a channel: producers, norms, consumers' input slices; :mod:`.group_norm`); ``epruner``
  (EPruner: affinity propagation's exemplar filters, which also decides each layer's kept
  count for the target ``counts_from: criterion``; :mod:`.epruner`); ``filtersketch``
  (FilterSketch: the kept filters are rewritten as a Frequent-Directions sketch; :mod:`.sketch`);
* feature maps on calibration data (``needs_data``; ``score(graph, model, calibration)``):
  ``hrank``, ``chip``, ``apoz``, sharing one streaming pass
  (:func:`prunekit.criteria.calibration.run_calibration`);
  ``central_filter`` (Central Filter: one central filter per cluster of similar maps, the
  removed filters' next-layer weights merged into it; :mod:`.central_filter`);
* gradients on labelled calibration data (``needs_data``): ``taylor`` (Taylor-FO-BN).
* input-channel sensitivities on calibration data (``needs_data``): ``pfp`` (Provable Filter
  Pruning; its error-level family of counts serves ``allocation: criterion``; :mod:`.pfp`).
* the loss of randomly masked models on labelled calibration data (``needs_data``,
  ``needs_labels``): ``lfe`` (linear filter ensembles; :mod:`.ensembles`).
* class separability of feature maps on labelled calibration data (``needs_data``,
  ``needs_labels``): ``class_separability`` (FSDP's CS score; :mod:`.separability`).

``list_criteria()`` gives the registered names. Every criterion's scores are checked in one
place (:func:`prunekit.criteria.base.checked_score`, applied to every subclass): NaN/inf in the
model's group tensors, the calibration batches or the scores raise :class:`ScoreError`
(:class:`CalibrationDataError` for a batch) naming the layer, group or batch.
"""
from .base import (CRITERIA, Criterion, ScoreError, combine_scores, get_criterion,
                   list_criteria, register_criterion)
from .weight import FPGM, BNScale, L1Norm, L2Norm, RandomCriterion
from .group_norm import GroupL1, GroupL2, GroupMagnitude
from .epruner import EPruner
from .sketch import FilterSketch
from .activation import APoZ, CHIP, ActivationCriterion, HRank
from .central_filter import CentralFilter
from .gradient import Taylor
from .pfp import PFP
from .ensembles import LinearFilterEnsembles
from .separability import ClassSeparability
from .calibration import CalibrationDataError, run_calibration
from .per_group import PerGroupCriterion

__all__ = ["Criterion", "CRITERIA", "get_criterion", "list_criteria", "register_criterion",
           "combine_scores", "ScoreError", "CalibrationDataError",
           "L1Norm", "L2Norm", "GroupL1", "GroupL2", "GroupMagnitude", "EPruner", "FilterSketch", "FPGM", "BNScale", "RandomCriterion", "ActivationCriterion",
           "HRank", "CHIP", "APoZ", "Taylor", "PFP", "LinearFilterEnsembles", "ClassSeparability", "CentralFilter", "PerGroupCriterion", "run_calibration"]
