"""The training run: :func:`fit` sets up the process group, determinism, optimiser, schedule and
resume, then runs the epochs, validating on rank 0 and writing ``last.pt``, ``best.pt`` and
``log.jsonl`` after each one.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data import build_loader
from ..errors import ConfigError, DataError
from ..measure import evaluate
from .checkpoint import (BEST_CHECKPOINT, CHECKPOINT_FORMAT, LAST_CHECKPOINT, LOG_FILE,
                         CheckpointError, _load_last_checkpoint, _save_log, _save_torch)
from .config import TrainConfig
from .distill import Distillation
from .distributed import _Distributed, _setup_distributed
from .divergence import DivergenceError, _NonFinite, check_weights
from .hooks import _Hooks
from .optim import build_optimizer, build_scheduler
from .seeding import _enable_determinism, epoch_seeds, seed_everything
from .trainer import _Trainer

__all__ = ["fit"]


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    config: TrainConfig | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    hooks: Sequence[Any] = (),
    resume: bool = True,
    distill: Distillation | None = None,
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

    Divergence: a non-finite loss (checked at every step, before the backward pass) or a
    non-finite parameter or buffer (checked at the end of every epoch, before and after the
    hooks' ``on_epoch_end``) raises :class:`DivergenceError` on every rank. Nothing of that
    epoch is written: ``last.pt``, ``best.pt`` and ``log.jsonl`` stay those of the last good
    epoch. A model that is already non-finite before the first step raises it too, and a
    ``last.pt`` holding non-finite weights raises :class:`CheckpointError`.

    Distillation: ``distill=Distillation(teacher, temperature, weight)`` adds Hinton et al.'s
    soft-target term to the loss (:mod:`prunekit.train.distill`); the teacher stays out of
    every file ``fit`` writes, and a resume must pass the same teacher (checked by
    fingerprint).

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
                    ddp, device, distill)
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
         resume: bool, ddp: _Distributed, device: torch.device,
         distill: Distillation | None = None) -> dict[str, Any]:
    use_amp = config.amp and device.type == "cuda"
    if config.amp and not use_amp:
        warnings.warn("amp=True is ignored on CPU (autocast + GradScaler need CUDA)", stacklevel=3)
    if config.batch_size < ddp.world_size:
        raise ConfigError(f"batch_size {config.batch_size} is smaller than the world size "
                         f"{ddp.world_size}: every process needs at least one image per step")

    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    # The schedule needs the epoch length; a loader is cheap to build (workers start on iter).
    probe = build_loader(train_set, config.batch_size // ddp.world_size, shuffle=True,
                         distributed=ddp.enabled, seed=config.seed)
    steps_per_epoch = min(len(probe), config.max_steps_per_epoch or len(probe))
    if steps_per_epoch == 0:
        raise DataError("the training set is empty: there is nothing to fine-tune on")
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
        distill=distill,
    )
    if distill is not None:
        if not isinstance(distill, Distillation):
            raise ConfigError("distill must be a prunekit.train.Distillation(teacher, ...)")
        distill.check_student(model)
        distill.prepare(device)

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
    _check_start(model, ddp, device, last_path if checkpoint is not None else None)

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
        try:
            result = trainer.train_epoch(epoch, loader)
            # Before on_epoch_end too: a hook that scores the weights (SFP's mask update)
            # would otherwise fail on them with an error that does not say "diverged".
            check_weights(model, ddp, device, "at the end of the epoch")
            hooks.call("on_epoch_end", epoch)
            check_weights(model, ddp, device, "after the hooks' on_epoch_end")
        except _NonFinite as problem:
            raise _diverged(problem.problem, epoch, config, out_dir, history, best) \
                from problem.__cause__

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


def _check_start(model: nn.Module, ddp: _Distributed, device: torch.device,
                 resumed_from: Path | None) -> None:
    """Refuse to train weights that are not finite to begin with."""
    try:
        check_weights(model, ddp, device, "before the first step")
    except _NonFinite as problem:
        if resumed_from is not None:
            raise CheckpointError(f"{resumed_from} holds non-finite weights ({problem.problem}); "
                                  f"it cannot be resumed. Delete it (or give the run another "
                                  f"--out) to start this training over") from None
        raise DivergenceError(f"fit() was given a model whose weights are not finite "
                              f"({problem.problem}); load finite weights before training. "
                              "Nothing was trained or written") from None


def _diverged(problem: str, epoch: int, config: TrainConfig, out_dir: Path,
              history: Sequence[Mapping[str, Any]], best: Mapping[str, Any]) -> DivergenceError:
    """The error for a divergence in ``epoch``: what was not finite, what was kept, what to do."""
    if history:
        kept = (f"The last good checkpoint, {out_dir / LAST_CHECKPOINT} (after epoch "
                f"{int(history[-1]['epoch']) + 1} of {config.epochs}), was kept")
        if best.get("epoch") is not None:
            kept += (f", and {out_dir / BEST_CHECKPOINT} (epoch {int(best['epoch']) + 1}, "
                     f"val_top1 {best['val_top1']:.2f})")
        kept += "."
    else:
        kept = "No checkpoint of this run was written (it diverged in its first epoch)."
    return DivergenceError(
        f"training diverged in epoch {epoch + 1} of {config.epochs}, {problem}. Nothing of "
        f"this epoch was saved. {kept} Lower the learning rate (lr={config.lr:g}; "
        "--finetune-lr on the command line, --lr for `prunekit finetune`) or check the "
        "training data for NaN/inf values, then train again.")
