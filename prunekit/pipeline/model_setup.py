"""The job's model: built from its spec (zoo, torchvision, timm, the user's builder, or a saved
file), the images it expects (its :class:`~prunekit.data.Preprocessing` with the user's
overrides, which set the example input for tracing, MACs and latency), and the check that its
outputs fit the data's classes."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import io
from ..data import Preprocessing
from ..errors import ConfigError
from ..models.sources import build_model, model_preprocessing
from ..utils import first_output

__all__ = ["check_outputs_fit_data", "load_model", "run_preprocessing"]


def load_model(spec: Mapping[str, Any]) -> torch.nn.Module:
    """A model from its spec: ``{"path", "trusted_modules"?}`` (a saved model; packages whose
    code it may import) or ``{"source", "name", "weights", "kwargs"}``."""
    if spec.get("path"):
        return io.load(spec["path"], trusted_modules=spec.get("trusted_modules") or ())
    return build_model({k: v for k, v in spec.items() if k != "trusted_modules"})


def run_preprocessing(spec: Mapping[str, Any], model: torch.nn.Module, dataset_kind: str,
                      overrides: Mapping[str, Any]) -> Preprocessing:
    """What the run feeds the model: its source's preprocessing, CIFAR-10's 32 px when the
    data is CIFAR-10 (its images have no other size), then the user's overrides."""
    preprocessing = model_preprocessing(spec, model)
    if dataset_kind == "cifar10" and preprocessing.input_size != 32:
        preprocessing = preprocessing.with_overrides(input_size=32)
    return preprocessing.with_overrides(**overrides)


def check_outputs_fit_data(model: torch.nn.Module, example: torch.Tensor, classes: int,
                           data_name: str) -> None:
    """The model takes ``example`` and gives one score per class of the run's data (else
    accuracy and the loss would be computed over the wrong classes, or fail mid-run)."""
    try:
        with torch.no_grad():
            output = first_output(model(example))
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the model rejects an input of shape {tuple(example.shape)} "
                          f"({first[:300]}); give the --input-size it needs") from None
    if output.dim() != 2:
        raise ConfigError(f"the model's output has shape {tuple(output.shape)} for an input of "
                          f"shape {tuple(example.shape)}; prunekit expects (batch, classes) "
                          "logits")
    if output.shape[1] != classes:
        raise ConfigError(f"the model has {output.shape[1]} outputs but {data_name} has "
                          f"{classes} classes; build the model with num_classes={classes}")
