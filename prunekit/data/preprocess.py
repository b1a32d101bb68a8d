"""How a model wants its images: input size, normalisation, eval resize/crop and train
augmentation, as one :class:`Preprocessing` that travels with the model's source and builds
the transforms for image folders.

Where it comes from, in order: explicit ``--input-size`` / ``--mean`` / ``--std`` overrides;
the weights (torchvision's ``weights.transforms()``, timm's pretrained config, the zoo's
checkpoints, which are CIFAR-10 nets at 32 px); the ImageNet default otherwise. ``backend="timm"``
builds the transforms with ``timm.data.create_transform`` so a timm model sees exactly what it
was trained with.

Eval: ``Resize(round(size / crop_pct))`` then ``CenterCrop(size)`` (crop_pct 0.875 gives the
classic 256 -> 224); with ``crop_pct=1`` and images already ``size`` pixels, both are no-ops, so
PNG copies of CIFAR-10 evaluate exactly like the arrays. Train: ``"imagenet"`` is
RandomResizedCrop + flip, ``"cifar"`` is a 4-pixel padded random crop + flip.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from .normalization import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["INTERPOLATIONS", "TRAIN_AUGMENTATIONS", "Preprocessing"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
TRAIN_AUGMENTATIONS = ("imagenet", "cifar", "none")


def _triple(values: Sequence[float], name: str, positive: bool) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) for v in out) or (positive and min(out) <= 0):
        kind = "positive " if positive else ""
        raise ConfigError(f"{name} needs 3 finite {kind}numbers (one per RGB channel), "
                          f"got {values!r}")
    return out


@dataclass(frozen=True)
class Preprocessing:
    """The images a model expects (see the module doc). ``source`` says where the values
    came from, for reports ("torchvision weights IMAGENET1K_V2", "timm pretrained_cfg", ...)."""

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    train: str = "imagenet"
    backend: str = "torchvision"
    source: str = "ImageNet default"

    def __post_init__(self) -> None:
        size = self.input_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"input size must be a whole number of pixels >= 1, got {size!r}")
        object.__setattr__(self, "mean", _triple(self.mean, "mean", positive=False))
        object.__setattr__(self, "std", _triple(self.std, "std", positive=True))
        crop = self.crop_pct
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
            raise ConfigError(f"crop_pct must be in (0, 1], got {crop!r}")
        for name, value, valid in (("interpolation", self.interpolation, INTERPOLATIONS),
                                   ("train augmentation", self.train, TRAIN_AUGMENTATIONS),
                                   ("backend", self.backend, ("torchvision", "timm"))):
            if value not in valid:
                raise ConfigError(f"{name} {value!r} is not one of {', '.join(valid)}")

    # ------------------------------------------------------------------ the usual ones
    @classmethod
    def imagenet(cls, input_size: int = 224, **changes: Any) -> "Preprocessing":
        return cls(input_size=input_size, **changes)

    @classmethod
    def cifar(cls, normalize: str = "imagenet", source: str = "CIFAR-10 (32 px)") -> "Preprocessing":
        """32-pixel CIFAR-10 images; the shared pretrained nets use ImageNet statistics."""
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else (CIFAR_MEAN,
                                                                                   CIFAR_STD)
        return cls(input_size=32, mean=mean, std=std, crop_pct=1.0, train="cifar",
                   source=source)

    def with_overrides(self, input_size: int | None = None,
                       mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None) -> "Preprocessing":
        """A copy with the user's explicit values (``None`` keeps the model's)."""
        changes = {k: v for k, v in (("input_size", input_size), ("mean", mean), ("std", std))
                   if v is not None}
        if not changes:
            return self
        return dataclasses.replace(self, **changes,
                                   source=f"{self.source}, overridden: {', '.join(changes)}")

    # ------------------------------------------------------------------------ as data
    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        """The example-input shape for tracing, MACs and latency."""
        return (batch, 3, self.input_size, self.input_size)

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct + 1e-9))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Preprocessing":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown preprocessing keys {sorted(unknown)}; valid: "
                              f"{sorted(known)}")
        return cls(**dict(values))

    def describe(self) -> str:
        mean = ", ".join(f"{v:.3f}" for v in self.mean)
        std = ", ".join(f"{v:.3f}" for v in self.std)
        return (f"{self.input_size} px (eval: resize {self.resize_size}, center crop; "
                f"{self.interpolation}), mean ({mean}), std ({std}), train augmentation "
                f"{self.train} [{self.source}]")

    # ----------------------------------------------------------------------- transforms
    def eval_transform(self):
        """PIL image -> normalised tensor, as the model is evaluated."""
        if self.backend == "timm":
            return self._timm_transform(training=False)
        from torchvision import transforms
        mode = getattr(transforms.InterpolationMode, self.interpolation.upper())
        return transforms.Compose([
            transforms.Resize(self.resize_size, interpolation=mode),
            transforms.CenterCrop(self.input_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def train_transform(self):
        """PIL image -> augmented, normalised tensor for training and calibration."""
        if self.train == "none":
            return self.eval_transform()
        if self.backend == "timm" and self.train == "imagenet":
            return self._timm_transform(training=True)
        from torchvision import transforms
        mode = getattr(transforms.InterpolationMode, self.interpolation.upper())
        if self.train == "cifar":
            geometry = [transforms.Resize(self.input_size, interpolation=mode),
                        transforms.CenterCrop(self.input_size),
                        transforms.RandomCrop(self.input_size, padding=4),
                        transforms.RandomHorizontalFlip()]
        else:
            geometry = [transforms.RandomResizedCrop(self.input_size, interpolation=mode),
                        transforms.RandomHorizontalFlip()]
        return transforms.Compose(geometry + [transforms.ToTensor(),
                                              transforms.Normalize(self.mean, self.std)])

    def _timm_transform(self, training: bool):
        try:
            from timm.data import create_transform
        except ImportError:
            raise ConfigError("this model's preprocessing comes from timm, which is not "
                              "installed: pip install prunekit[timm]") from None
        return create_transform(input_size=(3, self.input_size, self.input_size),
                                is_training=training, mean=self.mean, std=self.std,
                                crop_pct=self.crop_pct, interpolation=self.interpolation)
