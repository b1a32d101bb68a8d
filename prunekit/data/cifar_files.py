"""The CIFAR-10 files on disk: their two layouts, how to read them, and the per-process cache.

* ``official``: the python batches ``cifar-10-batches-py/`` (``data_batch_1..5``,
  ``test_batch``), read with an unpickler that only builds numpy arrays;
* ``packaged``: ``cifar10/train_*.npz``, ``cifar10/test.npz`` and
  ``cifar10/test_lossless_first1000.npz`` (the first 1,000 test images, original pixels).

Files hold the *stored parts* "trainval", "test" and "test-lossless"; cutting "train" and
"val" out of "trainval" is the business of :mod:`prunekit.data.splits`.
"""

from __future__ import annotations

import functools
import importlib
import pickle
from pathlib import Path

import numpy as np

from .errors import DatasetNotFoundError

__all__ = ["clear_cache"]

_OFFICIAL_DIR = "cifar-10-batches-py"
_OFFICIAL_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_OFFICIAL_FILES = _OFFICIAL_TRAIN_FILES + ("test_batch",)
_PACKAGED_DIR = "cifar10"
_LOSSLESS_FILE = "test_lossless_first1000.npz"
_LOSSLESS_COUNT = 1000  # the packaged lossless file holds the first 1,000 test images


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and builtins, so a tampered batch file
    cannot run code (the official format is a pickle; downloads are untrusted input)."""

    _NUMPY_NAMES = {"_reconstruct", "_frombuffer", "ndarray", "dtype", "scalar"}

    def find_class(self, module: str, name: str):
        is_numpy = module.split(".")[0] == "numpy" and name in self._NUMPY_NAMES
        # Python 3 protocol-2 pickles spell byte strings as _codecs.encode(text, "latin1").
        if not (is_numpy or (module, name) == ("_codecs", "encode")):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # avoid numpy 2's warning shim
        return getattr(importlib.import_module(module), name)


def _read_official_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as handle:
        # encoding="bytes": the official batches were pickled by Python 2.
        batch = _BatchUnpickler(handle, encoding="bytes").load()
    flat = np.asarray(batch[b"data"], dtype=np.uint8)
    # Rows are channel-major (1024 R, 1024 G, 1024 B); prunekit keeps HWC like the npz files.
    images = flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch[b"labels"], dtype=np.int64)


def _read_npz(path: Path, with_images: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    with np.load(path) as archive:
        labels = archive["y"].astype(np.int64)
        images = archive["x"] if with_images else None
    if images is not None and (images.shape[1:] != (32, 32, 3) or len(images) != len(labels)):
        raise ValueError(f"{path}: expected x (N,32,32,3) and y (N,), got {images.shape}")
    return images, labels


def _packaged_train_files(folder: Path) -> list[Path]:
    # Sort numerically: the parts must be concatenated in file order (train_0, train_1, ...).
    parts = [p for p in folder.glob("train_*.npz") if p.stem.split("_", 1)[1].isdigit()]
    return sorted(parts, key=lambda p: int(p.stem.split("_", 1)[1]))


def _check_train_parts_contiguous(files: list[Path]) -> None:
    """A missing or renamed part would silently shift every later image; ``first_index``
    (stored in each part) makes that detectable."""
    expected_start = 0
    for path in files:
        with np.load(path) as archive:
            if "first_index" in archive.files and int(archive["first_index"]) != expected_start:
                raise ValueError(
                    f"{path} starts at image {int(archive['first_index'])}, expected "
                    f"{expected_start}: is a train_*.npz part missing?"
                )
            expected_start += len(archive["y"])


def _read_part(folder: Path, layout: str, part: str, with_images: bool):
    """Read one of "trainval", "test", "test-lossless" (the splits stored on disk)."""
    if layout == "official":
        names = {"trainval": _OFFICIAL_TRAIN_FILES}.get(part, ("test_batch",))
        batches = [_read_official_batch(folder / name) for name in names]
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        if part == "test-lossless":  # test_batch is lossless; take the same 1,000 images
            images, labels = images[:_LOSSLESS_COUNT].copy(), labels[:_LOSSLESS_COUNT].copy()
        return (images if with_images else None), labels
    if part == "trainval":
        files = _packaged_train_files(folder)
        _check_train_parts_contiguous(files)
        parts = [_read_npz(p, with_images) for p in files]
        labels = np.concatenate([p[1] for p in parts])
        return (np.concatenate([p[0] for p in parts]) if with_images else None), labels
    name = "test.npz" if part == "test" else _LOSSLESS_FILE
    if not (folder / name).is_file():
        raise DatasetNotFoundError(f"split {part!r} needs {folder / name}, which is missing")
    return _read_npz(folder / name, with_images)


@functools.lru_cache(maxsize=4)
def _cached_part(folder: str, layout: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _read_part(Path(folder), layout, part, with_images=True)
    # Shared by every caller in the process: make accidental in-place edits fail loudly.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=8)
def _cached_labels(folder: str, layout: str, part: str) -> np.ndarray:
    if layout == "official":  # pickles cannot be read partially: load (and cache) it all
        return _cached_part(folder, layout, part)[1]
    labels = _read_part(Path(folder), layout, part, with_images=False)[1]
    labels.flags.writeable = False
    return labels


def clear_cache() -> None:
    """Forget the arrays cached by :func:`load_cifar10_arrays` (e.g. after files changed)."""
    _cached_part.cache_clear()
    _cached_labels.cache_clear()
