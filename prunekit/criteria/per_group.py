"""A composite criterion: every channel group scored by a criterion of its own (LFPC's
learned choices, or any hand-made mapping)."""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ..graph import ChannelGraph
from .base import Criterion, get_criterion

__all__ = ["PerGroupCriterion"]


class PerGroupCriterion(Criterion):
    """Scores every group with its own criterion: ``choices`` maps group name -> criterion
    (name or instance); groups not listed use ``default``. LFPC's learned criteria."""

    name = "per-group"

    def __init__(self, choices: dict[str, Any], default: Any = "l2"):
        self.choices = {str(k): get_criterion(v) for k, v in choices.items()}
        self.default = get_criterion(default)
        for crit in [self.default, *self.choices.values()]:
            if getattr(crit, "needs_data", False):
                raise ValueError(f"criterion '{crit.name}' needs calibration data; "
                                 "PerGroupCriterion supports data-free criteria only")

    def options(self) -> dict:
        return {"choices": {k: v.name for k, v in self.choices.items()},
                "default": self.default.name}

    def score(self, graph: ChannelGraph, model: nn.Module,
              calibration=None) -> dict[str, np.ndarray]:
        unknown = set(self.choices) - set(graph.by_name)
        if unknown:
            raise ValueError(f"PerGroupCriterion names unknown groups: {', '.join(sorted(unknown))}")
        by_criterion: dict[int, dict[str, np.ndarray]] = {}
        scores = {}
        for group in graph.prunable_groups():
            crit = self.choices.get(group.name, self.default)
            if id(crit) not in by_criterion:  # whole-graph scoring: FPGM's mix needs counts
                by_criterion[id(crit)] = crit.score(graph, model, calibration)
            scores[group.name] = by_criterion[id(crit)][group.name]
        return scores
