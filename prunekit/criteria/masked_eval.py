"""Evaluate a model *as if* a plan removed channels: no surgery, no deep copy.

Search and sampling methods (linear filter ensembles, CCEP's fitness) evaluate hundreds of
candidate plans on the same network. Physically pruning a copy per candidate costs a deep copy
and a surgery each time; :func:`prunekit.zero_removed_channels` on a copy is exact but still
copies the whole model. :class:`masked_channels` instead zeroes, in place, exactly the entries
``zero_removed_channels`` zeroes (producing rows, normalisation affine entries, consuming
input columns, grouped-layer slices), after saving only those entries, and writes them back
bit for bit on exit, also when the body raises. In eval mode the masked model computes what the
physically pruned model computes (the equivalence prunekit's surgery is tested against).

:func:`evaluate_batches` gives the mean loss and top-1 accuracy of a model on prepared
``(inputs, targets)`` batches; :func:`evaluate_masked` does it under a plan's mask;
:func:`prepared_batches` checks and moves the calibration data once, so a loop over many
masks does not re-check every batch per candidate.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import iter_batches, training_flags
from ..errors import ConfigError
from ..graph import ChannelGraph, kept_positions
from ..surgery import tensor_by_name

__all__ = ["masked_channels", "masked_views", "prepared_batches", "evaluate_batches",
           "evaluate_masked"]


def masked_views(model: nn.Module, graph: ChannelGraph,
                 plan: dict[str, list[int]]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """``[(tensor, dim, index)]``: every slice :func:`zero_removed_channels` zeroes for
    ``plan``, as a tensor (or a view of it), a dimension and the positions along it. A grouped
    layer (``blocks > 1``) gives one entry per removed (block, column): the view of that
    block's rows and the column."""
    removed = graph.removed_roots(plan)
    views = []
    if not removed:
        return views
    for member, roots in graph.tensor_members():
        keep = kept_positions(roots, removed)
        if len(keep) == len(roots):
            continue
        if member.tensor.endswith(("running_mean", "running_var")):
            continue  # as in zero_removed_channels: gamma = beta = 0 makes them irrelevant
        tensor = tensor_by_name(model, member.tensor)
        kept = set(keep.tolist())
        drop = [p for p in range(len(roots)) if p not in kept]
        if member.blocks > 1:
            cols = tensor.shape[member.dim]
            rows = tensor.shape[0] // member.blocks
            for p in drop:
                block, column = divmod(p, cols)
                views.append((tensor[block * rows:(block + 1) * rows], member.dim,
                              torch.tensor([column], device=tensor.device)))
        else:
            views.append((tensor, member.dim, torch.tensor(drop, device=tensor.device)))
    return views


class masked_channels:
    """Context manager: the plan's removed channels are zeroed in place inside the block.

    ``with masked_channels(model, graph, plan): model(x)`` computes (in eval mode) what the
    model physically pruned by ``plan`` computes. Only the zeroed entries are saved; on exit
    they are restored in reverse order (a tensor met by several members, e.g. a conv weight
    that is one group's producer and another's consumer, ends with its first, original
    values), so every parameter and buffer is bit-identical to before, exception or not.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, plan: dict[str, list[int]]):
        self.model, self.graph, self.plan = model, graph, plan
        self._saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> nn.Module:
        if self._saved:
            raise RuntimeError("masked_channels is not re-entrant: exit it before entering again")
        try:
            with torch.no_grad():
                for tensor, dim, index in masked_views(self.model, self.graph, self.plan):
                    self._saved.append((tensor, dim, index, tensor.index_select(dim, index)))
                    tensor.index_fill_(dim, index, 0)
        except BaseException:
            self._restore()
            raise
        return self.model

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        with torch.no_grad():
            while self._saved:
                tensor, dim, index, values = self._saved.pop()
                tensor.index_copy_(dim, index, values)


def prepared_batches(calibration, max_batches: int | None = None, device=None,
                     what: str = "masked evaluation", labels: bool = True) -> list:
    """The calibration batches as a list of ``(inputs tuple, targets)``, checked for NaN/inf
    and moved to ``device`` once. ``labels``: refuse input-only batches (a loss needs them)."""
    batches = list(iter_batches(calibration, max_batches, device, what=what))
    if not batches:
        raise ValueError(f"{what}: the calibration data yielded no batch")
    if labels and any(t is None for _, t in batches):
        raise ConfigError(f"{what} needs labelled (inputs, targets) calibration batches to "
                          "compute a loss or an accuracy; got input-only batches")
    return batches


def _main_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches, *,
                     loss_fn: Callable | None = None) -> dict[str, float]:
    """``{"loss", "accuracy", "samples"}`` of ``model`` in eval mode on ``batches`` (from
    :func:`prepared_batches`): the loss averaged over samples (``loss_fn(output, targets)``
    must be a batch mean, default cross-entropy), top-1 accuracy in [0, 1] (needs class
    targets). Module training flags are restored."""
    total_loss = 0.0
    correct = 0
    samples = 0
    with training_flags(model):
        model.eval()
        for inputs, targets in batches:
            logits = _main_output(model(*inputs))
            n = int(targets.shape[0])
            loss = loss_fn(logits, targets) if loss_fn is not None else \
                F.cross_entropy(logits, targets)
            total_loss += float(loss) * n
            if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) \
                    and logits.dim() == 2:
                correct += int((logits.argmax(1) == targets).sum())
            samples += n
    return {"loss": total_loss / samples, "accuracy": correct / samples, "samples": samples}


def evaluate_masked(model: nn.Module, graph: ChannelGraph, plan: dict[str, list[int]],
                    batches, *, loss_fn: Callable | None = None) -> dict[str, float]:
    """:func:`evaluate_batches` of ``model`` with ``plan``'s removed channels zeroed; the
    model is restored exactly afterwards."""
    with masked_channels(model, graph, plan):
        return evaluate_batches(model, batches, loss_fn=loss_fn)
