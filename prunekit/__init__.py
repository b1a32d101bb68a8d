"""prunekit: structured pruning of convolutional networks with physical channel removal.

>>> import torch, prunekit
>>> model = prunekit.models.create("cifar_resnet56", weights="pretrained").eval()
>>> result = prunekit.prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.3)
>>> print(result.summary())
"""

from .version import __version__

from . import models
from .deployment import deploy
from .errors import PrunekitError
from .graph import ChannelGraph, build_graph, explain
from .masking import zero_removed_channels
from .measure import count_macs, count_params
from .plan import PlanError, PlanTarget
from .pruning import PruningResult, prune
from .surgery import apply_plan

__all__ = ["ChannelGraph", "PlanError", "PlanTarget", "PrunekitError", "PruningResult",
           "__version__", "apply_plan", "build_graph", "count_macs", "count_params", "deploy",
           "explain", "models", "prune", "zero_removed_channels"]
