"""ImageNet-style image folders (``<root>/<split>/<class>/<images>``) through torchvision's
``ImageFolder``, with the usual ImageNet train and eval transforms. A folder without class
folders, or with a class folder holding no image, is refused before torchvision scans it."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, DataError
from .errors import DatasetNotFoundError
from .normalization import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["image_folder"]


def _check_class_folders(folder: Path, extensions: tuple[str, ...]) -> None:
    """What ImageFolder needs, said with the folder's name: at least one class folder, and
    at least one image in each (anywhere below it, as ImageFolder looks)."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataError(f"{folder} holds no class folders; expected {folder}/<class>/<images>, "
                        f"one folder per class")

    def has_image(class_dir: Path) -> bool:
        return any(name.lower().endswith(extensions)
                   for _, _, names in os.walk(class_dir, followlinks=True) for name in names)

    empty = [name for name in classes if not has_image(folder / name)]
    if empty:
        raise DataError(f"{folder}: class folder(s) {', '.join(empty)} hold no images "
                        f"({', '.join(extensions)}); add images or remove those folders")


def image_folder(
    root: str | os.PathLike,
    split: str = "train",
    image_size: int = 224,
    train_augment: bool | None = None,
):
    """``torchvision.datasets.ImageFolder`` over ``root/<split>`` with ImageNet transforms.

    Train: RandomResizedCrop(image_size) + horizontal flip; eval: Resize(image_size * 8/7,
    i.e. 256 for 224) + CenterCrop(image_size). Both normalise with ImageNet statistics.
    ``train_augment`` defaults to ``split == "train"``. A missing folder is a
    :class:`DatasetNotFoundError`; one without class folders or with an empty class folder is
    a :class:`~prunekit.errors.DataError` naming it.
    """
    if split not in ("train", "val"):
        raise ConfigError(f"unknown image-folder split {split!r}; valid splits: train, val")
    try:
        from torchvision import datasets, transforms
    except ImportError as error:
        raise ImportError(
            "image_folder needs torchvision: pip install prunekit[vision]"
        ) from error
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"image folder not found: {folder} (expected <root>/{split}/<class>/<images>)"
        )
    _check_class_folders(folder, tuple(datasets.folder.IMG_EXTENSIONS))
    augment = split == "train" if train_augment is None else train_augment
    if augment:
        geometry = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        resize = round(image_size * 256 / 224)
        geometry = [transforms.Resize(resize), transforms.CenterCrop(image_size)]
    pipeline = transforms.Compose(
        geometry + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    return datasets.ImageFolder(str(folder), transform=pipeline)
