"""The prune job's data: the splits a method may ask for, from one CIFAR-10 location."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .. import data
from .config import CALIBRATION_DEFAULTS

__all__ = ["CifarRunData", "calibration_batches"]


def calibration_batches(root, cfg: Mapping[str, Any], seed: int) -> list:
    """CHIP/HRank's calibration data: a few batches of augmented training images."""
    cfg = {**CALIBRATION_DEFAULTS, **(cfg or {})}
    ds = data.CIFAR10(root, split=cfg["split"], train_augment=cfg["augment"])
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size"], shuffle=True,
                                         generator=generator)
    batches = []
    # The augmentation draws from the global RNG: seed it too (without disturbing the
    # caller's stream), so the same seed gives the same images and the same scores.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, batch in enumerate(loader):
            if i >= cfg["batches"]:
                break
            batches.append(batch)
    return batches


class CifarRunData:
    """CIFAR-10 at ``root``: augmented ``train``, held-out ``val`` (``limit``: a class-balanced
    subset for smoke runs), calibration batches, and the evaluation splits."""

    num_classes = len(data.CIFAR10_CLASSES)
    name = "CIFAR-10"

    def __init__(self, root: str | Path, *, limit: int | None = None,
                 calibration: Mapping[str, Any] | None = None, seed: int = 0):
        self.root, self.limit, self.seed = Path(root), data.check_limit(limit), seed
        self.calibration = dict(calibration or {})

    def train_set(self):
        return data.CIFAR10(self.root, split="train", train_augment=True)

    def val_set(self):
        return data.CIFAR10(self.root, split="val", limit=self.limit)

    def eval_set(self, split: str):
        return data.CIFAR10(self.root, split=split, limit=self.limit)

    def calibration_batches(self) -> list:
        return calibration_batches(self.root, self.calibration, self.seed)

    def recalibration_loader(self, batch_size: int):
        return data.build_loader(self.train_set(), batch_size=batch_size, shuffle=True)

    def lossless_loader(self):
        return data.build_loader(data.CIFAR10(self.root, split="test-lossless"),
                                 batch_size=500, shuffle=False)
