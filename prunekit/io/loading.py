"""Loading a file written by :func:`prunekit.io.save`: read and check its spec, rebuild the
base model, put back the replaced modules, tensors (shapes and dtypes) and structural
attributes the spec records, check that attributes and tensors agree, then load the weights
with a readable report of anything that does not fit.

The spec is untrusted input: loading sets only the structural attributes each module kind
declares, after their checks (:mod:`prunekit.io.structure`), builds the base model without
pretrained weights (never reading a weights file nor touching the network) and lets no
tensor change kind (a float tensor may change precision, an index tensor may not).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import PrunekitError
from ..models.registry import SPEC_ATTR
from ..models.weights import (WeightsLoadError, WeightsMismatchError, compare_state, listing,
                              mismatch_lines)
from ..nn.registry import replacement_entry
from .consistency import consistency_problems
from .saving import _unwrap
from .sources import PRETRAINED_KEYS, build_saved_base
from .spec import SAVED_SPEC_ATTR, SPEC_KEY, _check_shapes, _parse_spec
from .structure import (SpecProblem, build_replacement, checked_attributes, checked_init,
                        declared_shapes, own_tensors, restore_attributes)

# Imported for its side effect: it registers the classes the registries must know before
# any load (StripeConv2d and ShortcutBlock as replacements, with the checks of their init
# payloads, and ZeroPadShortcut's structural attributes).
from . import replacements  # noqa: F401  isort: skip

_EDITED = "the file was edited or comes from another program; re-save it with prunekit.io.save"

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
    trusted_modules: Sequence[str] | str = (),
) -> nn.Module:
    """Rebuild and return the model saved in ``path`` by :func:`save`.

    The model is returned in training mode (call ``.eval()``), with ``model.prunekit_spec``
    (its base) and ``model.prunekit_saved_spec`` (the whole spec) set; every tensor has the
    dtype it was saved with. ``expect`` names the architecture the caller wants; a file of
    another one raises WeightsMismatchError. ``strict=False`` tolerates missing/unexpected
    tensors, never wrong shapes. A model of the user's own code (``package.module:function``)
    is rebuilt only when its package is in ``trusted_modules`` (or in
    ``$PRUNEKIT_TRUSTED_MODULES``): importing it runs it. The preprocessing the model was saved
    with (if any) is set as ``model.prunekit_preprocessing``.

    Raises:
        FileNotFoundError: no such file.
        WeightsLoadError: not a (complete) safetensors file, one without a prunekit spec, or
            one whose spec sets an attribute its module kind does not declare, a value that
            fails the attribute's check, or asks for pretrained weights.
        UnknownModelError: the base model is not known to this installation.
        WeightsMismatchError: wrong architecture for ``expect``, tensors that do not fit, or
            structural attributes that disagree with the stored tensors' shapes.
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
    model = _build_base(base, path, trusted_modules)
    _rebuild_replaced(model, spec["replaced"], path, tensors)
    unresizable = _resize_tensors(model, tensors, path)
    _restore_structure(model, spec["modules"], path)
    _check_consistency(model, path)
    _load_checked(model, tensors, strict, path, base["name"], unresizable,
                  hint="The file may come from an incompatible prunekit/torchvision version "
                       "or have an edited spec; re-save it from the original model.")
    model.to(map_location)
    setattr(model, SPEC_ATTR, dict(base) if base["source"] != "prunekit"
            else {"name": base["name"], "kwargs": base["kwargs"]})
    setattr(model, SAVED_SPEC_ATTR, spec)
    if isinstance(spec.get("preprocessing"), Mapping):
        model.prunekit_preprocessing = dict(spec["preprocessing"])
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
    ``shapes`` are a copy for readers of ``read_spec``/``spec.json``, and a file whose copy
    disagrees with the header is refused (WeightsMismatchError naming the tensor).
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
    if text is None:
        return None, content
    spec = _parse_spec(path, text)
    _check_shapes(path, spec, {k: list(v.shape) if tensors else v for k, v in content.items()})
    return spec, content


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


def _build_base(base: Mapping[str, Any], path: Path, trusted_modules) -> nn.Module:
    asked = [key for key in PRETRAINED_KEYS if key in base["kwargs"]]
    if asked:
        raise WeightsLoadError(f"the spec in {path} asks for pretrained weights "
                               f"({', '.join(asked)}) for its {base['name']} base; a file "
                               f"written by prunekit.io.save never does (it holds its own "
                               f"weights), so nothing is downloaded: {_EDITED}")
    try:
        return build_saved_base(base["source"], base["name"], base["kwargs"],
                                trusted_modules=trusted_modules)
    except PrunekitError:
        raise  # UnknownModelError: the base model is not known to this installation
    except (TypeError, ValueError) as err:
        raise WeightsLoadError(f"the spec in {path} names a base model that cannot be built: "
                               f"{base['name']}({err}); a file written by prunekit.io.save "
                               f"never does: {_EDITED}") from None


def _spec_error(path: Path, problem: SpecProblem) -> WeightsLoadError:
    if not problem.declared:
        return WeightsLoadError(f"the spec in {path} sets {problem.where}, which prunekit never "
                                f"restores ({problem.reason}); {_EDITED}")
    return WeightsLoadError(f"the spec in {path} sets {problem.where} to {problem.value!r}, "
                            f"which is not allowed: {problem.reason}; {_EDITED}")


def _mismatch(path: Path, lines: list[str], shapes: list[tuple[str, Any, Any]]
              ) -> WeightsMismatchError:
    return WeightsMismatchError(
        f"the spec in {path} does not agree with the tensors it stores:\n  "
        + "\n  ".join(lines) + f"\n{_EDITED[0].upper()}{_EDITED[1:]}.",
        missing=[], unexpected=[], shape_mismatches=shapes)


def _rebuild_replaced(model: nn.Module, replaced: Mapping[str, Any], path: Path,
                      tensors: Mapping[str, torch.Tensor]) -> None:
    for name, entry in replaced.items():
        registered = replacement_entry(entry.get("class"))
        if registered is None:
            raise WeightsLoadError(f"{path}: module '{name}' is a {entry.get('class')!r}, which "
                                   "this prunekit does not know; upgrade prunekit")
        try:
            init = checked_init(name, registered, entry["init"])
            # Compared with the stored tensors before the class allocates anything.
            declared = declared_shapes(name, registered, init)
            _same_shapes(path, declared or {}, tensors)
            built = build_replacement(model, name, registered, init)
        except SpecProblem as problem:
            raise _spec_error(path, problem) from None
        except (AttributeError, ValueError) as exc:  # no such module, or the root
            raise WeightsMismatchError(f"{path}: the base model has no module '{name}' to "
                                       "replace; the file may come from another version",
                                       missing=[], unexpected=[], shape_mismatches=[]) from exc
        # The class builds its own tensors in their final shapes; nothing resizes them.
        _same_shapes(path, {k: tuple(t.shape) for k, t in own_tensors(name, built).items()},
                     tensors)


def _same_shapes(path: Path, shapes: Mapping[str, tuple[int, ...]],
                 tensors: Mapping[str, torch.Tensor]) -> None:
    wrong = [(k, tuple(tensors[k].shape), tuple(s)) for k, s in shapes.items()
             if k in tensors and tuple(tensors[k].shape) != tuple(s)]
    if wrong:
        raise _mismatch(path, [f"{k} has shape {list(a)} but the module's init payload "
                               f"needs {list(b)}" for k, a, b in wrong], wrong)


def _resize_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                    path: Path | str = "the file") -> list[str]:
    """Give every parameter/buffer the saved shape and dtype (load_state_dict would convert
    to the base model's float32); returns the names that cannot be resized. Tied tensors
    stay tied."""
    current = model.state_dict(keep_vars=True)
    adopted: dict[int, torch.Tensor] = {}
    failed, wrong_kind = [], []
    for key, saved in tensors.items():
        old = current.get(key)
        if not isinstance(old, torch.Tensor):
            continue  # unknown keys are reported by _load_checked
        if _kind(old) != _kind(saved):
            wrong_kind.append(f"{key} is {saved.dtype} in the file but {old.dtype} in the model")
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        # Fresh, aligned storage (not the file's buffer), filled by load_state_dict.
        fresh = torch.empty(saved.shape, dtype=saved.dtype, device=old.device)
        if id(old) in adopted:
            new = adopted[id(old)]
        elif attr in owner._parameters:
            new = nn.Parameter(fresh, requires_grad=old.requires_grad)
        elif attr in owner._buffers:
            new = fresh
        else:  # an entry a custom _save_to_state_dict produced; only the module can resize it
            failed.append(key)
            continue
        adopted[id(old)] = new
        (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = new
    if wrong_kind:
        raise WeightsMismatchError(
            f"tensors in {path} are of another kind than the model's: {listing(wrong_kind)}. "
            f"{_EDITED[0].upper()}{_EDITED[1:]}.", missing=[], unexpected=[], shape_mismatches=[])
    return failed


def _kind(tensor: torch.Tensor) -> Any:
    # Floating point tensors may be stored in any precision; others keep their exact dtype.
    return "float" if tensor.is_floating_point() else tensor.dtype


def _restore_structure(model: nn.Module, modules: Mapping[str, Any], path: Path | str) -> None:
    absent = []
    for name, attrs in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            absent.append(name)
            continue
        try:
            restore_attributes(name, module, checked_attributes(name, module, attrs))
        except SpecProblem as problem:
            raise _spec_error(Path(path), problem) from None
    if absent:
        raise WeightsMismatchError(
            f"the spec in {path} describes modules the rebuilt base model lacks: "
            f"{listing(absent)}. The file may come from an incompatible version; re-save it.",
            missing=[], unexpected=[], shape_mismatches=[])


def _check_consistency(model: nn.Module, path: Path) -> None:
    problems = consistency_problems(model)
    if problems:
        raise _mismatch(path, [f"{key} {what}" for key, what, _, _ in problems],
                        [(k, a, b) for k, _, a, b in problems if a is not None])


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
    # safetensors keeps no state dict metadata; modules that read their layout version from
    # it (torchvision's MNASNet refuses None) get the versions of the model's own classes,
    # the layout the saving code wrote.
    state = OrderedDict(tensors)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:  # a module's own check of what it was given
        raise WeightsMismatchError(f"weights in {path} were refused by the model: {err}\n{hint}",
                                   missing=[], unexpected=[], shape_mismatches=[]) from None
