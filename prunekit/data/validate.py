"""What a stored CIFAR-10 part must hold before prunekit uses it, checked once when it is read.

The rules (every refusal is a :class:`~prunekit.errors.DataError` naming the file):

* images ``x``: shape ``(N, 32, 32, 3)`` (HWC, RGB) with ``N >= 1``, and either
  - ``uint8`` pixels ``0..255`` (the CIFAR-10 format; other integer dtypes are accepted
    when every value is in ``0..255`` and are converted exactly to ``uint8``), or
  - floating-point pixels already in ``[0, 1]`` (kept as ``float32`` and *not* divided by
    255 again). Floats outside ``[0, 1]``, NaN or inf are refused, including whole numbers
    ``0..255`` stored as floats: prunekit does not guess the scale of a float image;
  - anything else (bool, complex, strings, objects) is refused;
* labels ``y``: a 1-D integer array, one label per image, every label in
  ``[0, num_classes)``. Float labels are refused even when they are whole numbers (they are
  the sign of a file written by mistake, and were once silently truncated); the message says
  how to convert them when that is safe.

The checks are vectorised numpy reductions (``min``/``max``), cheap even on the 50,000
training images; the element-wise searches for the first offender run only on failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["IMAGE_SHAPE", "NUM_CLASSES", "check_image_layout", "check_images", "check_labels",
           "check_part"]

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
_RULE = ("CIFAR-10 images must be uint8 0..255 or floats in [0, 1], shaped (N, 32, 32, 3); "
         "labels int class indices 0..9")


def _fail(path: Path | str, what: str, remedy: str) -> DataError:
    return DataError(f"{path}: {what}. {remedy} ({_RULE}).")


def check_image_layout(path: Path | str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse an image array by its shape and dtype alone (no pixel is read)."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise _fail(path, f"x is an object array, refused as unsafe (it would need "
                          f"unpickling)", "Store the images as a plain uint8 array")
    if dtype.kind not in "uif":
        kind = {"b": "bool", "c": "complex"}.get(dtype.kind, str(dtype))
        raise _fail(path, f"x holds {kind} values ({dtype}), not pixels",
                    "Store the images as uint8 0..255 or as floats in [0, 1]")
    if len(shape) == 4 and tuple(shape[1:]) == (3, 32, 32):
        raise _fail(path, f"x has shape {tuple(shape)}, channels first (CHW)",
                    "Store HWC images: x.transpose(0, 2, 3, 1)")
    if len(shape) != 4 or tuple(shape[1:]) != IMAGE_SHAPE:
        raise _fail(path, f"x has shape {tuple(shape)}, expected (N, 32, 32, 3)",
                    "Store one 32x32 RGB image per row of x")
    if shape[0] == 0:
        raise _fail(path, "x holds no images (0 rows)",
                    "Re-create the file with its images")


def _first_bad_image(images: np.ndarray, bad) -> tuple[int, float]:
    flat = images.reshape(len(images), -1)
    rows = np.flatnonzero(bad(flat).any(axis=1))
    index = int(rows[0])
    value = flat[index][bad(flat[index])][0]
    return index, value.item()


def check_images(path: Path | str, images) -> np.ndarray:
    """Validate stored images; return them as ``uint8`` (0..255) or ``float32`` ([0, 1])."""
    if not isinstance(images, np.ndarray):
        raise _fail(path, f"x is a {type(images).__name__}, not a numpy array",
                    "Store the images as a numpy array")
    check_image_layout(path, images.shape, images.dtype)
    if images.dtype == np.uint8:
        return images
    low, high = images.min(), images.max()
    if images.dtype.kind in "ui":
        if low < 0 or high > 255:
            index, value = _first_bad_image(images, lambda a: (a < 0) | (a > 255))
            raise _fail(path, f"x holds pixel value {value} in image {index} (values range "
                              f"{low}..{high}), outside 0..255",
                        "Store 8-bit pixels as uint8")
        return images.astype(np.uint8)
    if np.isnan(low) or np.isnan(high) or np.isinf(low) or np.isinf(high):
        index, value = _first_bad_image(images, lambda a: ~np.isfinite(a))
        raise _fail(path, f"x holds {value} in image {index}: float images must be finite",
                    "Re-create the file from the original images")
    if low < 0 or high > 1:
        index, value = _first_bad_image(images, lambda a: (a < 0) | (a > 1))
        hint = ("They look like 0..255 pixels stored as floats: store them as uint8 "
                "(np.round(x).astype(np.uint8)) or divide them by 255"
                if low >= 0 and high <= 255 else
                "Float images must be pixels in [0, 1] before normalisation; prunekit "
                "normalises them itself")
        raise _fail(path, f"x holds float pixel value {value:g} in image {index} (values range "
                          f"{float(low):g}..{float(high):g}), outside [0, 1]", hint)
    return images.astype(np.float32, copy=False)


def check_labels(path: Path | str, labels, count: int,
                 num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Validate labels for ``count`` images; return them as ``int64``."""
    if not isinstance(labels, np.ndarray):
        raise _fail(path, f"y is a {type(labels).__name__}, not a numpy array",
                    "Store the labels as a 1-D integer numpy array")
    if labels.dtype.hasobject:
        raise _fail(path, "y is an object array, refused as unsafe (it would need unpickling)",
                    "Store the labels as a 1-D integer array")
    if labels.dtype.kind == "f":
        whole = bool(np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)))
        hint = ("They are all whole numbers: store y.astype(np.int64)" if whole else
                "Some are not whole numbers: they are not class indices; re-create y")
        raise _fail(path, f"y holds float labels ({labels.dtype}); prunekit does not "
                          f"truncate them to classes", hint)
    if labels.dtype.kind not in "ui":
        raise _fail(path, f"y holds {labels.dtype} values, not integer class indices",
                    "Store the labels as a 1-D integer array")
    if labels.ndim != 1:
        hint = ("It looks one-hot: store y.argmax(1)" if labels.ndim == 2
                and labels.shape[1] == num_classes else "Store one class index per image")
        raise _fail(path, f"y has shape {labels.shape}, expected ({count},)", hint)
    if len(labels) != count:
        raise _fail(path, f"x holds {count} images but y holds {len(labels)} labels",
                    "Store exactly one label per image")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        index = int(bad[0])
        raise _fail(path, f"y[{index}] = {labels[index]} is not a class in 0..{num_classes - 1} "
                          f"({len(bad)} such label{'s' if len(bad) > 1 else ''})",
                    "Fix the labels or use a CIFAR-10 file")
    return labels.astype(np.int64)


def check_part(path: Path | str, images, labels,
               num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Validate one stored part read from ``path``; return ``(images, labels)`` in the
    dtypes of :func:`check_images` and :func:`check_labels`."""
    images = check_images(path, images)
    return images, check_labels(path, labels, len(images), num_classes)
