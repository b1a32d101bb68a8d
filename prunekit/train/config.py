"""The configuration of :func:`~prunekit.train.fit`: :class:`TrainConfig` (checked on creation,
round-trips through plain dicts for JSON/YAML), the learning-rate schedules it accepts and the
keys of every log record. Imports nothing from prunekit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError

__all__ = ["LOG_KEYS", "SCHEDULES", "TrainConfig"]

SCHEDULES = ("cosine", "multistep", "constant")
#: Keys of every ``log.jsonl`` line (and of every ``fit(...)["history"]`` entry): ``lr`` is the
#: rate of the epoch's last iteration, ``train_*`` average over the epoch's training batches
#: (all ranks), ``val_*`` are null without a val_set, ``seconds`` is the epoch's wall time and
#: ``images/s`` the training throughput (validation excluded). Lines may also hold
#: ``train_extra_loss`` (mean of the hooks' extra_loss terms).
LOG_KEYS = ("epoch", "lr", "train_loss", "train_top1", "val_top1", "val_loss", "seconds",
            "images/s")
# Fields that do not change the trajectory: a resume may change them without a warning.
_RUNTIME_FIELDS = {"progress", "num_workers", "device"}


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit`. Every field is JSON/YAML friendly (see :meth:`to_dict`).

    Schedule (per iteration): a linear warm-up from 0 to ``lr`` over ``warmup_epochs``, then
    ``"cosine"``: ``0.5 * lr * (1 + cos(pi * t))`` with ``t`` going 0 -> 1 over the remaining
    iterations (CHIP's ``cos``; CHIP's warm-up started at ``lr / warmup_steps`` instead of 0);
    ``"multistep"``: ``lr * gamma ** (milestones passed)``, milestones in epochs;
    ``"constant"``: ``lr``.

    ``batch_size`` is the *global* batch: with N processes each one loads ``batch_size // N``.
    ``amp`` uses float16 autocast + GradScaler on CUDA and is ignored (with a warning) on CPU.
    ``channels_last`` trains in NHWC memory format (faster convolutions on recent GPUs; the
    numbers are the same up to floating-point order).
    ``deterministic`` turns on ``torch.use_deterministic_algorithms`` and the cuDNN flags; on
    CUDA in warn-only mode, because e.g. AdaptiveAvgPool2d's backward has no deterministic
    kernel. ``max_steps_per_epoch`` truncates every epoch (smoke tests).
    ``no_decay_bn_bias`` exempts 1-d parameters (norm weights, all biases) from weight decay.
    """

    epochs: int
    lr: float
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    label_smoothing: float = 0.0
    batch_size: int = 128
    amp: bool = False
    channels_last: bool = False
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    deterministic: bool = False
    max_steps_per_epoch: int | None = None
    grad_clip: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.milestones, (str, bytes)) or not hasattr(self.milestones, "__iter__"):
            raise ConfigError(f"TrainConfig: milestones must be a list of epochs, got "
                              f"{self.milestones!r}")
        self.milestones = tuple(self.milestones)
        self._validate()

    def _validate(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(f"TrainConfig: {message}")

        def is_int(value: Any) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            # finite: inf/nan compare as no sane value would (lr=inf passes "lr > 0")
            return (isinstance(value, (int, float, np.integer, np.floating))
                    and not isinstance(value, bool) and math.isfinite(value))

        require(is_int(self.epochs) and self.epochs >= 1,
                f"epochs must be an int >= 1, got {self.epochs!r}")
        require(is_number(self.lr) and self.lr > 0,
                f"lr (the learning rate; --finetune-lr on the command line) must be a finite "
                f"number > 0, got {self.lr!r}")
        require(is_number(self.momentum) and 0 <= self.momentum < 1,
                f"momentum must be a number in [0, 1), got {self.momentum!r}")
        require(not self.nesterov or self.momentum > 0, "nesterov=True needs momentum > 0")
        require(is_number(self.weight_decay) and self.weight_decay >= 0,
                f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        require(self.schedule in SCHEDULES,
                f"unknown schedule {self.schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        require(is_number(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs,
                f"warmup_epochs must be a number in [0, epochs={self.epochs}], got "
                f"{self.warmup_epochs!r}")
        require(all(is_int(m) and m > 0 for m in self.milestones)
                and list(self.milestones) == sorted(set(self.milestones)),
                f"milestones must be increasing positive epochs, got {list(self.milestones)}")
        require(is_number(self.gamma) and self.gamma > 0,
                f"gamma must be a finite number > 0, got {self.gamma!r}")
        require(is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
                f"label_smoothing must be a number in [0, 1), got {self.label_smoothing!r}")
        require(is_int(self.batch_size) and self.batch_size >= 1,
                f"batch_size must be an int >= 1, got {self.batch_size!r}")
        require(is_int(self.seed) and self.seed >= 0, f"seed must be an int >= 0, got {self.seed!r}")
        require(is_int(self.num_workers) and self.num_workers >= 0,
                f"num_workers must be an int >= 0, got {self.num_workers!r}")
        require(isinstance(self.device, str) and bool(self.device.strip()),
                f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {self.device!r}")
        require(self.max_steps_per_epoch is None
                or (is_int(self.max_steps_per_epoch) and self.max_steps_per_epoch >= 1),
                f"max_steps_per_epoch must be None or an int >= 1, got {self.max_steps_per_epoch!r}")
        require(self.grad_clip is None or (is_number(self.grad_clip) and self.grad_clip > 0),
                f"grad_clip must be None (no clipping) or a finite number > 0, got "
                f"{self.grad_clip!r}")
        for flag in ("nesterov", "no_decay_bn_bias", "amp", "channels_last", "deterministic",
                     "progress"):
            require(isinstance(getattr(self, flag), bool),
                    f"{flag} must be a bool, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (milestones as a list), ready for JSON or YAML."""
        result = asdict(self)
        result["milestones"] = list(self.milestones)
        return result

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"TrainConfig: expected a mapping of settings (e.g. "
                              f"{{'epochs': 10, 'lr': 0.01}}), got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"TrainConfig: unknown key(s) {', '.join(unknown)}; "
                             f"valid keys: {', '.join(sorted(known))}")
        missing = [name for name in ("epochs", "lr") if name not in values]
        if missing:
            raise ConfigError(f"TrainConfig: missing required key(s) {', '.join(missing)}")
        return cls(**dict(values))
