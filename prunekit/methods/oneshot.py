"""One-shot pruning: score the channels once, remove them, then the job fine-tunes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..measure import recalibrate_bn
from ..plan import ALLOCATIONS
from ..pruning import prune
from .context import MethodContext
from .registry import MethodConfig, MethodResult, PruningMethod, option, register_method

__all__ = ["OneShot", "reset_batchnorms"]


@torch.no_grad()
def reset_batchnorms(model: nn.Module) -> list[str]:
    """Put every BatchNorm layer of ``model`` at its fresh state (weight 1, bias 0, running
    mean 0, var 1, no batches tracked); returns their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()  # running stats, then affine weight 1 and bias 0
            names.append(name)
    return names


@register_method
class OneShot(PruningMethod):
    """Score every channel group with the run's criterion (l1 unless told), keep the best
    channels for the target, remove the rest physically. Fine-tuning follows as a separate
    stage of the job, so the pruned model is saved (and a rerun resumes from it). Right after
    the cut, the BatchNorm statistics are re-estimated on a few training batches
    (``bn_recalibration_batches``; 0 turns it off).

    ``copy_bn`` (default True): the pruned model keeps its BatchNorm layers' weight, bias and
    running statistics for the kept channels. ``False`` resets every BatchNorm layer of the
    pruned model (stem, each block's bn1 and bn2, projection shortcuts, a classifier's
    BatchNorm1d) to weight 1, bias 0, running mean 0, running var 1, as CHIP's CIFAR code does
    (Sui et al., NeurIPS 2021, arXiv 2110.13981; ``prune_finetune_cifar.py``:
    ``load_resnet_model`` copies only conv and linear weights, ``load_vgg_model`` only conv
    weights, into a freshly built narrow model; methods.md 1.4 and 1.6 pitfall 1). The reset
    comes before the BN recalibration, which then re-estimates the statistics."""

    name = "oneshot"
    summary = "score once with --criterion, remove, then fine-tune (default)"
    default_criterion = "l1"
    rounds_counts = True
    allocations = ALLOCATIONS

    @dataclass
    class Config(MethodConfig):
        # Measured on the pretrained ResNet-56 at 47% fewer MACs (l1, streams kept):
        # test-lossless top-1 right after pruning 41.3 -> 76.6 with 8 batches of 64
        # (benchmarks/results/equal_macs.md); BN statistics no longer describe the removed
        # channels' contributions after a one-shot cut.
        bn_recalibration_batches: int = option(8, "re-estimate BN statistics on this many "
                                               "training batches right after pruning "
                                               "(0: off)", flag="--bn-recalibration")
        bn_recalibration_batch_size: int = option(64, "images per BN recalibration batch")
        sensitivity_batches: int = option(4, "held-out val batches each group's sensitivity "
                                          "is measured on (allocation sensitivity), and on "
                                          "which gated weight rewrites (central_filter's "
                                          "merges) are accepted",
                                          flag="--sensitivity-batches")
        sensitivity_batch_size: int = option(128, "images per sensitivity batch")
        copy_bn: bool = option(True, "keep the BatchNorm weights and statistics of the kept "
                               "channels (False / --reset-bn: reset every BatchNorm to weight "
                               "1, bias 0, mean 0, var 1, as CHIP's CIFAR transfer)",
                               flag="--reset-bn", invert=True)

        def validate(self) -> None:
            if not isinstance(self.copy_bn, bool):
                raise ConfigError(f"copy_bn must be true or false, got {self.copy_bn!r}")
            for name in ("bn_recalibration_batches", "bn_recalibration_batch_size",
                         "sensitivity_batches", "sensitivity_batch_size"):
                value = getattr(self, name)
                least = 0 if name == "bn_recalibration_batches" else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise ConfigError(f"{name} must be a whole number >= {least}, "
                                      f"got {value!r}")

    def run(self, model: nn.Module, context: MethodContext) -> MethodResult:
        criterion = context.criterion_or(self.default_criterion)
        calibration = None
        if criterion.needs_data:
            with context.stage("calibration_data"):
                calibration = context.require_data(
                    f"criterion '{criterion.name}'").calibration_batches()
        c = self.config
        sensitivity = None
        heldout = getattr(criterion, "needs_heldout", False)
        if context.target.needs_sensitivity or heldout:
            what = ("allocation 'sensitivity'" if context.target.needs_sensitivity
                    else f"criterion '{criterion.name}' (its gated rewrites)")
            with context.stage("sensitivity_data"):
                sensitivity = context.require_data(what).sensitivity_batches(
                    c.sensitivity_batches, c.sensitivity_batch_size)
        graph = context.graph(model)
        with context.stage("score_and_prune"):
            result = prune(model, context.example_inputs, criterion=criterion,
                           target=context.target, ignore=context.target.ignore,
                           calibration=calibration, graph=graph,
                           sensitivity_data=sensitivity if context.target.needs_sensitivity
                           else None, heldout_data=sensitivity if heldout else None)
        extras = {}
        if sensitivity is not None:
            extras["sensitivity"] = {"batches": len(sensitivity),
                                     "batch_size": c.sensitivity_batch_size, "split": "val"}
        if result.rewrites:
            extras["rewrites"] = result.rewrites
        if result.latency is not None:
            extras["latency_target"] = result.latency
        if not c.copy_bn:
            extras["bn_reset"] = {"layers": len(reset_batchnorms(model))}
        if c.bn_recalibration_batches and context.data is not None:
            with context.stage("bn_recalibration"):
                torch.manual_seed(context.finetune.seed)
                loader = context.data.recalibration_loader(c.bn_recalibration_batch_size)
                used = recalibrate_bn(model, loader, c.bn_recalibration_batches, progress=False)
            # Only training images: the statistics must never see an evaluation split.
            extras["bn_recalibration"] = {"batches": used,
                                          "batch_size": c.bn_recalibration_batch_size,
                                          "split": "train"}
        return MethodResult(plan=result.plan, group_sizes=result.group_sizes, extras=extras)
