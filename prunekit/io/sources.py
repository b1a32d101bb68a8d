"""Model sources: the builders a spec's ``base`` may name (``"source"``) and
:func:`create_base`, which builds a model that :func:`prunekit.io.save` can describe.

``"prunekit"`` is :func:`prunekit.models.create`; ``"torchvision"`` is
``torchvision.models.get_model``.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..models.registry import SPEC_ATTR, UnknownModelError, create
from .jsonable import _jsonable

__all__ = ["PRETRAINED_KEYS", "SOURCES", "build_saved_base", "create_base"]

SOURCES = ("prunekit", "torchvision")

# Builder arguments that fetch or load pretrained weights. A saved file carries its own
# weights, so its base never names them: create_base and save leave them out, and load
# refuses a spec that has them (it was edited) rather than let a builder download.
PRETRAINED_KEYS = ("weights", "pretrained", "weights_backbone", "pretrained_backbone")

# torchvision builders silently change some constructor defaults when pretrained weights are
# requested; load always rebuilds with weights=None, so the spec must spell these out or the
# rebuilt network would compute something else (transform_input) or have other keys (aux heads).
_TORCHVISION_PRETRAINED_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"transform_input": True, "aux_logits": False},
    "inception_v3": {"transform_input": True},
}


def create_base(source: str, name: str, **kwargs: Any) -> nn.Module:
    """Build a model that :func:`~prunekit.io.save` can describe without an explicit ``base=``.

    ``source="prunekit"`` is :func:`prunekit.models.create`; ``source="torchvision"`` is
    ``torchvision.models.get_model(name, **kwargs)``. ``weights`` may be passed in ``kwargs``
    (e.g. ``weights="DEFAULT"``); it and the other :data:`PRETRAINED_KEYS` are not recorded,
    since a saved file carries its own weights.
    """
    weights = kwargs.pop("weights", None)
    if source == "prunekit":
        return create(name, weights=weights, **kwargs)  # the registry stamps the spec itself
    if source != "torchvision":
        raise ValueError(f"unknown model source {source!r}; expected one of {SOURCES}")
    recorded = {k: v for k, v in kwargs.items() if k not in PRETRAINED_KEYS}
    if weights is not None:
        for key, value in _TORCHVISION_PRETRAINED_DEFAULTS.get(name, {}).items():
            recorded.setdefault(key, value)
    recorded = _jsonable(recorded, f"torchvision {name}() kwargs")
    model = _torchvision_model(name, weights, kwargs)
    setattr(model, SPEC_ATTR, {"source": "torchvision", "name": name, "kwargs": recorded})
    return model


def build_saved_base(source: str, name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The base model a saved spec names, randomly initialised: never with pretrained
    weights, so building it never reads a weights file nor touches the network.

    Raises ValueError if ``kwargs`` hold one of :data:`PRETRAINED_KEYS`.
    """
    asked = [key for key in PRETRAINED_KEYS if key in kwargs]
    if asked:
        raise ValueError(f"the base kwargs ask for pretrained weights ({', '.join(asked)})")
    if source == "prunekit":
        return create(name, weights=None, **kwargs)
    if source != "torchvision":
        raise ValueError(f"unknown model source {source!r}; expected one of {SOURCES}")
    model = _torchvision_model(name, None, kwargs)
    setattr(model, SPEC_ATTR, {"source": "torchvision", "name": name,
                               "kwargs": _jsonable(dict(kwargs), f"torchvision {name}() kwargs")})
    return model


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
