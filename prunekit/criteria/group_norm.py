"""Group-aware magnitude: a channel scored over every parameter coupled to it, not only the
filter that produces it.

Removing channel ``j`` of a group removes, in every member tensor of the group, the slice at
``j``'s positions: the producing filters' rows (and biases), the norm layers' entries, and the
consumers' input columns. ``group_l1`` / ``group_l2`` score ``j`` by what it removes, as
Torch-Pruning's ``GroupMagnitudeImportance`` does (Fang et al., "DepGraph: Towards Any
Structural Pruning", CVPR 2023, section 3.3, the group-level importance of eq. 5 with the
L_p magnitude of each coupled parameter)::

    I_m(j) = sum_{w in slice_m(j)} |w|^p          (one value per member tensor m)
    I(j)   = reduce_m I_m(j)                       (mean, sum, max or first)
    S(j)   = I(j) / normaliser(I)                  (mean, max, sum, or none)

``roles`` chooses the members: ``"out"`` (producing weights and biases), ``"norm"``
(BatchNorm/LayerNorm weight and bias), ``"in"`` (consumers' input slices), ``"param"``
(parameters used directly). Grouped-conv input slices (``blocks > 1``) belong to whole blocks
of channels and are left out. Buffers (running statistics) are not parameters and never count.
The paper's own per-filter norms stay available as ``l1`` / ``l2`` (Li et al.).
"""
from __future__ import annotations

import numpy as np
from torch import nn

from ..errors import ConfigError
from ..graph import ChannelGroup
from .base import Criterion, check_choice, register_criterion

__all__ = ["GroupL1", "GroupL2", "GroupMagnitude"]

REDUCTIONS = ("mean", "sum", "max", "first")
NORMALIZERS = ("mean", "max", "sum", "none")
ROLES = ("out", "norm", "in", "param")


class GroupMagnitude(Criterion):
    """L_p magnitude of every coupled parameter of a channel, reduced over the group's member
    tensors and normalised per group (see the module doc for the definition)."""

    name = "group_magnitude"
    p = 1

    def __init__(self, reduction: str = "mean", normalizer: str = "mean",
                 roles: tuple[str, ...] | list[str] = ("out", "norm", "in", "param")):
        self.reduction = check_choice(reduction, REDUCTIONS, "reduction")
        self.normalizer = check_choice(normalizer, NORMALIZERS, "normalizer")
        roles = tuple(roles)
        for role in roles:
            check_choice(role, ROLES, "each role")
        if not roles:
            raise ConfigError("roles must name at least one of " + ", ".join(ROLES))
        self.roles = roles

    def options(self) -> dict:
        return {"reduction": self.reduction, "normalizer": self.normalizer,
                "roles": list(self.roles)}

    def member_scores(self, group: ChannelGroup, model: nn.Module):
        """``(channel index per position, |w|^p summed per position)`` of each member tensor
        that counts (see ``roles``)."""
        params = dict(model.named_parameters())
        for member, pos in group.members:
            if member.role not in self.roles or member.blocks > 1:
                continue
            tensor = params.get(member.tensor)
            if tensor is None:  # a buffer, or a tensor of another owner
                continue
            values = tensor.detach().double().abs().pow(self.p)
            per_position = values.movedim(member.dim, 0).reshape(values.shape[member.dim], -1)
            yield np.asarray(pos), per_position.sum(1).cpu().numpy()

    def score_group(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        size = group.size
        total, count = np.zeros(size), np.zeros(size)
        high, first = np.zeros(size), np.full(size, np.nan)
        for pos, values in self.member_scores(group, model):
            mine = pos >= 0
            # A channel at several positions of one tensor (e.g. read twice) adds them up: all
            # of those positions go when it goes.
            per_channel = np.zeros(size)
            np.add.at(per_channel, pos[mine], values[mine])
            covered = np.zeros(size, dtype=bool)
            covered[pos[mine]] = True
            total[covered] += per_channel[covered]
            count[covered] += 1
            high[covered] = np.maximum(high[covered], per_channel[covered])
            fresh = covered & np.isnan(first)
            first[fresh] = per_channel[fresh]
        if self.reduction == "sum":
            scores = total
        elif self.reduction == "mean":
            scores = np.divide(total, count, out=np.zeros(size), where=count > 0)
        elif self.reduction == "max":
            scores = high
        else:
            scores = np.nan_to_num(first, nan=0.0)
        return _normalised(scores, self.normalizer)


def _normalised(scores: np.ndarray, normalizer: str) -> np.ndarray:
    if normalizer == "none":
        return scores
    scale = {"mean": scores.mean(), "max": scores.max(), "sum": scores.sum()}[normalizer]
    return scores / scale if scale > 0 else scores


@register_criterion
class GroupL1(GroupMagnitude):
    """``group_l1``: :class:`GroupMagnitude` with p = 1 (Torch-Pruning's group L1)."""

    name = "group_l1"
    p = 1


@register_criterion
class GroupL2(GroupMagnitude):
    """``group_l2``: :class:`GroupMagnitude` with p = 2 (squared magnitudes, Torch-Pruning's
    default ``GroupMagnitudeImportance(p=2)``)."""

    name = "group_l2"
    p = 2
