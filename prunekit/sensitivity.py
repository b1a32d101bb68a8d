"""One-shot sensitivity of every channel group: how much the loss grows when that group alone
loses a fraction of its channels (the lowest-scored ones), measured on a few batches.

The group's channels are zeroed in a copy of the model (:func:`prunekit.zero_removed_channels`:
in eval mode this computes what the pruned model computes), so no surgery is needed per
measurement. The cost is

* ``"loss"``: the increase of the mean cross-entropy on the batches' labels,
* ``"kl"``: the mean KL divergence of the pruned model's softmax from the unpruned one's
  (no labels needed),
* ``"auto"``: ``loss`` when every batch carries integer class labels, else ``kl``.

This is the "sensitivity analysis" of Li et al., *Pruning Filters for Efficient ConvNets*
(ICLR 2017, Sec. 3.2 and Fig. 2: each layer pruned alone at growing ratios, accuracy
measured), used here to allocate a MACs budget (:func:`prunekit.plan.curves.counts_for_curves`)
instead of choosing layer ratios by hand.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .criteria.calibration import check_finite_batch, split_batch
from .errors import ConfigError
from .graph import ChannelGraph
from .masking import zero_removed_channels
from .measure.context import eval_mode, model_device_and_dtype, prepare_inputs
from .plan import keep_count, make_plan

__all__ = ["METRICS", "measure_sensitivity"]

METRICS = ("auto", "loss", "kl")


def _batches(model, batches) -> list[tuple[tuple, torch.Tensor | None]]:
    device, _ = model_device_and_dtype(model)
    out = []
    for i, batch in enumerate(batches):
        inputs, targets = split_batch(batch)
        check_finite_batch(inputs, targets, i, "sensitivity")
        if isinstance(targets, torch.Tensor):
            targets = targets.to(device)
        out.append((prepare_inputs(model, inputs), targets))
    if not out:
        raise ConfigError("the sensitivity allocation needs at least one batch of data "
                          "(e.g. a few held-out 'val' batches)")
    return out


def _metric(metric: str, batches) -> str:
    if metric not in METRICS:
        raise ConfigError(f"sensitivity metric must be one of {METRICS}, got {metric!r}")
    labelled = all(t is not None and not t.is_floating_point() and t.dim() == 1
                   for _, t in batches)
    if metric == "loss" and not labelled:
        raise ConfigError("sensitivity metric 'loss' needs batches of (inputs, class labels); "
                          "use metric 'kl' for unlabelled data")
    return metric if metric != "auto" else ("loss" if labelled else "kl")


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError("the sensitivity allocation needs a model returning a tensor of logits "
                      f"(or a tuple starting with one), got {type(out).__name__}")


@torch.no_grad()
def _cost(model, batches, metric, reference) -> float:
    total, count = 0.0, 0
    with eval_mode(model):
        for (inputs, targets), ref in zip(batches, reference):
            logits = _logits(model(*inputs)).float()
            if metric == "loss":
                value = F.cross_entropy(logits, targets, reduction="sum")
            else:
                value = F.kl_div(F.log_softmax(logits, 1), ref, log_target=True,
                                 reduction="sum")
            if not torch.isfinite(value):
                return float("inf")  # a removal that breaks the model costs the most
            total += float(value)
            count += logits.shape[0]
    return total / count


@torch.no_grad()
def measure_sensitivity(model: nn.Module, graph: ChannelGraph, scores: Mapping[str, np.ndarray],
                        batches: Iterable, *, ratios: Sequence[float] = (0.25, 0.5, 0.75),
                        metric: str = "auto", round_to: int = 1, groups: Iterable[str] = (),
                        progress: bool = True) -> dict[str, list[tuple[int, float]]]:
    """``{group: [(kept channels, cost increase), ...]}`` for every prunable group (or the
    ``groups`` named), each pruned alone at each of ``ratios`` by ``scores``.

    The model is not changed (each measurement zeroes channels in a copy).
    """
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ConfigError(f"sensitivity ratios must be fractions in (0, 1), got {list(ratios)}")
    batches = _batches(model, batches)
    metric = _metric(metric, batches)
    names = list(groups) or [g.name for g in graph.prunable_groups()]
    with eval_mode(model):
        reference = [F.log_softmax(_logits(model(*inputs)).float(), 1) for inputs, _ in batches]
    # The unpruned model's own cost, from the reference outputs (no second pass): its KL
    # from itself is 0, its loss the cross-entropy of those log-probabilities.
    base = 0.0 if metric == "kl" else float(
        sum(F.nll_loss(ref, t, reduction="sum") for ref, (_, t) in zip(reference, batches))
        / sum(len(t) for _, t in batches))
    curves: dict[str, list[tuple[int, float]]] = {}
    jobs = [(name, r) for name in names for r in sorted(set(ratios))]
    for name, ratio in tqdm(jobs, desc="sensitivity", disable=not progress, leave=False):
        group = graph.by_name[name]
        kept = keep_count(group, ratio, round_to)
        points = curves.setdefault(name, [])
        if kept >= group.size or any(k == kept for k, _ in points):
            continue
        plan = make_plan(graph, scores, {}, round_to, counts={name: kept})
        probe = zero_removed_channels(copy.deepcopy(model), graph, plan)
        points.append((kept, _cost(probe, batches, metric, reference) - base))
        del probe
    return curves
