"""Small helpers used across prunekit: example inputs as a tuple, a model's first output,
replacing a submodule by its dotted name. Imports only torch (bottom of the import graph)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["as_tuple", "first_output", "set_submodule"]


def as_tuple(example_inputs: Any) -> tuple:
    """``example_inputs`` as a tuple of positional inputs: one tensor becomes ``(tensor,)``,
    a list or tuple is copied into a tuple, ``None`` stays ``None``."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def first_output(output: Any) -> torch.Tensor:
    """The main output of a model: the tensor itself, or the first element of a tuple or
    namedtuple (GoogLeNet/Inception return their auxiliary heads after it in training)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_output(output[0])
    if isinstance(output, dict) and output:
        return first_output(next(iter(output.values())))
    raise TypeError(f"cannot take the main output of a {type(output).__name__}")


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``model`` by ``new``."""
    if not name:
        raise ValueError("cannot replace the root module; give a submodule name")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
