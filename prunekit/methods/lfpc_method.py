"""LFPC as a registered method: the criteria search, then SFP with the learned criteria (the
machinery is :mod:`prunekit.methods.lfpc`)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from ..errors import ConfigError
from ..train import TrainConfig
from .context import MethodContext
from .lfpc import lfpc_prune
from .lfpc_plot import plot_choices
from .lfpc_rate import RATE_ROUNDINGS, check_rate
from .lfpc_sampler import MASK_POSITIONS, SAMPLER_SCOPES
from .lfpc_split import SEARCH_SPLITS
from .registry import MethodConfig, MethodResult, PruningMethod, option, register_method
from .soft_methods import SOFT_TARGET_KINDS, soft_targets

__all__ = ["LFPC", "SAMPLER_KEYS"]

#: Options of :class:`~prunekit.methods.lfpc.CriteriaSearch` a recipe's ``sampler`` may set.
SAMPLER_KEYS = ("tau_max", "tau_min", "hard", "alpha_lr", "alpha_betas", "alpha_weight_decay",
                "init_std", "batch_size", "mask_every")


@register_method
class LFPC(PruningMethod):
    """Learning Filter Pruning Criteria (He et al., CVPR 2020), as reconstructed in lfpc.md:
    a Gumbel-softmax sampler learns which criterion each group uses (on the val split), then
    SFP prunes with those criteria at the same per-group counts."""

    name = "lfpc"
    summary = "learn each group's criterion (l1/l2/fpgm), then SFP with those choices"
    trains = True

    @property
    def target_kinds(self) -> tuple[str, ...]:
        """The run's targets; none with ``conv_rate`` (it is the target: the job then refuses
        a run target, "drop the ... target")."""
        return () if self.config.conv_rate is not None else SOFT_TARGET_KINDS

    @dataclass
    class Config(MethodConfig):
        criteria: tuple[str, ...] = option(("l1", "l2", "fpgm"), "the criteria each group's "
                                           "sampler chooses among")
        train_weights: bool = option(True, "train the weights during the search (off: only "
                                     "the sampler learns)", flag="--frozen-search", invert=True)
        mask_grads: bool = option(False, "zero the masked filters' gradients every step (FPGM's "
                                  "code) instead of letting them regrow (SFP's)")
        search: dict = option({}, "training settings of the search phase (TrainConfig keys; "
                              "default: the fine-tuning's, 1 epoch)",
                              subflags={"epochs": ("--search-epochs", int,
                                                   "epochs of the criteria search "
                                                   "(default 1)")})
        sampler_scope: str = option("group", "one sampler row per coupled channel group "
                                    "(group) or per conv as the re-implementation (conv; "
                                    "a group then takes its convs' probability-averaged "
                                    "choice)", choices=SAMPLER_SCOPES)
        mask_position: str = option("after_bn", "where the search masks: after_bn (equals "
                                    "removal) or before_bn (the re-implementation; BN's shift "
                                    "keeps a masked channel alive as a constant)",
                                    choices=MASK_POSITIONS)
        conv_rate: float | None = option(None, "SFP-style target: every conv loses this "
                                         "fraction of its filters (the run then gives no "
                                         "plan target); reports the papers' FLOPs count")
        conv_rate_rounding: str = option("removed", "conv_rate's counts: removed (int(N P) "
                                         "removed, SFP/FPGM code) or kept (int(N (1 - P)) kept, "
                                         "HRank/CHIP)", choices=RATE_ROUNDINGS)
        search_split: str = option("val", "the sampler's data: val (the held-out val split) "
                                   "or half (the train split cut 50/50, the re-"
                                   "implementation)", choices=SEARCH_SPLITS)
        sampler: dict = option({}, f"sampler options ({', '.join(SAMPLER_KEYS)})",
                               subflags={"alpha_lr": ("--alpha-lr", float,
                                                      "Adam lr of the sampler logits "
                                                      "(default 1e-4)")})

        def validate(self) -> None:
            bad = set(self.sampler) - set(SAMPLER_KEYS)
            if bad:
                raise ConfigError(f"unknown sampler keys {sorted(bad)}; valid: "
                                  f"{sorted(SAMPLER_KEYS)}")
            known = {f.name for f in fields(TrainConfig)}
            bad = set(self.search) - known
            if bad:
                raise ConfigError(f"method.search: unknown keys {sorted(bad)}; valid: "
                                  f"{sorted(known)}")
            if self.conv_rate is not None:
                check_rate(self.conv_rate)
            if len(self.criteria) < 2:
                raise ConfigError(f"LFPC chooses among criteria: give at least two, got "
                                  f"{list(self.criteria)}")

    def run(self, model: nn.Module, context: MethodContext) -> MethodResult:
        c = self.config
        targets = soft_targets(context) if c.conv_rate is None else {
            "conv_rate": c.conv_rate, "conv_rate_rounding": c.conv_rate_rounding}
        data = context.require_data("method lfpc")
        search = {**context.finetune.to_dict(), "epochs": 1, **c.search}
        with context.stage("soft_prune"):
            model, result, info = lfpc_prune(
                model, data.train_set(), data.val_set(), search, context.finetune,
                context.out_dir / "lfpc", example_inputs=context.example_inputs,
                criteria=c.criteria, train_weights=c.train_weights, mask_grads=c.mask_grads,
                ignore=context.target.ignore, graph=context.graph(model), **c.sampler,
                sampler_scope=c.sampler_scope, mask_position=c.mask_position,
                search_split=c.search_split, distill=context.distill, **targets)
        plot_choices(info["choices"], context.out_dir / "lfpc_choices.png")
        extras = {"lfpc": {k: info[k] for k in ("choices", "criteria", "search_history",
                                                "flops")}}
        return MethodResult(plan=result.plan, trained=True, summary=info["sfp"], extras=extras,
                            group_sizes=result.group_sizes)
