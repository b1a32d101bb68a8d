"""HBFP's training history: per-channel L1 norms, their record over training, trajectory
distances, greedy disjoint pairs and the differentiable pair regulariser.

S. H. Shabbeer Basha, M. Farazuddin, V. Pulabaigari, S. R. Dubey, S. Mukherjee, "Deep Model
Compression based on the Training History" (History Based Filter Pruning), arXiv:2102.00160;
code shabbeersh/History_Based_Filter_Pruning @f4514d3e (Keras; notes:
shared/research/related_methods_1.md section 6). The paper's equations were not readable
here; the definitions below are its abstract's description in our notation:

* N_i(t): the L1 norm of channel i of a channel group at record t, summed over every layer
  that produces the channel (a residual stream adds its producers, as criterion ``l1``'s
  ``combine="sum"``): N_i = sum_l sum |W^l_i| (:func:`channel_norms`). The code records every
  conv weight at every epoch end (:class:`NormHistory`; ``every``: epoch ends or every k
  optimiser steps).
* D_ij = sum_t |N_i(t) - N_j(t)| (:func:`trajectory_distances`; the code's ``v1``, which takes
  the absolute value; its ``v2`` drops it by a misplaced parenthesis).
* Pairs (:func:`greedy_pairs`): the smallest D first, each channel in at most one pair (ties:
  lower indices first). **Not the code's**: it sorts all n^2 entries of D, skips the n zeros of
  the diagonal and takes every second of the next 2k entries, which de-duplicates the symmetric
  entries only when no two distances tie and lets a channel sit in several pairs; and its
  candidate helper adds the larger-norm member and then the first member of every pair (both
  can be added), then deletes the smallest indices of that set (a Python set iterates in
  ascending order), not the most similar pairs. The paper prunes one filter of each pair.
* Regulariser (:class:`PairRegulariser`): lam * sum_pairs |N_i - N_j| on the current weights,
  so autograd pulls each pair's norms together, the paper's stated intent ("increase the
  similarity between the filters in a pair"). **Not the code's**: it computes
  exp(-0.001 sum_pairs |N_i - N_j|) once in NumPy and adds it to the loss as a constant (no
  gradient: its optimisation stage is plain training), and that sign would reward larger
  differences if it were differentiable.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..graph import ChannelGroup

__all__ = ["IterationPairs", "NormHistory", "PairRegulariser", "channel_norms", "greedy_pairs",
           "pair_penalty", "pruned_members", "trajectory_distances"]


def channel_norms(model: nn.Module, group: ChannelGroup, dtype=None) -> torch.Tensor:
    """N_i = sum over the group's producing weights of sum |W_i| (one value per channel),
    differentiable in the weights; channels no weight produces get 0 (criterion ``l1``).
    ``dtype``: of the sums (default the weights'; the recorder sums in float64)."""
    total = None
    for member, pos in group.producers():
        if not member.tensor.endswith("weight"):
            continue
        weight = model.get_parameter(member.tensor)
        weight = weight if dtype is None else weight.to(dtype)
        rows = weight.movedim(member.dim, 0).reshape(weight.shape[member.dim], -1).abs().sum(1)
        index = torch.as_tensor(np.asarray(pos), device=weight.device)
        mine = index >= 0
        if total is None:
            total = weight.new_zeros(group.size)
        total = total.index_add(0, index[mine], rows[mine].to(total.dtype))
    if total is None:
        raise ConfigError(f"HBFP: group '{group.name}' has no producing weight whose norm it "
                          "could record; ignore its modules (target ignore)")
    return total


class NormHistory:
    """A :func:`prunekit.train.fit` hook recording N(t) of every group in ``groups``.

    ``every="epoch"``: one record at every epoch end (the code's callback). An int k: a
    record after every k-th optimiser step and at every epoch end not already recorded, so
    a budget shorter than an epoch still has a history. ``records[name]`` is a
    ``(T, n)`` float64 array. The records are the hook's state (``state_dict``), so a resumed
    fit continues the same history.
    """

    def __init__(self, graph, groups: Iterable[str], every: str | int = "epoch") -> None:
        check_every(every)
        self.groups = [graph.by_name[name] for name in groups]
        self.every = every
        self._rows: dict[str, list[torch.Tensor]] = {g.name: [] for g in self.groups}
        self._model: nn.Module | None = None
        self._last_step: int | None = None
        self._step: int | None = None

    @property
    def records(self) -> dict[str, np.ndarray]:
        return {name: (torch.stack(rows).numpy() if rows else
                       np.zeros((0, self._size(name))))
                for name, rows in self._rows.items()}

    def __len__(self) -> int:
        return len(next(iter(self._rows.values()), []))

    def _size(self, name: str) -> int:
        return next(g.size for g in self.groups if g.name == name)

    @torch.no_grad()
    def record(self, model: nn.Module) -> None:
        for group in self.groups:
            norms = channel_norms(model, group, torch.float64).detach().cpu()
            self._rows[group.name].append(norms)

    # ---------------------------------------------------------------- fit hooks
    def on_train_start(self, model: nn.Module, optimizer) -> None:
        self._model = model

    def after_step(self, step: int) -> None:
        self._step = step
        if self.every != "epoch" and (step + 1) % int(self.every) == 0:
            self.record(self._model)
            self._last_step = step

    def on_epoch_end(self, epoch: int) -> None:
        if self.every == "epoch" or self._last_step != self._step:
            self.record(self._model)
            self._last_step = self._step

    def state_dict(self) -> dict:
        return {"records": {name: (torch.stack(rows) if rows else torch.zeros(0))
                            for name, rows in self._rows.items()},
                "last_step": -1 if self._last_step is None else int(self._last_step)}

    def load_state_dict(self, state: dict) -> None:
        records = state["records"]
        if set(records) != set(self._rows):
            raise ConfigError(f"HBFP: the checkpoint's norm history covers groups "
                              f"{sorted(records)}, this run's {sorted(self._rows)}")
        self._rows = {name: [row.clone() for row in records[name]] if records[name].numel()
                      else [] for name in self._rows}
        self._last_step = None if state["last_step"] < 0 else int(state["last_step"])
        self._step = self._last_step


def check_every(every) -> None:
    if every == "epoch":
        return
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"HBFP record_every must be 'epoch' or a whole number of steps >= 1, "
                          f"got {every!r}")


def trajectory_distances(history: np.ndarray) -> np.ndarray:
    """D_ij = sum_t |N_i(t) - N_j(t)| for a ``(T, n)`` history (``(n, n)``, zero diagonal)."""
    history = np.asarray(history, dtype=np.float64)
    if history.ndim != 2 or history.shape[0] == 0:
        raise ConfigError(f"HBFP needs a (records, channels) norm history with at least one "
                          f"record, got shape {history.shape}")
    n = history.shape[1]
    total = np.zeros((n, n))
    for start in range(0, history.shape[0], 256):  # chunks: T x n x n would not fit
        part = history[start:start + 256]
        total += np.abs(part[:, :, None] - part[:, None, :]).sum(0)
    return total


def greedy_pairs(distances: np.ndarray, eligible: np.ndarray | None = None,
                 limit: int | None = None) -> list[tuple[int, int]]:
    """Disjoint pairs (i < j) by ascending D_ij (ties: smaller i, then smaller j), each
    channel in at most one pair; ``eligible`` (bool per channel) limits the candidates,
    ``limit`` stops after that many pairs. The first k pairs are the k most similar
    disjoint pairs the greedy order finds."""
    d = np.asarray(distances, dtype=np.float64)
    n = d.shape[0]
    ok = np.ones(n, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    rows, cols = np.triu_indices(n, 1)
    keep = ok[rows] & ok[cols]
    rows, cols = rows[keep], cols[keep]
    order = np.lexsort((cols, rows, d[rows, cols]))
    used = np.zeros(n, dtype=bool)
    pairs: list[tuple[int, int]] = []
    for k in order:
        if limit is not None and len(pairs) >= limit:
            break
        i, j = int(rows[k]), int(cols[k])
        if not used[i] and not used[j]:
            used[i] = used[j] = True
            pairs.append((i, j))
    return pairs


def pruned_members(pairs, importance: np.ndarray) -> list[int]:
    """The member of each pair with the smaller ``importance`` (on a tie the higher index)."""
    return [int(i) if importance[i] < importance[j] else int(j) for i, j in pairs]


def pair_penalty(model: nn.Module, graph, pairs: dict[str, list[tuple[int, int]]]
                 ) -> torch.Tensor | None:
    """sum over groups and pairs of |N_i - N_j| on the current weights (differentiable)."""
    total = None
    for name, group_pairs in pairs.items():
        if not group_pairs:
            continue
        norms = channel_norms(model, graph.by_name[name])
        index = torch.as_tensor(group_pairs, device=norms.device)
        term = (norms[index[:, 0]] - norms[index[:, 1]]).abs().sum()
        total = term if total is None else total + term
    return total


class PairRegulariser:
    """A fit hook adding ``weight * sum_pairs |N_i - N_j|`` (:func:`pair_penalty`) to every
    training step's loss. ``pairs``: ``{group name: [(i, j), ...]}`` of ``graph``. Stateless
    (the pairs are fixed when it is built)."""

    def __init__(self, graph, pairs: dict[str, list[tuple[int, int]]], weight: float) -> None:
        self.graph, self.weight = graph, float(weight)
        self.pairs = {k: [(int(i), int(j)) for i, j in v] for k, v in pairs.items() if v}
        self.values: list[float] = []

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if not model.training or not self.pairs or self.weight == 0:
            return None
        value = self.weight * pair_penalty(model, self.graph, self.pairs)
        self.values.append(float(value.detach()))
        return value


class IterationPairs:
    """One HBFP iteration's pairing of ``graph``'s groups ``names`` from their histories.

    :meth:`plan` turns a number of pairs per group into a plan: groups in trace order, each
    pairing its eligible channels (not fixed, and not locked by a zero-padding shortcut whose
    carried channel the plan so far keeps: ``graph.requirements``, as
    :func:`prunekit.plan.make_plan` does) with :func:`greedy_pairs` and removing the member
    of each of its first k pairs with the smaller ``importance``.
    """

    def __init__(self, graph, records: dict[str, np.ndarray], importance: dict[str, np.ndarray]):
        self.graph = graph
        self.distances = {name: trajectory_distances(h) for name, h in records.items()}
        self.importance = {k: np.asarray(v, dtype=np.float64) for k, v in importance.items()}
        self._cache: dict[tuple[str, bytes], list[tuple[int, int]]] = {}

    def eligible(self, name: str, removed: dict[str, set[int]]) -> np.ndarray:
        group = self.graph.by_name[name]
        ok = ~np.asarray(group.fixed, dtype=bool)
        for (ga, ca), (gb, cb) in getattr(self.graph, "requirements", ()):
            if ga == group.index and cb not in removed.get(self.graph.groups[gb].name, ()):
                ok[ca] = False
        return ok

    def pairs(self, name: str, eligible: np.ndarray) -> list[tuple[int, int]]:
        key = (name, eligible.tobytes())
        if key not in self._cache:
            self._cache[key] = greedy_pairs(self.distances[name], eligible)
        return self._cache[key]

    def capacity(self, name: str) -> int:
        """The most pairs the group can give (before shortcut locks)."""
        return int((~np.asarray(self.graph.by_name[name].fixed, dtype=bool)).sum()) // 2

    def plan(self, wanted: dict[str, int]):
        """``(plan {group: kept indices}, pairs {group: [(i, j)]}, removed {group: [i]})``
        for ``wanted`` pairs per group (groups able to give fewer give all they can)."""
        removed: dict[str, set[int]] = {}
        pairs_used: dict[str, list[tuple[int, int]]] = {}
        for group in self.graph.groups:  # trace order: a carried channel's group comes first
            k = int(wanted.get(group.name, 0))
            if k <= 0 or group.name not in self.distances:
                continue
            chosen = self.pairs(group.name, self.eligible(group.name, removed))[:k]
            if chosen:
                pairs_used[group.name] = chosen
                removed[group.name] = set(pruned_members(chosen,
                                                         self.importance[group.name]))
        plan = {name: [i for i in range(self.graph.by_name[name].size) if i not in gone]
                for name, gone in removed.items()}
        return plan, pairs_used, {k: sorted(v) for k, v in removed.items()}
