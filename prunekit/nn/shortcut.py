"""The module SWP puts in place of a residual block whose branch lost every stripe: the
block's shortcut plus the constant the emptied branch still adds.

Registered as a replacement, so :func:`prunekit.io.save` / :func:`prunekit.io.load` store it.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import register_replacement

__all__ = ["ShortcutBlock"]


@register_replacement
class ShortcutBlock(nn.Module):
    """What a BasicBlock computes once its branch lost every stripe: ``relu(shortcut(x) + c)``,
    ``c`` the per-channel constant the emptied branch still adds (``bn2`` of zeros).
    ``relu=False``: ``shortcut(x) + c``, what SWP's reference code leaves (it puts the bare
    shortcut in the block's place; :mod:`prunekit.methods.swp_parts`)."""

    def __init__(self, shortcut: nn.Module, constant: torch.Tensor, relu: bool = True):
        super().__init__()
        self.shortcut, self.relu = shortcut, bool(relu)
        self.register_buffer("constant", constant.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shortcut(x) + self.constant
        return torch.relu(out) if self.relu else out

    def prunekit_init(self) -> dict:
        return {"channels": int(self.constant.numel()), **({} if self.relu else {"relu": False})}

    @classmethod
    def prunekit_build(cls, original: nn.Module, init: dict) -> "ShortcutBlock":
        """Around the replaced block's own shortcut (restored by the spec like any module)."""
        return cls(original.shortcut, torch.zeros(int(init["channels"])),
                   relu=bool(init.get("relu", True)))
