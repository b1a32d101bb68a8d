"""Per-layer pruning settings written the way papers write them.

CHIP and HRank give per-layer ratios as strings like ``[0.]+[0.15]*2+[0.4]*27`` and give them
meaning through their model code (methods.md §1.3, §5.1). These functions parse the strings
safely (no ``eval``) and map them onto a ChannelGraph's groups as *kept channel counts*, using
the papers' width formula ``int(width * (1 - r))`` (a floor of the kept count; prunekit's own
ratios floor the *removed* count instead).
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


def chip_resnet_counts(graph: ChannelGraph, model: nn.Module, sparsity) -> dict[str, int]:
    """CHIP's CIFAR ResNet ``--sparsity`` (methods.md §1.3): [stem] + [stage-1 and stage-2
    output streams] + [one ratio per block for conv1's output]; stage 3's stream is never
    pruned.

    The stem feeds stage 1's stream through an identity shortcut, so by default prunekit gives
    them one width: the stage-1 ratio. The CHIP code keeps the stem at full width and crops it
    in the first block's shortcut, discarding stem channels; a model built with
    ``chip_stem_crop=True`` reproduces that architecture exactly (and its MACs).
    """
    ratios = parse_ratio_list(sparsity) if isinstance(sparsity, str) else list(sparsity)
    blocks = [name for name, _ in model.named_modules() if re.fullmatch(r"layer\d\.\d+", name)]
    if len(ratios) != 3 + len(blocks):
        raise PlanError(f"a CHIP sparsity for this ResNet needs 3 + {len(blocks)} = "
                        f"{3 + len(blocks)} ratios, got {len(ratios)}")
    counts: dict[str, int] = {}
    separate_stem = graph.group("conv1") is not graph.group("layer1.0.conv2")
    if separate_stem:
        _count_for(graph, "conv1", ratios[0], counts)
    elif ratios[0] not in (0.0, ratios[1]):
        warnings.warn("the stem shares its channels with stage 1's stream here (build the "
                      "model with chip_stem_crop=True to separate them); the stem ratio is "
                      "replaced by the stage-1 ratio")
    _count_for(graph, "layer1.0.conv2", ratios[1], counts)
    _count_for(graph, "layer2.0.conv2", ratios[2], counts)
    for block, ratio in zip(blocks, ratios[3:]):
        _count_for(graph, f"{block}.conv1", ratio, counts)
    return {name: keep for name, keep in counts.items() if keep < graph.by_name[name].size}


def conv_rate_counts(graph: ChannelGraph, model: nn.Module, rates) -> dict[str, int]:
    """HRank-style list: one ratio per convolution in definition order (55 for ResNet-56, 13
    for VGG-16). A group produced by several convolutions (a residual stream) takes the ratio
    of its first convolution in the list; conflicting ratios are reported."""
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
