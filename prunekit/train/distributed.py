"""Joining the process group ``torchrun`` describes: this process's rank, the world size and
its device (``_setup_distributed``), and whether :func:`~prunekit.train.fit` created the group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..measure import resolve_device


@dataclass
class _Distributed:
    world_size: int = 1
    rank: int = 0
    created_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(requested_device: str) -> tuple[_Distributed, torch.device]:
    """Join (or create) the process group torchrun describes and pick this rank's device."""
    device = resolve_device(requested_device)
    already = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if already else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed(), device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = False
    if not already:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return _Distributed(dist.get_world_size(), dist.get_rank(), created), device
