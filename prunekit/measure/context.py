"""Where and how a measured model runs: its device and dtype, eval mode, the example inputs.

Every measurement leaves the model as it found it: :func:`eval_mode` restores each submodule's
own training flag and :func:`on_device` moves the model back to where it was.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..utils import as_tuple

__all__ = [
    "ExampleInputs",
    "eval_mode",
    "model_device_and_dtype",
    "on_device",
    "prepare_inputs",
    "resolve_device",
]

ExampleInputs = torch.Tensor | Sequence[torch.Tensor] | Sequence[int] | torch.Size


def model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        return tensor.device, dtype
    return torch.device("cpu"), torch.float32


def _is_shape(value: Any) -> bool:
    return isinstance(value, (tuple, list, torch.Size)) and len(value) > 0 and all(
        isinstance(v, int) for v in value
    )


def prepare_inputs(model: nn.Module, example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    """Return the inputs as a tuple of tensors on the model's device.

    A shape (tuple of ints, batch dimension included) is turned into a random tensor,
    because MAC counts depend only on shapes.
    """
    device, dtype = model_device_and_dtype(model)
    if _is_shape(example_inputs):
        return (torch.randn(*example_inputs, device=device, dtype=dtype),)
    inputs = as_tuple(example_inputs)
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode and restore every submodule's own flag afterwards.

    ``model.train(was_training)`` is not enough: it would flip submodules that the
    caller deliberately kept in a different mode (e.g. frozen BN while fine-tuning).
    """
    previous = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, was_training in previous.items():
            module.training = was_training


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``None``/``"auto"`` -> cuda if available else cpu; otherwise validate the request."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"invalid device {device!r}: {error}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA requested but torch.cuda.is_available() is False; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"{resolved} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return resolved


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """Run on ``device`` (None = where the model already is), moving the model back afterwards."""
    current, _ = model_device_and_dtype(model)
    if device is None:
        yield current
        return
    target = resolve_device(device)
    if target == current:
        yield current
        return
    model.to(target)
    try:
        yield target
    finally:
        model.to(current)
