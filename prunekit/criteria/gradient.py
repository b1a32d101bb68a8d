"""Criteria computed from gradients on labelled calibration data: taylor."""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..graph import ChannelGraph, ChannelGroup
from .base import (Criterion, ScoreError, check_choice, nonfinite_cause, register_criterion,
                   require_calibration)
from .calibration import (batch_count, check_max_batches, iter_batches, moved_to,
                          training_flags)

TAYLOR_COMBINE = ("gate", "mean", "sum", "max")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def default_loss(output, targets):
    """Cross-entropy of the model's (first) output."""
    return F.cross_entropy(_first_tensor(output), targets)


def _terms(group: ChannelGroup, params: dict[str, nn.Parameter]):
    """{layer: [(member, pos), ...]} of the parameters Taylor-FO-BN sums over per channel:
    the affine parameters of the group's normalisation layers where there are any, and
    ``by_producer`` the producing layers' weights and biases (for channels no BN covers)."""
    by_norm: dict[str, list] = {}
    by_producer: dict[str, list] = {}
    for member, pos in group.members:
        if member.tensor not in params:
            continue  # running statistics are buffers
        if member.role == "norm":
            by_norm.setdefault(member.module, []).append((member, pos))
        elif member.role == "out":
            by_producer.setdefault(member.module, []).append((member, pos))
    return by_norm, by_producer


@register_criterion
class Taylor(Criterion):
    """First-order Taylor importance of a channel's BN gate, "Taylor-FO-BN" (Molchanov et al.,
    "Importance Estimation for Neural Network Pruning", CVPR 2019, Eq. 8 with the gate after
    BN; their code's methods 22 "Taylor_gate" and 31 "BN_Taylor", which are equal):

        I_m = (sum_{s in channel m} g_s w_s)^2 = ((dL/dgamma_m) gamma_m + (dL/dbeta_m) beta_m)^2

    per mini-batch (L: ``loss_fn``, default cross-entropy, mean over the batch), then averaged
    over the batches: plain mean by default, which is what the reference code uses within a
    pruning interval (``add_criteria`` sums, ``compute_saliency`` divides by the iterations);
    its ``pruning_momentum=0.9`` only blends saliencies *across* successive pruning steps. With
    ``momentum=m`` the batches are blended as v <- m v + (1 - m) I_b (first batch: v = I_1).

    Residual streams: a channel carried by several BNs gets ``combine="gate"`` (default), the
    reference code's treatment of a gate shared by the blocks of a stage: the gradient
    contributions of all its BNs are summed *before* squaring (exactly the first-order loss
    change of removing the channel from all of them) and the result is divided by the number of
    BNs (the code's ``mult``). ``"mean"``, ``"sum"``, ``"max"`` combine the per-BN squared terms
    instead.

    Channels without a normalisation layer fall back to the producing layer: the same formula
    over the producing conv/linear weights (and bias) of the channel,
    (sum_s g_s w_s)^2 (Eq. 8 on the filter). A channel with no parameter at all (a zero-padding
    slot) scores 0.

    ``calibration`` must yield ``(inputs, targets)`` batches. ``mode="eval"`` (default) keeps
    the BN statistics frozen (running statistics are used, nothing is updated); ``"train"``
    normalises with batch statistics like the paper's fine-tuning loop, and the BN running
    statistics are restored afterwards. Gradients are taken with ``torch.autograd.grad``: the
    parameters' ``.grad`` fields are never touched, and ``requires_grad`` flags and module
    modes are restored.
    """

    name = "taylor"
    needs_data = True

    def __init__(self, combine: str = "gate", *, momentum: float | None = None,
                 mode: str = "eval", loss_fn: Callable | None = None,
                 max_batches: int | None = None, device=None, progress: bool = True):
        self.combine = check_choice(combine, TAYLOR_COMBINE, "combine")
        if momentum is not None and (isinstance(momentum, bool)
                                     or not isinstance(momentum, (int, float))
                                     or not 0 <= momentum < 1):
            raise ValueError(f"momentum must be None or a number in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.mode = check_choice(mode, ("eval", "train"), "mode")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("loss_fn must be callable(output, targets) -> scalar loss")
        self.loss_fn = loss_fn
        self.max_batches = check_max_batches(max_batches)
        self.device = device
        self.progress = bool(progress)

    def options(self) -> dict:
        opts = {"combine": self.combine, "mode": self.mode}
        for key in ("momentum", "loss_fn", "max_batches", "device"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts

    def score_group(self, group, model):
        raise TypeError("'taylor' needs labelled calibration data; call "
                        "score(graph, model, calibration)")

    def score(self, graph: ChannelGraph, model: nn.Module, calibration=None
              ) -> dict[str, np.ndarray]:
        require_calibration(self, calibration)
        params = dict(model.named_parameters())
        groups = graph.prunable_groups()
        plans = {g.name: _terms(g, params) for g in groups}
        needed = {m.tensor for by_norm, by_prod in plans.values()
                  for layers in (by_norm, by_prod) for terms in layers.values()
                  for m, _ in terms}
        names = sorted(needed)
        tensors = [params[n] for n in names]
        loss_fn = self.loss_fn or default_loss
        averaged: dict[str, np.ndarray] = {}
        done = 0
        saved_flags = [(p, p.requires_grad) for p in model.parameters()]
        saved_buffers = ({k: b.detach().clone() for k, b in model.state_dict().items()
                          if not isinstance(params.get(k), nn.Parameter)}
                         if self.mode == "train" else {})
        try:
            with training_flags(model), moved_to(model, self.device) as dev, \
                    torch.enable_grad():
                model.train(self.mode == "train")
                for p, _ in saved_flags:
                    p.requires_grad_(False)
                for t in tensors:
                    t.requires_grad_(True)
                batches = tqdm(iter_batches(calibration, self.max_batches, dev, what=self.name),
                               desc=self.name, unit="batch", leave=False,
                               total=batch_count(calibration, self.max_batches),
                               disable=not self.progress)
                for inputs, targets in batches:
                    if targets is None:
                        raise ValueError("taylor needs (inputs, targets) calibration batches "
                                         "to compute the loss; got input-only batches")
                    loss = loss_fn(model(*inputs), targets)
                    if not bool(torch.isfinite(loss.detach()).all()):
                        raise ScoreError(
                            f"taylor: the loss on calibration batch {done} (counting from 0) is "
                            f"{float(loss.detach().reshape(-1)[0]):.4g}: "
                            f"{nonfinite_cause(model)}")
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True) if tensors \
                        else ()
                    wg = {n: None if g is None else (t.detach() * g).double()
                          for n, t, g in zip(names, tensors, grads)}
                    for g in groups:
                        current = self._importance(g, *plans[g.name], wg)
                        if g.name not in averaged:
                            averaged[g.name] = current
                        elif self.momentum is None:
                            averaged[g.name] = averaged[g.name] + current
                        else:
                            averaged[g.name] = (self.momentum * averaged[g.name]
                                                + (1 - self.momentum) * current)
                    done += 1
        finally:
            for p, flag in saved_flags:
                p.requires_grad_(flag)
            if saved_buffers:
                with torch.no_grad():
                    state = model.state_dict()
                    for k, v in saved_buffers.items():
                        state[k].copy_(v)
        if done == 0:
            raise ValueError("the calibration data yielded no batch")
        if self.momentum is None:
            averaged = {k: v / done for k, v in averaged.items()}
        return averaged

    def _importance(self, group: ChannelGroup, by_norm, by_producer, wg) -> np.ndarray:
        """I_m of one batch for every channel of ``group``."""
        bn = self._layer_terms(group.size, by_norm, wg)
        out = self._layer_terms(group.size, by_producer, wg)
        covered_bn = np.zeros(group.size, dtype=bool)
        for _, cov in bn:
            covered_bn |= cov
        result = np.zeros(group.size)
        for terms, use in ((bn, covered_bn), (out, ~covered_bn)):
            if use.any() and terms:
                result[use] = self._combine(group.size, terms)[use]
        return result

    @staticmethod
    def _layer_terms(size, layers, wg) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(sum over the layer's parameters of channel m of w*g, covered mask)] per layer."""
        result = []
        for terms in layers.values():
            total = np.zeros(size)
            covered = np.zeros(size, dtype=bool)
            for member, pos in terms:
                prod = wg[member.tensor]
                mine = pos >= 0
                covered[pos[mine]] = True
                if prod is None:
                    continue
                per_pos = prod.movedim(member.dim, 0).reshape(prod.shape[member.dim], -1).sum(1)
                np.add.at(total, pos[mine], per_pos.cpu().numpy()[mine])
            result.append((total, covered))
        return result

    def _combine(self, size, terms) -> np.ndarray:
        count = np.zeros(size)
        for _, cov in terms:
            count += cov
        if self.combine == "gate":
            summed = np.zeros(size)
            for total, _ in terms:
                summed += total
            return summed ** 2 / np.maximum(count, 1)
        squares = np.stack([np.where(cov, total ** 2, np.nan) for total, cov in terms])
        with warnings.catch_warnings():  # "mean of empty slice" for uncovered channels
            warnings.simplefilter("ignore", RuntimeWarning)
            if self.combine == "sum":
                out = np.nansum(squares, axis=0)
            elif self.combine == "mean":
                out = np.nanmean(squares, axis=0)
            else:
                out = np.nanmax(squares, axis=0)
        return np.nan_to_num(out, nan=0.0)

