"""One epoch of training: ``_Trainer`` holds the state a :func:`~prunekit.train.fit` call shares
between epochs (model, optimizer, scheduler, GradScaler, hooks, step counter), runs an
epoch's steps, and turns that state into a ``last.pt`` checkpoint and back.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from ..data import build_loader
from ..measure.evaluation import first_nonfinite
from ..utils import first_output
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError
from .config import _RUNTIME_FIELDS, TrainConfig
from .distributed import _Distributed
from .distill import Distillation
from .divergence import _NonFinite, check_loss
from .hooks import _Hooks


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
    distill: Distillation | None = None   # a teacher the student also learns from
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
                if config.channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                targets = targets.to(device, non_blocking=True)
                lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses
                self.optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=self.use_amp):
                    logits = first_output(self.train_model(inputs))
                    teacher_logits = (None if self.distill is None
                                      else self.distill.teacher_logits(inputs))
                loss = self.criterion(logits.float(), targets)
                if teacher_logits is not None:
                    loss = self.distill.loss(logits, loss, teacher_logits)
                extra = self.hooks.extra_loss(self.model)
                total_loss = loss if extra is None else loss + extra
                where = f"step {index + 1}/{self.steps_per_epoch} (global step {self.global_step})"
                # Before backward: a non-finite step never reaches the weights or the momentum.
                check_loss(loss, extra, total_loss, self.model, self.ddp, device, where)
                self.scaler.scale(total_loss).backward()
                if self.use_amp:
                    self.scaler.unscale_(self.optimizer)  # hooks and clipping see true gradients
                self.hooks.call("after_backward", self.global_step)
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self._after_step(where)
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

    def _after_step(self, where: str) -> None:
        # A hook that scores the weights (LFPC's mask refresh) fails on the NaN a step just
        # wrote before the next loss check could see it: that is divergence, said as such.
        try:
            self.hooks.call("after_step", self.global_step)
        except Exception as error:
            found = first_nonfinite(self.model)
            if found is None:
                raise
            raise _NonFinite(f"{where}: the optimizer step made '{found[0]}' non-finite "
                             f"({found[1]} NaN/inf value(s)) and a hook's after_step failed on "
                             f"it ({type(error).__name__}: {error})") from error

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
            "distill": None if self.distill is None else self.distill.state(),
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
        self._check_same_distillation(checkpoint.get("distill"), path)
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

    def _check_same_distillation(self, saved: dict | None, path: Path) -> None:
        """A resume must learn from the same teacher the same way: else CheckpointError."""
        now = None if self.distill is None else self.distill.state()
        if saved == now:
            return
        if saved is None:
            raise CheckpointError(f"{path} was trained without distillation; resume it without "
                                  "a teacher, or start over (resume=False) to distil")
        if now is None:
            raise CheckpointError(f"{path} was trained distilling from a teacher "
                                  f"(temperature {saved['temperature']}, weight "
                                  f"{saved['weight']}); pass the same teacher to resume")
        raise CheckpointError(f"{path} was trained distilling with {saved}, this run with {now} "
                              "(a different teacher or setting); pass the same teacher and "
                              "options to resume, or start over (resume=False)")
