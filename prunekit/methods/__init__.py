"""Pruning methods, each a registered descriptor (:mod:`.registry`) with a config dataclass.

Registered: ``oneshot`` (score once, remove, fine-tune), ``sfp``, ``asfp``, ``ghfp``,
``fpgm-soft`` (soft pruning while training; schedules in :mod:`.soft_schedules`), ``lfpc``
(learned per-group criteria, then SFP), ``swp`` (stripe-wise pruning with a filter skeleton). ``list_methods()`` names them all,
``get_method(name)`` gives the class; register your own with ``@register_method``.

The machinery behind them:

* :mod:`prunekit.methods.soft`: soft filter pruning (SFP, FPGM-soft, ASFP) as a
  :func:`prunekit.train.fit` hook, plus :func:`soft_prune` (train + physical removal).
* :mod:`prunekit.methods.lfpc`: LFPC's learned per-group criteria (Gumbel-softmax sampler
  trained on a validation split), then SFP with those criteria: :func:`lfpc_prune`.
* :mod:`prunekit.methods.swp`: SWP's filter skeleton and stripe removal.
* :mod:`prunekit.methods.fsdp`: FSDP (method ``fsdp``): class-separability + FPGM masks with
  fractional steps, a SoftPruning subclass (:class:`FractionalStepPruning`).
"""
from .registry import (MethodConfig, MethodResult, PruningMethod, get_method, list_methods,
                       option, register_method)
from .context import MethodContext, RunData
from .lfpc import (CriteriaSampler, CriteriaSearch, PerGroupCriterion, lfpc_prune,
                   linear_temperature)
from .lfpc_plot import plot_choices
from .soft import (SOFT_SCHEDULES, SoftPruning, asymptotic_rate, finalize, soft_prune,
                   zero_masked_channels)
from . import oneshot, soft_methods, lfpc_method, swp_method  # noqa: F401,E402  (register)
from .fsdp import FractionalStepPruning, fsdp_prune  # noqa: E402  (registers fsdp)
from . import haste  # noqa: F401,E402  (registers haste)
from . import ccep  # noqa: F401,E402  (registers ccep)
from . import kdfs  # noqa: F401,E402  (registers kdfs)
from . import hbfp  # noqa: F401,E402  (registers hbfp)

__all__ = ["SOFT_SCHEDULES", "FractionalStepPruning", "fsdp_prune", "CriteriaSampler", "CriteriaSearch", "MethodConfig",
           "MethodContext", "MethodResult", "PerGroupCriterion", "PruningMethod", "RunData",
           "SoftPruning", "asymptotic_rate", "finalize", "get_method", "lfpc_prune",
           "linear_temperature", "list_methods", "option", "plot_choices",
           "register_method", "soft_prune", "zero_masked_channels"]
