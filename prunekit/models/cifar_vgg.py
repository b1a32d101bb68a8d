"""VGG-16 with batch norm for CIFAR, as used by the HRank/CHIP line of pruning papers.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015 (configuration D), adapted to 32x32 inputs the way GAL (Lin et al., CVPR 2019),
HRank (Lin et al., CVPR 2020) and CHIP (Sui et al., NeurIPS 2021) define it: 13 conv3x3
layers *with bias*, each followed by BN and ReLU; max-pooling after conv blocks 2, 4, 7 and
10 only (the final 2x2 map is average-pooled instead), then
``Linear(512, 512) -> BatchNorm1d -> ReLU -> Linear(512, num_classes)``.

Module names match those repositories' checkpoints: ``features.conv{i}`` /
``features.norm{i}`` / ``features.relu{i}`` / ``features.pool{i}``, where ``i`` is the
position in the configuration list (so ``features.conv0``, ``conv1``, ``pool2``,
``conv3``, ...), and ``classifier.linear1`` / ``norm1`` / ``relu1`` / ``linear2``.

Size: 14,991,946 parameters (14,982,474 without BN, the "14.98M" of the papers) and
313,463,808 conv+linear MACs at 32x32.  The papers' "313.73M FLOPs" is reproduced by conv
MACs plus the two linear layers counted twice (multiply + add): 313,731,072.  This is a
reconstruction from the arithmetic; the counter that first produced the figure is not public.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .registry import check_positive_int, register_model

__all__ = ["VGG16_CONFIG", "CifarVGG", "cifar_vgg16_bn"]

# Numbers are conv output widths, "M" a 2x2 max-pool.  No pool after the last block: the
# 2x2 map goes through AvgPool2d(2) instead, as in the HRank/CHIP code.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class CifarVGG(nn.Module):
    """Plain VGG feature stack + two-layer classifier with BatchNorm1d.

    Args:
        config: layer list, ints for conv widths and ``"M"`` for max-pooling.
        num_classes: classifier output size.
        channels: per-conv widths overriding those in ``config`` (13 values for VGG-16);
            pruned networks are rebuilt from these.
        hidden_features: width of the hidden classifier layer.
    """

    def __init__(self, config: Sequence[int | str] = VGG16_CONFIG, num_classes: int = 10,
                 channels: Sequence[int] | None = None, hidden_features: int = 512):
        super().__init__()
        check_positive_int(num_classes, "num_classes", "CifarVGG")
        check_positive_int(hidden_features, "hidden_features", "CifarVGG")
        self.config = tuple(config)
        default = [v for v in self.config if v != "M"]
        widths = _widths(channels, default)
        self.features = nn.Sequential()
        in_channels, conv = 3, 0
        for i, v in enumerate(self.config):
            if v == "M":
                self.features.add_module(f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = widths[conv]
            conv += 1
            self.features.add_module(f"conv{i}", nn.Conv2d(in_channels, out, 3, padding=1))
            self.features.add_module(f"norm{i}", nn.BatchNorm2d(out))
            self.features.add_module(f"relu{i}", nn.ReLU())
            in_channels = out
        # Fixed window, not adaptive: the reference network is defined for 32x32 inputs.
        self.avgpool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(in_channels, hidden_features)),
            ("norm1", nn.BatchNorm1d(hidden_features)),
            ("relu1", nn.ReLU()),
            ("linear2", nn.Linear(hidden_features, num_classes)),
        ]))
        self._default_widths = default
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # fan_out as torchvision's VGG and the HRank code (std = sqrt(2 / (k*k*out))).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def channel_config(self) -> dict[str, list[int] | int | None]:
        """Constructor widths read back from the (possibly pruned) modules."""
        widths = [m.weight.shape[0] for m in self.features if isinstance(m, nn.Conv2d)]
        return {
            "channels": None if widths == self._default_widths else widths,
            "hidden_features": self.classifier.linear1.weight.shape[0],
        }


def _widths(given: Sequence[int] | None, default: list[int]) -> list[int]:
    if given is None:
        return list(default)
    widths = list(given)
    if len(widths) != len(default) or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"channels must be {len(default)} positive ints, got {given!r}")
    return widths


@register_model
def cifar_vgg16_bn(num_classes: int = 10, **kwargs) -> CifarVGG:
    """VGG-16-BN for CIFAR in the GAL/HRank/CHIP form (Simonyan & Zisserman 2015, config D).

    14.99M parameters (14.98M excluding BN) and 313.46M conv+linear MACs at 32x32.
    """
    return CifarVGG(VGG16_CONFIG, num_classes=num_classes, **kwargs)
