"""The two places where SWP in prunekit may differ from SWP's reference code
(fxmeng/Pruning-Filter-in-Filter; Meng et al., "Pruning Filter in Filter", NeurIPS 2020,
arXiv 2009.14410; methods.md 3.1 and 3.4), each a named option of :mod:`prunekit.methods.swp`.

``mask_norms`` -- which norm layers a dead filter (one with no live stripe) zeroes during
training:

* ``"reference"``: only the norm after a conv whose output channels have no other producer
  (a plain chain, not a residual stream). On the CIFAR ResNet that is each block's ``bn1``
  after ``conv1``, exactly what the reference's ``ResNet56.update_skeleton`` masks
  (``BatchNorm.update_mask`` on ``layer*.bn1``); on a VGG (every conv a chain) it is every BN,
  as the reference's ``VGG.update_skeleton``. On other models (e.g. a bottleneck ResNet, for
  which no reference code was released) the same rule is applied; that is a reconstruction.
* ``"all"``: also the norms after convs that write into a residual stream (each block's
  ``bn2``, the stem's ``bn1``). prunekit's addition, not the reference's: a dead filter then
  outputs exactly zero wherever it lands, so a stream channel whose every producer died can be
  removed; with ``"reference"`` such a norm keeps adding its bias (a learnable constant).

``empty_blocks`` -- what replaces a residual block whose conv1 or conv2 lost every stripe:

* ``"exact"``: ``relu(shortcut(x) + c)`` with ``c`` the constant the emptied branch still adds
  (``bn2`` of zeros), so the pruned model computes what the skeleton-masked model did.
* ``"reference"``: the shortcut alone, as the reference's ``ResNet56.prune``
  (``layer.add_module(name, block.downsample)``): the constant and the block's final ReLU are
  dropped. Identical for an identity shortcut when ``c`` is zero (its input is already the
  output of a ReLU); a projection shortcut's ``BN(conv1x1(x))`` then reaches the next block
  un-rectified. This changes what the network computes; the exactness check of
  :func:`~prunekit.methods.swp.swp_prune` then compares against the model right after the
  replacement.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..graph import build_graph
from ..models.cifar_resnet import BasicBlock
from ..nn import ShortcutBlock
from ..utils import set_submodule

__all__ = ["EMPTY_BLOCKS", "MASK_NORMS", "norms_reading", "replace_empty_blocks"]

MASK_NORMS = ("reference", "all")
EMPTY_BLOCKS = ("exact", "reference")


def norms_reading(model: nn.Module, example_inputs, names: Sequence[str],
                  mask_norms: str = "all") -> dict[str, list[str]]:
    """For each conv, the norm layers a dead filter of it zeroes: every norm that normalises
    its output directly (``"all"``), or only those of convs that are the single producer of
    their output channels (``"reference"``)."""
    if mask_norms not in MASK_NORMS:
        raise ValueError(f"mask_norms must be one of {', '.join(map(repr, MASK_NORMS))}, "
                         f"got {mask_norms!r}")
    graph = build_graph(model, example_inputs)
    node_of = {m.module: m.node for m, _ in graph.tensor_members() if m.role == "out"}
    out: dict[str, list[str]] = {name: [] for name in names}
    for m, _ in graph.tensor_members():
        if m.role == "norm" and m.tensor.endswith(".weight"):
            for name in names:
                if node_of.get(name) == m.input_node:
                    out[name].append(m.module)
    if mask_norms == "reference":
        for name in names:
            producers = {m.module for m, _ in graph.group(name).producers()} \
                if out[name] else set()
            if producers != {name}:
                out[name] = []
    return out


def replace_empty_blocks(model: nn.Module, masks: dict[str, torch.Tensor], example_inputs,
                         empty_blocks: str = "exact") -> list[str]:
    """Replace each BasicBlock whose conv1 or conv2 lost every stripe. ``"exact"``: by its
    shortcut plus the branch's constant output, when that output is spatially constant (no
    conv bias feeding a zero-padded conv; otherwise the block stays); ``"reference"``: by its
    shortcut alone (no constant, no ReLU)."""
    if empty_blocks not in EMPTY_BLOCKS:
        raise ValueError(f"empty_blocks must be one of {', '.join(map(repr, EMPTY_BLOCKS))}, "
                         f"got {empty_blocks!r}")
    blocks = {name: b for name, b in model.named_modules() if isinstance(b, BasicBlock)
              and any(not bool(masks.get(f"{name}.{c}", torch.ones(1, dtype=torch.bool)).any())
                      for c in ("conv1", "conv2"))}
    if not blocks:
        return []
    shapes: dict[str, torch.Size] = {}

    def recorder(name):
        def record(module, args):
            shapes.setdefault(name, args[0].shape)  # returns None: the input is unchanged
        return record
    handles = [b.register_forward_pre_hook(recorder(name)) for name, b in blocks.items()]
    try:
        model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    replaced = []
    for name, block in blocks.items():
        channels = block.bn2.weight.shape[0]
        if empty_blocks == "reference":
            constant = torch.zeros(channels, device=block.bn2.weight.device)
            set_submodule(model, name, ShortcutBlock(block.shortcut, constant, relu=False))
            replaced.append(name)
            continue
        zeros = torch.zeros((1, *shapes[name][1:]), device=block.bn2.weight.device)
        branch = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(zeros)))))
        constant = branch[:, :, :1, :1]
        if not torch.equal(branch, constant.expand_as(branch)):
            continue
        set_submodule(model, name, ShortcutBlock(block.shortcut, constant.flatten()))
        replaced.append(name)
    return replaced
