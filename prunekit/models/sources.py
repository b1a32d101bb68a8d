"""Where a model comes from (the zoo, torchvision, timm, the user's own builder: one string such
as ``cifar_resnet56``, ``torchvision:resnet50``, ``timm:resnet50d``, ``my.module:build_fn``),
how it is built with its weights, and the images it expects (:func:`model_preprocessing`).

A spec is ``{"source", "name", "weights", "kwargs"}`` (``{"path"}`` for a saved model). A built
model carries ``prunekit_spec = {"source", "name", "kwargs"}``, what rebuilds its architecture
without weights: io.save records it, :func:`build_base` rebuilds it (no weights, no network).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, PrunekitError
from .registry import SPEC_ATTR, UnknownModelError, create, list_models
from .weights import (WEIGHT_SUFFIXES, download_guard, hf_hub_cache, load_weights, torch_hub_file,
                      weights_kind)

__all__ = ["MODEL_SOURCES", "PRETRAINED_KEYS", "TRUSTED_MODULES_ENV", "UntrustedModuleError",
           "build_base", "build_model", "model_preprocessing", "parse_model_ref"]

MODEL_SOURCES = ("prunekit", "torchvision", "timm", "module")
# Builder arguments that fetch or load weights: --weights' business, never in a rebuilt base.
PRETRAINED_KEYS = ("weights", "pretrained", "weights_backbone", "pretrained_backbone")
# timm arguments that make create_model read a file or the hub by itself.
_TIMM_LOADING_KEYS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")
TRUSTED_MODULES_ENV = "PRUNEKIT_TRUSTED_MODULES"
_SPEC_KEYS = ("source", "name", "weights", "kwargs")
# torchvision builders change some defaults when given weights; a rebuild without weights must
# spell them out or it computes something else (transform_input) or has other keys (aux heads).
_TORCHVISION_PRETRAINED_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"transform_input": True, "aux_logits": False},
    "inception_v3": {"transform_input": True},
}


class UntrustedModuleError(ConfigError):
    """A saved model whose architecture is built by Python code nobody marked as trusted."""


def parse_model_ref(text: str) -> dict[str, Any]:
    """``{"source", "name"}`` (or ``{"path"}``) for a ``--model`` string (see the module doc);
    ConfigError for an unknown ``prefix:``, UnknownModelError for a name the source lacks."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--model needs a zoo name, torchvision:NAME, timm:NAME, "
                          f"package.module:function or a saved .safetensors; got {text!r}")
    text = text.strip()
    if text.lower().endswith(".safetensors"):
        return {"path": text}
    if os.path.splitext(text)[1].lower() in WEIGHT_SUFFIXES:
        raise ConfigError(f"{text} holds weights: name the architecture with --model and give "
                          f"the file with --weights {text}")
    prefix, colon, name = text.partition(":")
    prefix, name = (prefix, name.strip()) if colon else ("prunekit", text)
    if prefix in MODEL_SOURCES[:3]:
        _check_name(prefix, name)
        return {"source": prefix, "name": name}
    ref = name if prefix == "module" else text
    module_name, _, attribute = ref.partition(":")
    if _findable(module_name.strip()):
        _check_attribute(ref, attribute)
        return {"source": "module", "name": ref}
    raise ConfigError(
        f"--model {text}: {prefix} is neither a model source ({', '.join(MODEL_SOURCES[:3])}) "
        f"nor an importable module. Write torchvision:NAME, timm:NAME or package.module:function"
        f" with that package installed or its folder on sys.path (PYTHONPATH)")


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """The model ``spec`` describes, with its weights, stamped with ``prunekit_spec``.

    ``weights``: ``None`` (random init); a file (``.pth/.pt/.bin`` state dict or checkpoint read
    with ``weights_only=True``, ``.safetensors``); a name: zoo/timm ``"pretrained"``, a timm
    tag, torchvision ``IMAGENET1K_V2``/``DEFAULT``. A download that cannot happen raises
    WeightsDownloadError saying where to put the file."""
    source, name, weights, kwargs = _checked_spec(spec)
    kind = weights_kind(weights)
    if source == "prunekit":
        if kind == "name" and weights != "pretrained":
            raise ConfigError(f"zoo model {name} knows the weights 'pretrained' (the shared "
                              f"CIFAR-10 checkpoint) or a file path, not {weights!r}")
        return _zoo(name, weights, kwargs)
    if kind == "name" and source == "module":
        raise ConfigError(f"--weights for {name} must be a weights file; a named download "
                          f"({weights!r}) is the builder's business: pass its argument in "
                          f"--model-kwargs")
    if kind != "name":
        model = _build(source, name, kwargs)
        _stamp(model, source, name, kwargs)
        return model if kind is None else load_weights(model, weights)
    model, name, recorded = _pretrained(source, name, weights, kwargs)
    _stamp(model, source, name, recorded)
    _check_rebuilds(model, source, name, recorded)
    return model


def build_base(source: str, name: str, kwargs: Mapping[str, Any] | None = None, *,
               trusted_modules: tuple[str, ...] | list[str] | str = ()) -> nn.Module:
    """The architecture a saved spec names, randomly initialised: it never reads a weights file
    nor touches the network (for io.load). ``source="module"`` runs the named Python code, so it
    is refused (UntrustedModuleError) unless its package is in ``trusted_modules`` or in the
    comma-separated ``$PRUNEKIT_TRUSTED_MODULES``."""
    if source not in MODEL_SOURCES or not isinstance(name, str) or not name:
        raise ConfigError(f"a base needs a source ({', '.join(MODEL_SOURCES)}) and a name, got "
                          f"{source!r}, {name!r}")
    kwargs = _checked_kwargs(kwargs, name)
    if source == "prunekit":
        return _zoo(name, None, kwargs)  # the registry stamps its own spec
    if source == "module":
        _check_trusted(name, trusted_modules)
    model = _build(source, name, kwargs)
    _stamp(model, source, name, kwargs)
    return model


def _build(source: str, name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    if source == "module":
        return _call_builder(_import_builder(name), name, kwargs)
    _check_name(source, name, kwargs)
    if source == "torchvision":
        return _torchvision_call(name, None, kwargs)
    return _library_call("timm", name, _library("timm").create_model, name, pretrained=False,
                         **kwargs)


def _stamp(model: nn.Module, source: str, name: str, kwargs: Mapping[str, Any]) -> None:
    setattr(model, SPEC_ATTR, {"source": source, "name": name,
                               "kwargs": json.loads(json.dumps(dict(kwargs)))})


def _checked_spec(spec: Any) -> tuple[str, str, Any, dict[str, Any]]:
    if not isinstance(spec, Mapping) or spec.get("path"):
        raise ConfigError(f"build_model needs a spec {{source, name, weights, kwargs}}, got "
                          f"{spec!r}; load a saved model with prunekit.io.load")
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    name, source = spec.get("name"), spec.get("source")
    if unknown or not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a model spec needs a 'name' and takes only {', '.join(_SPEC_KEYS)};"
                          f" got {dict(spec)!r}")
    if source is None:  # recipes may write "name: torchvision:resnet50"
        parsed = parse_model_ref(name)
        source, name = parsed.get("source", "(none: a saved model)"), parsed.get("name", name)
    if source not in MODEL_SOURCES:
        raise ConfigError(f"unknown model source {source!r}; valid: {', '.join(MODEL_SOURCES)}")
    return source, name.strip(), spec.get("weights"), _checked_kwargs(spec.get("kwargs"), name)


def _checked_kwargs(kwargs: Any, name: str) -> dict[str, Any]:
    if kwargs is None:
        return {}
    try:  # the spec of a saved model is JSON
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise TypeError("not a mapping of argument names to values")
        json.dumps(dict(kwargs), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} kwargs must map argument names to JSON values (numbers, "
                          f"strings, lists, mappings), got {kwargs!r}: {err}") from None
    return dict(kwargs)


def _zoo(name: str, weights: Any, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        return create(name, weights=weights, **kwargs)
    except (TypeError, ValueError) as err:  # the registry's "does not fit" messages
        raise err if isinstance(err, PrunekitError) else ConfigError(str(err)) from None


def _pretrained(source: str, name: str, weights: str, kwargs: Mapping[str, Any]):
    """(model, recorded name, recorded kwargs) of a named download."""
    _check_name(source, name, kwargs)
    if source == "timm":
        timm = _library("timm")
        full = _named_weights(source, name, weights)
        cfg = timm.models.get_pretrained_cfg(full)
        hub_id = getattr(cfg, "hf_hub_id", None)
        model = download_guard(
            lambda: _library_call("timm", full, timm.create_model, full, pretrained=True,
                                  **kwargs),
            f"of timm {full} (Hugging Face Hub {hub_id or getattr(cfg, 'url', '?')})",
            f"put it in the Hugging Face cache {hf_hub_cache()} (`huggingface-cli download "
            f"{hub_id}` there; HF_HOME moves it)")
        return model, full, dict(kwargs)
    chosen = _named_weights(source, name, weights)
    model = download_guard(lambda: _torchvision_call(name, chosen, kwargs),
                           f"{chosen} from {chosen.url}",
                           f"put it at {torch_hub_file(chosen.url)} (the torch hub cache; "
                           f"TORCH_HOME moves it)")
    recorded = {**_TORCHVISION_PRETRAINED_DEFAULTS.get(name, {}), **kwargs}
    return model, name, {k: v for k, v in recorded.items() if k not in PRETRAINED_KEYS}


def _check_rebuilds(model: nn.Module, source: str, name: str, recorded: Mapping) -> None:
    """The recorded kwargs rebuild what the weights went into (or a saved model won't load)."""
    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            shapes = [{k: v.shape for k, v in m.state_dict().items()}
                      for m in (model, build_base(source, name, recorded))]
    except Exception:  # some builders compute on tensors at init; nothing to compare then
        return
    if shapes[0] != shapes[1]:
        first = next(k for k in sorted({**shapes[0], **shapes[1]})
                     if shapes[0].get(k) != shapes[1].get(k))
        raise ConfigError(f"{source}:{name} with pretrained weights differs from {name}"
                          f"(**{dict(recorded)}) without them (at {first}); give the "
                          f"constructor arguments the weights need in --model-kwargs")


def _library(which: str):
    try:
        return importlib.import_module("torchvision.models" if which == "torchvision" else which)
    except ImportError:
        extra = "vision" if which == "torchvision" else which
        raise ConfigError(f"{which} models need {which}: pip install prunekit[{extra}]") from None


def _check_name(source: str, name: str, kwargs: Mapping[str, Any] | tuple = ()) -> None:
    if not name:
        raise ConfigError(f"{source}: needs a model name after the colon, e.g. {source}:resnet50")
    asked = [k for k in PRETRAINED_KEYS + _TIMM_LOADING_KEYS if k in kwargs]
    if asked:  # a rebuilt base never loads weights
        raise ConfigError(f"give weights with --weights (spec 'weights'), not as the {source} "
                          f"{name} argument {asked[0]!r}")
    if source == "prunekit" and name not in list_models():
        raise UnknownModelError(name, list_models())
    if source == "torchvision":
        _known(name, _library(source).list_models(), source, "torchvision.models.list_models()")
    if source == "timm":
        timm = _library(source)  # (hf-hub: names would read their config from the network)
        arch, _, tag = name.partition(".")
        _known(arch, timm.list_models(), source, "timm.list_models('resnet*')")
        if tag and name not in timm.list_pretrained(f"{arch}.*"):
            raise ConfigError(f"timm {arch} has no pretrained tag {tag!r}; its tags: "
                              f"{', '.join(timm.list_pretrained(f'{arch}.*')) or 'none'}")


def _known(name: str, names: list[str], where: str, lister: str) -> None:
    if name not in names:
        err = UnknownModelError(name, names)
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        err.args = (f"unknown {where} model {name!r}.{hint} {where} has {len(names)} models; "
                    f"list them with {lister}",)  # all of them would be a page of text
        raise err


def _library_call(where: str, name: str, fn: Callable[..., nn.Module], *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except TypeError as err:  # almost always a constructor argument the model does not take
        given = {k: v for k, v in kwargs.items() if k not in PRETRAINED_KEYS}
        raise ConfigError(f"{where} {name} cannot be built with {given}: {err}; check "
                          f"--model-kwargs") from None


def _torchvision_call(name: str, weights: Any, kwargs: Mapping[str, Any]) -> nn.Module:
    models, kwargs = _library("torchvision"), dict(kwargs)
    params = inspect.signature(models.get_model_builder(name)).parameters
    if "weights_backbone" in params:  # detection builders download an ImageNet backbone
        kwargs.setdefault("weights_backbone", None)
    return _library_call("torchvision", name, models.get_model, name, weights=weights, **kwargs)


def _named_weights(source: str, name: str, weights: str):
    """torchvision: the weights enum value; timm: the model name with its pretrained tag."""
    if source == "torchvision":
        enum = _library(source).get_model_weights(name)
        key = weights.rsplit(".", 1)[-1]  # "ResNet50_Weights.IMAGENET1K_V2" works too
        if key in enum.__members__ or key == "pretrained":
            return enum["DEFAULT" if key == "pretrained" else key]
        valid = list(enum.__members__)
    else:
        arch = name.partition(".")[0]
        valid = [t.partition(".")[2] for t in _library(source).list_pretrained(f"{arch}.*")]
        if weights in valid or (weights == "pretrained" and valid):
            return name if weights == "pretrained" else f"{arch}.{weights}"
        valid = ["pretrained"] + valid if valid else ["none"]
    raise ConfigError(f"{source} {name} has no weights {weights!r}; valid: {', '.join(valid)}, "
                      f"or a weights file path")


def _findable(module_name: str) -> bool:
    if not all(p.isidentifier() for p in module_name.split(".")):
        return False
    try:  # finds the module without running it (its parent packages do run)
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def _check_attribute(ref: str, attribute: str) -> None:
    if not attribute or not all(p.isidentifier() for p in attribute.split(".")):
        raise ConfigError(f"--model {ref}: after the colon give the function (or class) that "
                          f"builds the model, e.g. {ref.partition(':')[0]}:build_model")


def _import_builder(ref: str) -> Callable[..., Any]:
    module_name, _, attribute = ref.partition(":")
    _check_attribute(ref, attribute)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:  # the module itself, or one it imports
        raise ConfigError(f"cannot import {module_name!r} (for {ref}): {err}. Install the "
                          f"package, run from the folder holding it or add that folder to "
                          f"PYTHONPATH (sys.path starts {', '.join(sys.path[:3])})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{module_name} has no attribute {attribute!r} (for --model "
                              f"{ref}); check the name after the colon")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{ref} is a {type(obj).__name__}, not a function or class that "
                          f"builds a model")
    return obj


def _call_builder(fn: Callable[..., Any], ref: str, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{ref} does not take the arguments {dict(kwargs)}: {err}; check "
                          f"--model-kwargs") from None
    except ValueError:  # no signature to check (a builtin); the call itself will tell
        pass
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{ref}(**{dict(kwargs)}) returned a {type(model).__name__}, not a "
                          f"torch.nn.Module; --model must name a function that builds the model")
    return model


def _check_trusted(ref: str, trusted: tuple[str, ...] | list[str] | str) -> None:
    allowed = {trusted} if isinstance(trusted, str) else set(trusted)
    allowed |= {s.strip() for s in os.environ.get(TRUSTED_MODULES_ENV, "").split(",") if s}
    parts = (module_name := ref.partition(":")[0]).split(".")
    if not any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1)):
        raise UntrustedModuleError(
            f"the saved model is built by {ref}: loading it would import and run the Python "
            f"module {module_name!r}, which is not trusted. If you trust that code, allow its "
            f"package: prunekit.io.load(path, trusted_modules=[{parts[0]!r}]), --trust-module "
            f"{parts[0]} on the command line, or {TRUSTED_MODULES_ENV}={parts[0]}")


def model_preprocessing(spec: Mapping[str, Any], model: nn.Module):
    """The images ``model`` (built from ``spec``) expects, a :class:`~prunekit.data.Preprocessing`
    from: the model's ``prunekit_preprocessing`` dict; the zoo's CIFAR 32 px; torchvision's
    ``weights.transforms()``; timm's or a module model's ``pretrained_cfg``; else ImageNet's."""
    from ..data.preprocess import Preprocessing
    saved = getattr(model, "prunekit_preprocessing", None)
    if not isinstance(saved, Mapping):
        saved = (getattr(model, "prunekit_saved_spec", None) or {}).get("preprocessing")
    if isinstance(saved, Mapping):
        return Preprocessing.from_dict({"source": "saved with the model", **saved})
    stamped = getattr(model, SPEC_ATTR, None) or {}
    source, name = spec.get("source"), spec.get("name")
    if source is None and isinstance(name, str) and ":" in name:
        source, name = (parse_model_ref(name).get(k) for k in ("source", "name"))
    source, name = source or stamped.get("source", "prunekit"), name or stamped.get("name")
    if source == "prunekit":
        return Preprocessing.cifar(source="prunekit zoo (CIFAR-10, 32 px)")
    if source == "torchvision" and weights_kind(spec.get("weights")) == "name":
        chosen = _named_weights(source, name, spec["weights"])
        transform = chosen.transforms()
        if hasattr(transform, "crop_size"):  # classification (detection weights have none)
            crop = transform.crop_size[0]
            return Preprocessing(input_size=crop, mean=transform.mean, std=transform.std,
                                 crop_pct=crop / transform.resize_size[0],
                                 interpolation=transform.interpolation.value,
                                 source=f"torchvision weights {chosen}")
    if source == "timm":
        from timm.data import resolve_model_data_config
        return _from_timm_cfg(Preprocessing, resolve_model_data_config(model), "timm",
                              f"timm pretrained_cfg of {name}")
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if source == "module" and isinstance(cfg, Mapping):
        return _from_timm_cfg(Preprocessing, cfg, "torchvision", f"pretrained_cfg of {name}")
    return Preprocessing.imagenet(source=f"ImageNet default ({source} {name} has no "
                                         f"preprocessing of its own)")


def _from_timm_cfg(cls, cfg: Mapping[str, Any], backend: str, source: str):
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in ("bilinear", "bicubic", "nearest"):  # timm's "random" and the like
        source, interpolation = f"{source}, {interpolation} interpolation as bicubic", "bicubic"
    default, size = cls(), cfg.get("input_size") or (3, 224, 224)
    return cls(input_size=int(size[-2]), mean=tuple(cfg.get("mean") or default.mean),
               std=tuple(cfg.get("std") or default.std),
               crop_pct=min(float(cfg.get("crop_pct") or default.crop_pct), 1.0),
               interpolation=interpolation, backend=backend, source=source)
