"""What the prune job hands a method: the example inputs, the target, the fine-tuning config,
the data, the run directory, the criterion the user chose and the graph, traced once."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Protocol

from torch import nn

from ..criteria import Criterion, get_criterion
from ..errors import ConfigError
from ..graph import ChannelGraph, build_graph
from ..plan import PlanTarget
from ..train import TrainConfig

__all__ = ["MethodContext", "RunData"]


class RunData(Protocol):
    """The data a method may ask for (the job's data source implements it)."""

    def train_set(self): ...          # augmented training split
    def val_set(self): ...            # held-out split for checkpoint selection / searches
    def calibration_batches(self) -> list: ...   # scoring batches (CHIP, HRank, ...)
    def recalibration_loader(self, batch_size: int) -> Iterable: ...  # BN re-estimation
    def lossless_loader(self) -> Iterable | None: ...  # for before/after checks, if any


@dataclass
class MethodContext:
    """Everything a :class:`~prunekit.methods.PruningMethod` needs besides its own options.

    ``graph()`` traces the model on first use and then returns the same graph, so a run traces
    once (methods that change the model's structure before removing channels, such as SWP's
    skeleton, build their own).
    """

    example_inputs: tuple
    target: PlanTarget
    finetune: TrainConfig
    out_dir: Path
    data: RunData | None = None
    criterion: Criterion | str | None = None
    stage: Callable[[str], ContextManager] = field(default=lambda name: nullcontext())
    leaf_modules: tuple = ()
    distill: object | None = None   # a prunekit.train.Distillation for every fine-tuning fit
    _graph: ChannelGraph | None = field(default=None, repr=False)

    def graph(self, model: nn.Module) -> ChannelGraph:
        if self._graph is None:
            self._graph = build_graph(model, self.example_inputs, ignore=self.target.ignore,
                                      leaf_modules=self.leaf_modules)
        return self._graph

    def criterion_or(self, default: str) -> Criterion:
        """The run's criterion, or ``default`` when the run names none."""
        return get_criterion(self.criterion if self.criterion is not None else default)

    def require_data(self, what: str) -> RunData:
        if self.data is None:
            raise ConfigError(f"{what} needs data; this run has no data source")
        return self.data
