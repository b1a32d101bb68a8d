"""Per-channel normalisation statistics: ImageNet's (what the shared pretrained weights
expect) and CIFAR-10's, and the parser of the ``normalize=`` argument."""

from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD", "normalization_stats"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def normalization_stats(
    normalize: str | tuple[Sequence[float], Sequence[float]] | None,
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Turn ``"imagenet"``, ``"cifar"``, an explicit ``(mean, std)`` pair or None into stats;
    anything else is a ConfigError."""
    if normalize is None:
        return None
    if isinstance(normalize, str):
        named = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar": (CIFAR_MEAN, CIFAR_STD)}
        if normalize not in named:
            raise ConfigError(
                f"normalize={normalize!r}: use 'imagenet', 'cifar', (mean, std) or None"
            )
        return named[normalize]
    try:
        mean, std = (tuple(float(v) for v in stats) for stats in normalize)
    except (TypeError, ValueError):
        mean = std = ()
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"normalize needs 'imagenet', 'cifar', None or (3 means, 3 positive "
                          f"stds), got {normalize!r}")
    return mean, std
