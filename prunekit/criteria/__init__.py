"""Channel importance criteria: each a small class with a ``name`` and ``score(graph, model)``.

``score`` returns ``{group name: scores}`` with one score per channel of the group; higher means
more important (kept first). ``get_criterion("l1")`` looks one up by name.
"""
from .base import Criterion, CRITERIA, get_criterion, register_criterion
from .weight import L1Norm, RandomCriterion

__all__ = ["Criterion", "CRITERIA", "get_criterion", "register_criterion", "L1Norm",
           "RandomCriterion"]
