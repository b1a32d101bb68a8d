"""Fine-tuning engine: SGD training with checkpoints, exact resume, hooks and DDP.

:func:`fit` trains a model in place and writes three files to ``out_dir``:

* ``last.pt``  - everything needed to continue: model, optimizer, scheduler, GradScaler, hook
  states, step counters, the last finished epoch, the best validation top-1, the history and
  the config. Rewritten after every finished epoch.
* ``best.pt``  - ``{"model", "epoch", "val_top1", "config"}`` of the epoch with the highest
  validation top-1 (ties keep the earlier epoch).
* ``log.jsonl`` - one JSON object per finished epoch (see :data:`LOG_KEYS`).

Validation data: ``val_set`` must be a held-out split (``CIFAR10(split="val")``: 5,000 images
cut from the training set), NEVER the test set. ``best.pt`` is *chosen* on it, so a test
accuracy measured on the model that won that choice would be optimistically biased.

Exact resume: every epoch draws its randomness (shuffle order, augmentation, anything a hook
samples) from generators seeded by ``(seed, epoch, rank)`` at the start of the epoch, and all
files are written atomically at epoch boundaries. A run interrupted at any point and resumed
with ``resume=True`` therefore repeats no finished epoch, loses none, and - on CPU with
``deterministic=True`` - ends with weights bit-identical to an uninterrupted run.

Distributed: launch with ``torchrun --nproc_per_node=N``; see :func:`fit` for the rules.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from .data import build_loader
from .measure import evaluate, resolve_device

__all__ = [
    "SCHEDULES", "LOG_KEYS", "CheckpointError", "TrainConfig", "TrainHook", "build_optimizer",
    "build_scheduler", "epoch_seeds", "fit", "seed_everything",
]

SCHEDULES = ("cosine", "multistep", "constant")
LAST_CHECKPOINT, BEST_CHECKPOINT, LOG_FILE = "last.pt", "best.pt", "log.jsonl"
#: Keys of every ``log.jsonl`` line (and of every ``fit(...)["history"]`` entry): ``lr`` is the
#: rate of the epoch's last iteration, ``train_*`` average over the epoch's training batches
#: (all ranks), ``val_*`` are null without a val_set, ``seconds`` is the epoch's wall time and
#: ``images/s`` the training throughput (validation excluded). Lines may also hold
#: ``train_extra_loss`` (mean of the hooks' extra_loss terms).
LOG_KEYS = ("epoch", "lr", "train_loss", "train_top1", "val_top1", "val_loss", "seconds",
            "images/s")
CHECKPOINT_FORMAT = 1
# Fields that do not change the trajectory: a resume may change them without a warning.
_RUNTIME_FIELDS = {"progress", "num_workers", "device"}


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (corrupt, foreign, or for another model)."""


# --------------------------------------------------------------------------- configuration
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
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    deterministic: bool = False
    max_steps_per_epoch: int | None = None
    grad_clip: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.milestones = tuple(self.milestones)
        self._validate()

    def _validate(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"TrainConfig: {message}")

        def is_int(value: Any) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)

        require(is_int(self.epochs) and self.epochs >= 1,
                f"epochs must be an int >= 1, got {self.epochs!r}")
        require(is_number(self.lr) and self.lr >= 0, f"lr must be >= 0, got {self.lr!r}")
        require(is_number(self.momentum) and 0 <= self.momentum < 1,
                f"momentum must be in [0, 1), got {self.momentum!r}")
        require(not self.nesterov or self.momentum > 0, "nesterov=True needs momentum > 0")
        require(is_number(self.weight_decay) and self.weight_decay >= 0,
                f"weight_decay must be >= 0, got {self.weight_decay!r}")
        require(self.schedule in SCHEDULES,
                f"unknown schedule {self.schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        require(is_number(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs,
                f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs!r}")
        require(all(is_int(m) and m > 0 for m in self.milestones)
                and list(self.milestones) == sorted(set(self.milestones)),
                f"milestones must be increasing positive epochs, got {list(self.milestones)}")
        require(is_number(self.gamma) and self.gamma > 0, f"gamma must be > 0, got {self.gamma!r}")
        require(is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
                f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
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
                f"grad_clip must be None or > 0, got {self.grad_clip!r}")
        for flag in ("nesterov", "no_decay_bn_bias", "amp", "deterministic", "progress"):
            require(isinstance(getattr(self, flag), bool), f"{flag} must be a bool")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (milestones as a list), ready for JSON or YAML."""
        result = asdict(self)
        result["milestones"] = list(self.milestones)
        return result

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {', '.join(unknown)}; "
                             f"valid keys: {', '.join(sorted(known))}")
        missing = [name for name in ("epochs", "lr") if name not in values]
        if missing:
            raise ValueError(f"TrainConfig: missing required key(s) {', '.join(missing)}")
        return cls(**dict(values))


class TrainHook:
    """Optional base class documenting the hook protocol; any object with some of these
    methods works. See :func:`fit` for when each one is called."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def on_epoch_start(self, epoch: int) -> None: ...
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None: ...
    def after_backward(self, step: int) -> None: ...
    def after_step(self, step: int) -> None: ...
    def on_epoch_end(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


# --------------------------------------------------------------------------- randomness
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seeding only takes 32 bits
    torch.manual_seed(seed)


def epoch_seeds(seed: int, epoch: int, rank: int = 0) -> tuple[int, int]:
    """``(global_seed, loader_seed)`` of one epoch on one rank.

    Depending only on ``(seed, epoch, rank)`` is what makes resuming exact: epoch ``e`` draws
    the same numbers whether or not epochs ``0..e-1`` ran in this process. The rank enters so
    that the ranks of a DDP run augment their shards independently. Two seeds, so that the
    loader's shuffle and the global stream (augmentation, hooks) are not the same sequence.
    """
    global_seed, loader_seed = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, np.uint64)
    return int(global_seed), int(loader_seed)


def _enable_determinism(device: torch.device) -> Callable[[], None]:
    """Turn on deterministic algorithms; return a function restoring the previous settings."""
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        # cuBLAS reads this when it creates its handle; without it deterministic mode raises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def restore() -> None:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2:]

    return restore


# --------------------------------------------------------------------------- optimisation
def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD over the trainable parameters; with ``config.no_decay_bn_bias`` the 1-d ones
    (norm-layer weights and every bias) get no weight decay.

    A parameter may carry its own optimisation settings as attributes (set by the method that
    owns it, e.g. SWP's filter skeleton): ``prunekit_lr_scale`` multiplies ``config.lr`` (the
    schedule still applies) and ``prunekit_weight_decay`` replaces the weight decay. Such
    parameters get their own param groups, in a fixed order, so checkpoints resume.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: dict[tuple, list] = {}
    for p in trainable:
        wd = getattr(p, "prunekit_weight_decay", None)
        if wd is None:
            wd = 0.0 if config.no_decay_bn_bias and p.ndim <= 1 else config.weight_decay
        groups.setdefault((float(getattr(p, "prunekit_lr_scale", 1.0)), float(wd)), []).append(p)
    # the plain group first (its lr is the one logged), then the no-decay one, as before
    # per-parameter settings existed, so older checkpoints resume; then the special ones
    order = sorted(groups, key=lambda key: (key[0] != 1.0, key[1] != config.weight_decay))
    return torch.optim.SGD([{"params": groups[key], "lr": config.lr * key[0],
                             "weight_decay": key[1]} for key in order],
                           lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay)


def _lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``config.lr`` for iteration ``step`` (0-based, counted over all epochs)."""
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return step / warmup_steps
    if config.schedule == "cosine":
        decay_steps = max(config.epochs * steps_per_epoch - warmup_steps, 1)
        progress = min((step - warmup_steps) / decay_steps, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "multistep":
        epoch = step // steps_per_epoch
        return config.gamma ** sum(epoch >= milestone for milestone in config.milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration :class:`~torch.optim.lr_scheduler.LambdaLR` implementing ``config.schedule``
    (call ``scheduler.step()`` after every optimizer step)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, config, steps_per_epoch))


# --------------------------------------------------------------------------- hooks
class _Hooks:
    """Calls a method on every hook that has it, in the order the hooks were given."""

    def __init__(self, hooks: Iterable[Any]) -> None:
        self.hooks = list(hooks)

    def call(self, method: str, *args: Any) -> None:
        for hook in self.hooks:
            function = getattr(hook, method, None)
            if function is not None:
                function(*args)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        terms = [term for hook in self.hooks if hasattr(hook, "extra_loss")
                 for term in [hook.extra_loss(model)] if term is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def _stateful(self) -> list[Any]:
        return [hook for hook in self.hooks if hasattr(hook, "state_dict")]

    def state_dicts(self) -> list[Any]:
        """States of the hooks that have ``state_dict``, in order (stateless hooks, e.g. one
        that only logs, may be added or dropped between a run and its resume)."""
        return [hook.state_dict() for hook in self._stateful()]

    def load_state_dicts(self, states: Sequence[Any], path: Path) -> None:
        stateful = self._stateful()
        if len(states) != len(stateful):
            raise CheckpointError(f"{path} holds the state of {len(states)} hook(s) but fit() got "
                                  f"{len(stateful)} hook(s) with state_dict(); pass the same hooks "
                                  "to resume")
        for hook, state in zip(stateful, states):
            if hasattr(hook, "load_state_dict"):
                hook.load_state_dict(state)


# --------------------------------------------------------------------------- files
def _fsync_directory(directory: Path) -> None:
    if os.name == "posix":  # makes the rename itself durable; Windows cannot open directories
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temporary file in the same directory, fsync, then ``os.replace``: readers
    (and a resume after a kill) see either the old complete file or the new one."""
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:  # including KeyboardInterrupt: never leave temp files behind
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _save_torch(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda stream: torch.save(obj, stream))


def _save_log(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    # Rewritten whole from the history stored in last.pt, so the log can never disagree with
    # the checkpoint (no duplicated or missing lines after a kill between the two writes).
    text = "".join(json.dumps(record) + "\n" for record in history)
    _atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def _load_last_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    advice = (f"Delete {path} or call fit(..., resume=False) to start over "
              f"(which overwrites the files in {path.parent}).")
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects could run code.
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot load the checkpoint {path}: {type(error).__name__}: "
                              f"{error}. The file is corrupt or not a prunekit training "
                              f"checkpoint. {advice}") from error
    required = {"format", "epoch", "model", "optimizer", "scheduler", "history"}
    if not isinstance(checkpoint, dict) or not required <= set(checkpoint):
        raise CheckpointError(f"{path} is not a prunekit training checkpoint (missing keys). {advice}")
    return checkpoint


# --------------------------------------------------------------------------- distributed
@dataclass
class _Distributed:
    world_size: int = 1
    rank: int = 0
    created_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(requested_device: str) -> tuple[_Distributed, torch.device]:
    """Join (or create) the process group torchrun describes and pick this rank's device."""
    device = resolve_device(requested_device)
    already = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if already else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed(), device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = False
    if not already:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return _Distributed(dist.get_world_size(), dist.get_rank(), created), device


def _first_output(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]  # models with aux outputs


# --------------------------------------------------------------------------- training
@dataclass
class _EpochResult:
    train_loss: float
    train_top1: float
    lr: float
    images: int
    seconds: float
    extra_loss: float | None = None


@dataclass
class _Trainer:
    """The state one :func:`fit` call shares between its epochs."""

    model: nn.Module               # the bare model: checkpoints, hooks, validation
    train_model: nn.Module         # the model forward/backward runs through (DDP wrapper or model)
    train_set: Dataset
    config: TrainConfig
    device: torch.device
    ddp: _Distributed
    hooks: _Hooks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    use_amp: bool
    global_step: int = 0
    criterion: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing)

    def train_loader(self, epoch: int, loader_seed: int):
        """A fresh loader per epoch: persistent workers would carry their RNG state from one
        epoch to the next, which a resumed run could not reproduce."""
        config = self.config
        loader = build_loader(self.train_set, config.batch_size // self.ddp.world_size,
                              shuffle=True, num_workers=config.num_workers,
                              distributed=self.ddp.enabled, seed=config.seed)
        generator = torch.Generator().manual_seed(loader_seed)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)  # shuffles by (seed, epoch), identically on all ranks
        elif isinstance(loader.sampler, RandomSampler):
            loader.sampler.generator = generator
        loader.generator = generator  # worker seeds are drawn from it
        return loader

    def train_epoch(self, epoch: int, loader) -> _EpochResult:
        config, device = self.config, self.device
        self.train_model.train()
        # Sums stay on the device: calling .item() every step would stall CUDA.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        extra_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen, saw_extra = 0, False
        lr = self.optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (config.progress and self.ddp.is_main), leave=False)
        try:
            for index, (inputs, targets) in enumerate(loader):
                if index >= self.steps_per_epoch:
                    break
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses
                self.optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=self.use_amp):
                    logits = _first_output(self.train_model(inputs))
                loss = self.criterion(logits.float(), targets)
                extra = self.hooks.extra_loss(self.model)
                total_loss = loss if extra is None else loss + extra
                self.scaler.scale(total_loss).backward()
                if self.use_amp:
                    self.scaler.unscale_(self.optimizer)  # hooks and clipping see true gradients
                self.hooks.call("after_backward", self.global_step)
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.hooks.call("after_step", self.global_step)
                self.global_step += 1

                batch = targets.numel()
                seen += batch
                loss_sum += loss.detach().double() * batch
                correct += (logits.detach().argmax(1) == targets).sum()
                if extra is not None:
                    saw_extra = True
                    extra_sum += extra.detach().double() * batch
                bar.update()
                if not bar.disable and (index % 20 == 0 or index + 1 == self.steps_per_epoch):
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                    top1=f"{100 * correct.item() / seen:.2f}", lr=f"{lr:.4g}")
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        totals = torch.stack([loss_sum, correct, extra_sum,
                              torch.tensor(float(seen), dtype=torch.float64, device=device)])
        if self.ddp.enabled:  # every rank trained on its own shard: report the global numbers
            dist.all_reduce(totals)
        loss_total, correct_total, extra_total, seen_total = totals.tolist()
        if seen_total == 0:
            raise ValueError("the training loader yielded no batches")
        return _EpochResult(loss_total / seen_total, 100.0 * correct_total / seen_total, lr,
                            int(seen_total), seconds, extra_total / seen_total if saw_extra else None)

    def checkpoint(self, epoch: int, history: list[dict], best: dict) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.ddp.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "hooks": self.hooks.state_dicts(),
            "best_val_top1": best["val_top1"],
            "best_epoch": best["epoch"],
            "history": history,
            "config": self.config.to_dict(),
        }

    def restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        try:
            self.model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise CheckpointError(f"{path} does not fit this model (another architecture or "
                                  f"pruning plan?): {error}") from error
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.global_step = int(checkpoint["global_step"])
        saved = checkpoint.get("config", {})
        changed = sorted(key for key, value in self.config.to_dict().items()
                         if key not in _RUNTIME_FIELDS and saved.get(key, value) != value)
        if changed:
            warnings.warn(f"resuming {path} with a different config ({', '.join(changed)}); "
                          "the run will not match an uninterrupted one", stacklevel=3)
        if checkpoint.get("steps_per_epoch") != self.steps_per_epoch:
            warnings.warn(f"{path} was written with {checkpoint.get('steps_per_epoch')} steps per "
                          f"epoch, now there are {self.steps_per_epoch} (dataset, batch size or "
                          "world size changed); the learning-rate schedule shifts", stacklevel=3)


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    config: TrainConfig | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    hooks: Sequence[Any] = (),
    resume: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place on ``train_set``, validating on ``val_set`` after every epoch.

    ``val_set`` must be held out of training (e.g. the "val" split), never the test set: it
    picks ``best.pt``. ``None`` skips validation (then ``best.pt`` is not written and the
    val fields of the log are null). When ``fit`` returns, ``model`` holds the weights of the
    *last* epoch; load ``best.pt["model"]`` for the best one.

    Resume: with ``resume=True`` and an existing ``out_dir/last.pt``, training continues with
    the epoch after the one it holds (the same hooks must be passed); a corrupt file raises
    :class:`CheckpointError` instead of being overwritten. ``resume=False`` starts over and
    overwrites the files. A KeyboardInterrupt abandons the running epoch, keeps the files of
    the last finished one, and is re-raised.

    Hooks (objects with any subset of the methods of :class:`TrainHook`) are called, each
    method on every hook in the order given, as follows::

        on_train_start(model, optimizer)      # every fit() call, after a resume restored
        load_state_dict(state)                #   the model/optimizer; only when resuming
        for epoch:                            # (randomness is seeded before on_epoch_start)
            on_epoch_start(epoch)
            for step:                         # step = global iteration index, from 0
                forward; loss += extra_loss(model)
                backward                      # with AMP, gradients are unscaled here
                after_backward(step)          # gradients are final (DDP-averaged)
                grad clipping, optimizer.step(), scheduler.step()
                after_step(step)
            on_epoch_end(epoch)               # before validation and checkpointing
            state_dict()                      # on rank 0, stored in last.pt

    Hooks always receive the bare model (never the DDP wrapper); their ``state_dict()`` must
    hold only tensors and builtin containers/values (checkpoints load with weights_only).

    Distributed (``torchrun``, WORLD_SIZE > 1): the process group is created if needed
    ("nccl" on CUDA with device cuda:LOCAL_RANK, "gloo" on CPU) and destroyed at the end if
    ``fit`` created it; the model is wrapped in DistributedDataParallel, which averages the
    gradients and broadcasts rank 0's BatchNorm buffers at every forward; every rank loads
    ``batch_size // world_size`` images of a DistributedSampler shard. Only rank 0 validates
    (on the whole ``val_set``, unsharded, so the number is exact), writes files and shows
    progress; its results are broadcast so every rank returns the same summary. All ranks
    read ``last.pt`` on resume, so ``out_dir`` must be on a filesystem they share.

    Returns ``{"status", "history", "best_val_top1", "best_epoch", "epochs_run",
    "resumed_from_epoch", "final_val_top1", "out_dir"}``; ``history`` holds the log records.
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    ddp, device = _setup_distributed(config.device)
    restore_determinism = _enable_determinism(device) if config.deterministic else None
    try:
        return _fit(model, train_set, val_set, config, Path(out_dir), _Hooks(hooks), resume,
                    ddp, device)
    except KeyboardInterrupt:
        if ddp.is_main:
            print(f"\ninterrupted: {Path(out_dir) / LAST_CHECKPOINT} holds the last finished "
                  "epoch; call fit() again with resume=True to continue", file=sys.stderr)
        raise
    finally:
        if restore_determinism is not None:
            restore_determinism()
        if ddp.created_group:
            dist.destroy_process_group()


def _fit(model, train_set, val_set, config: TrainConfig, out_dir: Path, hooks: _Hooks,
         resume: bool, ddp: _Distributed, device: torch.device) -> dict[str, Any]:
    use_amp = config.amp and device.type == "cuda"
    if config.amp and not use_amp:
        warnings.warn("amp=True is ignored on CPU (autocast + GradScaler need CUDA)", stacklevel=3)
    if config.batch_size < ddp.world_size:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the world size "
                         f"{ddp.world_size}: every process needs at least one image per step")

    model.to(device)
    # The schedule needs the epoch length; a loader is cheap to build (workers start on iter).
    probe = build_loader(train_set, config.batch_size // ddp.world_size, shuffle=True,
                         distributed=ddp.enabled, seed=config.seed)
    steps_per_epoch = min(len(probe), config.max_steps_per_epoch or len(probe))
    if steps_per_epoch == 0:
        raise ValueError("train_set is empty")
    optimizer = build_optimizer(model, config)
    trainer = _Trainer(
        model=model,
        train_model=model,
        train_set=train_set,
        config=config,
        device=device,
        ddp=ddp,
        hooks=hooks,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config, steps_per_epoch),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp),
        steps_per_epoch=steps_per_epoch,
        use_amp=use_amp,
    )

    last_path, best_path, log_path = (out_dir / LAST_CHECKPOINT, out_dir / BEST_CHECKPOINT,
                                      out_dir / LOG_FILE)
    checkpoint = None
    if resume and last_path.exists():
        checkpoint = _load_last_checkpoint(last_path, device)
        trainer.restore(checkpoint, last_path)
    start_epoch = 0 if checkpoint is None else int(checkpoint["epoch"]) + 1
    history: list[dict[str, Any]] = [] if checkpoint is None else list(checkpoint["history"])
    best = {"val_top1": None, "epoch": None} if checkpoint is None else {
        "val_top1": checkpoint.get("best_val_top1"), "epoch": checkpoint.get("best_epoch")}
    if ddp.enabled:
        starts = [None] * ddp.world_size
        dist.all_gather_object(starts, start_epoch)
        if len(set(starts)) != 1:  # e.g. out_dir not shared: ranks would train different epochs
            raise RuntimeError(f"ranks disagree on the epoch to resume from ({starts}); is "
                               f"{out_dir} on a filesystem every rank can read?")
        trainer.train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    hooks.call("on_train_start", model, optimizer)
    if checkpoint is not None:
        hooks.load_state_dicts(checkpoint.get("hooks", []), last_path)

    val_loader = None
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _save_log(history, log_path)  # a fresh start truncates an old log
        if val_set is not None:
            # num_replicas=1: never shard validation, even when a process group exists.
            val_loader = build_loader(val_set, config.batch_size, shuffle=False,
                                      num_workers=config.num_workers, num_replicas=1, rank=0)

    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        global_seed, loader_seed = epoch_seeds(config.seed, epoch, ddp.rank)
        seed_everything(global_seed)
        loader = trainer.train_loader(epoch, loader_seed)
        hooks.call("on_epoch_start", epoch)
        result = trainer.train_epoch(epoch, loader)
        hooks.call("on_epoch_end", epoch)

        record: dict[str, Any] | None = None
        if ddp.is_main:
            val = None
            if val_loader is not None:
                val = evaluate(model, val_loader, device=None, progress=config.progress,
                               desc=f"val {epoch + 1}/{config.epochs}")
            record = {
                "epoch": epoch,
                "lr": result.lr,
                "train_loss": result.train_loss,
                "train_top1": result.train_top1,
                "val_top1": None if val is None else val["top1"],
                "val_loss": None if val is None else val["loss"],
                "seconds": time.perf_counter() - epoch_started,
                # Training throughput of all ranks together; validation is not included.
                "images/s": result.images / result.seconds if result.seconds > 0 else None,
            }
            if result.extra_loss is not None:
                record["train_extra_loss"] = result.extra_loss
            improved = val is not None and (best["val_top1"] is None or val["top1"] > best["val_top1"])
            if improved:
                best = {"val_top1": val["top1"], "epoch": epoch}
                # best.pt before last.pt: a kill in between repeats this epoch, rewriting both.
                _save_torch({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "epoch": epoch,
                             "val_top1": val["top1"], "config": config.to_dict()}, best_path)
            _save_torch(trainer.checkpoint(epoch, history + [record], best), last_path)
            _save_log(history + [record], log_path)
            if config.progress:
                val_text = "" if val is None else f" val_top1 {val['top1']:.2f}"
                tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {result.train_loss:.4f} "
                           f"train_top1 {result.train_top1:.2f}{val_text} lr {result.lr:.4g}")
        if ddp.enabled:
            # Also the barrier: no rank starts the next epoch before rank 0 saved this one.
            shared = [record, best]
            dist.broadcast_object_list(shared, src=0)
            record, best = shared
        history.append(record)

    return {
        "status": "completed",
        "history": history,
        "best_val_top1": best["val_top1"],
        "best_epoch": best["epoch"],
        "epochs_run": max(config.epochs - start_epoch, 0),
        "resumed_from_epoch": start_epoch if checkpoint is not None else None,
        "final_val_top1": history[-1]["val_top1"] if history else None,
        "out_dir": str(out_dir),
    }
