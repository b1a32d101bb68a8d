"""Where a model comes from: the zoo, torchvision, timm or the user's own builder, named by one
string (``cifar_resnet56``, ``torchvision:resnet50``, ``timm:resnet50d``,
``my.package.module:build_fn``) or a saved ``.safetensors``; how it is built with its
weights; and the images it expects (:func:`model_preprocessing`).

A model spec is a mapping ``{"source", "name", "weights", "kwargs"}`` (or ``{"path"}`` for a
saved model), as recipes write it and :func:`parse_model_ref` makes from the string.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..data.preprocess import Preprocessing
from ..errors import ConfigError
from .registry import SPEC_ATTR, create

__all__ = ["MODEL_SOURCES", "build_model", "model_preprocessing", "parse_model_ref"]

MODEL_SOURCES = ("prunekit", "torchvision", "timm", "module")


def parse_model_ref(text: str) -> dict[str, Any]:
    """``{"source", "name"}`` (or ``{"path"}``) for a ``--model`` string (see the module doc)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--model needs a model name, got {text!r}")
    text = text.strip()
    if text.endswith(".safetensors"):
        return {"path": text}
    if ":" not in text:
        return {"source": "prunekit", "name": text}
    prefix, _, name = text.partition(":")
    if prefix in ("torchvision", "timm", "prunekit"):
        return {"source": prefix, "name": name}
    return {"source": "module", "name": text}


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Build the model a spec describes, with its weights; stamped so ``io.save`` can describe
    it."""
    source = spec.get("source", "prunekit")
    name, weights, kwargs = spec["name"], spec.get("weights"), dict(spec.get("kwargs") or {})
    if source == "prunekit":
        return create(name, weights=weights, **kwargs)
    if source == "torchvision":
        from ..io import create_base
        return create_base("torchvision", name, weights=weights, **kwargs)
    raise ConfigError(f"model source {source!r} is not supported yet; valid: prunekit, "
                      "torchvision")


def model_preprocessing(spec: Mapping[str, Any], model: nn.Module) -> Preprocessing:
    """The images ``model`` (built from ``spec``) expects."""
    saved = getattr(model, "prunekit_preprocessing", None)
    if isinstance(saved, Mapping):
        return Preprocessing.from_dict(saved)
    source = spec.get("source", (getattr(model, SPEC_ATTR, None) or {}).get("source",
                                                                             "prunekit"))
    if source == "prunekit":
        return Preprocessing.cifar(source="prunekit zoo (CIFAR-10, 32 px)")
    if source == "torchvision" and spec.get("weights"):
        return _torchvision_preprocessing(spec["name"], spec["weights"])
    return Preprocessing.imagenet()


def _torchvision_preprocessing(name: str, weights: str) -> Preprocessing:
    from torchvision import models
    enum = models.get_model_weights(name)
    chosen = enum.DEFAULT if weights in ("DEFAULT", "pretrained") else enum[weights]
    transform = chosen.transforms()
    crop = transform.crop_size[0]
    return Preprocessing(input_size=crop, mean=transform.mean, std=transform.std,
                         crop_pct=crop / transform.resize_size[0],
                         interpolation=transform.interpolation.value,
                         source=f"torchvision weights {chosen}")
