"""DataLoaders for prunekit's datasets, sharded across processes when training is distributed."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["build_loader"]


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
    """DataLoader, sharded with a ``DistributedSampler(seed=seed)`` when ``distributed`` is True
    or a ``torch.distributed`` process group is initialised.

    With a DistributedSampler the caller MUST call ``loader.sampler.set_epoch(epoch)`` before
    every epoch, otherwise each epoch repeats the same order. ``num_replicas``/``rank`` default
    to the process group's; pass them to shard without one. Without sharding the shuffle order
    and augmentation follow torch's global RNG (``torch.manual_seed``).
    """
    group_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler = None
    if distributed or group_ready:
        sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
            drop_last=drop_last,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
