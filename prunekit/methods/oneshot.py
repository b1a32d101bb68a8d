"""One-shot pruning: score the channels once, remove them, then the job fine-tunes."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..pruning import prune
from .context import MethodContext
from .registry import MethodConfig, MethodResult, PruningMethod, register_method

__all__ = ["OneShot"]


@register_method
class OneShot(PruningMethod):
    """Score every channel group with the run's criterion (l1 unless told), keep the best
    channels for the target, remove the rest physically. Fine-tuning follows as a separate
    stage of the job, so the pruned model is saved (and a rerun resumes from it)."""

    name = "oneshot"
    summary = "score once with --criterion, remove, then fine-tune (default)"
    default_criterion = "l1"
    rounds_counts = True

    @dataclass
    class Config(MethodConfig):
        pass

    def run(self, model: nn.Module, context: MethodContext) -> MethodResult:
        criterion = context.criterion_or(self.default_criterion)
        calibration = None
        if criterion.needs_data:
            with context.stage("calibration_data"):
                calibration = context.require_data(
                    f"criterion '{criterion.name}'").calibration_batches()
        graph = context.graph(model)
        with context.stage("score_and_prune"):
            result = prune(model, context.example_inputs, criterion=criterion,
                           target=context.target, ignore=context.target.ignore,
                           calibration=calibration, graph=graph)
        return MethodResult(plan=result.plan, group_sizes=result.group_sizes)
