"""Loading a file written by :func:`prunekit.io.save`: read and check its spec, rebuild the
base model, put back the replaced modules, tensor shapes and structural attributes the spec
records, then load the weights with a readable report of anything that does not fit."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..models.registry import SPEC_ATTR
from ..models.weights import (WeightsLoadError, WeightsMismatchError, compare_state, listing,
                              mismatch_lines)
from ..nn.registry import replacement_class, structural_entries
from ..utils import set_submodule
from .saving import _unwrap
from .sources import create_base
from .spec import SAVED_SPEC_ATTR, SPEC_KEY, _parse_spec

# Imported for their side effect: they register the classes the registries above must know
# before any load, StripeConv2d and ShortcutBlock as replacements and ZeroPadShortcut's
# structural attributes.
from ..models import cifar_resnet  # noqa: F401  isort: skip
from ..nn import shortcut, stripe  # noqa: F401  isort: skip

__all__ = ["load", "load_state_into", "read_spec"]


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The spec stored in a file written by :func:`save` (tensors are not read)."""
    path = Path(path)
    spec, _ = _read(path, tensors=False)
    if spec is None:
        raise _plain_weights_error(path)
    return spec


def load(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    expect: str | None = None,
) -> nn.Module:
    """Rebuild and return the model saved in ``path`` by :func:`save`.

    The model is returned in training mode (call ``.eval()``), with ``model.prunekit_spec``
    (its base) and ``model.prunekit_saved_spec`` (the whole spec) set. ``expect`` names the
    architecture the caller wants; a file of another one raises WeightsMismatchError.
    ``strict=False`` tolerates missing/unexpected tensors, never wrong shapes.

    Raises:
        FileNotFoundError: no such file.
        WeightsLoadError: not a (complete) safetensors file, or one without a prunekit spec.
        UnknownModelError: the base model is not known to this installation.
        WeightsMismatchError: wrong architecture for ``expect``, or tensors that do not fit.
    """
    path = Path(path)
    spec, tensors = _read(path, tensors=True)
    if spec is None:
        raise _plain_weights_error(path)
    base = spec["base"]
    if expect is not None and expect != base["name"]:
        raise WeightsMismatchError(
            f"{path} holds a pruned {base['name']!r}, not the expected {expect!r}; pass the "
            f"matching file or expect={base['name']!r}",
            missing=[], unexpected=[], shape_mismatches=[],
        )
    model = create_base(base["source"], base["name"], **base["kwargs"])
    _rebuild_replaced(model, spec.get("replaced", {}), path)
    unresizable = _resize_tensors(model, tensors)
    _restore_structure(model, spec["modules"], path)
    _load_checked(model, tensors, strict, path, base["name"], unresizable,
                  hint="The file may come from an incompatible prunekit/torchvision version "
                       "or have an edited spec; re-save it from the original model.")
    model.to(map_location)
    setattr(model, SPEC_ATTR, dict(base) if base["source"] != "prunekit"
            else {"name": base["name"], "kwargs": base["kwargs"]})
    setattr(model, SAVED_SPEC_ATTR, spec)
    return model


def load_state_into(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Copy the weights saved in ``path`` into ``model``, which must already have their shapes.

    For resuming fine-tuning of a pruned model. Plain safetensors weight files work too.
    Returns ``model``; raises WeightsMismatchError if the tensors do not fit.
    """
    path = Path(path)
    spec, tensors = _read(path, tensors=True)
    name = spec["base"]["name"] if spec else None
    _load_checked(_unwrap(model), tensors, strict, path, name, [],
                  hint="load_state_into needs a model of the same pruned shape; use "
                       "prunekit.io.load(path) to rebuild the model from the file instead.")
    return model


def _read(path: Path, *, tensors: bool) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(spec or None, name -> tensor) or, with ``tensors=False``, (spec or None, name -> shape).

    The shapes come from the safetensors header itself, which is authoritative; the spec's
    ``shapes`` are a copy for readers of ``read_spec``/``spec.json``.
    """
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a .safetensors file, got a directory: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if tensors:
                content = {key: f.get_tensor(key) for key in f.keys()}
            else:
                content = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except SafetensorError as err:
        raise _unreadable(path, err) from err
    text = metadata.get(SPEC_KEY)
    return (None if text is None else _parse_spec(path, text)), content


def _unreadable(path: Path, err: Exception) -> WeightsLoadError:
    with path.open("rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (or, before PyTorch 1.6, a raw pickle).
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        hint = ("It looks like a torch.save checkpoint: load it with "
                "prunekit.models.load_weights(model, path) instead.")
    else:
        hint = "Re-save it with prunekit.io.save, or re-download it if it was copied."
    return WeightsLoadError(f"{path} is truncated or not a safetensors file ({err}). {hint}")


def _plain_weights_error(path: Path) -> WeightsLoadError:
    return WeightsLoadError(
        f"{path} is a safetensors file without a prunekit spec: it holds plain weights, not "
        "the architecture. Build the model yourself and use "
        "prunekit.models.load_weights(model, path) (or prunekit.io.load_state_into)."
    )


def _rebuild_replaced(model: nn.Module, replaced: Mapping[str, Any], path: Path) -> None:
    for name, entry in replaced.items():
        cls = replacement_class(entry.get("class"))
        if cls is None:
            raise WeightsLoadError(f"{path}: module '{name}' is a {entry.get('class')!r}, which "
                                   "this prunekit does not know; upgrade prunekit")
        try:
            original = model.get_submodule(name)
        except AttributeError as exc:
            raise WeightsMismatchError(f"{path}: the base model has no module '{name}' to "
                                       "replace; the file may come from another version",
                                       missing=[], unexpected=[], shape_mismatches=[]) from exc
        set_submodule(model, name, cls.prunekit_build(original, entry["init"]))


def _resize_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Give every parameter/buffer the saved shape; returns the names that cannot be resized."""
    current = model.state_dict(keep_vars=True)
    failed = []
    for key, saved in tensors.items():
        old = current.get(key)
        if old is None or old.shape == saved.shape:
            continue  # unknown keys are reported by _load_checked
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(
                torch.empty(saved.shape, dtype=old.dtype, device=old.device),
                requires_grad=old.requires_grad)
        elif attr in owner._buffers:
            owner._buffers[attr] = torch.empty(saved.shape, dtype=old.dtype, device=old.device)
        else:  # an entry a custom _save_to_state_dict produced; only the module can resize it
            failed.append(key)
    return failed


def _restore_structure(model: nn.Module, modules: Mapping[str, Any], path: Path) -> None:
    absent = []
    for name, attrs in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            absent.append(name)
            continue
        handled: set[str] = set()
        for names, restore in structural_entries(module):
            if restore is not None:
                restore(module, dict(attrs))
                handled.update(names)
        for attr, value in attrs.items():
            if attr in handled:
                continue
            # JSON turned tuples (LayerNorm.normalized_shape) into lists; restore the type.
            if isinstance(value, list) and isinstance(getattr(module, attr, None), tuple):
                value = tuple(value)
            setattr(module, attr, value)
    if absent:
        raise WeightsMismatchError(
            f"the spec in {path} describes modules the rebuilt base model lacks: "
            f"{listing(absent)}. The file may come from an incompatible version; re-save it.",
            missing=[], unexpected=[], shape_mismatches=[])


def _load_checked(model: nn.Module, tensors: dict[str, torch.Tensor], strict: bool, path: Path,
                  base_name: str | None, unresizable: list[str], hint: str) -> None:
    missing, unexpected, shapes = compare_state(model.state_dict(), tensors)
    if shapes or (strict and (missing or unexpected)):
        source = f"{path}" + (f" (a pruned {base_name})" if base_name else "")
        lines = [f"weights in {source} do not fit the {type(model).__name__} model:"]
        lines += mismatch_lines(missing, unexpected, shapes, strict, source="file")
        if unresizable:
            lines.append(f"  not resizable (custom state dict entries): {listing(unresizable)}")
        lines.append(hint)
        raise WeightsMismatchError("\n".join(lines), missing=missing if strict else [],
                                   unexpected=unexpected if strict else [],
                                   shape_mismatches=shapes)
    model.load_state_dict(tensors, strict=strict)
