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
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .errors import DatasetNotFoundError
from .validate import check_image_layout, check_images, check_labels, check_part

__all__ = ["clear_cache"]

_OFFICIAL_DIR = "cifar-10-batches-py"
_OFFICIAL_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_OFFICIAL_FILES = _OFFICIAL_TRAIN_FILES + ("test_batch",)
_PACKAGED_DIR = "cifar10"
_LOSSLESS_FILE = "test_lossless_first1000.npz"
_LOSSLESS_COUNT = 1000  # the packaged lossless file holds the first 1,000 test images
_DAMAGED = "Re-create or re-download it, or point --data at a good copy"


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"refusing to load {module}.{name} from a CIFAR batch")
        self.global_name = f"{module}.{name}"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and builtins, so a tampered batch file
    cannot run code (the official format is a pickle; downloads are untrusted input)."""

    # Where numpy 1 and 2 pickle arrays, dtypes and scalars from; nothing else is imported.
    _NUMPY_MODULES = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                      "numpy.core.numeric", "numpy._core.numeric"}
    _NUMPY_NAMES = {"_reconstruct", "_frombuffer", "ndarray", "dtype", "scalar"}

    def find_class(self, module: str, name: str):
        is_numpy = module in self._NUMPY_MODULES and name in self._NUMPY_NAMES
        # Python 3 protocol-2 pickles spell byte strings as _codecs.encode(text, "latin1").
        if not (is_numpy or (module, name) == ("_codecs", "encode")):
            raise _RefusedGlobal(module, name)
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # avoid numpy 2's warning shim
        return getattr(importlib.import_module(module), name)


def _unpickle_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            # encoding="bytes": the official batches were pickled by Python 2.
            batch = _BatchUnpickler(handle, encoding="bytes").load()
    except _RefusedGlobal as refused:
        raise DataError(
            f"{path}: refused as unsafe: the pickle asks for {refused.global_name}, which "
            f"could run code, and a CIFAR-10 batch only holds arrays and lists (nothing from "
            f"it was run). Delete it and download the official batches again "
            f"(prunekit.data.download_cifar10), or use a copy you trust"
        ) from None
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoding failure means a damaged file
        raise DataError(f"{path}: not a readable CIFAR-10 batch (truncated or not a pickle: "
                        f"{type(error).__name__}: {error}). {_DAMAGED}") from None
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch):
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: not a CIFAR-10 batch: it needs the keys b'data' and "
                        f"b'labels', found {keys}. {_DAMAGED}")
    return batch


def _read_official_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_batch(path)
    try:
        flat, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (ValueError, TypeError) as error:  # ragged lists and the like
        raise DataError(f"{path}: data or labels are not arrays ({error}). {_DAMAGED}") from None
    if flat.ndim != 2 or flat.shape[1] != 3072:
        raise DataError(f"{path}: b'data' has shape {flat.shape}, expected (N, 3072) rows of "
                        f"32x32x3 pixels. {_DAMAGED}")
    # Rows are channel-major (1024 R, 1024 G, 1024 B); prunekit keeps HWC like the npz files.
    images = np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return check_part(path, images, labels)


def _check_npz_signature(path: Path) -> None:
    """np.load treats any file that is neither a zip nor a .npy as a pickle: tell them apart
    here, so garbage is called garbage and a real pickle is called unsafe."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    if head.startswith(b"PK"):
        return
    if head.startswith(b"\x80"):
        raise DataError(f"{path}: holds a pickle, not an npz archive; refused as unsafe "
                        f"(loading it would need unpickling). Save the arrays with "
                        f"np.savez(path, x=images, y=labels)")
    what = "a single .npy array" if head == b"\x93NUMPY" else (
        "empty" if not head else f"not an npz (zip) archive (starts with {head!r})")
    raise DataError(f"{path}: {what}; an npz with arrays 'x' and 'y' is needed. {_DAMAGED}")


def _stored_shape(archive, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an npz member from its header, without decoding its data."""
    member = archive.zip.open(f"{name}.npy")
    with member:
        version = np.lib.format.read_magic(member)
        readers = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}
        if version in readers:
            shape, _, dtype = readers[version](member)
            return shape, dtype
    array = archive[name]  # other header versions: decode it (rare)
    return array.shape, array.dtype


def _load_npz(path: Path, with_images: bool) -> dict:
    """The arrays of a packaged npz: ``y``, ``x`` (or only its ``x_shape``/``x_dtype``), and
    ``first_index`` when stored; unreadable files become DataErrors naming ``path``."""
    _check_npz_signature(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                return {"missing": missing, "files": archive.files}
            out = {"y": archive["y"]}
            if with_images:
                out["x"] = archive["x"]
            else:
                out["x_shape"], out["x_dtype"] = _stored_shape(archive, "x")
            if "first_index" in archive.files:
                out["first_index"] = archive["first_index"]
            return out
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise DataError(f"{path}: a damaged npz ({error}). {_DAMAGED}") from None
        raise DataError(f"{path}: holds an object array, refused as unsafe (it would need "
                        f"unpickling). Store x as uint8 (N, 32, 32, 3) and y as integer "
                        f"labels") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as error:
        raise DataError(f"{path}: a damaged npz, truncated or not a zip archive "
                        f"({type(error).__name__}: {error}). {_DAMAGED}") from None


def _read_npz(path: Path, with_images: bool = True):
    """Validated ``(images or None, labels, first_index or None)`` of a packaged npz."""
    arrays = _load_npz(path, with_images)
    if "missing" in arrays:
        raise DataError(f"{path}: lacks the array(s) {', '.join(map(repr, arrays['missing']))} "
                        f"(it holds {arrays['files']}); a CIFAR-10 npz needs 'x' (images) "
                        f"and 'y' (labels). {_DAMAGED}")
    first = arrays.get("first_index")
    if first is not None:
        if not (isinstance(first, np.ndarray) and first.shape == () and first.dtype.kind in "ui"):
            raise DataError(f"{path}: first_index must be one integer, got {first!r}. "
                            f"{_DAMAGED}")
        first = int(first)
    if with_images:
        images = check_images(path, arrays["x"])
        return images, check_labels(path, arrays["y"], len(images)), first
    check_image_layout(path, arrays["x_shape"], arrays["x_dtype"])
    return None, check_labels(path, arrays["y"], arrays["x_shape"][0]), first


def _packaged_train_files(folder: Path) -> list[Path]:
    # Sort numerically: the parts must be concatenated in file order (train_0, train_1, ...).
    parts = [p for p in folder.glob("train_*.npz") if p.stem.split("_", 1)[1].isdigit()]
    return sorted(parts, key=lambda p: int(p.stem.split("_", 1)[1]))


def _check_train_parts(files: list[Path], parts: list) -> None:
    """A missing or renamed part would silently shift every later image; ``first_index``
    (stored in each part) makes that detectable. Parts must also agree on the pixel dtype:
    concatenating uint8 with [0, 1] floats would turn 0..255 into floats and mix scales."""
    expected_start = 0
    for path, (images, labels, first) in zip(files, parts):
        if first is not None and first != expected_start:
            raise DataError(f"{path} starts at image {first}, expected {expected_start}: is "
                            f"a train_*.npz part missing? Restore the missing part(s)")
        expected_start += len(labels)
    dtypes = {p[0].dtype for p in parts if p[0] is not None}
    if len(dtypes) > 1:
        kinds = ", ".join(f"{f.name}: {p[0].dtype}" for f, p in zip(files, parts))
        raise DataError(f"{files[0].parent}: the train_*.npz parts store pixels in different "
                        f"dtypes ({kinds}); store every part alike (uint8 0..255 or floats "
                        f"in [0, 1])")


def _read_part(folder: Path, layout: str, part: str, with_images: bool):
    """Read and validate one of "trainval", "test", "test-lossless" (the parts on disk)."""
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
        parts = [_read_npz(p, with_images) for p in files]
        _check_train_parts(files, parts)
        labels = np.concatenate([p[1] for p in parts])
        return (np.concatenate([p[0] for p in parts]) if with_images else None), labels
    name = "test.npz" if part == "test" else _LOSSLESS_FILE
    if not (folder / name).is_file():
        raise DatasetNotFoundError(f"split {part!r} needs {folder / name}, which is missing")
    return _read_npz(folder / name, with_images)[:2]


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
