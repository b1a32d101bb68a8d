"""LFPC's criteria sampler and where its masks act (He et al., "Learning Filter Pruning
Criteria for Deep Convolutional Neural Networks Acceleration", CVPR 2020; reconstruction in
``shared/research/lfpc.md`` section 2, whose equation labels R1/R2 are used here).

* :class:`CriteriaSampler`: one row of logits ``alpha`` per sampled unit and a Gumbel-softmax
  sample ``s = softmax((log softmax(alpha) + o) / tau)``, ``o ~ Gumbel(0, 1)`` (R1).
* :class:`MaskSites`: the feature maps the criteria forward (R2) multiplies by
  ``sum_k s_k M_k`` and every criterion's 0/1 keep-mask ``M_k`` per position. Two options:

  ``scope`` -- what one sampler row chooses for.
    ``"group"`` (prunekit's default): one row per coupled channel group (a residual stream is
    one unit, as prunekit removes it with one index set); criterion ``k``'s mask is the
    group's plan at the group's count.
    ``"conv"`` (the re-implementation koparkrea/Reproducibility_Challenge_2020, one
    ``criteria_attention`` row per conv): one row per convolution (any weight layer) that
    produces channels of a sampled group; criterion ``k`` scores *that conv's* filters only and
    keeps the group's count of them, so the convs of a residual stream mask different channel
    sets during the search, as in the re-implementation and in SFP.
  ``position`` -- where the mask multiplies.
    ``"after_bn"`` (default): the normalisation layer's output (the producer's output where no
    norm follows). Masking there equals removing the filter.
    ``"before_bn"`` (the re-implementation: mask, ``Align``, then BN): the producer's output.
    BN then maps a masked (zero) channel to the constant ``beta - gamma mu / sqrt(var + eps)``
    (with batch statistics: ``beta``), so the channel stays alive as a constant and the masked
    forward differs from the physically pruned network. The re-implementation normalises each
    criterion's masked copy separately, ``sum_k s_k BN(M_k o)``; prunekit normalises the
    mixture once, ``BN(sum_k s_k M_k o)``. With fixed statistics (eval) the two are equal
    because ``sum_k s_k = 1``; with batch statistics (training) they differ.

Combination rule for ``scope="conv"`` (:func:`combine_conv_choices`): physical removal needs
one index set per coupled group, so after the search each group takes the criterion with the
largest *mean probability* over the rows of its producing convs (the probability-averaged vote;
ties: the first criterion in ``criteria``), and SFP then scores the whole group with it. Why
this rule: it is the argmax of the group's expected criterion under the learned per-conv
distributions, it weighs a confident conv more than an undecided one (a majority vote of
argmaxes would not), and it reduces to the conv's own choice for a group with one producer.
A product of member masks during the search was rejected: it keeps the intersection of the
convs' sets, fewer channels than the group's count. Every conv's own choice is reported too.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..graph import ChannelGraph
from ..plan import make_plan, select

__all__ = ["MASK_POSITIONS", "SAMPLER_SCOPES", "CriteriaSampler", "MaskSite", "MaskSites",
           "combine_conv_choices", "linear_temperature"]

SAMPLER_SCOPES = ("group", "conv")
MASK_POSITIONS = ("after_bn", "before_bn")


def check_choice(value, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def linear_temperature(progress: float, tau_max: float = 5.0, tau_min: float = 0.1) -> float:
    """Gumbel temperature at ``progress`` in [0, 1] of the search: linear ``tau_max -> tau_min``."""
    progress = min(max(float(progress), 0.0), 1.0)
    return tau_max - (tau_max - tau_min) * progress


class CriteriaSampler(nn.Module):
    """LFPC's differentiable criteria sampler: logits ``alpha`` of shape (rows, criteria).

    :meth:`sample` draws a Gumbel-softmax sample at temperature ``tau`` (lfpc.md R1): soft by
    default, a straight-through one-hot with ``hard=True`` (forward one-hot, backward the soft
    sample's gradient). ``groups`` names the rows (groups, or convs with ``scope="conv"``).
    """

    def __init__(self, groups: Sequence[str], criteria: Sequence[str], *, init_std: float = 0.01,
                 hard: bool = False, seed: int = 0):
        super().__init__()
        if not groups:
            raise ValueError("the criteria sampler needs at least one group that loses channels")
        if len(criteria) < 2:
            raise ValueError(f"LFPC chooses among criteria: give at least two, got {list(criteria)}")
        self.groups, self.criteria, self.hard = list(groups), list(criteria), bool(hard)
        generator = torch.Generator().manual_seed(seed)
        self.alpha = nn.Parameter(torch.randn(len(groups), len(criteria), generator=generator)
                                  * init_std)
        self.tau = 5.0

    def probabilities(self) -> torch.Tensor:
        return self.alpha.detach().softmax(-1)

    def sample(self) -> torch.Tensor:
        return F.gumbel_softmax(self.alpha, tau=self.tau, hard=self.hard, dim=-1)

    def most_likely(self) -> torch.Tensor:
        """One-hot of ``argmax alpha`` per row (the choice after the search)."""
        return F.one_hot(self.alpha.detach().argmax(-1), len(self.criteria)).to(self.alpha.dtype)

    def choices(self) -> dict[str, str]:
        index = self.alpha.detach().argmax(-1).tolist()
        return {g: self.criteria[i] for g, i in zip(self.groups, index)}


@dataclasses.dataclass
class MaskSite:
    """One module whose output channels are multiplied by the sampled weights."""

    module: str
    dim: int
    roots: np.ndarray                      # channel root per output position
    producer: str | None = None            # the conv whose filters these channels are
    group_index: torch.Tensor | None = None  # sampler row per position (len(rows): unsampled)
    keep: torch.Tensor | None = None         # (positions, criteria) 0/1


def _sites(graph: ChannelGraph, position: str) -> list[MaskSite]:
    members = graph.tensor_members()
    producer_of = {m.node: m.module for m, _ in members
                   if m.role == "out" and m.tensor.endswith("weight")}
    normalised = {m.input_node for m, _ in members if m.role == "norm"}
    sites: dict[str, MaskSite] = {}
    for member, roots in members:
        if member.module in sites or member.blocks > 1:
            continue
        is_producer = member.role == "out" and member.tensor.endswith("weight")
        if position == "before_bn" and is_producer:
            sites[member.module] = MaskSite(member.module, 1, np.asarray(roots), member.module)
        elif position == "after_bn" and member.role == "norm":
            sites[member.module] = MaskSite(member.module, 1, np.asarray(roots),
                                            producer_of.get(member.input_node))
        elif position == "after_bn" and is_producer and member.node not in normalised:
            sites[member.module] = MaskSite(member.module, 1, np.asarray(roots), member.module)
    return list(sites.values())


class MaskSites:
    """The sites of the criteria forward, their sampler rows and keep-masks.

    ``keep``: channels kept per sampled group; ``scope`` / ``position``: see the module doc.
    ``rows`` names the sampler's rows; ``row_groups[row]`` the groups each row's masks cover.
    """

    def __init__(self, graph: ChannelGraph, keep: dict[str, int], *, scope: str = "group",
                 position: str = "after_bn"):
        self.graph, self.keep = graph, dict(keep)
        self.scope = check_choice(scope, SAMPLER_SCOPES, "sampler_scope")
        self.position = check_choice(position, MASK_POSITIONS, "mask_position")
        sites = _sites(graph, self.position)
        group_of_root = {int(r): g.name for g in graph.groups for r in g.channels}
        self.row_groups: dict[str, list[str]] = {}
        if self.scope == "group":
            for name in self.keep:
                self.row_groups[name] = [name]
        else:
            for group in graph.groups:
                if group.name not in self.keep:
                    continue
                for member, _ in group.producers():
                    if member.tensor.endswith("weight"):
                        self.row_groups.setdefault(member.module, [])
                        if group.name not in self.row_groups[member.module]:
                            self.row_groups[member.module].append(group.name)
        if self.scope == "conv":  # rows in the order the forward runs the convs
            order = {str(n.target): i for i, n in enumerate(graph.traced.graph.nodes)
                     if n.op == "call_module"} if graph.traced is not None else {}
            self.row_groups = dict(sorted(self.row_groups.items(),
                                          key=lambda item: order.get(item[0], len(order))))
        self.rows = list(self.row_groups)
        row = {name: i for i, name in enumerate(self.rows)}
        unsampled = len(self.rows)
        for site in sites:
            index = []
            for r in site.roots:
                group = group_of_root.get(int(r))
                if group not in self.keep:
                    index.append(unsampled)
                elif self.scope == "group":
                    index.append(row[group])
                else:  # a norm after a sum of several convs has no producer: unmasked
                    index.append(row.get(site.producer, unsampled))
            site.group_index = torch.as_tensor(index, dtype=torch.long)
        # sites with no sampled channel (e.g. the classifier) need no hook
        self.sites = [s for s in sites if bool((s.group_index < unsampled).any())]

    # ------------------------------------------------------------------ keep masks
    def conv_scores(self, criterion, conv: str, group_name: str, model: nn.Module) -> np.ndarray:
        """``criterion``'s scores of ``group_name``'s channels from ``conv``'s weights alone
        (the group restricted to that producer and the norms reading it)."""
        group = self.graph.by_name[group_name]
        nodes = {m.node for m, _ in group.members if m.module == conv and m.role == "out"}
        members = [(m, p) for m, p in group.members
                   if (m.module == conv and m.role == "out")
                   or (m.role == "norm" and m.input_node in nodes)]
        return np.asarray(criterion.score_group(dataclasses.replace(group, members=members),
                                                model))

    @torch.no_grad()
    def refresh(self, criteria: Sequence, model: nn.Module) -> None:
        """Every criterion's keep-mask at every group's count, from the current weights."""
        removed: list[dict[str | None, np.ndarray]] = []  # per criterion: producer -> roots
        for crit in criteria:
            if self.scope == "group":
                plan = make_plan(self.graph, crit.score(self.graph, model), {}, counts=self.keep)
                gone = np.fromiter(self.graph.removed_roots(plan), dtype=np.int64)
                removed.append({None: gone})
                continue
            per_conv = {}
            for conv, groups in self.row_groups.items():
                parts = []
                for name in groups:
                    group = self.graph.by_name[name]
                    kept = select(group, self.conv_scores(crit, conv, name, model),
                                  self.keep[name])
                    parts.append(np.delete(group.channels, kept))
                per_conv[conv] = np.concatenate(parts)
            removed.append(per_conv)
        for site in self.sites:
            key = None if self.scope == "group" else site.producer
            empty = np.zeros(0, dtype=np.int64)
            keep = np.stack([~np.isin(site.roots, gone.get(key, empty)) for gone in removed],
                            axis=1)
            site.keep = torch.as_tensor(keep, dtype=torch.float32)

    @staticmethod
    def channel_weights(sample: torch.Tensor, site: MaskSite) -> torch.Tensor:
        """Per position ``sum_k s_rk M_k`` (R2); unsampled positions (an extra row [1, 0, ...]
        over keep rows of ones) get 1."""
        extra = F.one_hot(torch.zeros(1, dtype=torch.long), sample.shape[1]).to(sample)
        rows = torch.cat([sample, extra])[site.group_index.to(sample.device)]
        return (rows * site.keep.to(sample)).sum(-1)


def combine_conv_choices(row_groups: dict[str, list[str]], probabilities: torch.Tensor,
                         criteria: Sequence[str]) -> dict[str, dict]:
    """Per group: the mean probability over its producing convs' rows, the argmax of it (the
    group's criterion; ties go to the first criterion) and each conv's own choice."""
    rows = list(row_groups)
    members: dict[str, list[int]] = {}
    for i, conv in enumerate(rows):
        for group in row_groups[conv]:
            members.setdefault(group, []).append(i)
    out = {}
    for group, index in members.items():
        mean = probabilities[index].mean(0)
        out[group] = {
            "probabilities": {c: float(v) for c, v in zip(criteria, mean)},
            "choice": criteria[int(mean.argmax())],
            "convs": {rows[i]: criteria[int(probabilities[i].argmax())] for i in index}}
    return out
