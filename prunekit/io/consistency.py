"""Whether the structural attributes of torch's layers agree with their tensors (a conv's
weight is ``[out_channels, in_channels / groups, *kernel_size]``, a BatchNorm's vectors have
``num_features`` entries, ...).

Loading restores attributes from the spec and tensors from the header separately, so a file
whose spec was edited could otherwise produce a module whose forward computes with
attributes that do not describe its weights; saving runs the same check so that it never
writes such a file.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.parameter import UninitializedTensorMixin

__all__ = ["Problem", "consistency_problems"]

# (tensor or attribute name, what is wrong, its shape, the shape it needs); shapes are None
# for a problem between attributes.
Problem = tuple[str, str, "tuple[int, ...] | None", "tuple[int, ...] | None"]

_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3,
              nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


def consistency_problems(model: nn.Module) -> list[Problem]:
    """Every disagreement between a module's structural attributes and its tensors."""
    found: list[Problem] = []
    for name, module in model.named_modules():
        if any(isinstance(t, UninitializedTensorMixin) for t in _tensors(module)):
            continue  # a lazy module takes its shapes from the first input
        for kind, check in _CHECKS:
            if isinstance(module, kind):
                check(f"{name}." if name else "", module, found)
                break
    return found


def _tensors(module: nn.Module) -> list[Any]:
    return [t for t in (*module._parameters.values(), *module._buffers.values())
            if t is not None]


def _needs(found: list[Problem], prefix: str, module: nn.Module, attr: str,
           shape: tuple[int, ...], because: str) -> None:
    tensor = getattr(module, attr, None)
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        found.append((f"{prefix}{attr}", f"has shape {list(tensor.shape)} but {because} "
                      f"need {list(shape)}", tuple(tensor.shape), tuple(shape)))


def _attr_problem(found: list[Problem], prefix: str, attr: str, what: str) -> None:
    found.append((f"{prefix}{attr}", what, None, None))


def _described(prefix: str, module: nn.Module, names: tuple[str, ...]) -> str:
    values = ", ".join(f"{n}={getattr(module, n, None)!r}" for n in names)
    return f"{prefix.rstrip('.') or '<model>'}'s {values}"


def _conv(prefix: str, m: nn.Module, found: list[Problem]) -> None:
    dims = next((d for cls, d in _CONV_DIMS.items() if isinstance(m, cls)), m.weight.dim() - 2)
    before = len(found)
    for attr in ("kernel_size", "stride", "dilation", "output_padding"):
        value = getattr(m, attr)
        if not isinstance(value, tuple) or len(value) != dims:
            _attr_problem(found, prefix, attr, f"is {value!r}, not {dims} values")
    if isinstance(m.padding, str):
        if m.transposed:
            _attr_problem(found, prefix, "padding", f"is {m.padding!r}; transposed "
                          "convolutions take numbers only")
        elif m.padding == "same" and any(s != 1 for s in m.stride):
            _attr_problem(found, prefix, "padding", "is 'same', which needs stride 1")
    elif not isinstance(m.padding, tuple) or len(m.padding) != dims:
        _attr_problem(found, prefix, "padding", f"is {m.padding!r}, not {dims} values")
    if m.transposed and m.padding_mode != "zeros":
        _attr_problem(found, prefix, "padding_mode", "must be 'zeros' in a transposed conv")
    if m.in_channels % m.groups or m.out_channels % m.groups:
        _attr_problem(found, prefix, "groups", f"={m.groups} does not divide in_channels="
                      f"{m.in_channels} and out_channels={m.out_channels}")
    if len(found) > before:
        return
    if m.transposed:
        shape = (m.in_channels, m.out_channels // m.groups, *m.kernel_size)
    else:
        shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
    names = ("out_channels", "in_channels", "groups", "kernel_size")
    _needs(found, prefix, m, "weight", shape, _described(prefix, m, names))
    _needs(found, prefix, m, "bias", (m.out_channels,), _described(prefix, m, names[:1]))


def _affine(found: list[Problem], prefix: str, m: nn.Module, flag: str, tensor: str) -> None:
    if getattr(m, flag) != (getattr(m, tensor, None) is not None):
        _attr_problem(found, prefix, flag, f"is {getattr(m, flag)} but the module "
                      f"{'lacks' if getattr(m, flag) else 'has'} {tensor!r}")


def _batchnorm(prefix: str, m: nn.Module, found: list[Problem]) -> None:
    because = _described(prefix, m, ("num_features",))
    for attr in ("weight", "bias", "running_mean", "running_var"):
        _needs(found, prefix, m, attr, (m.num_features,), because)
    _affine(found, prefix, m, "affine", "weight")
    _affine(found, prefix, m, "track_running_stats", "running_mean")


def _linear(prefix: str, m: nn.Module, found: list[Problem]) -> None:
    because = _described(prefix, m, ("out_features", "in_features"))
    _needs(found, prefix, m, "weight", (m.out_features, m.in_features), because)
    _needs(found, prefix, m, "bias", (m.out_features,), because)


def _groupnorm(prefix: str, m: nn.Module, found: list[Problem]) -> None:
    if m.num_channels % m.num_groups:
        _attr_problem(found, prefix, "num_groups", f"={m.num_groups} does not divide "
                      f"num_channels={m.num_channels}")
    because = _described(prefix, m, ("num_channels",))
    for attr in ("weight", "bias"):
        _needs(found, prefix, m, attr, (m.num_channels,), because)
    _affine(found, prefix, m, "affine", "weight")


def _layernorm(prefix: str, m: nn.Module, found: list[Problem]) -> None:
    because = _described(prefix, m, ("normalized_shape",))
    for attr in ("weight", "bias"):
        _needs(found, prefix, m, attr, tuple(m.normalized_shape), because)
    _affine(found, prefix, m, "elementwise_affine", "weight")


def _prelu(prefix: str, m: nn.Module, found: list[Problem]) -> None:
    _needs(found, prefix, m, "weight", (m.num_parameters,),
           _described(prefix, m, ("num_parameters",)))


_CHECKS: list[tuple[type, Callable[[str, Any, list[Problem]], None]]] = [
    (nn.modules.conv._ConvNd, _conv),
    (nn.modules.batchnorm._NormBase, _batchnorm),
    (nn.Linear, _linear),
    (nn.GroupNorm, _groupnorm),
    (nn.LayerNorm, _layernorm),
    (nn.PReLU, _prelu),
]
if hasattr(nn, "RMSNorm"):
    _CHECKS.append((nn.RMSNorm, _layernorm))
