"""Weights rewritten after surgery: what a method puts into the kept channels instead of the
sliced originals.

Surgery keeps the surviving entries of every tensor as they were. Some methods then change
them: FilterSketch replaces a layer's filters with a matrix sketch of all of them (the kept
rows are new filters), Central Filter adds each removed channel's next-layer weights into the
weights of the kept channel that represents it, EPruner and FilterSketch's code reset the
pruned layer's BatchNorm. Such a criterion exposes ``rewrites(graph, model, plan)``, called by
:func:`prunekit.prune` on the *unpruned* model once the plan is known (so it sees every
original weight); it returns :class:`Rewrite` s, each the new full values of some tensors of the
*pruned* model (shapes after surgery), applied right after surgery by :func:`apply_rewrites`.

A rewrite may be *gated* (``Rewrite.gated``): kept only if it does not lower the top-1 accuracy
on held-out labelled batches (Central Filter's code accepts a merge only if test accuracy does
not drop; prunekit uses held-out data, never an evaluation split). Gated rewrites need
``prune(..., heldout_data=batches)``; a criterion that produces them says so with
``needs_heldout = True`` so the call is refused before any work.

:func:`surviving` gives the original indices of a tensor's dimension that survive a plan, the
bookkeeping every rewrite needs to place values computed on the unpruned tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import PrunekitError
from .graph import ChannelGraph, kept_positions
from .measure.evaluation import evaluate
from .surgery import tensor_by_name

__all__ = ["Rewrite", "RewriteError", "apply_rewrites", "heldout_top1", "surviving"]


class RewriteError(PrunekitError, ValueError):
    """A rewrite names a tensor the pruned model lacks, or has the wrong shape or values."""


@dataclass
class Rewrite:
    """New values of tensors of the pruned model, for one group's removal.

    ``values``: ``{tensor name: full tensor in the pruned model's shape}``; ``group``: the
    channel group whose removal this compensates (for the log and messages); ``what``: a few
    words for the log (e.g. ``"merge into centres"``); ``gated``: apply only if held-out top-1
    does not drop (see the module doc).
    """

    group: str
    values: dict[str, torch.Tensor]
    what: str = ""
    gated: bool = False
    log: dict = field(default_factory=dict)


def surviving(graph: ChannelGraph, plan: dict[str, list[int]], tensor: str, dim: int,
              size: int) -> np.ndarray:
    """Original indices along ``dim`` of ``tensor`` (of length ``size`` before surgery) that
    the plan keeps, in order: position ``j`` of the pruned tensor is original ``result[j]``."""
    removed = graph.removed_roots(plan)
    found = None
    for member, roots in graph.tensor_members():
        if member.tensor == tensor and member.dim == dim:
            keep = kept_positions(roots, removed)
            if found is not None and not np.array_equal(found, keep):
                raise RewriteError(f"the graph keeps different entries of {tensor} dim {dim}")
            found = keep
    return np.arange(size) if found is None else found


def heldout_top1(model: nn.Module, batches) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode on labelled ``(inputs, labels)``
    batches (:func:`prunekit.measure.evaluate`), the measure a gated rewrite must not lower."""
    batches = list(batches)
    if not all(isinstance(b, (tuple, list)) and len(b) == 2
               and all(isinstance(t, torch.Tensor) for t in b) for b in batches):
        raise RewriteError("a gated rewrite compares held-out top-1 accuracy: give "
                           "heldout_data as labelled (inputs, labels) batches")
    if not batches:
        raise RewriteError("heldout_data holds no batch: give a few labelled held-out batches")
    return evaluate(model, batches, progress=False, desc="held-out check")["top1"] / 100


def _checked(model: nn.Module, rewrite: Rewrite) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = []
    for name, value in rewrite.values.items():
        try:
            target = tensor_by_name(model, name)
        except AttributeError:
            raise RewriteError(f"rewrite for group '{rewrite.group}' names '{name}', which the "
                               "pruned model does not have") from None
        if tuple(value.shape) != tuple(target.shape):
            raise RewriteError(f"rewrite for group '{rewrite.group}' gives '{name}' the shape "
                               f"{list(value.shape)}; the pruned tensor is {list(target.shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise RewriteError(f"rewrite for group '{rewrite.group}' gives '{name}' NaN/inf "
                               "values")
        pairs.append((target, value.to(device=target.device, dtype=target.dtype)))
    return pairs


@torch.no_grad()
def apply_rewrites(model: nn.Module, rewrites: list[Rewrite], heldout=None) -> list[dict]:
    """Write every rewrite into the pruned ``model`` (in place) and return the log, one entry
    per rewrite: group, what, applied, and for gated ones the held-out top-1 without and with
    it. Every rewrite is checked (names, shapes, finite values) before any is written. They
    are written in order, so when two rewrites set the same tensor (a layer that reads one
    rewritten group and produces another) the later one's value is the one kept: a criterion
    gives the final value in the last rewrite that touches it.
    Gated rewrites are tried one at a time in the given order, each kept only if top-1 on
    ``heldout`` does not drop (a RewriteError if ``heldout`` is None)."""
    checked = [(r, _checked(model, r)) for r in rewrites]
    if any(r.gated for r in rewrites) and heldout is None:
        raise RewriteError("gated rewrites compare held-out accuracy: pass heldout_data")
    log = []
    current = None
    for rewrite, pairs in checked:
        entry = {"group": rewrite.group, "what": rewrite.what, **rewrite.log}
        if not rewrite.gated:
            for target, value in pairs:
                target.copy_(value)
            log.append({**entry, "applied": True})
            current = None
            continue
        before = heldout_top1(model, heldout) if current is None else current
        saved = [target.clone() for target, _ in pairs]
        for target, value in pairs:
            target.copy_(value)
        after = heldout_top1(model, heldout)
        applied = after >= before
        if not applied:
            for (target, _), old in zip(pairs, saved):
                target.copy_(old)
        current = after if applied else before
        log.append({**entry, "applied": applied, "heldout_top1_before": before,
                    "heldout_top1_after": after})
    return log
