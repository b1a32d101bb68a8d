"""ImageNet-style data for the prune job: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``
cut into the same named splits as CIFAR-10, with the model's :class:`Preprocessing`.

* ``train``: ``ROOT/train`` minus the held-out part, train transform (augmented);
* ``val``: a fixed, class-balanced part of ``ROOT/train`` (``val_size`` images, by default a
  tenth, at most 10,000, chosen by :func:`stratified_order` with :data:`VAL_SPLIT_SEED`), eval
  transform — for checkpoint selection and searches, never the reported accuracy;
* ``trainval``: all of ``ROOT/train``;
* ``test``: ``ROOT/val`` with the eval transform (the ImageNet convention: its "val" folder is
  what papers report).

Both folders are scanned once per process and must hold the same class folders (the label of a
class is its index in the sorted names, as torchvision's ImageFolder assigns them; a class only
one folder has would shift every later label). ``limit`` keeps a class-balanced subset.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .errors import DatasetNotFoundError
from .folders import _check_class_folders
from .preprocess import Preprocessing
from .splits import LIMIT_SEED, VAL_SPLIT_SEED, check_limit, stratified_order

__all__ = ["FOLDER_SPLITS", "FolderDataset", "clear_folder_cache", "folder_classes", "folder_split",
           "is_image_folder"]

FOLDER_SPLITS = ("train", "val", "trainval", "test")
_MAX_DEFAULT_VAL = 10_000


def is_image_folder(root: str | os.PathLike) -> bool:
    """Whether ``root`` looks like ``ROOT/train/<class>/...`` (a folder of class folders)."""
    train = Path(root).expanduser() / "train"
    return train.is_dir() and any(entry.is_dir() for entry in os.scandir(train))


@functools.lru_cache(maxsize=8)
def _scan(folder: str) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    path = Path(folder)
    if not path.is_dir():
        raise DatasetNotFoundError(f"image folder not found: {path} (expected "
                                   f"{path}/<class>/<images>)")
    _check_class_folders(path, tuple(IMG_EXTENSIONS))
    classes = tuple(sorted(entry.name for entry in os.scandir(path) if entry.is_dir()))
    samples = make_dataset(str(path), {c: i for i, c in enumerate(classes)},
                           extensions=IMG_EXTENSIONS)
    return classes, tuple((str(p), int(label)) for p, label in samples)


def folder_classes(root: str | os.PathLike) -> tuple[str, ...]:
    """The class names of ``ROOT/train``, checked to be exactly those of ``ROOT/val`` when
    that folder exists (DataError naming the classes only one of them has)."""
    root = Path(root).expanduser()
    classes, _ = _scan(str(root / "train"))
    if (root / "val").is_dir():
        test_classes, _ = _scan(str(root / "val"))
        if test_classes != classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_val = sorted(set(test_classes) - set(classes))
            raise DataError(f"{root}: train/ and val/ hold different class folders (only in "
                            f"train/: {only_train or 'none'}; only in val/: {only_val or 'none'});"
                            " labels would not match, give both folders the same classes")
    return classes


def _default_val_size(n: int, classes: int) -> int:
    return max(classes, min(_MAX_DEFAULT_VAL, n // 10)) if n > classes else 0


class FolderDataset(torch.utils.data.Dataset):
    """Images of one split: ``(path, label)`` samples, a transform, a report description."""

    def __init__(self, samples, classes, transform, split: str, description: str):
        self.samples = list(samples)
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self.classes, self.transform = tuple(classes), transform
        self.split, self.description = split, description

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int):
        from torchvision.datasets.folder import default_loader
        path, label = self.samples[item]
        try:
            image = default_loader(path)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"cannot read image {path} ({exc}); remove or replace it") from None
        return self.transform(image), label

    def __repr__(self) -> str:
        return f"FolderDataset({self.description})"


def folder_split(root: str | os.PathLike, split: str, preprocessing: Preprocessing, *,
                 train_augment: bool | None = None, limit: int | None = None,
                 val_size: int | None = None) -> FolderDataset:
    """The named split of the image folder at ``root`` (see the module doc)."""
    if split not in FOLDER_SPLITS:
        raise ConfigError(f"unknown image-folder split {split!r}; valid splits: "
                          f"{', '.join(FOLDER_SPLITS)}")
    limit = check_limit(limit)
    root = Path(root).expanduser()
    classes = folder_classes(root)
    if split == "test":
        if not (root / "val").is_dir():
            raise DatasetNotFoundError(f"split 'test' is the images in {root / 'val'}, which is "
                                       "missing (expected val/<class>/<images>)")
        samples = list(_scan(str(root / "val"))[1])
        where = f"{root / 'val'}"
    else:
        samples = list(_scan(str(root / "train"))[1])
        where = f"{root / 'train'}"
        if split in ("train", "val"):
            labels = np.array([label for _, label in samples], dtype=np.int64)
            held = _default_val_size(len(samples), len(classes)) if val_size is None else val_size
            if isinstance(held, bool) or not isinstance(held, (int, np.integer)) or held < 0 \
                    or held >= len(samples):
                raise ConfigError(f"val_size must be a whole number in 0..{len(samples) - 1} "
                                  f"for {where} ({len(samples)} images), got {held!r}")
            if split == "val" and held == 0:
                raise ConfigError(f"{where} holds too few images to hold any out as 'val'")
            order = stratified_order(labels, VAL_SPLIT_SEED)
            chosen = np.sort(order[:held] if split == "val" else order[held:])
            samples = [samples[i] for i in chosen]
            where += f" ({'held-out' if split == 'val' else 'minus the held-out'} "
            where += f"{held:,} images, seed {VAL_SPLIT_SEED})"
    if limit is not None and limit < len(samples):
        labels = np.array([label for _, label in samples], dtype=np.int64)
        chosen = np.sort(stratified_order(labels, LIMIT_SEED)[:limit])
        samples = [samples[i] for i in chosen]
        where += f" [class-balanced subset of {limit:,}, seed {LIMIT_SEED}]"
    augment = split in ("train", "trainval") if train_augment is None else train_augment
    transform = preprocessing.train_transform() if augment else preprocessing.eval_transform()
    description = f"image folder {split}: {where}, {len(samples):,} images, {len(classes)} classes"
    return FolderDataset(samples, classes, transform, split, description)


def clear_folder_cache() -> None:
    """Forget the scanned folders (after files were added or removed)."""
    _scan.cache_clear()
