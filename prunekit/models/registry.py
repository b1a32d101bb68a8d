"""Name -> builder registry for the models prunekit knows how to prune.

Builders are plain functions registered with :func:`register_model`; the function name is the
model name (``cifar_resnet56``), as in ``torchvision.models`` and ``timm``.  Every model a
registered builder returns carries ``model.prunekit_spec = {"name": ..., "kwargs": {...}}``:
after physical pruning the architecture can no longer be inferred from the name alone, so the
save/load code stores the spec (see :func:`get_model_spec`) and rebuilds the skeleton with
``create(spec["name"], **spec["kwargs"])`` before loading the pruned state dict.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import functools
import inspect
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError, PrunekitError
from .weights import PretrainedWeights, find_pretrained_file, load_weights

__all__ = [
    "check_positive_int",
    "UnknownModelError",
    "create",
    "get_model_spec",
    "get_pretrained_weights",
    "list_models",
    "register_model",
]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_SIGNATURES: dict[str, inspect.Signature] = {}
_PRETRAINED: dict[str, PretrainedWeights] = {}

SPEC_ATTR = "prunekit_spec"


class UnknownModelError(PrunekitError, ValueError):
    """Raised by :func:`create` for a name no builder was registered under."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = available
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        super().__init__(
            f"unknown model {name!r}.{hint} Available models: {', '.join(available)}"
        )


def register_model(
    fn: Callable[..., nn.Module] | None = None, *, pretrained: PretrainedWeights | None = None
):
    """Register a model builder under its function name.

    Use as ``@register_model`` or ``@register_model(pretrained=PretrainedWeights(...))``.
    The returned wrapper behaves like ``fn`` but stamps the result with its spec, so models
    built by calling the builder directly can be saved and rebuilt just like ``create``'s.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _BUILDERS:
            raise ValueError(f"a model named {name!r} is already registered")
        signature = inspect.signature(builder)

        @functools.wraps(builder)
        def build(*args: Any, **kwargs: Any) -> nn.Module:
            spec_kwargs = _bind(name, signature, args, kwargs)
            model = builder(*args, **kwargs)
            setattr(model, SPEC_ATTR, {"name": name, "kwargs": spec_kwargs})
            return model

        _BUILDERS[name] = build
        _SIGNATURES[name] = signature
        if pretrained is not None:
            _PRETRAINED[name] = pretrained
        return build

    return decorate(fn) if fn is not None else decorate


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by an ``fnmatch`` pattern (``"cifar_*"``)."""
    names = sorted(_BUILDERS)
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n, pattern.lower())]


def get_pretrained_weights(name: str) -> PretrainedWeights | None:
    """The shared pretrained checkpoint registered for ``name``, if any."""
    _builder(name)
    return _PRETRAINED.get(name)


def check_positive_int(value: Any, name: str, model: str) -> int:
    """``value`` as a size argument of ``model`` (an int >= 1, not a bool), or ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{model}: {name} must be a whole number >= 1, got {value!r}")
    return int(value)


def create(
    name: str, weights: str | os.PathLike | Mapping[str, Any] | None = None, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` with constructor arguments ``kwargs``.

    ``weights`` may be ``None`` (random init), ``"pretrained"`` (the shared checkpoint
    registered for this model, located as described in :mod:`prunekit.models.weights`),
    a path to a checkpoint file, or a state dict; files and state dicts go through
    :func:`load_weights` with ``strict=True``.
    """
    builder = _builder(name)
    for size in ("num_classes", "hidden_features"):
        if size in kwargs:
            check_positive_int(kwargs[size], size, name)
    source = weights
    if isinstance(weights, str) and weights == "pretrained":
        source = _pretrained_source(name, kwargs)
    model = builder(**kwargs)
    if source is not None:
        load_weights(model, source)
    return model


def get_model_spec(model: nn.Module) -> dict[str, Any]:
    """``{"name", "kwargs"}`` that rebuild ``model``'s architecture via :func:`create`.

    Channel widths are re-read from the modules (``model.channel_config()``), so the spec
    stays true after the model has been physically pruned.
    """
    spec = getattr(model, SPEC_ATTR, None)
    if spec is None:
        raise ValueError(
            f"{type(model).__name__} was not built by a registered prunekit builder, so it has "
            "no 'prunekit_spec'; build it with prunekit.models.create(name, ...)"
        )
    spec = copy.deepcopy(spec)
    channel_config = getattr(model, "channel_config", None)
    if callable(channel_config):
        spec["kwargs"].update(_json_roundtrip(spec["name"], channel_config()))
    return spec


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _BUILDERS[name]
    except KeyError:
        raise UnknownModelError(name, list_models()) from None


def _bind(
    name: str, signature: inspect.Signature, args: tuple, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """All constructor arguments by name, defaults included.

    Defaults are recorded too so a checkpoint keeps rebuilding the same network if a default
    changes in a later release.
    """
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{name}(): {err}") from None
    bound.apply_defaults()
    flat: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif signature.parameters[key].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{name}(): positional *args cannot be recorded in a model spec")
        else:
            flat[key] = value
    return _json_roundtrip(name, flat)


def _json_roundtrip(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    # Round-tripping normalises tuples to lists now rather than surprising the loader later.
    try:
        return json.loads(json.dumps(dict(kwargs)))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name}(): constructor arguments must be JSON-serialisable to be saved with a "
            f"pruned model ({err})"
        ) from None


def _pretrained_source(name: str, kwargs: Mapping[str, Any]):
    info = _PRETRAINED.get(name)
    if info is None:
        have = ", ".join(sorted(_PRETRAINED)) or "none"
        raise ValueError(
            f"no pretrained weights are registered for {name!r}; models with pretrained "
            f"weights: {have}"
        )
    requested = _bind(name, _SIGNATURES[name], (), kwargs)
    conflicts = {
        key: (requested.get(key), want)
        for key, want in info.requires.items()
        if requested.get(key) != want
    }
    if conflicts:
        detail = "; ".join(f"{k}={got!r} but the checkpoint needs {k}={want!r}"
                           for k, (got, want) in conflicts.items())
        raise ValueError(f"pretrained weights for {name!r} do not fit this configuration: {detail}")
    return find_pretrained_file(info)
