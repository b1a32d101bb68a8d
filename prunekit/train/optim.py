"""The optimiser and learning-rate schedule of :func:`~prunekit.train.fit`: SGD with per-parameter
settings, and a per-iteration schedule (warm-up, then cosine, multistep or constant).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD over the trainable parameters; with ``config.no_decay_bn_bias`` the 1-d ones
    (norm-layer weights and every bias) get no weight decay.

    A parameter may carry its own optimisation settings as attributes (set by the method that
    owns it, e.g. SWP's filter skeleton): ``prunekit_lr_scale`` multiplies ``config.lr`` (the
    schedule still applies) and ``prunekit_weight_decay`` replaces the weight decay. Such
    parameters get their own param groups, in a fixed order, so checkpoints resume.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: dict[tuple, list] = {}
    for p in trainable:
        wd = getattr(p, "prunekit_weight_decay", None)
        if wd is None:
            wd = 0.0 if config.no_decay_bn_bias and p.ndim <= 1 else config.weight_decay
        groups.setdefault((float(getattr(p, "prunekit_lr_scale", 1.0)), float(wd)), []).append(p)
    # the plain group first (its lr is the one logged), then the no-decay one, as before
    # per-parameter settings existed, so older checkpoints resume; then the special ones
    order = sorted(groups, key=lambda key: (key[0] != 1.0, key[1] != config.weight_decay))
    return torch.optim.SGD([{"params": groups[key], "lr": config.lr * key[0],
                             "weight_decay": key[1]} for key in order],
                           lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay)


def _lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``config.lr`` for iteration ``step`` (0-based, counted over all epochs)."""
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return step / warmup_steps
    if config.schedule == "cosine":
        decay_steps = max(config.epochs * steps_per_epoch - warmup_steps, 1)
        progress = min((step - warmup_steps) / decay_steps, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "multistep":
        epoch = step // steps_per_epoch
        return config.gamma ** sum(epoch >= milestone for milestone in config.milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration :class:`~torch.optim.lr_scheduler.LambdaLR` implementing ``config.schedule``
    (call ``scheduler.step()`` after every optimizer step)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, config, steps_per_epoch))
