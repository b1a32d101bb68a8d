"""Randomness of a training run: seeding every generator, the per-epoch seeds that make a
resume exact, and torch's deterministic mode (switched on for one run, then restored).
"""

from __future__ import annotations

import os
import random
from typing import Callable

import numpy as np
import torch

__all__ = ["epoch_seeds", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seeding only takes 32 bits
    torch.manual_seed(seed)


def epoch_seeds(seed: int, epoch: int, rank: int = 0) -> tuple[int, int]:
    """``(global_seed, loader_seed)`` of one epoch on one rank.

    Depending only on ``(seed, epoch, rank)`` is what makes resuming exact: epoch ``e`` draws
    the same numbers whether or not epochs ``0..e-1`` ran in this process. The rank enters so
    that the ranks of a DDP run augment their shards independently. Two seeds, so that the
    loader's shuffle and the global stream (augmentation, hooks) are not the same sequence.
    """
    global_seed, loader_seed = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, np.uint64)
    return int(global_seed), int(loader_seed)


def _enable_determinism(device: torch.device) -> Callable[[], None]:
    """Turn on deterministic algorithms; return a function restoring the previous settings."""
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        # cuBLAS reads this when it creates its handle; without it deterministic mode raises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def restore() -> None:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2:]

    return restore
