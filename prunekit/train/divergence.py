"""Stopping a training that diverged: :class:`DivergenceError`, and the checks
:func:`~prunekit.train.fit` makes so that NaN/inf never reach a checkpoint or a report.

The loss is checked at every step, before the backward pass (one scalar, so cheap), and the
parameters and buffers at the end of every epoch, before anything of that epoch is written.
Under DDP every check ends in an all-reduce of a flag, so all ranks stop at the same step
instead of one raising while the others wait for it in the next collective. A GradScaler
skipping an fp16 step with inf gradients is normal and not checked here: only the fp32 loss
and the weights are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import PrunekitError
from ..measure.evaluation import first_nonfinite
from .distributed import _Distributed

__all__ = ["DivergenceError"]


class DivergenceError(PrunekitError, RuntimeError):
    """Training produced a non-finite loss or non-finite weights; nothing of the failing
    epoch was written, and the checkpoint of the last good epoch was kept."""


class _NonFinite(Exception):
    """Raised inside an epoch; :func:`fit` turns it into a :class:`DivergenceError` that
    names the epoch and the checkpoint kept. ``problem`` says what was not finite."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def _all_ranks_agree(bad: bool, ddp: _Distributed, device: torch.device) -> int:
    """The number of ranks that found a problem (this rank's ``bad`` when not distributed)."""
    if not ddp.enabled:
        return int(bad)
    flag = torch.tensor([int(bad)], dtype=torch.int32, device=device)
    dist.all_reduce(flag)
    return int(flag.item())


def check_loss(loss: torch.Tensor, extra: torch.Tensor | None, total: torch.Tensor,
               model: nn.Module, ddp: _Distributed, device: torch.device, where: str) -> None:
    """Raise :class:`_NonFinite` on every rank when ``total`` is not finite on any rank."""
    bad = not bool(torch.isfinite(total.detach()).all())
    ranks = _all_ranks_agree(bad, ddp, device)
    if not ranks:
        return
    if bad:
        parts = f"the loss is {float(total.detach()):.4g}"
        if extra is not None:
            parts += (f" (cross-entropy {float(loss.detach()):.4g}, the hooks' extra loss "
                      f"{float(extra.detach()):.4g})")
    else:
        parts = f"the loss is not finite on {ranks} of {ddp.world_size} processes"
    weights = first_nonfinite(model)
    if weights is not None:
        parts += (f"; the weights were already non-finite before this step "
                  f"('{weights[0]}' holds {weights[1]} NaN/inf value(s))")
    raise _NonFinite(f"{where}: {parts}")


def check_weights(model: nn.Module, ddp: _Distributed, device: torch.device, where: str) -> None:
    """Raise :class:`_NonFinite` on every rank when a parameter or buffer of ``model`` holds
    NaN/inf on any rank, naming the first such tensor."""
    found = first_nonfinite(model)
    ranks = _all_ranks_agree(found is not None, ddp, device)
    if not ranks:
        return
    if found is None:
        raise _NonFinite(f"{where}: the weights are not finite on {ranks} of "
                         f"{ddp.world_size} processes")
    name, count = found
    raise _NonFinite(f"{where}: the model's tensor '{name}' holds {count} NaN/inf value(s)")
