"""Datasets for prunekit: CIFAR-10 (two on-disk layouts) and ImageNet-style folders.

CIFAR-10 is found in either layout below a *data root* (see :func:`resolve_data_root`):

* ``official``: the python batches ``cifar-10-batches-py/`` (``data_batch_1..5``,
  ``test_batch``), as unpacked from the archive :func:`download_cifar10` fetches;
* ``packaged``: ``cifar10/train_*.npz``, ``cifar10/test.npz`` and
  ``cifar10/test_lossless_first1000.npz``, the project's shared copy. Its full arrays were
  decoded from a JPEG copy of CIFAR-10 and cost pretrained nets about 10 accuracy points;
  only ``test-lossless`` has the exact original pixels.

Every accuracy should be reported together with its split name (see :data:`SPLITS` and
:func:`describe_split`) so a reader can tell a JPEG-test number from a lossless one and a
validation number from a test number.

Files are validated when a dataset opens them (:mod:`prunekit.data.validate` has the rules):
images ``(N, 32, 32, 3)`` as ``uint8`` 0..255 or as floats already in ``[0, 1]`` (never
divided by 255 twice), integer labels in ``0..9``, one per image; anything else, a damaged
file or a pickle that asks for more than numpy arrays is a :class:`~prunekit.errors.DataError`
naming the file. Bad options (split, limit, val_size, normalize) are a
:class:`~prunekit.errors.ConfigError`.

Modules, each importing only those above it: ``errors``; ``validate`` (what a stored part
must hold); ``cifar_files`` (layouts, readers, cache); ``locate`` (the data root); ``splits``
(train/val/test, report labels, option checks); ``normalization``; ``cifar`` (the Dataset);
``loaders``; ``download``; ``folders``; ``preprocess`` (:class:`Preprocessing`, the images a
model expects); ``folder_splits`` (ImageNet-style folders cut into train/val/test); ``folder_export``
(arrays written as a lossless PNG image folder).
"""

from __future__ import annotations

from .cifar import CIFAR10, CIFAR10_CLASSES, random_crop_flip
from .cifar_files import clear_cache
from .download import CIFAR10_MD5, CIFAR10_URL, download_cifar10
from .errors import ChecksumError, DatasetNotFoundError, DownloadError
from .folders import image_folder
from .folder_export import export_image_folder
from .folder_splits import (FOLDER_SPLITS, FolderDataset, clear_folder_cache, folder_classes,
                            folder_split, is_image_folder)
from .preprocess import Preprocessing
from .loaders import build_loader
from .locate import DATA_ENV_VAR, resolve_data_root
from .normalization import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalization_stats,
)
from .splits import (
    DEFAULT_VAL_SIZE,
    LIMIT_SEED,
    SPLITS,
    VAL_SPLIT_SEED,
    check_limit,
    check_split,
    describe_split,
    load_cifar10_arrays,
    load_cifar10_labels,
    stratified_order,
    train_val_indices,
)

__all__ = [
    "FOLDER_SPLITS", "FolderDataset", "Preprocessing", "clear_folder_cache", "folder_classes",
    "export_image_folder", "folder_split", "is_image_folder",
    "CIFAR10", "CIFAR10_CLASSES", "CIFAR10_MD5", "CIFAR10_URL", "CIFAR_MEAN", "CIFAR_STD",
    "DATA_ENV_VAR", "DEFAULT_VAL_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "LIMIT_SEED", "SPLITS",
    "VAL_SPLIT_SEED", "ChecksumError", "DatasetNotFoundError", "DownloadError", "build_loader",
    "check_limit", "check_split", "clear_cache", "describe_split", "download_cifar10",
    "image_folder", "load_cifar10_arrays", "load_cifar10_labels", "normalization_stats",
    "random_crop_flip", "resolve_data_root", "stratified_order", "train_val_indices",
]
