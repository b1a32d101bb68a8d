"""Channel rules for layers with parameters: convolutions, linear, normalisation, PReLU.

Convolutions and linear layers *produce* fresh channels; normalisation layers and PReLU carry
per-channel parameters through unchanged. Functional forms (``F.conv2d(x, self.weight)``) are
handled too: their weights are found through the get_attr nodes that feed them.
"""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import nn

from .channels import carrying_dims, channel_ids
from .attributes import attribute_holding
from .context import tensor_shape
from .numbers import takes_counts
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
    ids = ctx.ids(x)
    if ids is not None and any(d >= 2 for d in carrying_dims(ids)):
        return _sliding_over_channels(ctx, ids, in_shape, tensor_shape(out_value), weight, bias,
                                      module)
    in_vec = ctx.channel_vector(ids, 1, c_in)
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


def _sliding_over_channels(ctx, ids, in_shape, out_shape, weight, bias, module):
    """A convolution whose spatial axis holds channels (ECA: a 1-D conv along the pooled
    channel vector): each output mixes neighbouring channels, and removing one would change
    the neighbours of the rest, so those channels are kept."""
    ctx.fix(ids, f"a convolution slides over them in '{module or weight}'")
    out_vec = ctx.new_vars(out_shape[1])
    ctx.fix(out_vec, f"output of '{module or weight}', which slides over channels")
    ctx.member(weight, 0, out_vec, "out", module)
    if bias is not None:
        ctx.member(bias, 0, out_vec, "out", module)
    ctx.meta(module, kind="dense", multiplier=1)
    if in_shape[1] == out_shape[1] == 1 and tuple(in_shape[2:]) == tuple(out_shape[2:]):
        return ids  # position j of the output stands where channel j stood
    ctx.fail("a convolution over channel positions that changes their number")


def own_extras(ctx, node, module, known: tuple[str, ...], out_ids) -> None:
    """Tensors a subclass adds to a layer (timm's ScaledStdConv2d ``gain``): one entry per
    output channel is sliced with the outputs; anything else cannot be mapped, so the layer's
    outputs are kept."""
    name = node.target
    out_vec = out_ids.reshape(-1) if out_ids.size > 1 else None
    for attr, tensor in list(module.named_parameters(recurse=False)) + \
            list(module.named_buffers(recurse=False)):
        if attr in known or tensor is None or tensor.dim() == 0 or tensor.numel() == 1:
            continue
        rows = tensor.shape[0]
        if out_vec is not None and rows == len(out_vec) and tensor.numel() == rows:
            ctx.member(f"{name}.{attr}", 0, out_vec, "out", name)
        else:
            ctx.fix(out_ids, f"'{name}.{attr}' of {type(module).__name__} has a shape prunekit "
                             "cannot map to channels")


_CONV_TENSORS = ("weight", "bias")
_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@register_module_rule(nn.Conv1d, subclasses=True)
@register_module_rule(nn.Conv2d, subclasses=True)
@register_module_rule(nn.Conv3d, subclasses=True)
def conv_module(ctx, node, module):
    name = node.target
    ids = convolution(ctx, node.args[0], ctx.value(node), f"{name}.weight",
                      f"{name}.bias" if module.bias is not None else None, module.groups, name)
    own_extras(ctx, node, module, _CONV_TENSORS, ids)
    return ids


@register_function_rule(F.conv1d, F.conv2d, F.conv3d)
@takes_counts
def conv_function(ctx, node, module=None):
    weight = _param_name(ctx.arg(1, "weight"))
    if weight is None:
        ctx.fail("convolution weight is not a parameter of the model")
    bias = _param_name(ctx.arg(2, "bias"))
    x = node.args[0]
    groups_arg = ctx.arg(6, "groups", 1)
    groups = ctx.value(groups_arg)
    ids = convolution(ctx, x, ctx.value(node), weight, bias, groups, _owner(weight))
    if groups > 1 and groups == tensor_shape(ctx.value(x))[1]:
        _depthwise_groups(ctx, node, x, groups_arg)
    elif ctx.counted(groups_arg).size:
        ctx.fix(ctx.counted(groups_arg), f"their number sets the groups of '{node.name}'")
    # Other arguments (stride, padding) are never channel counts.
    others = list(node.args[3:6]) + [v for k, v in node.kwargs.items() if k != "groups"]
    ctx.fix(ctx.counted(others), f"their number is used by '{node.name}'")
    return ids


def _depthwise_groups(ctx, node, x, groups_arg) -> None:
    """``F.conv2d(x, w, groups=C)``: C must follow the pruning (timm's BlurPool2d reads it from
    ``self.channels``; ``x.shape[1]`` follows by itself)."""
    in_vec = ctx.channel_vector(ctx.ids(x), 1, tensor_shape(ctx.value(x))[1])
    counted = ctx.counted(groups_arg)
    if counted.size:
        if set(counted.tolist()) != set(in_vec[in_vec >= 0].tolist()):
            ctx.fix(counted, f"their number sets the groups of '{node.name}'")
            ctx.fix(in_vec, f"the groups of '{node.name}' count other channels")
        return
    where = attribute_holding(ctx, groups_arg)
    if where is None:
        ctx.fix(in_vec, f"the groups of '{node.name}' are a literal that is no attribute of "
                        "its module")
    else:
        ctx.attr_member(*where, in_vec, source=False)


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


@register_module_rule(nn.Linear, subclasses=True)
def linear_module(ctx, node, module):
    name = node.target
    ids = linear(ctx, node.args[0], ctx.value(node), f"{name}.weight",
                 f"{name}.bias" if module.bias is not None else None, name)
    own_extras(ctx, node, module, _CONV_TENSORS, ids)
    return ids


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


@register_module_rule(nn.modules.batchnorm._NormBase, subclasses=True)
def batch_norm(ctx, node, module):
    tensors = _present(module, ("weight", "bias", "running_mean", "running_var"))
    ids = per_channel(ctx, node, module, 1, tensors)
    channels = tensor_shape(ctx.value(node.args[0]))[1]
    own_extras(ctx, node, module, _NORM_TENSORS, ctx.channel_vector(ids, 1, channels))
    return ids


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
    from .rules_reshape import shape_only
    return shape_only(ctx, node, module)
