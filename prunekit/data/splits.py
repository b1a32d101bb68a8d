"""The CIFAR-10 splits: which images make up each one, and a report label for each.

"train" and "val" are cut out of the stored "trainval" part by a class-balanced choice with a
fixed seed; "trainval", "test" and "test-lossless" are stored parts as they are. Every
accuracy should be reported together with its split name (see :data:`SPLITS` and
:func:`describe_split`) so a reader can tell a JPEG-test number from a lossless one and a
validation number from a test number.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from .cifar_files import _cached_labels, _cached_part
from .locate import _locate

__all__ = [
    "DEFAULT_VAL_SIZE", "LIMIT_SEED", "SPLITS", "VAL_SPLIT_SEED", "check_limit", "check_split",
    "describe_split", "load_cifar10_arrays", "load_cifar10_labels", "stratified_order",
    "train_val_indices",
]

#: Split names used throughout prunekit and in every report.
SPLITS = ("train", "val", "trainval", "test", "test-lossless")
DEFAULT_VAL_SIZE = 5000
#: Seeds of the held-out validation choice and of ``limit=`` subsets. Changing them changes
#: which images are "val", so they are constants, never taken from a global RNG.
VAL_SPLIT_SEED = 0
LIMIT_SEED = 1


def check_split(split: str) -> str:
    """Return ``split`` if it is one of :data:`SPLITS`; else a ConfigError listing them."""
    if not isinstance(split, str) or split not in SPLITS:
        raise ConfigError(f"unknown CIFAR-10 split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def _whole_number(value) -> bool:
    # bool is an int to Python, but limit=True is a slip, not "one image".
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_limit(limit: int | None) -> int | None:
    """Return ``limit`` (None, or a whole number of images >= 1) as an int or None; anything
    else (0, negative, bool, 0.5, "10") is a ConfigError, raised before any data is read."""
    if limit is None:
        return None
    if not _whole_number(limit) or limit < 1:
        raise ConfigError(f"limit must be a whole number of images >= 1 (or None for all), "
                          f"got {limit!r}")
    return int(limit)


def _check_val_size(val_size: int) -> int:
    if not _whole_number(val_size) or val_size < 0:
        raise ConfigError(f"val_size must be a whole number of images >= 0, got {val_size!r}")
    return int(val_size)


def _stored_part(split: str) -> str:
    """The on-disk part a split is cut from: train and val are both cut from trainval."""
    return "trainval" if split in ("train", "val") else split


def stratified_order(labels: Sequence[int] | np.ndarray, seed: int) -> np.ndarray:
    """All indices of ``labels`` in an order that visits the classes round-robin.

    Each class is shuffled by its own generator, ``np.random.default_rng([seed, class])``,
    so the result depends only on the labels and ``seed`` (never on a global RNG), and the
    first ``k`` entries are a class-balanced sample of size ``k``: every class contributes
    ``k // classes`` or one more, unless it runs out of images and the others make up for it.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        shuffled = members[np.random.default_rng([seed, int(cls)]).permutation(len(members))]
        rank_in_class[shuffled] = np.arange(len(members))
    # lexsort's last key is the primary one: first everyone's rank 0, then rank 1, ...
    return np.lexsort((labels, rank_in_class))


def train_val_indices(
    labels: Sequence[int] | np.ndarray, val_size: int = DEFAULT_VAL_SIZE, seed: int = VAL_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Split the trainval indices into sorted (train, val) index arrays; val is class-balanced."""
    count = len(labels)
    if not 0 <= _check_val_size(val_size) < count:
        raise ConfigError(
            f"val_size={val_size} holds out {val_size} of the {count} trainval images, "
            f"leaving {max(count - val_size, 0)} to train on; give a val_size in [0, {count})"
        )
    val = np.sort(stratified_order(labels, seed)[:val_size])
    train = np.setdiff1d(np.arange(count), val, assume_unique=True)
    return train, val


@functools.lru_cache(maxsize=8)
def _cached_train_val(folder: str, layout: str, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    return train_val_indices(_cached_labels(folder, layout, "trainval"), val_size)


def _split_indices(layout: str, folder: Path, split: str, val_size: int) -> np.ndarray | None:
    """Indices into the stored part for ``split``, or None when the split is the whole part."""
    if split not in ("train", "val"):
        return None
    if split == "val" and _check_val_size(val_size) == 0:
        raise ConfigError("val_size=0 leaves the 'val' split empty; give a val_size >= 1 or "
                          "use split='test'")
    train, val = _cached_train_val(str(folder), layout, val_size)
    return train if split == "train" else val


def load_cifar10_arrays(
    root: str | os.PathLike | None, split: str, val_size: int = DEFAULT_VAL_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 32, 32, 3)`` (HWC, RGB) and labels ``int64 (N,)`` of a split.

    Images are ``uint8`` 0..255 as CIFAR-10 stores them, or ``float32`` in ``[0, 1]`` when
    the files store float pixels (see :mod:`prunekit.data.validate`).

    ``root`` goes through :func:`resolve_data_root` (None = search). Stored parts are cached
    per process; for "trainval", "test" and "test-lossless" the cached read-only arrays
    themselves are returned (copy them before editing), "train" and "val" are fresh copies.
    """
    check_split(split)
    layout, folder = _locate(root)
    images, labels = _cached_part(str(folder), layout, _stored_part(split))
    indices = _split_indices(layout, folder, split, val_size)
    if indices is None:
        return images, labels
    return images[indices], labels[indices]


def load_cifar10_labels(
    root: str | os.PathLike | None, split: str, val_size: int = DEFAULT_VAL_SIZE
) -> np.ndarray:
    """Labels of a split without decoding the packaged images (cheap; for counting and sampling)."""
    check_split(split)
    layout, folder = _locate(root)
    labels = _cached_labels(str(folder), layout, _stored_part(split))
    indices = _split_indices(layout, folder, split, val_size)
    return labels if indices is None else labels[indices]


def describe_split(
    root: str | os.PathLike | None, split: str, val_size: int = DEFAULT_VAL_SIZE
) -> str:
    """Human label for a split, e.g. for a report line "top-1 91.5% on <description>"."""
    check_split(split)
    layout, folder = _locate(root)
    count = len(load_cifar10_labels(folder, split, val_size))
    lossy = layout == "packaged"
    if split == "train":
        total = len(_cached_labels(str(folder), layout, "trainval"))
        text = f"{count:,} of the {total:,} training images; {val_size:,} held out as 'val'"
    elif split == "val":
        text = f"{count:,} training images held out class-balanced, seed {VAL_SPLIT_SEED}"
    elif split == "trainval":
        text = f"all {count:,} training images"
    elif split == "test":
        text = f"{count:,} images" if lossy else f"{count:,} official test images"
    else:  # test-lossless: exact pixels in both layouts
        return f"{split} (first {count:,} official test images, original pixels)"
    if not lossy:
        return f"{split} ({text}, original pixels)"
    quality = "JPEG-decoded copy: ~10 points below lossless"
    return f"{split} ({text}, {quality}{'; class-major order' if split == 'test' else ''})"
