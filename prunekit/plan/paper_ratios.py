"""Per-layer pruning settings written the way papers write them.

CHIP and HRank give per-layer ratios as strings like ``[0.]+[0.15]*2+[0.4]*27`` and give
them meaning through their model code (methods.md §1.3, §5.1): CHIP's for its CIFAR ResNets
and for ResNet-50 (torchvision's layout), HRank's one rate per convolution. These functions
parse the strings safely (no ``eval``) and map them onto a ChannelGraph's groups as *kept
channel counts*, using the papers' width formula ``int(width * (1 - r))`` (a floor of the kept
count; prunekit's own ratios floor the *removed* count instead).
"""
from __future__ import annotations

import re
import warnings

from torch import nn

from ..graph import ChannelGraph
from .checks import PlanError, check_ratio

_TERM = re.compile(r"\s*\[\s*([^\[\]]*?)\s*\]\s*(?:\*\s*(\d+))?\s*")


def parse_ratio_list(text: str) -> list[float]:
    """``"[0.]+[0.15]*2+[0.4]*27"`` -> 30 floats; each in [0, 1)."""
    if not isinstance(text, str) or not text.strip():
        raise PlanError(f"expected a ratio list such as '[0.]+[0.15]*2+[0.4]*27', got {text!r}")
    values: list[float] = []
    for part in text.split("+"):
        match = _TERM.fullmatch(part)
        if not match:
            raise PlanError(f"cannot parse '{part.strip()}' in {text!r}: each term must look "
                            "like [0.4] or [0.4]*27 or [0.1, 0.2]")
        items = [float(v) for v in match.group(1).split(",") if v.strip()]
        values.extend(items * int(match.group(2) or 1))
    return [check_ratio(v, f"ratio {v} in {text!r}") for v in values]


def _kept(width: int, ratio: float) -> int:
    return max(1, int(width * (1 - ratio)))


def _count_for(graph: ChannelGraph, module: str, ratio: float, counts: dict[str, int]) -> None:
    group = graph.group(module)
    width = max(len(pos) for m, pos in group.producers() if m.module == module)
    keep = _kept(width, ratio)
    if group.size != width:
        keep = group.size - (width - keep)  # a wider group loses the same channels
    previous = counts.get(group.name)
    if previous is not None and previous != keep:
        warnings.warn(f"group '{group.name}' gets conflicting widths ({previous} and {keep}); "
                      "keeping the first")
        return
    counts[group.name] = keep


def _has_conv(module: nn.Module, attr: str) -> bool:
    return isinstance(getattr(module, attr, None), nn.Conv2d)


def _resnet_layout(model: nn.Module) -> tuple[str, list[str]]:
    """``("basic" | "bottleneck", block names)`` for a ResNet laid out as CHIP's models are
    (stem ``conv1``, blocks ``layer<s>.<b>``); PlanError for anything else."""
    blocks = {name: m for name, m in model.named_modules() if re.fullmatch(r"layer\d\.\d+", name)}
    stages = sorted({name.split(".")[0] for name in blocks})
    convs = [(_has_conv(m, "conv1") and _has_conv(m, "conv2"), _has_conv(m, "conv3"))
             for m in blocks.values()]
    if blocks and _has_conv(model, "conv1") and all(two for two, _ in convs):
        if not any(three for _, three in convs) and stages == ["layer1", "layer2", "layer3"]:
            return "basic", list(blocks)
        if all(three for _, three in convs) and stages == [f"layer{s}" for s in (1, 2, 3, 4)]:
            return "bottleneck", list(blocks)
    found = (f"{len(blocks)} blocks in stages {', '.join(stages)}" if blocks
             else "no layer<s>.<b> blocks")
    raise PlanError(f"a CHIP sparsity string is defined for CHIP's ResNets only: a CIFAR "
                    f"ResNet (stem conv1, 3 stages of blocks with conv1/conv2) or a ResNet-50-"
                    f"style network (stem conv1, 4 stages of bottlenecks with conv1/conv2/conv3, "
                    f"as torchvision's resnet50); {type(model).__name__} has {found}. Use a "
                    f"ratio, ratios, macs_reduction or counts target for other models")


def _stem_count(graph: ChannelGraph, ratio: float, first_stream: str, stage1: float,
                counts: dict[str, int], hint: str) -> None:
    if graph.group("conv1") is not graph.group(first_stream):
        _count_for(graph, "conv1", ratio, counts)
    elif ratio not in (0.0, stage1):
        warnings.warn(f"the stem shares its channels with stage 1's stream here{hint}; the "
                      "stem ratio is replaced by the stage-1 ratio")


def chip_resnet_counts(graph: ChannelGraph, model: nn.Module, sparsity) -> dict[str, int]:
    """CHIP's ResNet ``--sparsity`` (methods.md §1.3), read the way CHIP's ``adapt_channel``
    reads it for the model's layout; kept counts are ``int(width * (1 - r))``.

    * CIFAR ResNet (BasicBlocks, 3 stages; ``3 + n_blocks`` ratios): [stem] + [stage-1 and
      stage-2 output streams] + [one ratio per block for conv1's output]; stage 3's stream is
      never pruned. The stem feeds stage 1's stream through an identity shortcut, so by default
      prunekit gives them one width: the stage-1 ratio. The CHIP code keeps the stem at full
      width and crops it in the first block's shortcut, discarding stem channels; a model built
      with ``chip_stem_crop=True`` reproduces that architecture exactly (and its MACs).
    * ResNet-50 layout (Bottlenecks, 4 stages, e.g. torchvision's resnet50; ``4 + n_blocks``
      ratios, 20 for ResNet-50): [stem] + [stage-1..3 output streams: every conv3 and the
      downsample of the stage] + [one ratio per bottleneck, applied to both conv1's and conv2's
      outputs]; stage 4's stream (the classifier's input) is never pruned. The stem is its own
      group there (layer1.0 has a downsample). CHIP writes the mid width as
      ``int(planes//4 * (1 - r))`` of the stage width, which is conv1's width in a ResNet-50;
      prunekit takes conv1's actual width (the same number).
    """
    ratios = parse_ratio_list(sparsity) if isinstance(sparsity, str) else list(sparsity)
    layout, blocks = _resnet_layout(model)
    streams = 2 if layout == "basic" else 3
    if len(ratios) != 1 + streams + len(blocks):
        raise PlanError(f"a CHIP sparsity for this ResNet ({len(blocks)} {layout} blocks: the "
                        f"stem, {streams} stage outputs, one ratio per block) needs "
                        f"{1 + streams} + {len(blocks)} = {1 + streams + len(blocks)} ratios, "
                        f"got {len(ratios)}")
    counts: dict[str, int] = {}
    out_conv = "conv2" if layout == "basic" else "conv3"
    hint = " (build the model with chip_stem_crop=True to separate them)" \
        if layout == "basic" else ""
    _stem_count(graph, ratios[0], f"layer1.0.{out_conv}", ratios[1], counts, hint)
    for stage in range(1, streams + 1):
        _count_for(graph, f"layer{stage}.0.{out_conv}", ratios[stage], counts)
    mids = ("conv1",) if layout == "basic" else ("conv1", "conv2")
    for block, ratio in zip(blocks, ratios[1 + streams:]):
        for conv in mids:
            _count_for(graph, f"{block}.{conv}", ratio, counts)
    return {name: keep for name, keep in counts.items() if keep < graph.by_name[name].size}


def conv_rate_counts(graph: ChannelGraph, model: nn.Module, rates) -> dict[str, int]:
    """HRank-style list: one ratio per convolution in definition order (55 for ResNet-56, 13
    for VGG-16, 53 for ResNet-50: its 4 downsample convolutions included, as in HRank's list;
    a CIFAR option-B ``shortcut.0`` is not counted). A group produced by several convolutions
    (a residual stream) takes the ratio of its first convolution in the list; conflicting
    ratios are reported."""
    ratios = parse_ratio_list(rates) if isinstance(rates, str) else list(rates)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and not name.endswith("shortcut.0")]
    if len(ratios) != len(convs):
        raise PlanError(f"expected one ratio per convolution ({len(convs)}), got {len(ratios)}")
    counts: dict[str, int] = {}
    for name, ratio in zip(convs, ratios):
        group = graph.group(name)
        if group.prunable and ratio > 0:
            _count_for(graph, name, ratio, counts)
    return {name: keep for name, keep in counts.items() if keep < graph.by_name[name].size}
