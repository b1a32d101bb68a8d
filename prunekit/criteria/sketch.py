"""FilterSketch: a pruned layer's kept filters become a Frequent-Directions sketch of all its
filters (Lin et al., "Filter Sketch for Network Pruning", IEEE TNNLS 33(12):7091-7100, 2022,
arXiv:2001.08514; code lmbxmu/FilterSketch, ``sketch_cifar.py``: ``sketch_matrix``,
``weight_norm``, ``load_resnet_sketch_model``).

Frequent Directions (Liberty, "Simple and Deterministic Matrix Sketching", KDD 2013) streams the
rows of A (n x d) into B (l x d): fill B row by row; when it is full, B = U Sigma V^T,
delta = sigma^2 at (0-based) index floor(l/2), B <- sqrt(max(Sigma^2 - delta, 0)) V^T (the rows
from floor(l/2) on become zero) and insertion continues. Each shrink removes at least
(floor(l/2) + 1) * delta of ||B||_F^2, so ||A^T A - B^T B||_2 <= sum of deltas
<= 2 ||A||_F^2 / l: the sketch keeps A's "second-order information" A^T A.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..graph import ChannelGraph, ChannelGroup
from ..rewrite import Rewrite, surviving
from ..surgery import tensor_by_name
from .base import Criterion, check_choice, register_criterion
from .weight import L2Norm

__all__ = ["CONSUMER_MODES", "FilterSketch", "STREAM_MODES", "code_consumer_sketch",
           "frequent_directions"]

#: How the layers reading a sketched group (its consumers) get their new input columns.
CONSUMER_MODES = ("project", "slice", "code")
#: What happens to a pruned group the sketch cannot handle (a residual stream, ...).
STREAM_MODES = ("warn", "refuse")
BN_RESET = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def frequent_directions(rows: torch.Tensor, l: int, *,
                        early_stop: bool = True) -> tuple[torch.Tensor, int]:
    """``(B, used)``: the l x d Frequent-Directions sketch of ``rows`` (n x d), computed in
    float64 as the reference's ``sketch_matrix`` loop does, and how many rows entered it.

    ``early_stop`` (the reference's quirk): once B is full, the loop ends when fewer than
    ``l // 2`` rows remain, so those last rows never enter the sketch. Where d < l (the
    reference never sketches such a layer) only the d nonzero singular directions are kept.
    """
    A = rows.detach().double()
    n, d = A.shape
    B = A.new_zeros(l, d)
    half = l // 2
    filled = used = 0
    for i in range(n):
        if filled >= l:
            if early_stop and n - i < half:
                break
            _, sigma, vh = torch.linalg.svd(B, full_matrices=False)
            delta = sigma[half] ** 2 if half < sigma.numel() else sigma.new_zeros(())
            shrunk = torch.sqrt(torch.clamp(sigma ** 2 - delta, min=0.0))
            B = A.new_zeros(l, d)
            B[:sigma.numel()] = shrunk[:, None] * vh
            filled = half
        B[filled] = A[i]
        filled += 1
        used = i + 1
    return B, used


def code_consumer_sketch(weight: torch.Tensor, l: int, *, early_stop: bool = True,
                         unit_frobenius: bool = True) -> torch.Tensor:
    """The reference's consumer rewrite, literally: ``sketch_matrix(W2, l, dim=1)`` sketches
    ``W2.view(W2.size(1), -1)`` (a reshape, not a transpose: with in = out its rows are W2's
    output filters, not its input-channel slices) into l rows, reshapes the l x (out*k*k)
    result to (out, l, k, k) and divides it by its Frobenius norm."""
    out, inputs = weight.shape[:2]
    rows = weight.detach().double().reshape(inputs, -1)
    B, _ = frequent_directions(rows, l, early_stop=early_stop)
    new = B.reshape(out, l, *weight.shape[2:])
    return _unit(new) if unit_frobenius else new


def _unit(t: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(t)
    return t / norm if norm > 0 else t


def _as_bool(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    return value


class _Workspace:
    """Full-size float64 copies of the tensors being rewritten: rows and columns of kept
    channels are overwritten group by group (in graph order, so a layer's input columns are
    projected before its own filters are sketched), then every copy is sliced to the pruned
    shape at the end."""

    def __init__(self, graph: ChannelGraph, model: nn.Module, plan: dict):
        self.graph, self.model, self.plan = graph, model, plan
        self.full: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.full:
            self.full[name] = tensor_by_name(self.model, name).detach().double().clone()
        return self.full[name]

    def kept(self, name: str, dim: int) -> torch.Tensor:
        return torch.as_tensor(surviving(self.graph, self.plan, name, dim,
                                         self.get(name).shape[dim]), dtype=torch.long)

    def pruned(self, name: str) -> torch.Tensor:
        value = self.full[name]
        for dim in range(value.dim()):
            value = value.index_select(dim, self.kept(name, dim))
        return value


@register_criterion
class FilterSketch(Criterion):
    """FilterSketch (Lin et al., TNNLS 2022; shared/research/related_methods_1.md section 9):
    each pruned layer's l kept filters are replaced by the Frequent-Directions sketch (see the
    module doc) of all its n filters, A = W.view(n, c*k*k) over the input columns the plan
    keeps. Not a selection criterion: the count comes from the target (the reference keeps
    int(rate * planes) of every block's first conv, the streams untouched: ``conv_rates``
    ``"[0.0]+[0.4,0.0]*27"`` on ResNet-56, or ``ratio`` with ``stream_scale: 0``). The scores
    are the filters' L2 norms; they only decide which indices surgery drops, which matters only
    for ``consumer="slice"`` and ``bn_reset=False`` (the sketch rows replace the filters).

    Options (defaults as the reference unless said):

    * ``early_stop`` (True, the code's quirk): the FD loop stops once fewer than l/2 rows
      remain, so up to l/2 - 1 last filters never enter the sketch; False sketches every row.
    * ``unit_frobenius`` (True, the README's ``--weight_norm_method l2``; ``options.py``
      defaults to none): the sketched tensor is divided by its whole-tensor Frobenius norm.
    * ``bn_reset`` (True): the BN after the producer restarts as a fresh BN (weight 1, bias 0,
      running statistics 0/1), as the code, which does not copy it; False keeps the sliced BN.
    * ``consumer``: the layers reading the group. ``"project"`` (default, prunekit's
      correction): with A ~ T B, T = A B^+ (least squares), each consumer's new columns are
      W2' = W2 T, exact for the linear part: a conv -> conv pair computes what it computed
      whenever B spans A's row space (B's rows always lie in it; so when rank B = rank A: for
      rank A <= floor(l/2) FD loses no direction, and generically for rank A <= l). A BN or
      ReLU between them makes it approximate, more so after ``bn_reset``: a ReLU does not
      commute with T, so right after pruning a sketched network is far from the original
      whatever the consumer, and the method relies on its fine-tune. ``"slice"``: plain surgery (the kept
      columns as they were). ``"code"``: the faithful reproduction of the reference's reshape
      quirk (:func:`code_consumer_sketch`; conv consumers whose input is only this group).
    * ``streams`` (``"warn"``): a pruned group the sketch cannot handle, i.e. a residual stream
      (several producing convs; the reference never prunes one), a linear or grouped producer,
      or fixed channels, is pruned by plain surgery with a warning; ``"refuse"`` raises instead.

    A producer's bias is sketched with its filter, as one more column of A. Sketch rows are
    written in order to the kept rows; their signs are the SVD's (LAPACK's) choice, as in the
    reference. Groups whose every channel is kept are left as they are.
    """

    name = "filtersketch"

    def __init__(self, *, consumer: str = "project", early_stop: bool = True,
                 unit_frobenius: bool = True, bn_reset: bool = True, streams: str = "warn"):
        self.consumer = check_choice(consumer, CONSUMER_MODES, "consumer")
        self.early_stop = _as_bool(early_stop, "early_stop")
        self.unit_frobenius = _as_bool(unit_frobenius, "unit_frobenius")
        self.bn_reset = _as_bool(bn_reset, "bn_reset")
        self.streams = check_choice(streams, STREAM_MODES, "streams")

    def options(self) -> dict:
        return {"consumer": self.consumer, "early_stop": self.early_stop,
                "unit_frobenius": self.unit_frobenius, "bn_reset": self.bn_reset,
                "streams": self.streams}

    def score_group(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        return L2Norm().score_group(group, model)

    @staticmethod
    def why_not_sketched(group: ChannelGroup, model: nn.Module) -> str | None:
        """Why ``group`` cannot be sketched, or None when one conv produces every channel."""
        weights = [(m, pos) for m, pos in group.producers() if m.tensor.endswith("weight")]
        if len(weights) != 1:
            return f"{len(weights)} producing layers (a residual stream)"
        member, pos = weights[0]
        if model.get_parameter(member.tensor).dim() < 3 or member.dim != 0:
            return "its producer is not a convolution with filters along dim 0"
        if group.fixed.any() or group.blocks:
            return "it has fixed channels or a grouped layer"
        if not np.array_equal(np.sort(pos), np.arange(group.size)):
            return "its producer does not write every channel once"
        return None

    def rewrites(self, graph: ChannelGraph, model: nn.Module, plan: dict) -> list[Rewrite]:
        """One :class:`Rewrite` per sketched group: the producer's filters (and bias), its BN
        (``bn_reset``) and the consumers' columns (``consumer``), in the pruned shapes."""
        work = _Workspace(graph, model, plan)
        touched: dict[str, list[str]] = {}
        logs: dict[str, dict] = {}
        skipped = []
        for group in graph.groups:
            kept = plan.get(group.name)
            if kept is None or len(kept) >= group.size:
                continue
            reason = self.why_not_sketched(group, model)
            if reason is not None:
                skipped.append(f"'{group.name}' ({reason})")
                continue
            touched[group.name], logs[group.name] = self._sketch_group(work, group, len(kept))
        if skipped:
            message = (f"filtersketch: {len(skipped)} pruned group(s) cannot be sketched and are "
                       f"pruned by plain surgery: {', '.join(skipped[:4])}"
                       f"{' ...' if len(skipped) > 4 else ''}. The reference keeps the streams: "
                       "use stream_scale 0 (or conv_rates with 0 for the streams)")
            if self.streams == "refuse":
                raise ConfigError(message + "; or streams='warn' to allow it")
            warnings.warn(message, stacklevel=2)
        final = {name: work.pruned(name) for name in work.full}
        return [Rewrite(group=name, values={t: final[t] for t in tensors},
                        what=f"filter sketch, consumer {self.consumer}", log=logs[name])
                for name, tensors in touched.items()]

    def _sketch_group(self, work: _Workspace, group: ChannelGroup, l: int):
        member, pos = next((m, p) for m, p in group.producers() if m.tensor.endswith("weight"))
        weight = work.get(member.tensor)
        rows_kept = work.kept(member.tensor, 0)
        cols_kept = work.kept(member.tensor, 1)
        inner = weight.index_select(1, cols_kept)
        A = inner.reshape(inner.shape[0], -1)
        bias_name = next((m.tensor for m, _ in group.producers()
                          if m.tensor == member.tensor[:-len("weight")] + "bias"), None)
        if bias_name is not None:
            A = torch.cat([A, work.get(bias_name)[:, None]], dim=1)
        B, used = frequent_directions(A, l, early_stop=self.early_stop)
        d = inner[0].numel()
        if self.unit_frobenius:
            norm = torch.linalg.vector_norm(B[:, :d])
            B = B / norm if norm > 0 else B
        weight[rows_kept[:, None], cols_kept[None, :]] = B[:, :d].reshape(
            l, len(cols_kept), *inner.shape[2:])
        touched = [member.tensor]
        if bias_name is not None:
            work.get(bias_name)[rows_kept] = B[:, d]
            touched.append(bias_name)
        if self.bn_reset:
            touched += self._reset_norms(work, group)
        # sketch row j sits in pruned row j, i.e. group channel pos[rows_kept[j]]
        channel_row = {int(pos[r]): j for j, r in enumerate(rows_kept.tolist())}
        T = A @ torch.linalg.pinv(B) if self.consumer == "project" else None
        row_of_channel = np.argsort(pos)  # A's row (original position) of each channel
        consumers = []
        for cm, cpos in group.members:
            if cm.role != "in" or not (cpos >= 0).any() or self.consumer == "slice":
                continue
            if self.consumer == "project":
                self._project(work, cm, cpos, T[row_of_channel], channel_row)
            else:
                self._code(work, cm, cpos, l, group)
            consumers.append(cm.tensor)
        touched += [t for t in consumers if t not in touched]
        log = {"rows": l, "of": int(group.size), "sketched_rows": used, "consumers": consumers}
        return touched, log

    def _reset_norms(self, work: _Workspace, group: ChannelGroup) -> list[str]:
        names = []
        for m, pos in group.members:
            suffix = m.tensor.rsplit(".", 1)[-1]
            if m.role != "norm" or suffix not in BN_RESET or not (pos >= 0).all():
                continue
            work.get(m.tensor).fill_(BN_RESET[suffix])
            names.append(m.tensor)
        return names

    @staticmethod
    def _project(work: _Workspace, member, cpos: np.ndarray, T: torch.Tensor,
                 channel_row: dict[int, int]) -> None:
        """W2' = W2 T on the consumer's columns of this group; a channel read at several
        positions (a flatten before a linear layer) is projected slot by slot."""
        full = work.get(member.tensor).movedim(member.dim, 0)  # a view: writes go through
        kept = set(work.kept(member.tensor, member.dim).tolist())
        n = T.shape[0]
        slots = [np.flatnonzero(cpos == c) for c in range(n)]
        if len({len(s) for s in slots}) != 1:
            raise ConfigError(f"filtersketch consumer 'project': '{member.tensor}' reads the "
                              "group's channels unevenly; use consumer='slice'")
        for s in range(len(slots[0])):
            original = torch.as_tensor([int(slots[c][s]) for c in range(n)])
            old = full[original].reshape(n, -1)
            new = (T.T @ old).reshape(T.shape[1], *full.shape[1:])
            for c, j in channel_row.items():
                position = int(slots[c][s])
                if position in kept:
                    full[position] = new[j]

    def _code(self, work: _Workspace, member, cpos: np.ndarray, l: int,
              group: ChannelGroup) -> None:
        weight = work.get(member.tensor)
        if weight.dim() != 4 or member.dim != 1 or not np.array_equal(
                cpos, np.arange(group.size)):
            raise ConfigError(f"filtersketch consumer 'code' reproduces the reference on a conv "
                              f"reading only this group; '{member.tensor}' is not one: use "
                              "consumer='project' or 'slice'")
        new = code_consumer_sketch(weight, l, early_stop=self.early_stop,
                                   unit_frobenius=self.unit_frobenius)
        weight[:, work.kept(member.tensor, 1)] = new
