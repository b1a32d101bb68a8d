"""The SFP-style target of LFPC: every convolution at one pruning rate, and FLOPs counted the
way the SFP / FPGM / LFPC papers count them.

LFPC (He et al., CVPR 2020) builds on SFP (He et al., IJCAI 2018) and FPGM (He et al., CVPR
2019), whose CIFAR code masks every convolution (the stem, conv_a and conv_b of every block:
``mask_index = range(0, last_index, 3)``, methods.md section 0.3) at the same rate P, and
whose percentages come from ``utils/cifar_resnet_flop.py`` (methods.md section 0.2). That count
is reproduced here for any traced network by one rule:

    paper FLOPs = sum over convolutions c of  MACs_c x f_out(c) x f_in(c)

* ``MACs_c``: the unpruned convolution's multiply-accumulates (prunekit's count of it);
* ``f_out(c)``: the fraction of c's filters kept;
* ``f_in(c)``: the kept fraction of the convolution whose output c reads *directly* (through
  normalisation, activation and other one-input pass-through modules only); 1 when c reads a
  residual sum, a concatenation or the network input.

On a CIFAR ResNet this is the file's rule: the stem ``x keep``, every block's conv_b
``x keep^2``, conv_a ``x keep`` (its input is the unpruned residual stream) except in the very
first block, whose conv_a reads the stem directly (``x keep^2``), and the stage transitions'
"offset" is simply conv_a's real input width. With ``rate`` the fractions are ``1 - rate`` as in
the file (ResNet-56 at 40%: 52.63%, the papers' 52.6%); with ``counts`` they are the kept
counts over the widths. The linear classifier is left out (``include_linear=False``, as in the
file; ResNet-56's adds 640 MACs); ``include_linear=True`` counts linear layers by the same rule
(pooling and flattening pass a pruned input through). Unlike prunekit's physical MACs, the
count treats conv_b's zeroed filters as removed although its output is added to an unpruned
residual stream. That LFPC counts as SFP does is implied (its baselines are FPGM's), not read
in the paper (lfpc.md section 3): LFPC's 52.9% for ResNet-56 matches no round rate by this rule.

Kept counts at a rate (``rounding``): ``"removed"`` (default; SFP / FPGM's code zeroes
``int(N x P)`` filters of each layer, methods.md section 4.1), or ``"kept"``
(``int(N x (1 - P))`` kept, HRank's and CHIP's rule, :func:`prunekit.plan.conv_rate_counts`).
A coupled group (a residual stream) gets the count of its first convolution; prunekit removes
the same channels from all its producers, so it is physically pruned too.
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..graph import ChannelGraph
from ..measure import macs_by_module
from ..plan import conv_rate_counts

__all__ = ["RATE_ROUNDINGS", "paper_flops", "rate_convs", "sfp_rate_counts"]

RATE_ROUNDINGS = ("removed", "kept")
# one-input ops that keep every channel where it is (what a pruned input passes through)
_PASS_THROUGH = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Identity,
                 nn.Dropout, nn.Hardswish, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.MaxPool2d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
_PASS_FUNCTIONS = ("relu", "relu_", "relu6", "leaky_relu", "dropout", "hardswish", "silu",
                   "gelu", "sigmoid", "tanh", "contiguous", "clone", "flatten", "max_pool2d",
                   "avg_pool2d", "adaptive_avg_pool2d")
_LAYERS = (nn.Conv2d, nn.Linear)


def check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
        raise ConfigError(f"conv_rate must be a number in (0, 1), the fraction of every "
                          f"convolution's filters removed (SFP/LFPC: 0.4); got {rate!r}")
    return float(rate)


def rate_convs(model: nn.Module) -> list[str]:
    """The convolutions a rate applies to, in definition order (an option-B ``shortcut.0`` is
    left out, as in :func:`prunekit.plan.conv_rate_counts`)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
            and not name.endswith("shortcut.0")]


def sfp_rate_counts(graph: ChannelGraph, model: nn.Module, rate: float,
                    rounding: str = "removed") -> dict[str, int]:
    """Kept channels per group with every convolution at ``rate`` (see the module doc)."""
    rate = check_rate(rate)
    if rounding not in RATE_ROUNDINGS:
        raise ConfigError(f"conv_rate_rounding must be one of {', '.join(RATE_ROUNDINGS)}, got "
                          f"{rounding!r}")
    convs = rate_convs(model)
    if rounding == "kept":
        return conv_rate_counts(graph, model, [rate] * len(convs))
    counts: dict[str, int] = {}
    for name in convs:
        group = next((g for g in graph.groups
                      if any(m.module == name for m, _ in g.producers())), None)
        if group is None or not group.prunable or group.name in counts:
            continue
        width = max(len(pos) for m, pos in group.producers() if m.module == name)
        removed = min(int(width * rate + 1e-9), width - 1)
        counts[group.name] = max(group.size - removed, int(group.fixed.sum()))
    return {name: keep for name, keep in counts.items() if keep < graph.by_name[name].size}


def _direct_producers(graph: ChannelGraph, model: nn.Module) -> dict[str, str | None]:
    """conv / linear -> the conv or linear whose output it reads through pass-through ops only
    (None: a residual sum, a concatenation, the input)."""
    modules = dict(model.named_modules())
    nodes = list(graph.traced.graph.nodes)
    convs = {n.name: str(n.target) for n in nodes if n.op == "call_module"
             and isinstance(modules.get(str(n.target)), _LAYERS)}
    out = {}
    for node in nodes:
        if node.name not in convs:
            continue
        source = node.args[0] if node.args else None
        while source is not None and source.name not in convs:
            one_input = isinstance(source.args, tuple) and len(source.args) >= 1
            passes = (source.op == "call_module"
                      and isinstance(modules.get(str(source.target)), _PASS_THROUGH)) or (
                source.op in ("call_function", "call_method")
                and getattr(source.target, "__name__", str(source.target)) in _PASS_FUNCTIONS)
            source = source.args[0] if passes and one_input else None
        out[convs[node.name]] = convs[source.name] if source is not None else None
    return out


def paper_flops(graph: ChannelGraph, model: nn.Module, example_inputs, *,
                counts: dict[str, int] | None = None, rate: float | None = None,
                include_linear: bool = False) -> dict:
    """``{"baseline", "pruned", "reduction", "rule"}``: the SFP/LFPC papers' FLOPs (MACs) of
    ``model`` (unpruned) pruned by ``counts`` (kept per group) or at ``rate`` (module doc)."""
    if (counts is None) == (rate is None):
        raise ConfigError("paper_flops needs counts (kept channels per group) or rate, not both")
    per_module = macs_by_module(model, example_inputs)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _LAYERS)}
    keep = {}
    for name, module in layers.items():
        try:
            group = graph.group(name)
        except KeyError:  # a layer the trace never reached (e.g. a training-only head)
            keep[name] = 1.0
            continue
        if rate is not None:
            keep[name] = 1 - check_rate(rate) if group.prunable else 1.0
            continue
        width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        kept = counts.get(group.name, group.size)
        keep[name] = max(width - (group.size - kept), 0) / width
    reads = _direct_producers(graph, model)
    baseline = pruned = 0.0
    for name, module in layers.items():
        if isinstance(module, nn.Linear) and not include_linear:
            continue
        macs = per_module.get(name, 0)
        source = reads.get(name)
        baseline += macs
        pruned += macs * keep[name] * (keep[source] if source else 1.0)
    return {"baseline": int(baseline), "pruned": float(pruned),
            "reduction": 1 - pruned / baseline if baseline else 0.0,
            "rule": "SFP/FPGM utils/cifar_resnet_flop.py: conv MACs x kept-out fraction x "
                    "kept-in fraction of the layer read directly (1 after a residual sum)"
                    + ("; linear layers counted the same way" if include_linear else
                       "; linear layers not counted")}
