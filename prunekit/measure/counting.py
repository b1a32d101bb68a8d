"""Counting the cost of a model: MACs (the "FLOPs" of papers) and parameters.

Counting conventions (read this before comparing numbers with papers):

* **MACs** (multiply-accumulates) are what the pruning literature calls "FLOPs".
  The ResNet paper and almost every pruning paper (SFP, FPGM, HRank, CHIP, ...)
  report MACs under that name, e.g. CIFAR ResNet-56 = "125.49M FLOPs".
* ``include="conv+linear"`` (default) counts convolutions and the matmul family
  (``nn.Linear``, ``matmul``, ``bmm``, ...) via
  :class:`torch.utils.flop_counter.FlopCounterMode`, which reports FLOPs = 2 x MACs;
  we halve it. Bias additions, BN, activations, pooling and residual adds count 0.
* ``include="thop"`` additionally adds 2 x (number of output elements) for every
  BatchNorm layer, which is what the thop versions used by CHIP counted. Use it
  only to reproduce CHIP-style numbers, and always compare against a baseline
  counted the same way. Activations and pooling are not added (thop's share for
  them is < 0.01% on CIFAR ResNets).
* Counts are for the whole ``example_inputs`` batch and are not normalised:
  pass a batch of 1 to get the per-image number papers report.
* Parameters are unique ``nn.Parameter`` objects (shared/tied ones once),
  including BN affine weights, excluding buffers (BN running statistics).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .context import ExampleInputs, eval_mode, prepare_inputs

__all__ = ["MAC_CONVENTIONS", "count_macs", "count_params", "macs_by_module", "profile"]

MAC_CONVENTIONS = ("conv+linear", "thop")


def _check_convention(include: str) -> None:
    if include not in MAC_CONVENTIONS:
        raise ValueError(f"include must be one of {MAC_CONVENTIONS}, got {include!r}")


@dataclass
class _MacCounts:
    """Result of one counting pass; per-module dicts are keyed by ``named_modules()`` names."""

    conv_linear: int
    bn_extra: int
    conv_linear_by_module: dict[str, int]
    bn_extra_by_module: dict[str, int]


def _count(model: nn.Module, example_inputs: ExampleInputs) -> _MacCounts:
    """Run one forward pass, counting conv/matmul MACs and BN output elements per module."""
    inputs = prepare_inputs(model, example_inputs)
    counter = FlopCounterMode(display=False)
    flops_by_module: dict[str, int] = defaultdict(int)
    bn_extra_by_module: dict[str, int] = defaultdict(int)
    # Stack of [name, global FLOPs at entry, FLOPs of already-finished children] so each
    # module is credited only with the ops executed directly in its own forward.
    stack: list[list[Any]] = []

    def pre_hook(name: str):
        def hook(module, args):
            stack.append([name, counter.get_total_flops(), 0])
        return hook

    def post_hook(name: str):
        def hook(module, args, output):
            entry_name, start, children = stack.pop()
            inclusive = counter.get_total_flops() - start
            flops_by_module[entry_name] += inclusive - children
            if stack:
                stack[-1][2] += inclusive
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(output, torch.Tensor):
                bn_extra_by_module[entry_name] += 2 * output.numel()
        return hook

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        handles.append(module.register_forward_hook(post_hook(name)))
    try:
        with eval_mode(model), torch.no_grad(), counter:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    # FlopCounterMode counts a multiply-add as 2 FLOPs, so every entry is even.
    return _MacCounts(
        conv_linear=counter.get_total_flops() // 2,
        bn_extra=sum(bn_extra_by_module.values()),
        conv_linear_by_module={name: flops // 2 for name, flops in flops_by_module.items()},
        bn_extra_by_module=dict(bn_extra_by_module),
    )


def count_macs(model: nn.Module, example_inputs: ExampleInputs, *, include: str = "conv+linear") -> int:
    """MACs of one forward pass over ``example_inputs`` (a tensor, tuple of tensors, or a shape).

    ``include="conv+linear"`` counts conv and matmul-family ops (the "FLOPs" of papers);
    ``include="thop"`` also adds 2 x output elements of every BatchNorm, as CHIP's thop did.
    The count covers the whole batch; pass batch size 1 for per-image numbers. The model is
    run in eval mode under ``no_grad`` and its training flags are restored afterwards.
    """
    _check_convention(include)
    counts = _count(model, example_inputs)
    return counts.conv_linear + (counts.bn_extra if include == "thop" else 0)


def macs_by_module(
    model: nn.Module, example_inputs: ExampleInputs, *, include: str = "conv+linear"
) -> dict[str, int]:
    """MACs per module name (as in ``model.named_modules()``, root = ``""``), for reports.

    Each module gets the MACs executed directly in its own forward, not in its children,
    so for ordinary CNNs the entries are the conv/linear leaves and the values sum to
    :func:`count_macs`. Modules with zero MACs are omitted.
    """
    _check_convention(include)
    counts = _count(model, example_inputs)
    result = dict(counts.conv_linear_by_module)
    if include == "thop":
        for name, macs in counts.bn_extra_by_module.items():
            result[name] = result.get(name, 0) + macs
    return {name: macs for name, macs in result.items() if macs}


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of unique parameters (tied ones counted once); buffers are excluded."""
    # model.parameters() already de-duplicates by identity, which handles weight tying.
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def profile(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, int]:
    """``{"macs", "macs_thop", "params"}`` from a single forward pass."""
    counts = _count(model, example_inputs)
    return {
        "macs": counts.conv_linear,
        "macs_thop": counts.conv_linear + counts.bn_extra,
        "params": count_params(model),
    }
