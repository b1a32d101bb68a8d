"""The CIFAR-10 torch Dataset: a split as normalised ``(3, 32, 32)`` float tensors, with the
standard pad-and-crop plus flip augmentation for training splits."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .cifar_files import _cached_part
from .locate import _locate
from .normalization import normalization_stats
from .splits import (
    DEFAULT_VAL_SIZE,
    LIMIT_SEED,
    check_limit,
    check_split,
    _split_indices,
    _stored_part,
    describe_split,
    stratified_order,
)

__all__ = ["CIFAR10", "CIFAR10_CLASSES", "random_crop_flip"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


def random_crop_flip(image: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a ``(C, H, W)`` tensor: zero-pad, random crop, random
    horizontal flip. Uses torch's RNG, so ``torch.manual_seed`` (and the per-worker seeds a
    DataLoader derives from it) make it reproducible."""
    _, height, width = image.shape
    padded = F.pad(image, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    crop = padded[:, top:top + height, left:left + width]
    return crop.flip(-1) if torch.rand(()) < 0.5 else crop


class CIFAR10(Dataset):
    """CIFAR-10 split as ``(float tensor (3, 32, 32), int label)`` pairs.

    Args:
        root: data root or CIFAR folder; None searches (see :func:`resolve_data_root`).
        split: one of :data:`SPLITS`.
        train_augment: pad-4 random crop + horizontal flip; default on for "train" and
            "trainval" only. Padding happens before normalisation, i.e. the border is black.
        normalize: "imagenet" (default; what the shared pretrained weights expect), "cifar",
            an explicit ``(mean, std)`` pair, or None for plain ``[0, 1]`` pixels.
        limit: keep only this many images (a whole number >= 1), chosen class-balanced by a
            fixed seed (:data:`LIMIT_SEED`, see :func:`stratified_order`) and kept in stored
            order. Not a prefix on purpose: the packaged ``test.npz`` is class-major, so its
            first 100 images would all be airplanes.
        val_size: images held out of "train" as "val" (in ``[0, trainval size)``).

    The stored part is validated when the dataset is opened (see
    :mod:`prunekit.data.validate`): a file with wrong dtypes, pixel or label ranges or
    lengths is a :class:`~prunekit.errors.DataError` naming it; bad options (split, limit,
    val_size, normalize) are a :class:`~prunekit.errors.ConfigError`. Stored ``uint8`` pixels
    are divided by 255; stored float pixels are already in ``[0, 1]`` and are not.

    Attributes: ``split``, ``description`` (for reports), ``labels`` (int64 array),
    ``classes``.
    """

    classes = CIFAR10_CLASSES

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "test",
        train_augment: bool | None = None,
        normalize: str | tuple[Sequence[float], Sequence[float]] | None = "imagenet",
        limit: int | None = None,
        val_size: int = DEFAULT_VAL_SIZE,
    ) -> None:
        # Options first: a bad one is reported before any file is read.
        check_split(split)
        limit = check_limit(limit)
        stats = normalization_stats(normalize)
        layout, folder = _locate(root)
        # Keep the cached stored part plus an index array instead of copying 45,000 images.
        # Reading the part validates it (dtype, range, lengths), once per cached part.
        self._images, stored_labels = _cached_part(str(folder), layout, _stored_part(split))
        indices = _split_indices(layout, folder, split, val_size)
        labels = stored_labels if indices is None else stored_labels[indices]
        self.description = describe_split(folder, split, val_size)
        if limit is not None:
            if limit < len(labels):
                chosen = np.sort(stratified_order(labels, LIMIT_SEED)[:limit])
                indices = chosen if indices is None else indices[chosen]
                labels = labels[chosen]
                self.description += f" [class-balanced subset of {limit:,}, seed {LIMIT_SEED}]"
        self._indices = indices
        self.labels = np.asarray(labels, dtype=np.int64)
        # uint8 parts hold 0..255; float parts were validated to hold [0, 1] pixels already.
        self._scale = 255.0 if self._images.dtype == np.uint8 else 1.0
        self.split = split
        if train_augment is None:
            train_augment = split in ("train", "trainval")
        self.train_augment = train_augment
        self._mean = None if stats is None else torch.tensor(stats[0]).view(3, 1, 1)
        self._std = None if stats is None else torch.tensor(stats[1]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        stored = item if self._indices is None else self._indices[item]
        # torch.tensor copies, so the shared read-only cache is never aliased.
        image = torch.tensor(self._images[stored]).permute(2, 0, 1).float().div_(self._scale)
        if self.train_augment:
            image = random_crop_flip(image)
        if self._mean is not None:
            image = (image - self._mean) / self._std
        return image, int(self.labels[item])

    def __repr__(self) -> str:
        return f"CIFAR10({self.description}, augment={self.train_augment})"
