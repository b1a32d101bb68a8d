"""Criteria computed from weights alone."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..graph import ChannelGroup
from .base import Criterion, register_criterion


def producer_slices(group: ChannelGroup, model: nn.Module):
    """(channel index per row, rows) of each producing weight, rows flattened per channel."""
    for member, pos in group.producers():
        if not member.tensor.endswith("weight"):
            continue
        weight = model.get_parameter(member.tensor).detach()
        rows = weight.movedim(member.dim, 0).reshape(weight.shape[member.dim], -1)
        yield pos, rows


@register_criterion
class L1Norm(Criterion):
    """L1 norm of each filter, s_j = sum |W_j| (Li et al., "Pruning Filters for Efficient
    ConvNets", ICLR 2017, section 3.1).

    A group that several layers produce (a residual stream) adds their norms (``combine="sum"``)
    or averages them (``"mean"``).
    """

    name = "l1"
    p = 1

    def __init__(self, combine: str = "sum"):
        if combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
        self.combine = combine

    def score_group(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        total = np.zeros(group.size)
        count = np.zeros(group.size)
        for pos, rows in producer_slices(group, model):
            norms = torch.linalg.vector_norm(rows.float(), ord=self.p, dim=1).cpu().numpy()
            mine = pos >= 0
            np.add.at(total, pos[mine], norms[mine])
            np.add.at(count, pos[mine], 1)
        if self.combine == "mean":
            total = total / np.maximum(count, 1)
        return total


@register_criterion
class RandomCriterion(Criterion):
    """Uniformly random scores from a seeded generator (a baseline every paper should beat)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, graph, model):
        rng = np.random.default_rng(self.seed)
        return {g.name: rng.random(g.size) for g in graph.prunable_groups()}
