"""Channel rules for layers with parameters: convolutions, linear, normalisation, PReLU.

Convolutions and linear layers *produce* fresh channels; normalisation layers and PReLU carry
per-channel parameters through unchanged. Functional forms (``F.conv2d(x, self.weight)``) are
handled too: their weights are found through the get_attr nodes that feed them.
"""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import nn

from .channels import channel_ids
from .context import tensor_shape
from .registry import register_function_rule, register_module_rule
from .rules_tensor import elementwise, spatial


def _param_name(node_arg) -> str | None:
    return node_arg.target if getattr(node_arg, "op", None) == "get_attr" else None


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def convolution(ctx, x, out_value, weight: str, bias: str | None, groups: int, module: str):
    """Members and output ids of a convolution (module or functional)."""
    in_shape = tensor_shape(ctx.value(x))
    c_in, c_out = in_shape[1], tensor_shape(out_value)[1]
    ndim = len(in_shape)
    in_vec = ctx.channel_vector(ctx.ids(x), 1, c_in)
    if groups == 1:
        ctx.member(weight, 1, in_vec, "in", module)
        out_vec = ctx.new_vars(c_out)
        kind = "dense"
    elif groups == c_in:
        # Depthwise (with channel multiplier): output channel j reads only input j // multiplier.
        out_vec = np.repeat(in_vec, c_out // c_in)
        kind = "depthwise"
    else:
        # Grouped: each block of output rows reads its own block of input channels, so every
        # block must keep as many channels as the others.
        ctx.member(weight, 1, in_vec, "in", module, blocks=groups)
        out_vec = ctx.new_vars(c_out)
        ctx.divisible(in_vec, groups)
        ctx.divisible(out_vec, groups)
        kind = "grouped"
    ctx.member(weight, 0, out_vec, "out", module)
    if bias is not None:
        ctx.member(bias, 0, out_vec, "out", module)
    ctx.meta(module, kind=kind, multiplier=c_out // c_in if kind == "depthwise" else 1)
    return channel_ids(out_vec, ndim, 1)


@register_module_rule(nn.Conv1d)
@register_module_rule(nn.Conv2d)
@register_module_rule(nn.Conv3d)
def conv_module(ctx, node, module):
    name = node.target
    return convolution(ctx, node.args[0], ctx.value(node), f"{name}.weight",
                       f"{name}.bias" if module.bias is not None else None, module.groups, name)


@register_function_rule(F.conv1d, F.conv2d, F.conv3d)
def conv_function(ctx, node, module=None):
    weight = _param_name(ctx.arg(1, "weight"))
    if weight is None:
        ctx.fail("convolution weight is not a parameter of the model")
    bias = _param_name(ctx.arg(2, "bias"))
    return convolution(ctx, node.args[0], ctx.value(node), weight, bias,
                       ctx.arg(6, "groups", 1), _owner(weight))


def linear(ctx, x, out_value, weight: str, bias: str | None, module: str):
    in_shape = tensor_shape(ctx.value(x))
    in_vec = ctx.channel_vector(ctx.ids(x), -1, in_shape[-1])
    ctx.member(weight, 1, in_vec, "in", module)
    out_vec = ctx.new_vars(tensor_shape(out_value)[-1])
    ctx.member(weight, 0, out_vec, "out", module)
    if bias is not None:
        ctx.member(bias, 0, out_vec, "out", module)
    ctx.meta(module, kind="linear")
    return channel_ids(out_vec, len(in_shape), -1)


@register_module_rule(nn.Linear)
def linear_module(ctx, node, module):
    name = node.target
    return linear(ctx, node.args[0], ctx.value(node), f"{name}.weight",
                  f"{name}.bias" if module.bias is not None else None, name)


@register_function_rule(F.linear)
def linear_function(ctx, node, module=None):
    weight = _param_name(ctx.arg(1, "weight"))
    if weight is None:
        ctx.fail("linear weight is not a parameter of the model")
    return linear(ctx, node.args[0], ctx.value(node), weight, _param_name(ctx.arg(2, "bias")),
                  _owner(weight))


def per_channel(ctx, node, module, dim: int, tensors: list[str], role: str = "norm"):
    """A layer whose listed tensors hold one entry per channel of ``dim``; output = input ids."""
    x = node.args[0]
    ids = ctx.ids(x)
    length = tensor_shape(ctx.value(x))[dim]
    vec = ctx.channel_vector(ids, dim, length)
    for t in tensors:
        ctx.member(f"{node.target}.{t}", 0, vec, role, node.target)
    return ids


def _present(module, names):
    return [n for n in names if getattr(module, n, None) is not None]


@register_module_rule(nn.modules.batchnorm._NormBase)
def batch_norm(ctx, node, module):
    tensors = _present(module, ("weight", "bias", "running_mean", "running_var"))
    return per_channel(ctx, node, module, 1, tensors)


@register_module_rule(nn.GroupNorm)
def group_norm(ctx, node, module):
    ids = per_channel(ctx, node, module, 1, _present(module, ("weight", "bias")))
    vec = ctx.channel_vector(ids, 1, module.num_channels)
    ctx.divisible(vec, module.num_groups)
    return ids


@register_module_rule(nn.LayerNorm)
def layer_norm(ctx, node, module):
    if len(module.normalized_shape) != 1:
        ctx.fail("LayerNorm over more than one dimension")
    return per_channel(ctx, node, module, -1, _present(module, ("weight", "bias")))


@register_module_rule(nn.PReLU)
def prelu(ctx, node, module):
    if module.num_parameters == 1:
        return ctx.ids(node.args[0])
    return per_channel(ctx, node, module, 1, ["weight"], role="param")


@register_function_rule(F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm)
def functional_norm(ctx, node, module=None):
    """The per-channel parameters arrive as get_attr nodes whose ids were already created;
    uniting them with the input's channel dimension is all that is needed."""
    x = node.args[0]
    ids = ctx.ids(x)
    shape = tensor_shape(ctx.value(x))
    dim = -1 if node.target is F.layer_norm else 1
    vec = ctx.channel_vector(ids, dim, shape[dim])
    for a in list(node.args[1:]) + list(node.kwargs.values()):
        pid = ctx.ids(a) if getattr(a, "op", None) == "get_attr" else None
        if pid is not None and pid.size == shape[dim]:
            ctx.unite(pid.reshape(-1), vec)
    if node.target is F.group_norm:
        ctx.divisible(vec, ctx.arg(1, "num_groups"))
    return ids


ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Threshold,
)
for _cls in ACTIVATIONS:
    register_module_rule(_cls, elementwise, leaf=False)

SPATIAL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    nn.ConstantPad2d,
)
for _cls in SPATIAL:
    register_module_rule(_cls, spatial, leaf=False)


@register_module_rule(nn.Flatten)
def flatten_module(ctx, node, module):
    from .rules_tensor import shape_only
    return shape_only(ctx, node, module)


@register_module_rule(nn.Softmax)
@register_module_rule(nn.LogSoftmax)
def softmax(ctx, node, module):
    ids = ctx.ids(node.args[0])
    dim = module.dim if module.dim is not None else 1
    if ids is not None and ids.shape[dim] > 1:
        ctx.fix(ids, "normalised by a softmax over channels")
    return ids
