"""The criterion interface and the registry of criteria by name."""
from __future__ import annotations

import numpy as np
from torch import nn

from ..graph import ChannelGraph, ChannelGroup

CRITERIA: dict[str, type["Criterion"]] = {}


def register_criterion(cls):
    """Class decorator: make ``cls`` available by its ``name``."""
    CRITERIA[cls.name] = cls
    return cls


class Criterion:
    """Scores every channel of every prunable group; higher = more important."""

    name = "base"
    needs_data = False

    def score(self, graph: ChannelGraph, model: nn.Module) -> dict[str, np.ndarray]:
        return {g.name: self.score_group(g, model) for g in graph.prunable_groups()}

    def score_group(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def get_criterion(criterion, **kwargs) -> Criterion:
    """A criterion instance from a name, a class or an instance."""
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, type) and issubclass(criterion, Criterion):
        return criterion(**kwargs)
    if isinstance(criterion, str) and criterion in CRITERIA:
        return CRITERIA[criterion](**kwargs)
    raise ValueError(f"unknown criterion {criterion!r}; available: {', '.join(sorted(CRITERIA))}")
