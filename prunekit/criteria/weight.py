"""Criteria computed from weights alone: l1, l2 (SFP), fpgm, bn_scale, random.

Groups produced by several layers (a residual stream: the stem and every block's last conv)
score each producing layer (or BN) separately and combine the per-layer scores per channel with
``combine`` (see :func:`prunekit.criteria.base.combine_scores`). A channel that no producing
weight writes (e.g. a zero-padding slot of an option-A shortcut) has nothing to measure: the
weight criteria give it 0, so it goes first, which is right for a channel that is always zero.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ..graph import ChannelGroup
from .base import Criterion, check_choice, combine_scores, register_criterion

WEIGHT_COMBINE = ("sum", "mean", "max")


def producer_slices(group: ChannelGroup, model: nn.Module):
    """(channel index per row, rows) of each producing weight, rows flattened per channel."""
    for member, pos in group.producers():
        if not member.tensor.endswith("weight"):
            continue
        weight = model.get_parameter(member.tensor).detach()
        rows = weight.movedim(member.dim, 0).reshape(weight.shape[member.dim], -1)
        yield pos, rows


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


@register_criterion
class L1Norm(Criterion):
    """L1 norm of each filter, s_j = sum |W_j| (Li et al., "Pruning Filters for Efficient
    ConvNets", ICLR 2017, section 3.1).

    A group that several layers produce (a residual stream) adds their norms (``combine="sum"``,
    the default), averages them (``"mean"``) or takes the largest (``"max"``).
    """

    name = "l1"
    p = 1

    def __init__(self, combine: str = "sum"):
        self.combine = check_choice(combine, WEIGHT_COMBINE, "combine")

    def options(self) -> dict:
        return {"combine": self.combine}

    def score_group(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        parts = [(pos, _numpy(torch.linalg.vector_norm(rows.double(), ord=self.p, dim=1)))
                 for pos, rows in producer_slices(group, model)]
        scores = combine_scores(group.size, parts, self.combine, uncovered=0.0)
        return np.zeros(group.size) if scores is None else scores


@register_criterion
class L2Norm(L1Norm):
    """L2 norm of each filter, s_j = ||W_j||_2, the criterion of Soft Filter Pruning (He et al.,
    "Soft Filter Pruning for Accelerating Deep CNNs", IJCAI 2018, section 3.2, Eq. 2; the code's
    ``get_filter_codebook``: ``torch.norm(weight_vec, 2, 1)``).

    Multi-producer groups combine the per-layer norms like ``l1`` (default ``combine="sum"``, so
    that ``l1`` and ``l2`` differ only in the norm; ``"mean"`` and ``"max"`` are available).
    """

    name = "l2"
    p = 2


def distance_sums(rows: torch.Tensor, include: np.ndarray | None = None) -> np.ndarray:
    """g(F_j) = sum_j' ||F_j - F_j'||_2 over the rows ``include`` selects (others get 0)."""
    n = rows.shape[0]
    include = np.ones(n, dtype=bool) if include is None else include
    out = np.zeros(n)
    if include.sum() > 1:
        sel = rows[torch.as_tensor(include, device=rows.device)].double()
        dist = torch.cdist(sel[None], sel[None])[0]  # float64: the mm form is exact enough
        out[include] = _numpy(dist.sum(dim=1))
    return out


@register_criterion
class FPGM(Criterion):
    """Filter Pruning via Geometric Median (He et al., CVPR 2019, Eq. 1-9).

    The geometric median of a layer's filters is approximated by the filter minimising
    g(F_j) = sum_j' ||F_j - F_j'||_2 (Euclidean distance of the raw flattened filters, over all
    filters of the producing layer, Eq. 7-9); the filters with the *smallest* g are the most
    replaceable and are pruned, so the score is g itself. (The reference code always uses the
    Euclidean distance whatever ``--dist_type`` says; so does this class.)

    ``combine`` (default ``"mean"``; ``"sum"``, ``"max"``): a residual stream has several
    producing layers; g is computed *within each producing layer separately* (a conv2's filters
    are compared with that conv2's other filters, rows of other groups included), then the
    per-layer g of a channel are combined. The mean keeps a channel's score on the scale of
    one layer whatever the number of layers that carry it.

    ``mix_norm_ratio`` (default 0: "FPGM-only"): the paper's "FPGM-mix" variant. A fraction
    ``mix_norm_ratio`` of the channels to prune is first taken by smallest L2 norm (combined
    like g), then the rest by smallest g computed among the remaining filters only (the code's
    ``get_filter_similar``: norm pre-filter, then ``cdist`` among the large filters). FPGM-mix
    40% = 30% by distance + 10% by norm is ``mix_norm_ratio=0.25``. Which channels the mix
    removes depends on how many are removed, so the criterion needs the same target as the
    plan: ``ratio`` and/or ``ratios`` (as in :func:`prunekit.prune`), or ``counts`` (channels
    kept per group), with ``round_to``. It then returns scores that rank the norm-pruned
    channels lowest (by norm), then the others by g: the plan for that target removes exactly
    the FPGM-mix set. For another target, or with block (grouped-conv) constraints, the set is
    only approximately the paper's.
    """

    name = "fpgm"

    def __init__(self, combine: str = "mean", mix_norm_ratio: float = 0.0, *,
                 ratio: float | None = None, ratios: dict[str, float] | None = None,
                 counts: dict[str, int] | None = None, round_to: int = 1):
        self.combine = check_choice(combine, WEIGHT_COMBINE, "combine")
        if isinstance(mix_norm_ratio, bool) or not isinstance(mix_norm_ratio, (int, float)) \
                or not 0 <= mix_norm_ratio <= 1:
            raise ValueError(f"mix_norm_ratio must be a number in [0, 1] (the fraction of the "
                             f"pruned channels chosen by L2 norm); got {mix_norm_ratio!r}")
        self.mix_norm_ratio = float(mix_norm_ratio)
        if self.mix_norm_ratio > 0 and ratio is None and ratios is None and counts is None:
            raise ValueError("FPGM-mix (mix_norm_ratio > 0) needs the pruning target to pick its "
                             "channels: pass ratio=..., ratios=... or counts=..., the same as "
                             "given to prune()")
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be a positive int, got {round_to!r}")
        self.ratio, self.ratios, self.counts, self.round_to = ratio, ratios, counts, round_to

    def options(self) -> dict:
        opts = {"combine": self.combine, "mix_norm_ratio": self.mix_norm_ratio}
        if self.mix_norm_ratio > 0:
            opts.update({k: v for k, v in (("ratio", self.ratio), ("ratios", self.ratios),
                                           ("counts", self.counts)) if v is not None})
            if self.round_to != 1:
                opts["round_to"] = self.round_to
        return opts

    def _removed_counts(self, graph) -> dict[str, int]:
        from ..plan import ratio_counts
        removed = {}
        if self.ratio is not None or self.ratios is not None:
            for name, keep in ratio_counts(graph, self.ratio, self.ratios, self.round_to).items():
                removed[name] = graph.by_name[name].size - keep
        for name, keep in (self.counts or {}).items():
            if name not in graph.by_name:
                raise ValueError(f"counts names unknown group '{name}'")
            removed[name] = graph.by_name[name].size - int(keep)
        return removed

    def score(self, graph, model, calibration=None):
        removed = self._removed_counts(graph) if self.mix_norm_ratio > 0 else {}
        return {g.name: self.score_group(g, model, removed.get(g.name, 0))
                for g in graph.prunable_groups()}

    def score_group(self, group: ChannelGroup, model: nn.Module, n_removed: int = 0) -> np.ndarray:
        slices = list(producer_slices(group, model))
        by_norm = np.zeros(0, dtype=np.int64)
        if self.mix_norm_ratio > 0 and n_removed > 0:
            norms = combine_scores(group.size, [(pos, _numpy(rows.double().norm(dim=1)))
                                                for pos, rows in slices],
                                   self.combine, uncovered=0.0)
            norms = np.zeros(group.size) if norms is None else norms
            candidates = np.flatnonzero(~group.fixed)
            candidates = candidates[np.argsort(norms[candidates], kind="stable")]
            by_norm = candidates[:int(self.mix_norm_ratio * n_removed + 1e-9)]
        parts = [(pos, distance_sums(rows, ~np.isin(pos, by_norm))) for pos, rows in slices]
        scores = combine_scores(group.size, parts, self.combine, uncovered=0.0)
        scores = np.zeros(group.size) if scores is None else scores
        if by_norm.size:
            rest = np.setdiff1d(np.arange(group.size), by_norm)
            floor = scores[rest].min() if rest.size else 0.0
            # below every other channel, smallest norm lowest
            scores[by_norm] = floor - 1.0 - np.arange(by_norm.size)[::-1]
        return scores


@register_criterion
class BNScale(Criterion):
    """|gamma| of the batch normalisation that normalises each channel: Network Slimming (Liu
    et al., "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017,
    section 3.2; channels with small scaling factors are pruned). Train with the L1 penalty on
    gamma (the paper's ``s * sign(gamma)`` gradient) for the criterion to be meaningful.

    Uses the group's normalisation members whose tensor ends with ``.weight`` (BatchNorm, also
    GroupNorm/LayerNorm affine scales). A residual stream is normalised by several BNs (the
    stem's and every block's last one); their |gamma| are combined per channel with
    ``combine`` (default ``"mean"``: the paper ranks |gamma| across layers on one scale, and the
    mean keeps that scale; ``"sum"``, ``"max"``). A group without any affine normalisation falls
    back to ``l1`` with a warning; channels no BN covers in an otherwise normalised group get
    the group's highest score (kept), with a warning.
    """

    name = "bn_scale"

    def __init__(self, combine: str = "mean"):
        self.combine = check_choice(combine, WEIGHT_COMBINE, "combine")

    def options(self) -> dict:
        return {"combine": self.combine}

    def score_group(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        parts = []
        for member, pos in group.members:
            if member.role == "norm" and member.tensor.endswith(".weight"):
                gamma = model.get_parameter(member.tensor).detach()
                gamma = gamma.movedim(member.dim, 0).reshape(gamma.shape[member.dim], -1)
                parts.append((pos, _numpy(gamma.double().abs().mean(dim=1))))
        scores = combine_scores(group.size, parts, self.combine, uncovered="max",
                                where=f"bn_scale, group '{group.name}'")
        if scores is None:
            warnings.warn(f"bn_scale: group '{group.name}' has no affine normalisation; "
                          "scoring it by l1", stacklevel=2)
            return L1Norm().score_group(group, model)
        return scores


@register_criterion
class RandomCriterion(Criterion):
    """Uniformly random scores from a seeded generator (a baseline every paper should beat)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def options(self) -> dict:
        return {"seed": self.seed}

    def score(self, graph, model, calibration=None):
        rng = np.random.default_rng(self.seed)
        return {g.name: rng.random(g.size) for g in graph.prunable_groups()}
