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

Divergence: a non-finite loss (every step) or non-finite weights (every epoch end) stop the
run with :class:`DivergenceError` before anything of that epoch is written, so the files keep
the last good epoch.

The package, one idea per module (each imports only the ones listed before it):
``config`` (:class:`TrainConfig`, :data:`SCHEDULES`, :data:`LOG_KEYS`), ``checkpoint`` (the
three files, :class:`CheckpointError`), ``hooks`` (:class:`TrainHook`), ``optim``
(:func:`build_optimizer`, :func:`build_scheduler`), ``seeding`` (:func:`seed_everything`,
:func:`epoch_seeds`, determinism), ``distributed`` (the process group), ``divergence``
(:class:`DivergenceError` and the finite checks), ``distill`` (:class:`Distillation`, a
teacher's soft targets), ``trainer`` (one epoch's steps) and
``loop`` (:func:`fit`).
"""

from __future__ import annotations

from .checkpoint import (BEST_CHECKPOINT, CHECKPOINT_FORMAT, LAST_CHECKPOINT, LOG_FILE,
                         CheckpointError)
from .config import LOG_KEYS, SCHEDULES, TrainConfig
from .distill import Distillation, distillation_loss
from .divergence import DivergenceError
from .hooks import TrainHook
from .loop import fit
from .optim import build_optimizer, build_scheduler
from .seeding import epoch_seeds, seed_everything

__all__ = [
    "SCHEDULES", "LOG_KEYS", "CheckpointError", "Distillation", "DivergenceError",
    "TrainConfig", "TrainHook", "distillation_loss",
    "build_optimizer", "build_scheduler", "epoch_seeds", "fit", "seed_everything",
]
