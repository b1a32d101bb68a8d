"""SFP, ASFP, FPGM-soft and GHFP as registered methods: masks during training, removal at the
end (the machinery is :mod:`prunekit.methods.soft`, the schedules
:mod:`prunekit.methods.soft_schedules`)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .context import MethodContext
from ..errors import ConfigError
from .registry import MethodConfig, MethodResult, PruningMethod, option, register_method
from .soft import soft_prune
from .soft_schedules import (ASFP_D, ASFP_FITS, ASFP_POINT, DECAY_SCHEDULES, HARD_FRACTIONS,
                             SOFT_SCHEDULES, SoftSchedule)

__all__ = ["ASFP", "FPGMSoft", "GHFP", "SFP", "SOFT_TARGET_KINDS", "SoftConfig", "soft_targets"]

#: The SoftConfig fields passed to SoftPruning as they are.
_SOFT_OPTIONS = ("schedule", "mask_grads", "zero_norm_weight", "reset_momentum", "asfp_d",
                 "asfp_point", "asfp_fit", "decay", "decay_start", "hard_fraction")
_DECAY_HELP = ("factor the soft-masked filters are multiplied by instead of zeroed: none "
               "(zeroed), exponential (SRFP/GHFP, a0 e^-ct to 0 at 0.9 E) or anneal "
               "(annealing decay, linear to 0 at E/2)")
_HARD_HELP = ("share of each group's masked filters kept hard (zero, no gradient, no "
              "momentum): none or cubic (GHFP, 1 - (1 - e/E)^3)")

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
    asfp_d: float = option(ASFP_D, "asymptotic: fraction D of the epochs at which the rate "
                           "reaches asfp-point of the target (ASFP: 1/8, as NNCF, FSDP, PGMPF "
                           "and Acxyle's code have it; prunekit's old schedule: 0.25 with "
                           "--asfp-fit approximate)")
    asfp_point: float = option(ASFP_POINT, "asymptotic: fraction of the target reached at "
                               "D (E - 1)")
    asfp_fit: str = option("exact", "asymptotic: exact (three-point fit, NNCF/FSDP) or "
                           "approximate (k = -ln(1 - point) / (D E), PGMPF/Acxyle)",
                           choices=ASFP_FITS)
    decay: str = option("none", _DECAY_HELP, choices=DECAY_SCHEDULES)
    decay_start: float | None = option(None, "decay factor a0 of the first masks (default: "
                                       "0.5 exponential, 1 anneal)")
    hard_fraction: str = option("none", _HARD_HELP, choices=HARD_FRACTIONS)

    def validate(self) -> None:
        try:  # epochs=1 stands for the fine-tuning epochs, known only when the job runs
            SoftSchedule(**{k: getattr(self, k) for k in ("schedule", "asfp_d", "asfp_point",
                                                          "asfp_fit", "decay", "decay_start",
                                                          "hard_fraction")}, epochs=1)
        except ValueError as error:
            raise ConfigError(str(error)) from None


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
                **{k: getattr(c, k) for k in _SOFT_OPTIONS},
                example_inputs=context.example_inputs, ignore=context.target.ignore,
                graph=context.graph(model), distill=context.distill, **targets)
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
class GHFP(_SoftMethod):
    """Gradually Hard Filter Pruning (Cai, An, Xu, arXiv 2011.03170): ASFP's rising rate; of
    the masked filters the lowest-norm share lambda(e) = 1 - (1 - e/E)^3 is hard (zero, no
    gradient), the rest soft and multiplied by alpha(e) = a0 e^(-ce) (SRFP) instead of zeroed:
    a smooth switch from soft to hard pruning. The schedules are reconstructed from the first
    author's PGMPF code (related_methods_2.md 5; soft_schedules)."""

    name = "ghfp"
    summary = ("gradually hard filter pruning: asymptotic rate, decaying soft masks, a "
               "growing hard share")

    @dataclass
    class Config(SoftConfig):
        schedule: str = option("asymptotic", "mask rate over the epochs: constant (SFP, FPGM) "
                               "or asymptotic (ASFP)", choices=SOFT_SCHEDULES)
        decay: str = option("exponential", _DECAY_HELP, choices=DECAY_SCHEDULES)
        hard_fraction: str = option("cubic", _HARD_HELP, choices=HARD_FRACTIONS)


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
