"""SWP as a registered method: train the filter skeleton, then remove stripes, filters and
emptied blocks (the machinery is :mod:`prunekit.methods.swp`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..measure import evaluate, recalibrate_bn
from ..train import fit
from .context import MethodContext
from .registry import MethodConfig, MethodResult, PruningMethod, option, register_method
from .swp import FilterSkeleton, swp_prune

__all__ = ["SWP"]


@register_method
class SWP(PruningMethod):
    """Stripe-wise pruning (Meng et al., NeurIPS 2020): a learnable K x K filter skeleton with
    an L1 penalty; stripes at or below the threshold are removed. SWP decides how much it
    removes (no ratio or MACs target); the skeleton is trained for ``--finetune-epochs``."""

    name = "swp"
    summary = ("stripe-wise pruning: train a filter skeleton for --finetune-epochs, then remove "
               "stripes, filters and blocks")
    trains = True
    target_kinds = ()  # the skeleton decides what goes

    @dataclass
    class Config(MethodConfig):
        sr: float = option(1e-5, "L1 weight alpha of the filter skeleton")
        threshold: float = option(0.01, "stripes with |skeleton| <= threshold are removed")
        skeleton_lr_scale: float = option(1.0, "the skeleton's lr as a multiple of "
                                          "--finetune-lr")
        skeleton_weight_decay: float | None = option(None, "weight decay of the skeleton "
                                                     "(default: the weights')")
        penalty_epochs: int | None = option(None, "train the skeleton (L1 term) only in "
                                            "the first N epochs, then freeze it and train the "
                                            "weights to recover (default: all)")
        bn_recalibration_batches: int = option(0, "re-estimate BN statistics on this many "
                                               "training batches after pruning (0: off, as "
                                               "the paper)", flag="--bn-recalibration")
        executor: str = option("stripe", "run pruned convs as StripeConv2d or as dense "
                               "convs with zero stripes", flag="--stripe-executor",
                               choices=("stripe", "dense"))
        mask_norms: str = option("all", "norms a dead filter zeroes in training: 'all' "
                                 "(prunekit: also the norms writing residual streams) or "
                                 "'reference' (only a block's bn1, as the reference code)",
                                 choices=("all", "reference"))
        empty_blocks: str = option("exact", "a block whose conv lost every stripe becomes "
                                   "'exact' (its shortcut + the branch's constant, ReLU kept) "
                                   "or 'reference' (the bare shortcut, as the reference code)",
                                   choices=("exact", "reference"))

        def validate(self) -> None:
            if self.bn_recalibration_batches < 0:
                raise ConfigError("bn_recalibration_batches must be >= 0")

    def run(self, model: nn.Module, context: MethodContext) -> MethodResult:
        data = context.require_data("method swp")
        c = self.config
        skeleton = FilterSkeleton(model, context.example_inputs, sr=c.sr, threshold=c.threshold,
                                  lr_scale=c.skeleton_lr_scale,
                                  weight_decay=c.skeleton_weight_decay,
                                  penalty_epochs=c.penalty_epochs, ignore=context.target.ignore,
                                  mask_norms=c.mask_norms)
        with context.stage("skeleton_training"):
            summary = fit(model, data.train_set(), data.val_set(), context.finetune,
                          context.out_dir / "skeleton", hooks=[skeleton],
                          distill=context.distill)
        extras = {"stripes_alive": skeleton.stripe_fraction(),
                  "stripes_alive_history": skeleton.history}
        with context.stage("stripe_prune"):
            result = swp_prune(model, skeleton, context.example_inputs, executor=c.executor,
                               empty_blocks=c.empty_blocks)
        extras["swp"] = result.to_dict()
        if c.bn_recalibration_batches:
            with context.stage("bn_recalibration"):
                extras["bn_recalibration"] = _recalibrate(model, data,
                                                          c.bn_recalibration_batches,
                                                          context.finetune)
        return MethodResult(plan=result.plan, trained=True, summary=summary, extras=extras)


def _recalibrate(model: nn.Module, data, batches: int, config) -> dict:
    """Re-estimate the BN statistics on augmented training batches; report the lossless
    accuracy before and after (when the data has such a split), so the effect is visible."""
    lossless = data.lossless_loader()
    before = evaluate(model, lossless, desc="test-lossless")["top1"] if lossless else None
    torch.manual_seed(config.seed)
    used = recalibrate_bn(model, data.recalibration_loader(config.batch_size), batches)
    after = evaluate(model, lossless, desc="test-lossless")["top1"] if lossless else None
    return {"batches": used, "batch_size": config.batch_size,
            "test-lossless_before": before, "test-lossless_after": after}
