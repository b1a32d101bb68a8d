"""Exporting (pruned) models to ONNX and TorchScript, each checked against PyTorch's output.

A pruned model is an ordinary nn.Module, so the standard exporters apply; what prunekit adds is
the check: onnxruntime (or the traced TorchScript module) must reproduce the eager outputs at
the example batch size and one more (the batch axis is dynamic), else :class:`ExportCheckError`.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PrunekitError
from .files import fsync_directory, temp_path_for
from .measure import eval_mode
from .utils import as_tuple


__all__ = ["ExportCheckError", "ExportError", "export_onnx", "export_torchscript"]


class ExportCheckError(PrunekitError, RuntimeError):
    """An exported model does not compute what the PyTorch model computes."""


class ExportError(PrunekitError, ValueError):
    """A model holds a module that cannot be exported; nothing was written."""


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    exporter: str = "auto",
) -> Path:
    """Export ``model`` (in eval mode) to ONNX, verify it, and return ``path``.

    Inputs are named ``input`` (``input_0``, ``input_1``, ... for several) and outputs
    ``output`` (``output_0``, ...); ``dynamic_batch`` makes axis 0 of all of them symbolic.
    ``exporter``: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``, fast and robust for
    CNNs), ``"dynamo"`` (torch.export-based, opset >= 18), or ``"auto"``: TorchScript, falling
    back to dynamo if it fails. With ``check`` and onnxruntime installed, the ONNX model is run
    on the example (and on a batch of another size if ``dynamic_batch``) and must match PyTorch.
    The file is written next to ``path`` and renamed into place only once it passed its checks:
    a failed export leaves ``path`` as it was.
    """
    _refuse_unexportable(model, "ONNX")
    onnx = _require("onnx")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'auto', 'torchscript' or 'dynamo', not {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = _example_args(example_input)
    with eval_mode(model), _written_into_place(path) as temp:
        with torch.no_grad():
            outputs = _flat_outputs(model(*args))
        inputs = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
        names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
        _export_onnx_file(model, args, temp, opset, dynamic_batch, exporter, inputs, names)
        onnx.checker.check_model(str(temp))  # by path, so models with external data work too
        if check:
            _compare_onnx(model, args, temp, dynamic_batch, shown=path)
    return path


def export_torchscript(
    model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor | Sequence[torch.Tensor],
    *, check: bool = True,
) -> Path:
    """Trace ``model`` (in eval mode) with ``torch.jit.trace``, save it and return ``path``.

    With ``check`` the saved file is loaded back and compared with the eager model on the
    example and on a batch of another size (tracing can bake the batch size in). A failed
    check leaves ``path`` as it was.
    """
    _refuse_unexportable(model, "TorchScript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = _example_args(example_input)
    with eval_mode(model), _written_into_place(path) as temp:
        with warnings.catch_warnings(), torch.no_grad():
            # torch.jit is deprecated in favour of torch.export; the caller asked for it anyway.
            warnings.filterwarnings("ignore", r".*torch\.jit\.\w+` is deprecated", FutureWarning)
            traced = torch.jit.trace(model, args, check_trace=False)
            torch.jit.save(traced, str(temp))
            if check:
                reloaded = torch.jit.load(str(temp), map_location=args[0].device)
                # The profiling executor spends seconds optimising the first calls; the check
                # is about what the saved graph computes, so run it unoptimised.
                with torch.jit.optimized_execution(False):
                    for batch in _check_batches(args, dynamic=True):
                        got = [o.cpu().numpy() for o in _flat_outputs(reloaded(*batch))]
                        _assert_match(_flat_outputs(model(*batch)), got,
                                      f"TorchScript model {path}", batch[0].shape[0])
    return path


# --- internals ------------------------------------------------------------------------------


@contextmanager
def _written_into_place(path: Path):
    """A temporary file next to ``path``, renamed to ``path`` if the block succeeds and
    deleted if it fails (so a failed check never leaves a wrong file at the destination)."""
    temp = temp_path_for(path)
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _refuse_unexportable(model: nn.Module, what: str) -> None:
    """ExportError before any file is written if a module's class declares, in
    ``prunekit_unexportable``, why it cannot be exported (e.g. HASTE's HashConv2d)."""
    for name, module in model.named_modules():
        reason = getattr(type(module), "prunekit_unexportable", None)
        if reason:
            raise ExportError(f"cannot export to {what}: module '{name or '<root>'}' is a "
                              f"{type(module).__name__}. {reason}")


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is needed to export to ONNX: pip install prunekit[export]") \
            from None


def _example_args(example_input: Any) -> tuple[torch.Tensor, ...]:
    args = as_tuple(example_input)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_input must be a tensor or a sequence of tensors")
    return args


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    return [t for item in out for t in _flat_outputs(item)]


def _export_onnx_file(model, args, path, opset, dynamic_batch, exporter, inputs, outputs) -> None:
    if exporter in ("auto", "torchscript"):
        try:
            with warnings.catch_warnings():
                # Chosen on purpose (faster and more robust for CNNs than torch.export), so its
                # deprecation notice and the constant-folding notes on strided slices are noise.
                warnings.filterwarnings("ignore", ".*legacy TorchScript-based ONNX export")
                warnings.filterwarnings("ignore", ".*feature will be removed")
                warnings.filterwarnings("ignore", ".*Constant folding - Only steps=1")
                axes = {n: {0: "batch"} for n in inputs + outputs} if dynamic_batch else None
                torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset,
                                  input_names=inputs, output_names=outputs, dynamic_axes=axes)
            return
        except Exception as err:
            if exporter == "torchscript":
                raise
            legacy_error = err
    # torch.export-based exporter: its lowest implemented opset is 18.
    dynamo_opset = max(opset, 18)
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in args)
    try:
        torch.onnx.export(model, args, str(path), dynamo=True, opset_version=dynamo_opset,
                          input_names=inputs, output_names=outputs, dynamic_shapes=shapes,
                          external_data=False, verbose=False)
    except Exception as err:
        if exporter == "dynamo":
            raise
        raise RuntimeError(f"ONNX export failed with both exporters. TorchScript-based: "
                           f"{legacy_error}; torch.export-based: {err}") from err
    if exporter == "auto":
        warnings.warn(f"the TorchScript-based ONNX exporter failed ({legacy_error}); exported "
                      f"with the torch.export-based exporter at opset {dynamo_opset} instead",
                      stacklevel=3)


def _check_batches(args: tuple[torch.Tensor, ...], dynamic: bool) -> list[tuple[torch.Tensor, ...]]:
    batches = [args]
    if dynamic:  # a second batch size proves the batch axis really is symbolic
        batches.append(tuple(torch.cat([a, a[:1]]) for a in args))
    return batches


def _compare_onnx(model: nn.Module, args, path: Path, dynamic_batch: bool,
                  shown: Path | None = None) -> None:
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        warnings.warn("onnxruntime is not installed, so the exported model was not compared "
                      "with PyTorch: pip install prunekit[export]", stacklevel=3)
        return
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch in _check_batches(args, dynamic_batch):
        with torch.no_grad():
            expected = _flat_outputs(model(*batch))
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, batch)}
        _assert_match(expected, session.run(None, feeds), f"ONNX model {shown or path}",
                      batch[0].shape[0])


def _assert_match(expected: list[torch.Tensor], actual: list, what: str, batch: int) -> None:
    if len(expected) != len(actual):
        raise ExportCheckError(f"{what} returns {len(actual)} outputs, PyTorch {len(expected)}")
    for i, (want, got) in enumerate(zip(expected, actual)):
        want = want.detach().cpu()
        got = torch.as_tensor(got)
        if tuple(got.shape) != tuple(want.shape):
            raise ExportCheckError(f"{what}: output {i} has shape {tuple(got.shape)} at batch "
                                   f"{batch}, PyTorch {tuple(want.shape)}")
        if not want.is_floating_point():
            if not torch.equal(got.to(want.dtype), want):
                raise ExportCheckError(f"{what}: output {i} differs from PyTorch at batch {batch}")
            continue
        # Kernels sum in different orders, so the absolute error grows with the outputs' scale.
        scale = max(1.0, float(want.abs().max()))
        diff = float((got.to(want.dtype) - want).abs().max())
        if not torch.allclose(got.to(want.dtype), want, rtol=1e-4, atol=1e-5 * scale):
            raise ExportCheckError(
                f"{what}: output {i} differs from PyTorch at batch {batch} (max abs difference "
                f"{diff:.3g}, output scale {scale:.3g}; tolerance rtol=1e-4, "
                f"atol={1e-5 * scale:.3g})"
            )
