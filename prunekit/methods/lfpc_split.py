"""Which data LFPC's criteria search trains on (He et al., CVPR 2020: the sampler is "optimized
by the validation loss of the pruned network"; the split itself is unverified, lfpc.md 2.4).

``search_split``:

* ``"val"`` (default): the weights train on the run's ``train`` split, the sampler on its
  held-out ``val`` split (CIFAR-10: 45k / 5k of the training set; the test set is never used).
* ``"half"`` (the re-implementation koparkrea/Reproducibility_Challenge_2020, TAS's
  ``splits/cifar10-0.5.pth``): the run's ``train`` split is cut in two halves by a seeded
  permutation; the weights train on the first, the sampler on the second (both keep the train
  split's augmentation). The SFP phase then trains on the whole ``train`` split. prunekit's
  run data hold 5k images out as ``val`` for checkpoint choice, so the halves are 22.5k each,
  not the re-implementation's 25k.
"""
from __future__ import annotations

import torch
from torch.utils.data import Subset

from ..errors import ConfigError

__all__ = ["SEARCH_SPLITS", "search_sets"]

SEARCH_SPLITS = ("val", "half")


def search_sets(train_set, val_set, split: str = "val", seed: int = 0):
    """``(weights' set, sampler's set)`` of the search for ``split`` (module doc)."""
    if split not in SEARCH_SPLITS:
        raise ConfigError(f"search_split must be one of {', '.join(SEARCH_SPLITS)} (val: the "
                          f"held-out val split trains the sampler; half: the train split cut "
                          f"50/50), got {split!r}")
    if split == "val":
        return train_set, val_set
    if len(train_set) < 2:
        raise ConfigError(f"search_split 'half' needs at least 2 training images, got "
                          f"{len(train_set)}")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    half = len(train_set) // 2
    return (Subset(train_set, order[:half].tolist()), Subset(train_set, order[half:].tolist()))
