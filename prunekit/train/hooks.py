"""The hook protocol of :func:`~prunekit.train.fit`: :class:`TrainHook` documents the methods a
hook may have, ``_Hooks`` calls them on every hook given, in order, and saves/restores the
states of the hooks that have one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .checkpoint import CheckpointError

__all__ = ["TrainHook"]


class TrainHook:
    """Optional base class documenting the hook protocol; any object with some of these
    methods works. See :func:`fit` for when each one is called."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def on_epoch_start(self, epoch: int) -> None: ...
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None: ...
    def after_backward(self, step: int) -> None: ...
    def after_step(self, step: int) -> None: ...
    def on_epoch_end(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


class _Hooks:
    """Calls a method on every hook that has it, in the order the hooks were given."""

    def __init__(self, hooks: Iterable[Any]) -> None:
        self.hooks = list(hooks)

    def call(self, method: str, *args: Any) -> None:
        for hook in self.hooks:
            function = getattr(hook, method, None)
            if function is not None:
                function(*args)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        terms = [term for hook in self.hooks if hasattr(hook, "extra_loss")
                 for term in [hook.extra_loss(model)] if term is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def _stateful(self) -> list[Any]:
        return [hook for hook in self.hooks if hasattr(hook, "state_dict")]

    def state_dicts(self) -> list[Any]:
        """States of the hooks that have ``state_dict``, in order (stateless hooks, e.g. one
        that only logs, may be added or dropped between a run and its resume)."""
        return [hook.state_dict() for hook in self._stateful()]

    def load_state_dicts(self, states: Sequence[Any], path: Path) -> None:
        stateful = self._stateful()
        if len(states) != len(stateful):
            raise CheckpointError(f"{path} holds the state of {len(states)} hook(s) but fit() got "
                                  f"{len(stateful)} hook(s) with state_dict(); pass the same hooks "
                                  "to resume")
        for hook, state in zip(stateful, states):
            if hasattr(hook, "load_state_dict"):
                hook.load_state_dict(state)
