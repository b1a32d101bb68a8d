"""The graph rewrites of :func:`prunekit.deploy`, on a ``torch.fx`` trace of the model copy.

1. **BatchNorm folding** (eval-mode BN is the per-channel affine map
   ``y = (x - mean) / sqrt(var + eps) * gamma + beta``): for a BN whose input is the output of
   a plain ``nn.Conv2d`` (any ``groups``, so grouped and depthwise too) or a StripeConv2d, and
   that output is used by nothing else, ``scale = gamma / sqrt(var + eps)`` multiplies the
   conv's weight per output channel and ``bias' = (bias - mean) * scale + beta`` becomes its
   bias; the BN node is removed. A BN without running statistics (``track_running_stats=
   False``, batch statistics even in eval) is left alone. Only exact ``nn.Conv2d`` is folded
   into: a subclass may transform its weight in ``forward`` (timm's StdConv2d standardises it).
   Likewise only BNs running torch's own forward are folded, plus timm's ``BatchNormAct2d``,
   whose activation (and dropout) stays in the graph in its place; another subclass may
   compute anything.
2. **Identity / dropout removal**: ``nn.Identity`` and ``nn.Dropout*`` modules (identities in
   eval mode) and ``F.dropout`` calls with ``training=False``.
3. **Epilogue fusion** on conv outputs used only once: a following residual add (``+``,
   ``torch.add`` without ``alpha``, ``+=``) of a tensor of the same shape and a following ReLU
   (``nn.ReLU``, ``torch.relu``, ``F.relu``, ``.relu()``) become attributes of a
   :class:`~prunekit.deployment.fused.FusedStripeConv2d` (applied by the C kernel as it writes
   its outputs) or, for a dense ``nn.Conv2d``, of a
   :class:`~prunekit.deployment.fused_dense.FusedConv2d` (oneDNN post-ops).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph.registry import is_leaf_type
from ..nn.stripe import StripeConv2d
from ..utils import set_submodule
from .fused import FusedStripeConv2d
from .fused_dense import FusedConv2d

__all__ = ["DeployTracer", "drop_identities", "fold_batchnorms", "fuse_epilogues"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
_RELU_FUNCTIONS = (torch.relu, F.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class DeployTracer(fx.Tracer):
    """Keeps StripeConv2d (its forward branches on the tensor) and the modules prunekit's
    channel graph registers as leaves (their forward may not be traceable)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, StripeConv2d) or is_leaf_type(m) or super().is_leaf_module(m, qualname)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_foldable_conv(module) -> bool:
    return type(module) is nn.Conv2d or isinstance(module, StripeConv2d)


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x * scale + shift`` of an eval-mode BN, computed in float64 for accuracy."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _folded_conv(conv: nn.Module, bn) -> nn.Module:
    scale, shift = _bn_scale_shift(bn)
    with torch.no_grad():
        old_bias = conv.bias.detach().double() if conv.bias is not None else 0.0
        bias = (old_bias * scale + shift).to(conv.weight.dtype)
        if isinstance(conv, StripeConv2d):
            row_scale = scale[conv.out_index.to(scale.device)]
            weight = (conv.weight.detach().double() * row_scale[:, None]).to(conv.weight.dtype)
            relu = getattr(conv, "relu", False)
            residual = getattr(conv, "residual", False)
            return FusedStripeConv2d.from_stripe(conv, weight, bias, relu=relu, residual=residual)
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, True, conv.padding_mode,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        folded.weight.copy_((conv.weight.detach().double() * scale.view(shape)).to(conv.weight.dtype))
        folded.bias.copy_(bias)
        folded.requires_grad_(False)
        return folded


def _bn_tail(bn: nn.Module) -> tuple[bool, list[nn.Module]]:
    """Whether ``bn`` may be folded, and the modules it applies after normalising (to keep).
    torch's own BatchNorm2d forward: nothing after. timm's ``BatchNormAct2d`` (a BatchNorm2d
    subclass that normalises, then applies ``self.drop`` and ``self.act``): those two. Any
    other subclass may compute something else in its forward, so it is not folded."""
    if type(bn).forward is nn.BatchNorm2d.forward:
        return True, []
    if type(bn).__name__ == "BatchNormAct2d" and isinstance(getattr(bn, "drop", None),
                                                            nn.Module) \
            and isinstance(getattr(bn, "act", None), nn.Module):
        return True, [m for m in (bn.drop, bn.act) if not isinstance(m, nn.Identity)]
    return False, []


def fold_batchnorms(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Fold every eligible BN into its conv; returns the (conv, bn) module names folded. A BN
    that also applies an activation (timm's BatchNormAct2d) is replaced by that activation."""
    folded = []
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or not node.args:
            continue
        foldable, tail = _bn_tail(bn)
        if not foldable:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or len(source.users) != 1:
            continue
        conv = _module(gm, source)
        if not _is_foldable_conv(conv) or conv.out_channels != bn.num_features \
                or getattr(conv, "relu", False) or getattr(conv, "residual", False):
            continue
        set_submodule(gm, source.target, _folded_conv(conv, bn))
        if tail:  # the node now calls the activation alone (a ReLU can then be fused)
            set_submodule(gm, node.target, tail[0] if len(tail) == 1 else nn.Sequential(*tail))
        else:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
        folded.append((source.target, node.target))
    return folded


def drop_identities(gm: fx.GraphModule) -> list[str]:
    """Remove identity and dropout nodes (eval mode); returns what was removed."""
    dropped = []
    for node in list(gm.graph.nodes):
        module = _module(gm, node)
        is_identity_module = isinstance(module, (nn.Identity,) + _DROPOUT) and len(node.args) == 1
        is_dropout_call = node.op == "call_function" and node.target is F.dropout and (
            node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True) is False)
        if not (is_identity_module or is_dropout_call) or not isinstance(node.args[0], fx.Node):
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        dropped.append(str(node.target) if module is not None else node.name)
    return dropped


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu(gm: fx.GraphModule, node: fx.Node | None) -> bool:
    if node is None:
        return False
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.ReLU
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return len(node.args) == 1 and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _residual_operand(node: fx.Node | None, source: fx.Node, shapes: dict) -> fx.Node | None:
    """The other operand of ``node`` when it is ``source + other`` with equal shapes."""
    if node is None or node.op != "call_function" or node.target not in _ADD_FUNCTIONS \
            or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is source else a if b is source else None
    if not isinstance(other, fx.Node) or other is source or node.target is operator.iadd and \
            a is not source:
        return None
    if shapes and shapes.get(other) != shapes.get(source):
        return None
    return other


def _shapes(gm: fx.GraphModule, example_inputs) -> dict:
    """Node -> output shape on the example (empty without an example)."""
    if example_inputs is None:
        return {}
    shapes: dict = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = tuple(out.shape)
            return out

    with torch.no_grad():
        Recorder(gm).run(*example_inputs)
    return shapes


def fuse_epilogues(gm: fx.GraphModule, example_inputs=None) -> dict[str, list[str]]:
    """Fuse residual adds and ReLUs into the convs whose output they alone use: StripeConv2d
    into :class:`FusedStripeConv2d` (the C kernel's epilogue), dense ``nn.Conv2d`` into
    :class:`FusedConv2d` (oneDNN post-ops). A residual add is fused only when shapes are known
    to match (needs the example inputs), so the fused add can never broadcast."""
    shapes = _shapes(gm, example_inputs)
    done: dict[str, list[str]] = {"stripe_residual": [], "stripe_relu": [],
                                  "dense_residual": [], "dense_relu": []}
    for node in list(gm.graph.nodes):
        conv = _module(gm, node)
        kind = "stripe" if isinstance(conv, StripeConv2d) else \
            "dense" if type(conv) is nn.Conv2d else None
        if kind is None or getattr(conv, "relu", False) or getattr(conv, "residual", False) \
                or len(node.args) != 1 or node.kwargs:
            continue
        user, residual = _single_user(node), None
        other = _residual_operand(user, node, shapes) if shapes else None
        if other is not None:
            residual, add_node = other, user
            if not _is_before(other, node):  # e.g. a downsample computed after the branch
                add_node.prepend(node)  # both operands precede the add: still in order
            user = _single_user(add_node)
        relu = _is_relu(gm, user)
        if residual is None and not relu:
            continue
        set_submodule(gm, node.target, _fused(conv, relu, residual is not None))
        if residual is not None:
            node.args = (node.args[0], residual)
            add_node.replace_all_uses_with(node)
            gm.graph.erase_node(add_node)
            done[f"{kind}_residual"].append(node.target)
        if relu:
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            done[f"{kind}_relu"].append(node.target)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return done


def _fused(conv: nn.Module, relu: bool, residual: bool) -> nn.Module:
    if isinstance(conv, StripeConv2d):
        bias = conv.bias.detach() if conv.bias is not None else None
        return FusedStripeConv2d.from_stripe(conv, conv.weight.detach(), bias, relu=relu,
                                             residual=residual)
    return FusedConv2d.from_conv(conv, relu=relu, residual=residual)


def _is_before(a: fx.Node, b: fx.Node) -> bool:
    """Whether node ``a`` comes before ``b`` in the graph (so ``b`` may take it as input)."""
    for node in a.graph.nodes:
        if node is a:
            return True
        if node is b:
            return False
    return False
