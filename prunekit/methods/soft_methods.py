"""SFP, ASFP and FPGM-soft as registered methods: masks during training, removal at the end
(the machinery is :mod:`prunekit.methods.soft`)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .context import MethodContext
from .registry import MethodConfig, MethodResult, PruningMethod, option, register_method
from .soft import SOFT_SCHEDULES, soft_prune

__all__ = ["ASFP", "FPGMSoft", "SFP", "SOFT_TARGET_KINDS", "SoftConfig", "soft_targets"]

#: The targets soft pruning trains towards (counts fixed once, before training).
SOFT_TARGET_KINDS = ("ratio", "ratios", "macs_reduction")


@dataclass
class SoftConfig(MethodConfig):
    schedule: str = option("constant", "mask rate over the epochs: constant (SFP, FPGM) or "
                           "asymptotic (ASFP)", choices=SOFT_SCHEDULES)
    mask_grads: bool = option(False, "zero the masked filters' gradients every step (FPGM's "
                              "code) instead of letting them regrow (SFP's)")
    zero_norm_weight: bool = option(False, "zero the masked channels' BN weight (gamma) too")
    reset_momentum: bool = option(False, "zero the masked entries' momentum at every masking "
                                  "(stabilises ASFP from a trained network)")


def soft_targets(context: MethodContext) -> dict:
    """The ratio / ratios / macs_reduction a soft method trains towards, as keyword arguments
    (the job has checked that the target is one of :data:`SOFT_TARGET_KINDS`)."""
    return {k: getattr(context.target, k) for k in SOFT_TARGET_KINDS
            if getattr(context.target, k) is not None}


class _SoftMethod(PruningMethod):
    """Soft pruning (He et al.): every epoch the lowest-scoring filters of each group are
    zeroed and may regrow; the last mask is removed physically."""

    trains = True
    target_kinds = SOFT_TARGET_KINDS
    Config = SoftConfig
    default_criterion = "l2"

    def run(self, model: nn.Module, context: MethodContext) -> MethodResult:
        targets = soft_targets(context)
        data = context.require_data(f"method {self.name}")
        c = self.config
        with context.stage("soft_prune"):
            model, result, summary = soft_prune(
                model, data.train_set(), data.val_set(), context.finetune,
                context.out_dir / "finetune", criterion=context.criterion_or(self.default_criterion),
                schedule=c.schedule, mask_grads=c.mask_grads,
                zero_norm_weight=c.zero_norm_weight, reset_momentum=c.reset_momentum,
                example_inputs=context.example_inputs, ignore=context.target.ignore,
                graph=context.graph(model), **targets)
        return MethodResult(plan=result.plan, trained=True, summary=summary,
                            group_sizes=result.group_sizes)


@register_method
class SFP(_SoftMethod):
    """Soft Filter Pruning (He et al., IJCAI 2018): L2-norm masks, constant rate."""

    name = "sfp"
    summary = "soft filter pruning: l2 masks recomputed every epoch, removed at the end"


@register_method
class ASFP(_SoftMethod):
    """Asymptotic SFP (He et al., TCyb 2020): the rate rises towards the target."""

    name = "asfp"
    summary = "asymptotic SFP: the masked fraction rises towards the target over training"

    @dataclass
    class Config(SoftConfig):
        schedule: str = option("asymptotic", "mask rate over the epochs: constant (SFP, FPGM) "
                               "or asymptotic (ASFP)", choices=SOFT_SCHEDULES)


@register_method
class FPGMSoft(_SoftMethod):
    """FPGM with soft pruning (He et al., CVPR 2019): geometric-median masks, gradients of
    masked filters zeroed every step (its code's do_grad_mask)."""

    name = "fpgm-soft"
    summary = "FPGM soft pruning: fpgm masks, masked gradients zeroed"
    default_criterion = "fpgm"

    @dataclass
    class Config(SoftConfig):
        mask_grads: bool = option(True, "zero the masked filters' gradients every step (FPGM's "
                                  "code) instead of letting them regrow (SFP's)")
