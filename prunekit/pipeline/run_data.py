"""The prune job's data: the splits a method may ask for, from CIFAR-10 or an ImageNet-style
image folder (:func:`open_run_data` picks by ``--dataset`` or by what ``--data`` holds)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .. import data
from ..errors import ConfigError
from .config import CALIBRATION_DEFAULTS, DATASET_KINDS

__all__ = ["CifarRunData", "FolderRunData", "calibration_batches", "open_run_data",
           "resolve_dataset"]



def calibration_batches(source, cfg: Mapping[str, Any], seed: int) -> list:
    """CHIP/HRank's calibration data: the first ``cfg["batches"]`` batches, in a seeded
    shuffle, of ``source`` — a Dataset, or a CIFAR-10 root whose ``cfg["split"]`` is read
    (augmented when ``cfg["augment"]``)."""
    cfg = {**CALIBRATION_DEFAULTS, **(cfg or {})}
    if isinstance(source, (str, Path)):
        source = data.CIFAR10(source, split=cfg["split"], train_augment=cfg["augment"])
    dataset = source
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], shuffle=True,
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
    subset for smoke runs), calibration batches, and the evaluation splits. ``normalize`` is
    the model's (mean, std)."""

    num_classes = len(data.CIFAR10_CLASSES)
    name = "CIFAR-10"
    kind = "cifar10"
    splits = data.SPLITS
    default_eval_splits = ("test", "test-lossless")

    def __init__(self, root: str | Path, *, limit: int | None = None,
                 calibration: Mapping[str, Any] | None = None, seed: int = 0,
                 preprocessing: data.Preprocessing | None = None):
        self.root, self.limit, self.seed = Path(root), data.check_limit(limit), seed
        self.calibration = dict(calibration or {})
        self.preprocessing = preprocessing or data.Preprocessing.cifar()
        if self.preprocessing.input_size != 32:
            raise ConfigError(f"CIFAR-10 images are 32 px; the model's preprocessing asks for "
                              f"{self.preprocessing.input_size} px. Give --input-size 32, or "
                              "use an image folder at the size the model needs")
        self._normalize = (self.preprocessing.mean, self.preprocessing.std)

    def _split(self, split: str, **kwargs):
        return data.CIFAR10(self.root, split=split, normalize=self._normalize, **kwargs)

    def train_set(self):
        return self._split("train", train_augment=True)

    def val_set(self):
        return self._split("val", limit=self.limit)

    def eval_set(self, split: str):
        return self._split(split, limit=self.limit)

    def calibration_batches(self) -> list:
        cfg = {**CALIBRATION_DEFAULTS, **self.calibration}
        return calibration_batches(self._split(cfg["split"], train_augment=cfg["augment"]),
                                   cfg, self.seed)

    def sensitivity_batches(self, batches: int, batch_size: int) -> list:
        """Held-out ``val`` images, not augmented, for the sensitivity allocation: the first
        ``batches`` batches of a seeded shuffle; never an evaluation split."""
        return calibration_batches(self.eval_set("val"),
                                   {"batches": batches, "batch_size": batch_size}, self.seed)

    def recalibration_loader(self, batch_size: int):
        return data.build_loader(self.train_set(), batch_size=batch_size, shuffle=True)

    def lossless_loader(self):
        return data.build_loader(self._split("test-lossless"), batch_size=500, shuffle=False)


class FolderRunData(CifarRunData):
    """An image folder (``ROOT/train``, ``ROOT/val``; see :mod:`prunekit.data.folder_splits`)
    with the model's preprocessing; ``test`` is ``ROOT/val``."""

    name = "the image folder"
    kind = "imagefolder"
    splits = data.FOLDER_SPLITS
    default_eval_splits = ("test",)

    def __init__(self, root: str | Path, *, preprocessing: data.Preprocessing,
                 limit: int | None = None, calibration: Mapping[str, Any] | None = None,
                 seed: int = 0):
        self.root, self.limit, self.seed = Path(root), data.check_limit(limit), seed
        self.calibration = dict(calibration or {})
        self.preprocessing = preprocessing
        self.num_classes = len(data.folder_classes(self.root))  # checks train/ against val/

    def _split(self, split: str, **kwargs):
        return data.folder_split(self.root, split, self.preprocessing, **kwargs)

    def train_set(self):
        return self._split("train", train_augment=True)

    def eval_set(self, split: str):
        return self._split(split, limit=self.limit, train_augment=False)

    def lossless_loader(self):
        return None  # image files are what they are: no lossy copy to compare against


def resolve_dataset(dataset: str | None, data_dir) -> tuple[str, Path]:
    """``(kind, root)``: ``"imagefolder"`` when asked for or when ``data_dir`` holds
    ``train/<class>/``, else CIFAR-10 found as :func:`prunekit.data.resolve_data_root` does."""
    dataset = dataset or "auto"
    if dataset not in DATASET_KINDS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASET_KINDS)}")
    if dataset == "imagefolder" or (dataset == "auto" and data_dir is not None
                                    and data.is_image_folder(data_dir)):
        if data_dir is None:
            raise ConfigError("--dataset imagefolder needs --data DIR (DIR/train/<class>/...)")
        root = Path(data_dir).expanduser()
        if not data.is_image_folder(root):
            raise data.DatasetNotFoundError(f"{root} is not an image folder: expected "
                                            f"{root}/train/<class>/<images> (and val/ for test)")
        return "imagefolder", root
    return "cifar10", data.resolve_data_root(data_dir)


def open_run_data(kind: str, root: Path, preprocessing: data.Preprocessing, *,
                  limit=None, calibration=None, seed: int = 0):
    """The run's data source for ``kind`` (from :func:`resolve_dataset`)."""
    if kind == "imagefolder":
        return FolderRunData(root, preprocessing=preprocessing, limit=limit,
                             calibration=calibration, seed=seed)
    return CifarRunData(root, limit=limit, calibration=calibration, seed=seed,
                        preprocessing=preprocessing)
