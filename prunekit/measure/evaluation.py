"""Quality on data: top-1/top-5 accuracy and loss of a model, and re-estimating its BN statistics.

Both run over a loader of ``(inputs, targets)`` batches on the model's device (or one given,
moving the model there and back). A model holding NaN/inf values, or producing them, is still
evaluated (one may measure a broken model on purpose) but never silently: see
:class:`NonFiniteWarning` and :func:`first_nonfinite`.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .context import eval_mode, on_device

__all__ = ["NonFiniteWarning", "evaluate", "first_nonfinite", "recalibrate_bn"]


class NonFiniteWarning(UserWarning):
    """A model, or its outputs, holds NaN/inf values: the numbers measured on it mean little."""


def first_nonfinite(model: nn.Module) -> tuple[str, int] | None:
    """``(name, number of NaN/inf entries)`` of the first parameter or floating-point buffer of
    ``model`` (in ``state_dict`` order) that is not finite everywhere; None if all are finite."""
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    for name, tensor in named:
        if tensor.is_floating_point() or tensor.is_complex():
            finite = torch.isfinite(tensor.detach())
            if not bool(finite.all()):
                return name, int((~finite).sum())
    return None


def _warn_nonfinite_model(model: nn.Module, desc: str) -> None:
    found = first_nonfinite(model)
    if found is not None:
        name, count = found
        warnings.warn(f"{desc}: the model's tensor '{name}' holds {count} NaN/inf value(s) "
                      "(it may hold others too); its accuracy and loss are those of a broken "
                      "model (weights from a diverged training?)", NonFiniteWarning, stacklevel=3)


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "eval",
    max_batches: int | None = None,
) -> dict[str, float | int]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over a loader of (inputs, targets).

    Top-5 uses ``min(5, num_classes)`` so it is defined for small label sets. ``device=None``
    evaluates where the model already is; an explicit device moves it there and back.

    The result also holds ``nonfinite_outputs``: the number of examples whose output row has a
    NaN/inf entry (their top-1/top-5 hits are arbitrary and the loss is not finite). A
    :class:`NonFiniteWarning` is issued when it is not 0, and when a parameter or buffer of the
    model is not finite (naming the first one); the evaluation itself goes on.
    """
    _warn_nonfinite_model(model, desc)
    try:
        total_batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total_batches = None
    if max_batches is not None and total_batches is not None:
        total_batches = min(total_batches, max_batches)

    seen = correct_top1 = correct_top5 = nonfinite = 0
    loss_sum = 0.0
    with on_device(model, device) as run_device, eval_mode(model), torch.inference_mode():
        bar = tqdm(loader, total=total_batches, desc=desc, disable=not progress, leave=False)
        try:
            for batch_index, batch in enumerate(bar):
                if max_batches is not None and batch_index >= max_batches:
                    break
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TypeError("evaluate expects the loader to yield (inputs, targets) pairs")
                inputs = batch[0].to(run_device, non_blocking=True)
                targets = batch[1].to(run_device, non_blocking=True)
                logits = model(inputs)
                if isinstance(logits, (tuple, list)):  # e.g. models that also return aux outputs
                    logits = logits[0]
                loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
                rows = logits.reshape(logits.shape[0], -1)
                nonfinite += int((~torch.isfinite(rows)).any(dim=1).sum())
                k = min(5, logits.shape[1])
                top_k = logits.topk(k, dim=1).indices
                hits = top_k.eq(targets.unsqueeze(1))
                correct_top1 += hits[:, 0].sum().item()
                correct_top5 += hits.any(dim=1).sum().item()
                seen += targets.numel()
                bar.set_postfix(top1=f"{100.0 * correct_top1 / seen:.2f}")
        finally:
            bar.close()
    if seen == 0:
        raise ValueError("evaluate: the loader yielded no examples")
    if nonfinite:
        warnings.warn(f"{desc}: the model's outputs hold NaN/inf values for {nonfinite} of "
                      f"{seen} examples; their predictions are arbitrary and the loss is not "
                      "finite, so the accuracy is not meaningful (check the weights and the "
                      "input data)", NonFiniteWarning, stacklevel=2)
    return {
        "top1": 100.0 * correct_top1 / seen,
        "top5": 100.0 * correct_top5 / seen,
        "loss": loss_sum / seen,
        "n": seen,
        "nonfinite_outputs": nonfinite,
    }


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 50, *,
                   device: torch.device | str | None = None, progress: bool = True) -> int:
    """Re-estimate every batch-norm layer's running mean and variance from ``batches``
    batches of ``loader`` (a cumulative average, train-mode forward, no gradients, weights
    untouched); returns the number of batches used. The model is left in eval mode.

    Needed when the network changed after its statistics were last updated, e.g. stripes cut
    during the last steps of SWP's skeleton training: train-mode accuracy stays high while the
    eval-mode statistics describe the unpruned filters.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches!r}")
    iterator = iter(loader)
    first = next(iterator, None)
    if first is None:
        raise ValueError("recalibrate_bn got an empty loader; the statistics are unchanged")
    saved = [(m, m.momentum) for m in norms]
    used = 0
    with on_device(model, device) as run_device:
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average over the batches seen
            model.train()
            bar = tqdm(itertools.chain([first], iterator), total=batches,
                       desc="bn recalibration", disable=not progress, leave=False)
            for batch in bar:
                if used >= batches:
                    break
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs.to(run_device))
                used += 1
        finally:
            for m, momentum in saved:
                m.momentum = momentum
            model.eval()
    return used
