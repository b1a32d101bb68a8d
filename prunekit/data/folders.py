"""ImageNet-style image folders (``<root>/<split>/<class>/<images>``) through torchvision's
``ImageFolder``, with the usual ImageNet train and eval transforms."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DatasetNotFoundError
from .normalization import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["image_folder"]


def image_folder(
    root: str | os.PathLike,
    split: str = "train",
    image_size: int = 224,
    train_augment: bool | None = None,
):
    """``torchvision.datasets.ImageFolder`` over ``root/<split>`` with ImageNet transforms.

    Train: RandomResizedCrop(image_size) + horizontal flip; eval: Resize(image_size * 8/7,
    i.e. 256 for 224) + CenterCrop(image_size). Both normalise with ImageNet statistics.
    ``train_augment`` defaults to ``split == "train"``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown image-folder split {split!r}; valid splits: train, val")
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
