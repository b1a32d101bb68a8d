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

__all__ = ["SOURCES", "create_base"]

SOURCES = ("prunekit", "torchvision")

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
