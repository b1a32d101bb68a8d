"""Saving, loading and exporting (pruned) models.

A pruned model is stored as ONE ``.safetensors`` file: its state dict, plus a JSON *spec* in
the safetensors header metadata (key ``"prunekit_spec"``) that says how to rebuild the
architecture. No Python object is pickled, so loading a file can never execute code.

Pruning keeps every module class but shrinks tensors and changes a few integer attributes, so
the spec records (1) the *base* model the network started from (``create`` name + kwargs, or a
torchvision builder), (2) the shape of every tensor, and (3) the structural attributes
(``out_channels``, ``groups``, ZeroPadShortcut's ``positions``, ...) of every module whose
attributes differ from a freshly built base. Loading builds the base, swaps in empty tensors of
the saved shapes, restores those attributes and then loads the weights strictly::

    {"format": "prunekit/1",
     "base": {"source": "prunekit", "name": "cifar_resnet56", "kwargs": {"num_classes": 10, ...}},
     "shapes": {"conv1.weight": [8, 3, 3, 3], ...},
     "modules": {"conv1": {"in_channels": 3, "out_channels": 8, "groups": 1}, ...},
     "method": ..., "recipe": ..., "plan": ..., "metrics": ...,
     "prunekit_version": "0.1.0", "torch_version": "2.14.1"}

>>> import torch, prunekit, prunekit.io
>>> model = prunekit.models.create("cifar_resnet56")
>>> result = prunekit.prune(model, torch.randn(1, 3, 32, 32), ratio=0.5)
>>> prunekit.io.save(model, "resnet56-pruned.safetensors", method="l1", plan=result.plan)
>>> same = prunekit.io.load("resnet56-pruned.safetensors").eval()
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .models.cifar_resnet import ZeroPadShortcut
from .models.registry import SPEC_ATTR, UnknownModelError, create
from .models.weights import (WeightsLoadError, WeightsMismatchError, compare_state, listing,
                             mismatch_lines)

__all__ = [
    "FORMAT",
    "create_base",
    "load",
    "load_state_into",
    "read_spec",
    "register_replacement",
    "register_structural_attributes",
    "save",
    "structural_attributes",
]

FORMAT = "prunekit/1"
SPEC_KEY = "prunekit_spec"
SAVED_SPEC_ATTR = "prunekit_saved_spec"
SOURCES = ("prunekit", "torchvision")

# Module attributes that describe shape rather than behaviour: pruning rewrites them, and a
# rebuilt base model would otherwise keep the unpruned values. Matched with isinstance, so
# subclasses (Conv2d, BatchNorm1d, ...) are covered; classes may instead list theirs in a class
# attribute ``prunekit_structural``. An entry may carry a restore function for modules that
# derive more state from these attributes than setattr would update.
Restore = Callable[[nn.Module, dict[str, Any]], None]


def _restore_zero_pad_shortcut(module: nn.Module, attrs: dict[str, Any]) -> None:
    # set_positions also rebuilds front/back and the non-persistent scatter index buffer,
    # which no state dict carries.
    if "positions" in attrs and hasattr(module, "set_positions"):
        module.set_positions([int(p) for p in attrs["positions"]], int(attrs["out_channels"]))
    else:
        for attr, value in attrs.items():
            setattr(module, attr, value)


_STRUCTURAL: dict[type, tuple[tuple[str, ...], Restore | None]] = {
    nn.modules.conv._ConvNd: (("in_channels", "out_channels", "groups"), None),
    nn.Linear: (("in_features", "out_features"), None),
    nn.modules.batchnorm._NormBase: (("num_features",), None),
    nn.GroupNorm: (("num_channels", "num_groups"), None),
    nn.LayerNorm: (("normalized_shape",), None),
    nn.PReLU: (("num_parameters",), None),
    ZeroPadShortcut: (("positions", "front", "back", "in_channels", "out_channels"),
                      _restore_zero_pad_shortcut),
}

# torchvision builders silently change some constructor defaults when pretrained weights are
# requested; load always rebuilds with weights=None, so the spec must spell these out or the
# rebuilt network would compute something else (transform_input) or have other keys (aux heads).
_TORCHVISION_PRETRAINED_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"transform_input": True, "aux_logits": False},
    "inception_v3": {"transform_input": True},
}


def register_structural_attributes(
    cls: type, names: Sequence[str], *, restore: Restore | None = None
) -> None:
    """Record attributes ``names`` of modules of class ``cls`` (and subclasses) in saved specs.

    Needed for custom modules whose attributes a pruning rule changes, so that :func:`load`
    can restore them on the rebuilt base model. ``restore(module, attrs)`` replaces the
    default ``setattr`` for modules that must recompute derived state from them.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"expected an nn.Module subclass, got {cls!r}")
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a sequence of attribute names, got {names!r}")
    known, known_restore = _STRUCTURAL.get(cls, ((), None))
    _STRUCTURAL[cls] = (known + tuple(n for n in names if n not in known),
                        restore or known_restore)


# Modules that pruning puts in place of others (SWP's StripeConv2d for a Conv2d, ShortcutBlock
# for an emptied residual block). Such a class defines ``prunekit_init(self) -> dict`` (JSON)
# and a classmethod ``prunekit_build(original, init)`` that rebuilds it on a fresh base model,
# given the module it replaced there.
_REPLACEMENTS: dict[str, type] = {}


def register_replacement(cls: type) -> type:
    """Let :func:`save` / :func:`load` store modules of class ``cls`` that replaced a module of
    the base model (class decorator; see ``_REPLACEMENTS``)."""
    if not (hasattr(cls, "prunekit_init") and hasattr(cls, "prunekit_build")):
        raise TypeError(f"{cls.__name__} needs prunekit_init() and a prunekit_build classmethod")
    _REPLACEMENTS[cls.__name__] = cls
    return cls


def _replaced_modules(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, Any]]:
    from .methods import swp  # noqa: F401  registers StripeConv2d and ShortcutBlock

    reference_modules = dict(reference.named_modules())
    replaced: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "prunekit_init") or any(name.startswith(r + ".") for r in replaced):
            continue
        if type(reference_modules.get(name)) is type(module):
            continue
        if type(module).__name__ not in _REPLACEMENTS:
            raise TypeError(f"module '{name}' ({type(module).__name__}) replaced a module of the "
                            "base model but its class is not registered with "
                            "prunekit.io.register_replacement")
        replaced[name] = {"class": type(module).__name__,
                          "init": _jsonable(module.prunekit_init(), f"{name} init")}
    return replaced


def _rebuild_replaced(model: nn.Module, replaced: Mapping[str, Any], path: Path) -> None:
    from .methods import swp  # noqa: F401  registers StripeConv2d and ShortcutBlock

    for name, entry in replaced.items():
        cls = _REPLACEMENTS.get(entry.get("class"))
        if cls is None:
            raise WeightsLoadError(f"{path}: module '{name}' is a {entry.get('class')!r}, which "
                                   "this prunekit does not know; upgrade prunekit")
        try:
            original = model.get_submodule(name)
        except AttributeError as exc:
            raise WeightsMismatchError(f"{path}: the base model has no module '{name}' to "
                                       "replace; the file may come from another version",
                                       missing=[], unexpected=[], shape_mismatches=[]) from exc
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, cls.prunekit_build(original, entry["init"]))


def structural_attributes(module: nn.Module) -> dict[str, Any]:
    """The structural attributes of ``module`` as JSON values (tuples become lists)."""
    names: list[str] = []
    for cls, (attrs, _) in _STRUCTURAL.items():
        if isinstance(module, cls):
            names.extend(attrs)
    names.extend(getattr(type(module), "prunekit_structural", ()))
    return {
        name: _jsonable(getattr(module, name), f"{type(module).__name__}.{name}")
        for name in dict.fromkeys(names)
        if hasattr(module, name)
    }


def create_base(source: str, name: str, **kwargs: Any) -> nn.Module:
    """Build a model that :func:`save` can describe without an explicit ``base=``.

    ``source="prunekit"`` is :func:`prunekit.models.create`; ``source="torchvision"`` is
    ``torchvision.models.get_model(name, **kwargs)``. ``weights`` may be passed in ``kwargs``
    (e.g. ``weights="DEFAULT"``); it is not recorded, since a saved file carries its own weights.
    """
    weights = kwargs.pop("weights", None)
    if source == "prunekit":
        return create(name, weights=weights, **kwargs)  # the registry stamps the spec itself
    if source != "torchvision":
        raise ValueError(f"unknown model source {source!r}; expected one of {SOURCES}")
    recorded = dict(kwargs)
    if weights is not None:
        for key, value in _TORCHVISION_PRETRAINED_DEFAULTS.get(name, {}).items():
            recorded.setdefault(key, value)
    recorded = _jsonable(recorded, f"torchvision {name}() kwargs")
    model = _torchvision_model(name, weights, kwargs)
    setattr(model, SPEC_ATTR, {"source": "torchvision", "name": name, "kwargs": recorded})
    return model


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base: Sequence[Any] | Mapping[str, Any] | None = None,
    method: Any = None,
    recipe: Any = None,
    plan: Any = None,
    metrics: Any = None,
    spec_json: bool | str | os.PathLike = False,
) -> Path:
    """Save ``model`` (pruned or not) with its spec as one ``.safetensors`` file.

    ``base`` is ``(source, name, kwargs)`` or ``{"source", "name", "kwargs"}``; it defaults to
    the ``prunekit_spec`` that :func:`prunekit.models.create` and :func:`create_base` attach.
    ``method``, ``recipe``, ``plan`` and ``metrics`` are free-form JSON stored in the spec.
    ``spec_json=True`` also writes a readable copy as ``spec.json`` in the same folder (or at
    the given path); :func:`load` never reads it. Returns the path written.
    """
    model = _unwrap(model)
    path = Path(path)
    base_spec = _resolve_base(model, base)
    reference = _reference_model(base_spec)
    tensors = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}; "
                            "safetensors files hold tensors only")
        # A private CPU copy: safetensors rejects tensors that share storage (tied weights,
        # views) and needs contiguous host memory.
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    spec = {
        "format": FORMAT,
        "base": base_spec,
        "shapes": {key: list(t.shape) for key, t in tensors.items()},
        "modules": _changed_modules(model, reference),
        "replaced": _replaced_modules(model, reference),
        "method": _jsonable(method, "method"),
        "recipe": _jsonable(recipe, "recipe"),
        "plan": _jsonable(plan, "plan"),
        "metrics": _jsonable(metrics, "metrics"),
        "prunekit_version": __version__,
        "torch_version": torch.__version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted save never leaves a truncated file under `path`.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={SPEC_KEY: json.dumps(spec), "format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if spec_json:
        readable = path.parent / "spec.json" if spec_json is True else Path(spec_json)
        readable.write_text(json.dumps(spec, indent=2) + "\n")
    return path


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


def _unwrap(model: nn.Module) -> nn.Module:
    # DataParallel/DDP and torch.compile wrap the network and prefix every state dict key.
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _resolve_base(model: nn.Module, base: Any) -> dict[str, Any]:
    if base is None:
        spec = getattr(model, SPEC_ATTR, None)
        if spec is None:
            raise ValueError(
                f"cannot tell which architecture this {type(model).__name__} was built from: "
                "pass base=('torchvision', 'resnet50', {...kwargs}) to save(), or build the model "
                "with prunekit.models.create(...) or prunekit.io.create_base(...)"
            )
        source, name, kwargs = spec.get("source", "prunekit"), spec["name"], spec["kwargs"]
    elif isinstance(base, Mapping):
        source, name, kwargs = base.get("source", "prunekit"), base["name"], base.get("kwargs", {})
    elif isinstance(base, Sequence) and not isinstance(base, str) and len(base) in (2, 3):
        source, name, kwargs = base[0], base[1], base[2] if len(base) == 3 else {}
    else:
        raise TypeError(f"base must be (source, name, kwargs) or a dict, got {base!r}")
    if source not in SOURCES:
        raise ValueError(f"unknown model source {source!r}; expected one of {SOURCES}")
    if not isinstance(name, str) or not isinstance(kwargs, Mapping):
        raise TypeError(f"base name must be a str and kwargs a dict, got {name!r}, {kwargs!r}")
    return {"source": source, "name": name, "kwargs": _jsonable(dict(kwargs), f"{name} kwargs")}


def _reference_model(base: Mapping[str, Any]) -> nn.Module:
    """A freshly built base to diff against; on the meta device when possible, as only its
    attributes are read and initialising large torchvision weights would waste seconds."""
    try:
        with torch.device("meta"):
            return create_base(base["source"], base["name"], **base["kwargs"])
    except Exception:  # some builders compute on tensors at init; retry for real
        return create_base(base["source"], base["name"], **base["kwargs"])


def _changed_modules(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, Any]]:
    reference_modules = dict(reference.named_modules())
    changed = {}
    for name, module in model.named_modules():
        attrs = structural_attributes(module)
        if not attrs:
            continue
        ref = reference_modules.get(name)
        if ref is None or structural_attributes(ref) != attrs:
            changed[name] = attrs
    return changed


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


def _parse_spec(path: Path, text: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
        fmt = spec["format"]
        base = spec["base"]
        ok = (isinstance(base["name"], str) and isinstance(base.get("kwargs", {}), dict)
              and isinstance(spec.get("modules", {}), dict))
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsLoadError(f"the prunekit spec in {path} is corrupt ({err}); re-save the "
                               "model with prunekit.io.save") from None
    if not ok or base.get("source", "prunekit") not in SOURCES:
        raise WeightsLoadError(f"the prunekit spec in {path} is malformed; re-save the model")
    if fmt != FORMAT:
        raise WeightsLoadError(f"{path} uses format {fmt!r} but this prunekit (version "
                               f"{__version__}) reads {FORMAT!r}; upgrade prunekit")
    base.setdefault("source", "prunekit")
    base.setdefault("kwargs", {})
    spec.setdefault("modules", {})
    return spec


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
        for cls, (names, restore) in _STRUCTURAL.items():
            if restore is not None and isinstance(module, cls):
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


def _torchvision_model(name: str, weights: Any, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        models = importlib.import_module("torchvision.models")
    except ImportError:
        raise ImportError(f"torchvision is needed to build {name!r}: "
                          "pip install prunekit[vision]") from None
    available = models.list_models()
    if name not in available:
        raise UnknownModelError(name, available)
    return models.get_model(name, weights=weights, **kwargs)


def _jsonable(value: Any, what: str) -> Any:
    """``value`` as plain JSON types; numpy/torch scalars and arrays are converted."""

    def convert(obj: Any) -> Any:
        if hasattr(obj, "tolist"):  # numpy arrays and scalars, tensors
            return obj.tolist()
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        if hasattr(obj, "to_dict"):  # e.g. a PruningResult passed as metrics
            return obj.to_dict()
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(value, default=convert))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable to be stored in the spec ({err})") \
            from None


# --- export internals --------------------------------------------------------------------


# Exporting lives in prunekit.export; these names stay importable from prunekit.io.
from .export import ExportCheckError, export_onnx, export_torchscript  # noqa: E402,F401  (re-export)
