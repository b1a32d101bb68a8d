"""FLOPs as SWP's reference code counts them, so its papers' percentages can be compared.

SWP (Meng et al., NeurIPS 2020; code fxmeng/Pruning-Filter-in-Filter, ``flops.py``, itself from
simochen/model-tools, called with ``multiply_adds=True``) reports FLOPs reductions counted by
forward hooks on leaf modules:

* convolutions: ``2 x k_h x k_w x C_in x C_out x H_out x W_out`` per image, i.e. 2 x MACs (a
  broken stripe conv is a 1x1 conv over ``C_in`` with one output per kept stripe: 2 x its MACs);
  no bias term (its convs have none);
* ``Linear``: ``2 x weight elements + bias elements`` per row;
* ``BatchNorm``: ``2 x input elements``;
* ``ReLU`` *modules*: ``input elements``; its ResNet-56 calls ``F.relu``, which no hook sees, so
  there ReLU counts nothing, while its VGG uses ``nn.ReLU`` modules;
* ``MaxPool2d`` / ``AvgPool2d`` *modules*: ``kernel_size^2 x output elements``; the ResNet's
  ``F.adaptive_avg_pool2d`` counts nothing;
* residual adds and everything functional: nothing.

:func:`reference_flops` counts a prunekit model the same way. prunekit's CIFAR ResNets use
``nn.ReLU`` and ``nn.AdaptiveAvgPool2d`` modules where the reference ResNet calls functions, so
``relu`` defaults to ``False`` (the reference ResNet-56's count); pass ``relu=True`` to count
ReLU modules as the reference's VGG count does. Adaptive pooling is never counted (the reference
hooks only the two fixed-kernel pools). The count covers the whole batch of
``example_inputs``: pass a batch of one for per-image figures, and always compare a pruned
model with its unpruned baseline counted the same way.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .context import ExampleInputs
from .counting import count_macs

__all__ = ["reference_flops"]


def _pool_kernel_area(module: nn.Module) -> int:
    k = module.kernel_size
    if isinstance(k, int):
        return k * k
    return int(k[0]) * int(k[1])


def reference_flops(model: nn.Module, example_inputs: ExampleInputs, *, relu: bool = False,
                    pooling: bool = True) -> int:
    """FLOPs of one forward pass over ``example_inputs`` as SWP's ``flops.py`` counts them.

    ``2 x (conv + matmul MACs) + Linear biases + 2 x BatchNorm input elements``, plus
    ``nn.ReLU`` input elements when ``relu`` and ``kernel_size^2 x`` output elements of
    ``nn.MaxPool2d`` / ``nn.AvgPool2d`` when ``pooling`` (see the module docstring for why
    ``relu`` is off by default). Run in eval mode without gradients; the model's training
    flags are restored.
    """
    extra = {"linear_bias": 0, "bn": 0, "relu": 0, "pool": 0}

    def hook(module, args, output):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        if isinstance(module, nn.Linear):
            if module.bias is not None:
                rows = x.shape[0] if x.dim() == 2 else 1
                extra["linear_bias"] += rows * module.bias.numel()
        elif isinstance(module, _BatchNorm):
            extra["bn"] += 2 * x.numel()
        elif isinstance(module, nn.ReLU):
            extra["relu"] += x.numel()
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and isinstance(output, torch.Tensor):
            extra["pool"] += _pool_kernel_area(module) * output.numel()

    kinds = (nn.Linear, _BatchNorm) + ((nn.ReLU,) if relu else ()) + \
        ((nn.MaxPool2d, nn.AvgPool2d) if pooling else ())
    # The hooks count during count_macs's own forward pass (eval mode, no grad): one pass.
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        macs = count_macs(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return 2 * macs + sum(extra.values())
