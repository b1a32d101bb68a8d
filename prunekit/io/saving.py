"""Saving a (pruned) model: its tensors plus a spec that says how far it differs from a
freshly built base model (tensor shapes, structural attributes, replaced modules), written
atomically as one ``.safetensors`` file."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..files import atomic_write, atomic_write_text
from ..models.registry import SPEC_ATTR
from ..nn.registry import replacement_class, structural_attribute_names
from ..version import __version__
from .jsonable import _jsonable
from .sources import SOURCES, create_base
from .spec import FORMAT, SPEC_KEY

# Imported for their side effect: they register the classes the registries above must know
# before any save, StripeConv2d and ShortcutBlock as replacements and ZeroPadShortcut's
# structural attributes.
from ..models import cifar_resnet  # noqa: F401  isort: skip
from ..nn import shortcut, stripe  # noqa: F401  isort: skip

__all__ = ["save", "structural_attributes"]


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
    # Serialised completely before the temporary file is written, and renamed over `path`
    # only then: an interrupted save never leaves a truncated file under `path`.
    data = safetensors_bytes(tensors, metadata={SPEC_KEY: json.dumps(spec), "format": "pt"})
    atomic_write(path, lambda stream: stream.write(data))
    if spec_json:
        readable = path.parent / "spec.json" if spec_json is True else Path(spec_json)
        atomic_write_text(readable, json.dumps(spec, indent=2) + "\n")
    return path


def structural_attributes(module: nn.Module) -> dict[str, Any]:
    """The structural attributes of ``module`` as JSON values (tuples become lists)."""
    return {
        name: _jsonable(getattr(module, name), f"{type(module).__name__}.{name}")
        for name in structural_attribute_names(module)
        if hasattr(module, name)
    }


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


def _replaced_modules(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, Any]]:
    reference_modules = dict(reference.named_modules())
    replaced: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "prunekit_init") or any(name.startswith(r + ".") for r in replaced):
            continue
        if type(reference_modules.get(name)) is type(module):
            continue
        if replacement_class(type(module).__name__) is None:
            raise TypeError(f"module '{name}' ({type(module).__name__}) replaced a module of the "
                            "base model but its class is not registered with "
                            "prunekit.io.register_replacement")
        replaced[name] = {"class": type(module).__name__,
                          "init": _jsonable(module.prunekit_init(), f"{name} init")}
    return replaced
