"""Central Filter (CF): one central filter kept per cluster of similar feature maps, and the
removed filters' next-layer weights merged into it (Duan et al., "Network Compression via
Central Filter", arXiv:2112.05493; code 8ubpshLR23/Central-Filter, ``rank.py`` and
``main_win.py``), as the code computes it:

1. similarity D_ij = (1/K) sum_k pearson(A_i(x_k), A_j(x_k)) of the flattened post-BN-ReLU
   maps over the K calibration images (``rank.py: get_distance_matrix``), with its special
   cases: both maps constant (which includes both all-zero) +1, exactly one all-zero -1
   (the code tests ``sum() == 0``: the same on post-ReLU maps); D_ii = 1;
2. the threshold t bisected (eps 1e-7, from min(D) - eps to max(D) + eps, ``get_threshold``)
   so that the graph with edges D_ij > t has (#nodes with an edge) - (#components among them)
   = X deletable nodes, X = n - keep (the code: ceil(n * ratio));
3. closeness cc_i = deg_i / sum_{j in N(i)} (1024 - D_ij) (``get_closeness_2``);
4. greedy central selection (``del_filter``): visit nodes with cc > 0 by decreasing cc; an
   unassigned node whose component has no representative is saved; every visited node then
   deletes its unassigned neighbours, recorded as its delegates, until X are deleted; isolated
   nodes are kept;
5. compensation (``adjust_filter``) in every consumer: W[:, c] += sum_{d in D(c)} W[:, d],
   in place in channel order as the code loops (a deleted node's own delegates therefore reach
   its centre only when they come earlier in that order). Exact only when A_d = A_c.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ..graph import ChannelGraph, ChannelGroup
from ..plan.streams import is_stream
from ..rewrite import Rewrite, surviving
from ..surgery import tensor_by_name
from .activation import _pooled_sources
from .base import (Criterion, ScoreError, check_choice, nonfinite_cause, register_criterion,
                   require_calibration)
from .calibration import check_max_batches, run_calibration
from .weight import L1Norm

__all__ = ["COMPENSATE_MODES", "CentralFilter", "CentralScores", "central_filters",
           "central_selection", "closeness", "deletable_count", "map_similarity",
           "merge_delegates", "similarity_threshold"]

#: ``compensate``: gated on held-out top-1 (the code's rule), always, or never.
COMPENSATE_MODES = ("heldout", "always", "never")
STREAM_MODES = ("spare",)
#: ``ties``: the order in which nodes of equal closeness are visited.
TIE_ORDERS = ("code", "stable")
RANKING_RATIOS = tuple(np.round(np.arange(0.1, 0.95, 0.1), 1))


def map_similarity(maps: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """[B, C, C] Pearson correlation of every pair of channels' flattened maps, per image, in
    float64 (the code's ``np.corrcoef`` on the float32 maps), with the code's special cases.
    A pair with one constant non-zero map and one varying map gets 0; the code's corrcoef gives
    NaN there, which leaves that layer unpruned (its bisection compares against NaN)."""
    out = []
    for part in maps.detach().flatten(2).split(chunk):
        x = part.double()
        const = x.amax(2) == x.amin(2)
        zero = (x == 0).all(2)
        xc = x - x.mean(2, keepdim=True)
        cov = xc @ xc.transpose(1, 2)
        std = cov.diagonal(dim1=1, dim2=2).sqrt()
        denom = std[:, :, None] * std[:, None, :]
        r = torch.where(denom > 0, cov / denom.clamp_min(1e-300), 0.0).clamp(-1.0, 1.0)
        r = torch.where(zero[:, :, None] ^ zero[:, None, :], -1.0, r)
        r = torch.where(const[:, :, None] & const[:, None, :], 1.0, r)
        r = (r + r.transpose(1, 2)) / 2  # exactly symmetric (the products differ in the ulp)
        r.diagonal(dim1=1, dim2=2).fill_(1.0)
        out.append(r)
    return torch.cat(out)


def _components(adjacency: np.ndarray) -> np.ndarray:
    """Component label (its smallest node) of every node of a symmetric boolean adjacency."""
    n = len(adjacency)
    labels = np.arange(n)
    while True:
        neighbour = np.where(adjacency, labels[None, :], n).min(axis=1)
        new = np.minimum(labels, neighbour)
        new = new[new]
        if np.array_equal(new, labels):
            return labels
        labels = new


def deletable_count(D: np.ndarray, threshold: float) -> tuple[int, np.ndarray, np.ndarray]:
    """(#nodes with an edge - #their components, adjacency D_ij > t off the diagonal, labels):
    the code's ``get_dels``."""
    adjacency = D > threshold
    np.fill_diagonal(adjacency, False)
    adjacency |= adjacency.T
    labels = _components(adjacency)
    return len(D) - len(np.unique(labels)), adjacency, labels


def similarity_threshold(D: np.ndarray, deletable: int):
    """The code's ``get_threshold`` step for step: ``(t, count, adjacency, labels)``; count is
    ``deletable`` when some bisection point reaches it, else the lower bound's (larger) count,
    which the greedy selection then stops at ``deletable``."""
    eps = 1e-7
    low, high = float(D.min()) - eps, float(D.max()) + eps
    best = high
    while low < high:
        mid = (low + high) / 2
        count, adjacency, labels = deletable_count(D, mid)
        if count < deletable:
            high = mid - eps
        elif count > deletable:
            best, low = low, mid + eps
        else:
            return mid, count, adjacency, labels
    return (best, *deletable_count(D, best))


def closeness(D: np.ndarray, adjacency: np.ndarray) -> np.ndarray:
    """cc_i = deg_i / sum_{j in N(i)} (1024 - D_ij); 0 for isolated nodes. Summed left to
    right as the code's loop (a cumulative sum), so that its exact ties stay ties."""
    degree = adjacency.sum(axis=1)
    total = np.cumsum(np.where(adjacency, 1024.0 - D, 0.0), axis=1)[:, -1]
    return np.where(total > 0, degree / np.where(total > 0, total, 1.0), 0.0)


def central_selection(adjacency: np.ndarray, cc: np.ndarray, labels: np.ndarray,
                      deletable: int, ties: str = "code") -> tuple[list[int], list[list[int]]]:
    """The code's ``del_filter``: (kept indices, delegates per node). Exact ties in cc are
    common (the two nodes of an isolated pair always tie): ``ties="code"`` visits them as the
    code's ``np.argsort(closeness)`` read backwards does (numpy's default sort, whose order of
    ties may differ between numpy builds), ``"stable"`` highest index first on every machine."""
    n = len(cc)
    saved, deleted, roots = set(), set(), set()
    delegates: list[list[int]] = [[] for _ in range(n)]
    order = np.argsort(cc, kind="stable") if ties == "stable" else np.argsort(cc)
    for node in order[::-1]:
        node = int(node)
        if cc[node] <= 0:
            continue
        if node not in deleted and node not in saved and labels[node] not in roots:
            saved.add(node)
            roots.add(labels[node])
        for other in np.flatnonzero(adjacency[node]):
            other = int(other)
            if other in deleted or other in saved:
                continue
            if len(deleted) >= deletable:
                return sorted(set(range(n)) - deleted), delegates
            deleted.add(other)
            delegates[node].append(other)
    return sorted(set(range(n)) - deleted), delegates


def central_filters(D: np.ndarray, keep: int, ties: str = "code"
                    ) -> tuple[list[int], list[list[int]]]:
    """(kept indices, delegates per node) of steps 2-4 for ``keep`` of ``len(D)`` channels."""
    deletable = len(D) - keep
    if deletable <= 0:
        return list(range(len(D))), [[] for _ in range(len(D))]
    _, _, adjacency, labels = similarity_threshold(D, deletable)
    return central_selection(adjacency, closeness(D, adjacency), labels, deletable, ties)


def merge_delegates(weight: torch.Tensor, dim: int, pos: np.ndarray,
                    delegates: list[list[int]]) -> torch.Tensor:
    """A copy of a consumer's ``weight`` with W[c] += sum_{d in delegates[c]} W[d] along
    ``dim`` (``pos``: group channel per position, -1 elsewhere), in place in channel order."""
    merged = weight.detach().clone()
    cols = merged.movedim(dim, 0)
    where = [np.flatnonzero(pos == j) for j in range(len(delegates))]
    for centre, ds in enumerate(delegates):
        for d in ds:
            if len(where[d]) == len(where[centre]) and len(where[d]):
                cols[torch.as_tensor(where[centre])] += cols[torch.as_tensor(where[d])]
    return merged


class CentralScores(dict):
    """Ranking scores ``{group: scores}`` that also *choose* (:func:`prunekit.plan.chosen`):
    ``choose(group, keep)`` gives the central selection for that count; ``similarity`` holds
    each clustered group's D."""

    def __init__(self, scores, similarity: dict[str, np.ndarray], criterion: str,
                 ties: str = "code"):
        super().__init__(scores)
        self.similarity = similarity
        self.criterion = criterion
        self.ties = ties

    def choose(self, group: ChannelGroup, keep: int) -> list[int] | None:
        D = self.similarity.get(group.name)
        if D is None or len(D) != group.size:
            return None
        kept, _ = central_filters(D, keep, self.ties)
        if len(kept) != keep or not set(np.flatnonzero(group.fixed).tolist()) <= set(kept):
            return None  # the bisection could not reach the count, or fixed channels go
        return kept


@register_criterion
class CentralFilter(Criterion):
    """Central Filter (Duan et al., arXiv:2112.05493; the module doc gives the equations):
    the plan's count for a group keeps the central filters of clusters of similar
    post-BN-ReLU maps (``choose``), and :meth:`rewrites` merges each removed filter's
    next-layer weights into its centre.

    Options: ``compensate`` ``"heldout"`` (default; the code's rule, accept a group's merge
    only if top-1 does not drop, with its test loader replaced by held-out data: needs
    ``prune(..., heldout_data=)``, the pipeline passes ``val`` batches), ``"always"``,
    ``"never"``; ``streams="spare"`` (as the code: residual streams, rate 0 in run.sh, are not
    clustered; a target that prunes them gets them ranked by l1: spare them with conv_rates or
    ``stream_scale: 0``); ``ties`` (:func:`central_selection`; with ``"code"``, rank.py's
    functions and this module keep the same filters on 9 of the repository's committed
    similarity matrices at ratios 0.1..0.9, all 81 cases, numpy 2.4; ``"stable"`` is
    machine-independent); ``max_batches`` (None: every calibration batch; the code uses one
    batch of 128 augmented training images), ``device``, ``progress``.

    Groups not clustered (streams, grouped layers, groups without a 4-D map) are ranked by l1
    and never compensated. Ranking scores of clustered groups (used where the chooser declines
    and to rank within MACs searches): the fraction of the ratios 0.1, ..., 0.9 at which the
    central selection keeps the channel, plus (1 - max_j!=i D_ij) / 1000 to break ties
    (prunekit's choice). Gated merges are tried deepest group first (the code's back-to-front
    order). The code's iterative schedule (one block at a time from the last, mask, merge,
    1 epoch of training; 28 steps) is not built: prune once and fine-tune. Its matrices come
    from the unpruned model (rank.py's precomputed dis_mtx), so its selection is the one-shot
    selection; only merges and training interleave there.
    """

    name = "central_filter"
    needs_data = True

    def __init__(self, compensate: str = "heldout", *, streams: str = "spare",
                 ties: str = "code", max_batches: int | None = None, device=None,
                 progress: bool = True):
        self.compensate = check_choice(compensate, COMPENSATE_MODES, "compensate")
        self.streams = check_choice(streams, STREAM_MODES, "streams")
        self.ties = check_choice(ties, TIE_ORDERS, "ties")
        self.max_batches = check_max_batches(max_batches)
        self.device = device
        self.progress = bool(progress)
        self.needs_heldout = self.compensate == "heldout"
        self.last_scores: CentralScores | None = None

    def options(self) -> dict:
        opts = {"compensate": self.compensate, "streams": self.streams, "ties": self.ties}
        if self.max_batches is not None:
            opts["max_batches"] = self.max_batches
        return opts

    def clustered(self, group: ChannelGroup) -> bool:
        return not group.blocks and not is_stream(group) and bool(group.producers())

    def score(self, graph: ChannelGraph, model: nn.Module, calibration=None):
        require_calibration(self, calibration)
        fx_nodes = {n.name: n for n in graph.traced.graph.nodes}
        candidates = {g.name: _maps_of(g, fx_nodes, model)
                      for g in filter(self.clustered, graph.prunable_groups())}
        users: dict[str, list[tuple[str, np.ndarray, list[str]]]] = {}
        for name, maps in candidates.items():
            for k, (node, idx) in enumerate(maps):
                users.setdefault(node, []).append((name, idx, [n for n, _ in maps[:k]]))
        totals: dict[tuple[str, str], torch.Tensor] = {}
        images: dict[tuple[str, str], int] = {}

        batch = [0]

        def consume(node: str, x) -> None:
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                return
            if x.is_floating_point() and not torch.isfinite(x).all():
                groups = ", ".join(dict.fromkeys(name for name, _, _ in users[node]))
                raise ScoreError(f"{self.name}: feature map '{node}' (group(s) {groups}) on "
                                 f"calibration batch {batch[0]} (counting from 0) holds "
                                 f"{int((~torch.isfinite(x)).sum())} NaN/inf value(s): "
                                 f"{nonfinite_cause(model)}")
            for name, idx, earlier in users[node]:
                if x.shape[1] <= idx.max() or any((name, n) in totals for n in earlier):
                    continue  # not this map, or the map before the pooling is used
                sim = map_similarity(x[:, torch.as_tensor(idx, device=x.device)]).sum(0)
                key = (name, node)
                totals[key] = totals[key] + sim if key in totals else sim
                images[key] = images.get(key, 0) + x.shape[0]

        if users:
            run_calibration(graph, model, calibration, list(users), consume,
                            max_batches=self.max_batches, device=self.device,
                            progress=self.progress, desc=self.name,
                            on_batch=lambda index: batch.__setitem__(0, index))
        similarity, scores = {}, {}
        for group in graph.prunable_groups():
            key = next(((group.name, n) for n, _ in candidates.get(group.name, [])
                        if (group.name, n) in totals), None)
            if key is None:
                if group.name in candidates:
                    warnings.warn(f"{self.name}: group '{group.name}' has no 4-D feature map "
                                  "holding all its channels; ranked by l1, not clustered",
                                  stacklevel=2)
                scores[group.name] = L1Norm().score_group(group, model)
                continue
            D = (totals[key] / images[key]).cpu().numpy()
            np.fill_diagonal(D, 1.0)
            similarity[group.name] = D
            scores[group.name] = self.ranking(D, self.ties)
        self.last_scores = CentralScores(scores, similarity, self.name, self.ties)
        return self.last_scores

    @staticmethod
    def ranking(D: np.ndarray, ties: str = "code") -> np.ndarray:
        """Prunekit's ranking scores (class doc): how often the channel is kept."""
        n = len(D)
        kept = np.zeros(n)
        for ratio in RANKING_RATIOS:
            keep = max(1, n - int(np.ceil(n * ratio)))
            kept[central_filters(D, keep, ties)[0]] += 1
        if n == 1:
            return kept / len(RANKING_RATIOS)
        off = np.where(np.eye(n, dtype=bool), -np.inf, D)
        return kept / len(RANKING_RATIOS) + (1 - off.max(axis=1)) / 1000

    def rewrites(self, graph: ChannelGraph, model: nn.Module, plan: dict[str, list[int]]):
        """The merges for ``plan`` (shapes after surgery), one Rewrite per group (groups
        sharing a consumer tensor share one); gated when ``compensate="heldout"``. Uses the
        similarity of the last :meth:`score`; a group whose kept set is not the central
        selection for its count (the chooser declined) is not compensated."""
        if self.compensate == "never":
            return []
        if self.last_scores is None:
            warnings.warn(f"{self.name}: no similarity computed (an explicit plan?); "
                          "nothing compensated", stacklevel=2)
            return []
        merges: list[tuple[str, list[tuple[str, int, np.ndarray]], list[list[int]]]] = []
        for group in reversed(graph.prunable_groups()):
            D = self.last_scores.similarity.get(group.name)
            kept = plan.get(group.name)
            if D is None or kept is None or len(D) != group.size:
                continue
            chosen, delegates = central_filters(D, len(kept), self.ties)
            if chosen != sorted(kept):
                warnings.warn(f"{self.name}: group '{group.name}' keeps other channels than "
                              "its central selection; not compensated", stacklevel=2)
                continue
            members = [(m.tensor, m.dim, pos) for m, pos in group.members
                       if m.role == "in" and m.blocks == 1]
            if any(delegates) and members:
                merges.append((group.name, members, delegates))
        return _rewrites(graph, model, plan, merges, gated=self.compensate == "heldout")


def _maps_of(group: ChannelGroup, fx_nodes, model: nn.Module) -> list[tuple[str, np.ndarray]]:
    """(fx node, position of each group channel in it) of the first consumer's input map that
    holds every channel of ``group`` once (of a concatenation, the group's slice), the 4-D map
    before any pooling / flattening of it first (the code hooks the ReLU, as hrank/chip do)."""
    for member, pos in group.members:
        if member.role != "in" or not member.input_node or member.blocks != 1:
            continue
        where = [np.flatnonzero(pos == j) for j in range(group.size)]
        if all(len(w) == 1 for w in where):
            idx = np.array([w[0] for w in where])
            chain = _pooled_sources(fx_nodes, member.input_node, model)[::-1]
            return [(node, idx) for node in chain + [member.input_node]]
    return []


def _rewrites(graph, model, plan, merges, gated: bool) -> list[Rewrite]:
    """One Rewrite per set of groups linked by a shared consumer tensor."""
    clusters: list[tuple[list[str], set[str], list]] = []
    for name, members, delegates in merges:
        tensors = {t for t, _, _ in members}
        linked = [c for c in clusters if c[1] & tensors]
        for c in linked:
            clusters.remove(c)
        names = [n for c in linked for n in c[0]] + [name]
        items = [i for c in linked for i in c[2]] + [(members, delegates)]
        clusters.append((names, tensors.union(*(c[1] for c in linked)), items))
    out = []
    for names, tensors, items in clusters:
        work = {t: tensor_by_name(model, t).detach().clone() for t in sorted(tensors)}
        for members, delegates in items:
            for tensor, dim, pos in members:
                work[tensor] = merge_delegates(work[tensor], dim, pos, delegates)
        values = {}
        for tensor, value in work.items():
            for dim in range(value.dim()):
                keep = surviving(graph, plan, tensor, dim, value.shape[dim])
                value = value.index_select(dim, torch.as_tensor(keep, device=value.device))
            values[tensor] = value
        merged = sum(len(ds) for _, delegates in items for ds in delegates)
        out.append(Rewrite(group="+".join(names), values=values, gated=gated,
                           what="merge delegates into central filters",
                           log={"merged_channels": int(merged)}))
    return out
