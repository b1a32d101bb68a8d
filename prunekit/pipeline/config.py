"""The prune job's configuration: one dataclass, each default written once.

A recipe (``recipes/*.yaml``) merged with command-line flags becomes a :class:`RunConfig`;
the job, the CLI's help texts and ``report.json`` (its ``options`` entry) all read it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import numpy as np

from .. import data
from ..errors import ConfigError
from ..train.distill import check_distill_options

__all__ = ["CALIBRATION_DEFAULTS", "DATASET_KINDS", "FINETUNE_DEFAULTS", "RunConfig",
           "run_default"]

DATASET_KINDS = ("auto", "cifar10", "imagefolder")

# From a pretrained network: a tenth of the from-scratch learning rate (as FPGM/CHIP do).
FINETUNE_DEFAULTS = {"epochs": 0, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                     "schedule": "cosine", "batch_size": 128}
# CHIP's and HRank's scoring data: 5 batches of 128 augmented training images.
CALIBRATION_DEFAULTS = {"split": "train", "batches": 5, "batch_size": 128, "augment": True}


@dataclass
class RunConfig:
    """What ``prunekit prune`` does, end to end.

    ``model``: ``{"name", "weights", "kwargs"}`` (a zoo model) or ``{"path"}`` (a saved
    model); ``method``: ``{"name": ..., options}`` (default one-shot); ``criterion``:
    ``{"name", "options"}`` (default: the method's); ``plan``: the target
    (:class:`prunekit.plan.PlanTarget` keys); ``finetune``: :class:`prunekit.train.TrainConfig`
    keys over :data:`FINETUNE_DEFAULTS`; ``calibration``: scoring data over
    :data:`CALIBRATION_DEFAULTS`; ``data`` / ``dataset``: where the images are and which kind
    (``auto`` tells CIFAR-10 from an image folder); ``input_size`` / ``mean`` / ``std``
    override the preprocessing the model's source gives; ``eval_splits`` default to the
    data's (CIFAR-10: test and test-lossless; an image folder: test); ``distill``:
    ``{"temperature", "weight"}`` (over :data:`prunekit.train.distill.DISTILL_DEFAULTS`) makes
    the fine-tuning learn from the unpruned model too (:class:`prunekit.train.Distillation`);
    ``deploy``: the final interleaved before/after latency measurement compares both models
    as :func:`prunekit.deploy` makes them; the rest says how to measure.
    """

    model: dict[str, Any]
    out: str
    method: dict[str, Any] = field(default_factory=dict)
    criterion: dict[str, Any] | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    dataset: str = "auto"
    seed: int = 0
    eval_splits: list[str] | None = None
    latency_batches: tuple[int, ...] = (1, 64)
    latency_runs: int = 30
    deploy: bool = False  # the final before/after latency compares both models deployed
    limit: int | None = None
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    recipe: str | None = None
    distill: dict[str, Any] | None = None   # teacher = the unpruned model (fine-tuning stage)
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, Mapping) or not (self.model.get("name")
                                                         or self.model.get("path")):
            raise ConfigError("give --model (and --weights) or --recipe")
        self.method = dict(self.method or {})
        self.finetune = {**FINETUNE_DEFAULTS, **(self.finetune or {})}
        self.calibration = {**CALIBRATION_DEFAULTS, **(self.calibration or {})}
        self.plan = dict(self.plan or {})
        self.latency_batches = _whole_numbers(self.latency_batches, "latency_batches")
        _whole_numbers([self.latency_runs], "latency_runs")
        _whole_numbers([self.seed], "seed", minimum=0)
        if self.input_size is not None:
            self.input_size = _whole_numbers([self.input_size], "input_size")[0]
        if self.eval_splits is not None:
            self.eval_splits = list(self.eval_splits)  # checked against the data's splits
        if self.dataset not in DATASET_KINDS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; valid: "
                              f"{', '.join(DATASET_KINDS)}")
        self.limit = data.check_limit(self.limit)
        if not isinstance(self.deploy, bool):
            raise ConfigError(f"deploy takes true or false, got {self.deploy!r}")
        if self.distill is not None:
            self.distill = check_distill_options(dict(self.distill))
        # Checked here (not when data is opened): the values must be usable before any work.
        self.preprocessing_overrides()

    def preprocessing_overrides(self) -> dict[str, Any]:
        """The user's ``input_size`` / ``mean`` / ``std`` (checked), for
        :meth:`prunekit.data.Preprocessing.with_overrides`."""
        out = {k: getattr(self, k) for k in ("input_size", "mean", "std")
               if getattr(self, k) is not None}
        if out:
            data.Preprocessing().with_overrides(**out)  # raises ConfigError on bad values
        return out

    @property
    def method_name(self) -> str:
        return self.method.get("name") or "oneshot"

    @property
    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        """From a merged recipe + flags mapping; recipe-only sections (name, paper, notes,
        expected, source) are ignored, anything else unknown is an error."""
        known = {f.name for f in fields(cls)}
        ignored = {"name", "paper", "notes", "expected", "source"}
        unknown = set(values) - known - ignored
        if unknown:
            raise ConfigError(f"unknown run options {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON (``report.json``'s ``options``; ``progress`` left out)."""
        out = asdict(self)
        out.pop("progress")
        out["latency_batches"] = list(self.latency_batches)
        for key in ("mean", "std"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


def _whole_numbers(values, name: str, minimum: int = 1) -> tuple[int, ...]:
    """``values`` as ints >= ``minimum`` (bools and fractions refused), or ConfigError."""
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ConfigError(f"{name} takes whole numbers >= {minimum}, got {value!r}")
        out.append(int(value))
    return tuple(out)


def run_default(name: str) -> Any:
    """The default of one :class:`RunConfig` field (for CLI flags and ``finetune_saved``)."""
    f = RunConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
