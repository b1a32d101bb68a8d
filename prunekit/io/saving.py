"""Saving a (pruned) model: its tensors plus a spec that says how far it differs from a
freshly built base model (tensor shapes and dtypes, structural attributes, replaced
modules), written atomically as one ``.safetensors`` file. A model the spec cannot describe
exactly is refused (:class:`~prunekit.io.errors.SaveError`, see :mod:`prunekit.io.describe`)
instead of written to a file that would not load back."""
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
from ..version import __version__
from .describe import _changed_modules, describe, structural_attributes  # noqa: F401
from .errors import SaveError
from .jsonable import _jsonable
from .sources import PRETRAINED_KEYS, SOURCES, build_saved_base, module_package
from .spec import FORMAT, SPEC_KEY

# Imported for its side effect: it registers the classes the registries must know before
# any save (StripeConv2d and ShortcutBlock as replacements, with the checks of their init
# payloads, and ZeroPadShortcut's structural attributes).
from . import replacements  # noqa: F401  isort: skip

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
    preprocessing: Any = None,
    spec_json: bool | str | os.PathLike = False,
) -> Path:
    """Save ``model`` (pruned or not) with its spec as one ``.safetensors`` file.

    ``base`` is ``(source, name, kwargs)`` or ``{"source", "name", "kwargs"}``; it defaults to
    the ``prunekit_spec`` that :func:`prunekit.models.create` and :func:`create_base` attach.
    ``method``, ``recipe``, ``plan`` and ``metrics`` are free-form JSON stored in the spec.
    ``preprocessing`` (a :class:`prunekit.data.Preprocessing` or its dict; default: the
    model's ``prunekit_preprocessing``) says which images the model expects, so a loaded model
    is evaluated and fine-tuned as it was trained.
    ``spec_json=True`` also writes a readable copy as ``spec.json`` in the same folder (or at
    the given path); :func:`load` never reads it. Returns the path written.

    Every tensor keeps its dtype (float16, bfloat16, mixed). Raises SaveError, naming the
    module, tensor or attribute, for what a file cannot describe so that :func:`load`
    rebuilds the same network: a module the base model lacks or lacks of it, a changed class
    that is not a registered replacement, modules or tensors shared (aliased, tied)
    differently from the base model, and attributes that differ from the base model's but
    are not recorded structural attributes (or fail their checks).
    """
    model = _unwrap(model)
    path = Path(path)
    base_spec = _resolve_base(model, base)
    reference = _reference_model(base_spec)
    modules, replaced = describe(model, reference, base_spec["name"])
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
        "modules": modules,
        "replaced": replaced,
        "method": _jsonable(method, "method"),
        "recipe": _jsonable(recipe, "recipe"),
        "plan": _jsonable(plan, "plan"),
        "metrics": _jsonable(metrics, "metrics"),
        "preprocessing": _preprocessing(model, preprocessing),
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


def _preprocessing(model: nn.Module, given: Any) -> dict[str, Any] | None:
    given = getattr(model, "prunekit_preprocessing", None) if given is None else given
    if given is None:
        return None
    values = given.to_dict() if hasattr(given, "to_dict") else dict(given)
    return _jsonable(values, "preprocessing")


def _unwrap(model: nn.Module) -> nn.Module:
    # DataParallel/DDP and torch.compile wrap the network and prefix every state dict key.
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _resolve_base(model: nn.Module, base: Any) -> dict[str, Any]:
    if base is None:
        spec = getattr(model, SPEC_ATTR, None)
        if spec is None:
            raise SaveError(
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
        raise SaveError(f"unknown model source {source!r}; expected one of {SOURCES}")
    if not isinstance(name, str) or not isinstance(kwargs, Mapping):
        raise TypeError(f"base name must be a str and kwargs a dict, got {name!r}, {kwargs!r}")
    # The file carries the weights; a base that asks for pretrained ones would make load
    # read or download them (load refuses such a spec).
    kwargs = {k: v for k, v in kwargs.items() if k not in PRETRAINED_KEYS}
    return {"source": source, "name": name, "kwargs": _jsonable(kwargs, f"{name} kwargs")}


def _reference_model(base: Mapping[str, Any]) -> nn.Module:
    """A freshly built base to diff against; on the meta device when possible, as only its
    attributes are read and initialising large torchvision weights would waste seconds."""
    # The model being saved was built from this very code, so the user's module is trusted.
    trusted = [module_package(base["name"])] if base["source"] == "module" else []
    try:
        with torch.device("meta"):
            return build_saved_base(base["source"], base["name"], base["kwargs"],
                                    trusted_modules=trusted)
    except Exception:  # some builders compute on tensors at init; retry for real
        return build_saved_base(base["source"], base["name"], base["kwargs"],
                                trusted_modules=trusted)
