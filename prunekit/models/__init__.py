"""Model zoo: a registry of CIFAR CNN builders plus checkpoint loading, and models from
anywhere else (torchvision, timm, the user's own builder: :mod:`.sources`).

>>> from prunekit import models
>>> net = models.create("cifar_resnet56", weights="pretrained")   # shortcut "A"
>>> models.list_models("cifar_resnet*")
['cifar_resnet110', 'cifar_resnet20', 'cifar_resnet32', 'cifar_resnet44', 'cifar_resnet56']
>>> net = models.build_model(models.parse_model_ref("torchvision:resnet18"))  # random init
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
    WeightsDownloadError,
    WeightsLoadError,
    WeightsMismatchError,
    WeightsNotFoundError,
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
from .sources import (  # noqa: E402
    MODEL_SOURCES,
    UntrustedModuleError,
    build_base,
    build_model,
    model_preprocessing,
    parse_model_ref,
)

__all__ = [
    "MODEL_SOURCES",
    "SHORTCUTS",
    "CifarResNet",
    "CifarVGG",
    "PretrainedWeights",
    "UnknownModelError",
    "UntrustedModuleError",
    "WeightsDownloadError",
    "WeightsLoadError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "build_base",
    "build_model",
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
    "model_preprocessing",
    "parse_model_ref",
    "pretrained_checkpoint_info",
    "register_model",
]
