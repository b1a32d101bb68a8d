"""Tiny model and data for the training tests, and the worker of the DDP test.

Run by ``tests/test_train.py`` as
``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT_DIR``. Every rank
trains :class:`TinyNet` for one epoch with :func:`prunekit.train.fit` and saves its final
state to ``OUT_DIR/rank{r}.pt``; with a second argument ``distill`` it learns from a
teacher (the same seeded TinyNet on every rank) as well. Each rank passes its own ``out_dir``
(``OUT_DIR/run_rank{r}``) so that a file written by a rank other than 0 would be visible as a
non-empty directory; in real use all ranks pass the same directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset


class TinyNet(nn.Module):
    """Two conv-BN-ReLU layers, global pooling, a linear classifier: a CNN in miniature."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class RandomImages(Dataset):
    """``count`` random 3x``size``x``size`` images whose mean depends on the class, so there is
    something to learn. ``augment`` flips at random using torch's global RNG, like the CIFAR
    augmentation does, so the tests exercise the per-epoch seeding of that RNG."""

    def __init__(self, count: int = 64, num_classes: int = 4, size: int = 16, seed: int = 0,
                 augment: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (count,), generator=generator)
        noise = torch.randn(count, 3, size, size, generator=generator)
        self.images = noise + self.labels.view(-1, 1, 1, 1).float() * 0.5
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, int(self.labels[index])


def main(out_dir: Path, distill: bool = False) -> None:
    from prunekit.train import Distillation, TrainConfig, fit

    rank = int(os.environ["RANK"])
    # A different initialisation on every rank: equal final weights then prove that DDP
    # broadcast rank 0's weights and averaged the gradients.
    torch.manual_seed(100 + rank)
    model = TinyNet()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(epochs=1, lr=0.1, batch_size=16, device="cpu", deterministic=True,
                         progress=False)
    teacher = None
    if distill:
        torch.manual_seed(7)
        teacher = Distillation(TinyNet(), temperature=2.0, weight=0.7)
    summary = fit(model, RandomImages(64), RandomImages(32, seed=1, augment=False), config,
                  out_dir / f"run_rank{rank}", distill=teacher)
    torch.save({
        "initial": initial,
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "history": summary["history"],
        "group_destroyed": not torch.distributed.is_initialized(),
    }, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), distill=sys.argv[2:] == ["distill"])
