"""Model zoo: a registry of CIFAR CNN builders plus checkpoint loading.

>>> from prunekit import models
>>> net = models.create("cifar_resnet56", weights="pretrained")   # shortcut "A"
>>> models.list_models("cifar_resnet*")
['cifar_resnet110', 'cifar_resnet20', 'cifar_resnet32', 'cifar_resnet44', 'cifar_resnet56']
"""

from .registry import (
    UnknownModelError,
    create,
    get_model_spec,
    get_pretrained_weights,
    list_models,
    register_model,
)
from .weights import (
    PretrainedWeights,
    WeightsLoadError,
    WeightsMismatchError,
    find_data_root,
    load_weights,
    pretrained_checkpoint_info,
)

# Imported for their side effect of registering builders.
from . import cifar_resnet, cifar_vgg  # noqa: E402  isort: skip
from .cifar_resnet import (  # noqa: E402
    SHORTCUTS,
    CifarResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
)
from .cifar_vgg import CifarVGG, cifar_vgg16_bn  # noqa: E402

__all__ = [
    "SHORTCUTS",
    "CifarResNet",
    "CifarVGG",
    "PretrainedWeights",
    "UnknownModelError",
    "WeightsLoadError",
    "WeightsMismatchError",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_vgg16_bn",
    "create",
    "find_data_root",
    "get_model_spec",
    "get_pretrained_weights",
    "list_models",
    "load_weights",
    "pretrained_checkpoint_info",
    "register_model",
]
