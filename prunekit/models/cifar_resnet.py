"""CIFAR ResNet-(6n+2) from He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016, section 4.2.

A 3x3 stem with 16 channels, three stages of ``n`` basic blocks with 16/32/64 channels
(stride 2 at the start of stages 2 and 3), global average pooling and a linear classifier.
Module names follow the widely shared akamaster/CHIP/HRank layout (``conv1``, ``bn1``,
``layer1..3``, ``linear``) so their checkpoints load without renaming.

The pruning literature disagrees on the shortcut used when a block changes shape, and the
choice changes both accuracy and what may be pruned, so it is a constructor argument:

* ``"A"``: parameter-free; subsample ``x[:, :, ::2, ::2]`` and zero-pad the new channels
  split between front and back (akamaster, CHIP, HRank; the shared pretrained weights).
* ``"A_append"``: the same but the zero channels are appended at the end (FPGM/SFP's
  ``DownsampleA``: stride-2 pooling then ``torch.cat((x, x.mul(0)), 1)``).
* ``"B"``: 1x1 strided convolution + BN projection (SWP/PFF), as ``shortcut.0``/``shortcut.1``.

Every shortcut is a module with straight-line tensor code so that ``torch.fx.symbolic_trace``
works on the whole network, and every activation is a named ``nn.ReLU`` (``relu`` in the stem,
``relu1``/``relu2`` per block) because activation-based criteria (CHIP, HRank) hook exactly
"after BN+ReLU of conv1" and "block output after the residual add".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..graph import register_module_rule
from ..graph.channels import channel_ids
from ..nn.registry import (MAX_EXTENT, MAX_SIZE, flag, integer, optional,
                           register_structural_attributes)
from .registry import check_positive_int, register_model
from .weights import PretrainedWeights

__all__ = [
    "INITS",
    "SHORTCUTS",
    "BasicBlock",
    "CifarResNet",
    "ZeroPadShortcut",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
]

SHORTCUTS = ("A", "A_append", "B")
INITS = ("kaiming", "swp")
STAGE_WIDTHS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling plus zero channels, no parameters.

    Input channel ``i`` lands on output channel ``positions[i]``; every other output channel is
    zero. Unpruned, the positions are contiguous: ``front = (out - in) // 2`` zero channels
    before the input (akamaster/CHIP layout) or all of them after it (``append=True``,
    FPGM/SFP), computed with one ``F.pad``. After pruning the positions may have gaps, and the
    input is scattered into place instead.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *,
                 append: bool = False, positions: Sequence[int] | None = None,
                 lossy: bool = False):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                "a zero-padding shortcut cannot reduce channels "
                f"({in_channels} -> {out_channels}); use shortcut='B' for a projection"
            )
        front = 0 if append else (out_channels - in_channels) // 2
        self.stride = stride
        # lossy=True reproduces CHIP's cropping shortcut: pruning may drop an input channel
        # from the shortcut (position -1) while the layer before keeps it. The pruned network
        # then computes something else than the masked one; only recipes that reproduce CHIP
        # ask for it.
        self.lossy = lossy
        self.set_positions(list(range(front, front + in_channels)) if positions is None
                           else [int(p) for p in positions], out_channels)

    def set_positions(self, positions: list[int], out_channels: int) -> None:
        carried = [p for p in positions if p >= 0]
        if len(set(carried)) != len(carried) or any(p >= out_channels for p in carried) or \
                (len(carried) < len(positions) and not self.lossy):
            raise ValueError(f"shortcut positions must be distinct, in [0, {out_channels}) "
                             f"(or -1 for a dropped input if lossy); got {positions}")
        self.positions = list(positions)
        self.in_channels = len(positions)
        self.out_channels = out_channels
        first = carried[0] if carried else 0
        contiguous = carried == list(range(first, first + len(carried)))
        # Contiguous positions are a plain pad; gaps need a scatter (kept as a buffer so it
        # follows .to(device) and exports to ONNX as ScatterND).
        self.front = first if contiguous else None
        self.back = out_channels - first - len(carried) if contiguous else None
        dropped = len(carried) < len(positions)
        self.register_buffer("carry_index", torch.tensor(
            [i for i, p in enumerate(positions) if p >= 0], dtype=torch.long) if dropped else None,
            persistent=False)
        self.register_buffer("scatter_index", None if contiguous else
                             torch.tensor(carried, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:  # a Python int, so fx traces this branch away
            x = x[:, :, :: self.stride, :: self.stride]
        if self.carry_index is not None:
            x = x.index_select(1, self.carry_index)
        if self.scatter_index is None:
            return F.pad(x, (0, 0, 0, 0, self.front, self.back))
        out = x.new_zeros((x.shape[0], self.out_channels, x.shape[2], x.shape[3]))
        return out.index_copy(1, self.scatter_index, x)

    def prunekit_apply_kept(self, kept: dict[str, np.ndarray]) -> None:
        """Surgery callback: ``kept["in"]``/``kept["out"]`` are the kept input/output channel
        indices; each kept input keeps its slot (the channel rule guarantees the slot stays
        unless the shortcut is lossy, where a removed slot drops the input: -1)."""
        slot = {int(p): j for j, p in enumerate(kept["out"])}
        self.set_positions([slot.get(self.positions[int(i)], -1) for i in kept["in"]],
                           len(kept["out"]))

    def extra_repr(self) -> str:
        where = (f"front={self.front}, back={self.back}" if self.scatter_index is None
                 else f"positions={self.positions}")
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, {where}"


@register_module_rule(ZeroPadShortcut)
def zero_pad_shortcut_channels(ctx, node, module: ZeroPadShortcut):
    """Channel rule: the output channels are channels of their own, not the input's.

    The offsets are *mapped*, not protected. Output slot ``positions[i]`` carries input ``i``
    through the residual add, so removing that slot requires removing input ``i`` (else its
    values would be lost); removing input ``i`` alone is fine: its slot then receives zeros.
    Stages therefore prune independently (CHIP prunes each stage's stream at its own ratio),
    and the shortcut rebuilds its positions from whatever both sides keep.
    """
    x = node.args[0]
    vec = ctx.channel_vector(ctx.ids(x), 1, module.in_channels)
    out = ctx.new_vars(module.out_channels)
    for i, p in enumerate(module.positions):
        if p >= 0 and not module.lossy:
            ctx.requires(out[p], vec[i])
    ctx.attr_member(node.target, "in", vec)
    ctx.attr_member(node.target, "out", out)
    return channel_ids(out, ctx.value(x).dim(), 1)


def _restore_zero_pad_shortcut(module: nn.Module, attrs: dict[str, Any]) -> None:
    # set_positions also rebuilds front/back and the non-persistent scatter index buffer,
    # which no state dict carries.
    for attr in ("stride", "lossy"):  # before set_positions, which reads lossy
        if attr in attrs:
            setattr(module, attr, attrs[attr])
    if "positions" in attrs and hasattr(module, "set_positions"):
        module.set_positions([int(p) for p in attrs["positions"]], int(attrs["out_channels"]))
    else:
        for attr, value in attrs.items():
            setattr(module, attr, value)


# Pruning rewrites these, so saved specs record them and prunekit.io.load restores them.
def _positions(value: Any) -> list[int]:
    if not (isinstance(value, list) and len(value) <= MAX_SIZE and all(
            isinstance(p, int) and not isinstance(p, bool) and -1 <= p < MAX_SIZE
            for p in value)):
        raise ValueError(f"must be a list of channel positions (integers >= -1), got "
                         f"{str(value)[:80]}")
    return value


# Each value is checked before it is set (a file is untrusted input; a huge width would be
# allocated at the first forward); set_positions then checks the positions against the width.
register_structural_attributes(
    ZeroPadShortcut, {"positions": _positions, "front": optional(integer(0)),
                      "back": optional(integer(0)), "in_channels": integer(1),
                      "out_channels": integer(1), "stride": integer(1, MAX_EXTENT),
                      "lossy": flag},
    restore=_restore_zero_pad_shortcut)


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The shortcut branch of a block; identity unless the block changes shape."""
    _check_shortcut(kind)
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "B":
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    return ZeroPadShortcut(in_channels, out_channels, stride, append=kind == "A_append")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    ``mid_channels`` (conv1's output) differs from ``out_channels`` only after pruning.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, section 4.2).

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        num_classes: size of the linear classifier.
        shortcut: one of :data:`SHORTCUTS` (see the module docstring).
        mid_channels: per block, the width of conv1's output (3n values); ``None`` = the
            standard 16/32/64.  Pruned networks are rebuilt from these.
        out_channels: the stem's output width followed by every block's output width
            (3n + 1 values); ``None`` = standard.
        chip_stem_crop: give the first block a lossy channel-mapping shortcut so that the
            stem and stage 1's stream can be pruned to different widths, as CHIP's code does
            (a reproduction option; it changes what the pruned network computes).
        init: ``"kaiming"`` (default: conv kaiming-normal fan_out, BN weight 1, PyTorch's
            Linear init) or ``"swp"``, the from-scratch init of SWP's reference code
            (fxmeng/Pruning-Filter-in-Filter ``models/stripe.py``): PyTorch's default conv init,
            every BN weight 0.5 (bias 0), Linear weight N(0, 0.01) (bias PyTorch's default).
    """

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A",
                 mid_channels: Sequence[int] | None = None,
                 out_channels: Sequence[int] | None = None, chip_stem_crop: bool = False,
                 init: str = "kaiming"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid options: {', '.join(INITS)}")
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, ...), got {depth}"
            )
        _check_shortcut(shortcut)
        check_positive_int(num_classes, "num_classes", f"cifar_resnet{depth}")
        n = (depth - 2) // 6
        default_mid, default_out = _standard_widths(n)
        mid = _widths("mid_channels", mid_channels, default_mid)
        out = _widths("out_channels", out_channels, default_out)
        self.depth = depth
        self.shortcut_type = shortcut

        self.conv1 = nn.Conv2d(3, out[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out[0])
        self.relu = nn.ReLU()
        block = 0
        for stage, stride in enumerate(STAGE_STRIDES):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(out[block], mid[block], out[block + 1],
                                         stride if i == 0 else 1, shortcut))
                block += 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        if chip_stem_crop:
            # CHIP's CIFAR code prunes the stem and stage 1's stream to different widths and
            # crops the stem's output in the first block's shortcut (methods.md 1.6, pitfall 3).
            if shortcut == "B":
                raise ValueError("chip_stem_crop needs a zero-padding shortcut ('A')")
            self.layer1[0].shortcut = ZeroPadShortcut(out[0], out[1], 1, lossy=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out[-1], num_classes)
        self._init_weights(init)

    def _init_weights(self, init: str = "kaiming") -> None:
        for m in self.modules():
            if init == "swp":  # the modules' own init is PyTorch's default
                if isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 0.5)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.Conv2d):
                # fan_out as torchvision's ResNet; akamaster used fan_in. Either keeps the
                # activations' scale stable; it only matters when training from scratch.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.linear(x)

    def blocks(self) -> list[BasicBlock]:
        """All basic blocks in forward order."""
        return [b for layer in (self.layer1, self.layer2, self.layer3) for b in layer]

    def channel_config(self) -> dict[str, list[int] | None]:
        """Constructor widths read back from the (possibly pruned) modules.

        Reads the weight tensors rather than ``out_channels`` attributes because pruning code
        may replace a tensor without updating the attribute.
        """
        blocks = self.blocks()
        mid = [b.conv1.weight.shape[0] for b in blocks]
        out = [self.conv1.weight.shape[0]] + [b.conv2.weight.shape[0] for b in blocks]
        default_mid, default_out = _standard_widths(len(blocks) // 3)
        return {
            "mid_channels": None if mid == default_mid else mid,
            "out_channels": None if out == default_out else out,
        }


def _check_shortcut(kind: str) -> None:
    if kind not in SHORTCUTS:
        valid = ", ".join(map(repr, SHORTCUTS))
        raise ValueError(f"unknown shortcut {kind!r}; valid options: {valid}")


def _standard_widths(n: int) -> tuple[list[int], list[int]]:
    mid = [w for w in STAGE_WIDTHS for _ in range(n)]
    return mid, [STAGE_WIDTHS[0]] + mid


def _widths(name: str, given: Sequence[int] | None, default: list[int]) -> list[int]:
    if given is None:
        return default
    widths = list(given)
    if len(widths) != len(default) or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(
            f"{name} must be {len(default)} positive ints for this depth, got {given!r}"
        )
    return widths


def _akamaster(filename: str, top1: float) -> PretrainedWeights:
    return PretrainedWeights(
        filename=filename,
        folder="akamaster_resnet_cifar10",
        # Trained with the option-A shortcut, 10 classes and standard widths; anything
        # else would not fit (or, for A_append, would silently mis-route the shortcut).
        requires={"num_classes": 10, "shortcut": "A", "mid_channels": None, "out_channels": None},
        top1=top1,
        source="github.com/akamaster/pytorch_resnet_cifar10 (BSD-2-Clause, Y. Idelbayev)",
    )


# top1: the upstream README's CIFAR-10 test accuracy (%); inputs use ImageNet mean/std.
@register_model(pretrained=_akamaster("resnet20-*.th", 91.73))
def cifar_resnet20(num_classes: int = 10, shortcut: str = "A", **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016, section 4.2): n=3, 0.27M parameters."""
    return CifarResNet(20, num_classes=num_classes, shortcut=shortcut, **kwargs)


@register_model(pretrained=_akamaster("resnet32-*.th", 92.63))
def cifar_resnet32(num_classes: int = 10, shortcut: str = "A", **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016, section 4.2): n=5, 0.46M parameters."""
    return CifarResNet(32, num_classes=num_classes, shortcut=shortcut, **kwargs)


@register_model(pretrained=_akamaster("resnet44-*.th", 93.10))
def cifar_resnet44(num_classes: int = 10, shortcut: str = "A", **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR (He et al. 2016, section 4.2): n=7, 0.66M parameters."""
    return CifarResNet(44, num_classes=num_classes, shortcut=shortcut, **kwargs)


@register_model(pretrained=_akamaster("resnet56-*.th", 93.39))
def cifar_resnet56(num_classes: int = 10, shortcut: str = "A", **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016, section 4.2): n=9, 0.85M parameters, 125.49M MACs."""
    return CifarResNet(56, num_classes=num_classes, shortcut=shortcut, **kwargs)


@register_model
def cifar_resnet110(num_classes: int = 10, shortcut: str = "A", **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2016, section 4.2): n=18, 1.73M parameters, 252.89M MACs.

    No shared pretrained weights: the upstream file exceeds the snapshot size limit.
    """
    return CifarResNet(110, num_classes=num_classes, shortcut=shortcut, **kwargs)
