"""Writing arrays as an image folder (``OUT/<split>/<class>/<index>.png``), losslessly: PNG
keeps every pixel, so a folder written from CIFAR-10's lossless test images evaluates exactly
like the arrays (the exactness check of the image-folder path)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..files import atomic_write

__all__ = ["export_image_folder"]


def export_image_folder(images: np.ndarray, labels: Sequence[int], out: str | os.PathLike,
                        split: str, classes: Sequence[str]) -> Path:
    """Write ``images`` (N, H, W, 3) uint8 with ``labels`` as PNG files under
    ``out/split/<class name>/<index>.png``; returns ``out/split``. Existing files of the same
    names are replaced atomically; every class gets its folder even when it has no image."""
    from PIL import Image
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"export_image_folder needs uint8 images (N, H, W, 3), got "
                          f"{images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ConfigError(f"{len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ConfigError(f"labels must be in 0..{len(classes) - 1}")
    root = Path(out) / split
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    width = len(str(max(len(images) - 1, 0)))
    for index, (image, label) in enumerate(zip(images, labels)):
        path = root / classes[int(label)] / f"{index:0{width}d}.png"
        atomic_write(path, lambda stream, im=image: Image.fromarray(im).save(stream, "PNG"))
    return root
