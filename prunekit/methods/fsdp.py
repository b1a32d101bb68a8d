"""FSDP, Fractional Step Discriminant Pruning: a :func:`prunekit.train.fit` hook and method.

N. Gkalelis, V. Mezaris, "Fractional Step Discriminant Pruning: A Filter Pruning Framework for
Deep Convolutional Neural Networks", IEEE ICME Workshops (MMC) 2020,
doi 10.1109/icmew46912.2020.9105979; code bmezaris/fractional_step_discriminant_pruning_dcnn
(``notebook_cifar.py``, ``utilities/expPrmDecay.py``; ../shared/research/related_methods_2.md
2.1). What the code computes:

* Rate theta(e) = alpha e^(-beta e) + gamma through (0, 0), (e3 / tau, 3/4 theta3), (e3,
  theta3), e3 = E - 1 (``cmpAsymptoticSchedule``; CLI tau = 10, the function's 8): ASFP's
  three-point fit with D = 1 / tau, :func:`prunekit.methods.soft_schedules.asymptotic_rate`.
* Split theta_cs(e) = min(theta_cs_final, theta(e)), theta_gm(e) = theta(e) - theta_cs(e):
  the theta_cs share of each group with the lowest class separability
  (:class:`prunekit.criteria.ClassSeparability`, tr(M P M^T)), then the theta_gm share with
  the smallest FPGM distance sum among the *other* filters (``get_filter_similar``).
* Fractional step zeta(e) = (1 - theta(e) / theta3) * attenuation, 1 -> 0: at every mask the
  selected filters' current weights are multiplied by zeta (compounding while selected), and
  after every backward their gradients; ``use_zero_scaling`` (``--use_zero_scaling``) sets
  zeta = 0, plain soft pruning. BN is untouched (``scale_norm=False``).
* CS re-scored before training and after every epoch e with e % cs_period == 0 (the code's
  ``--epoch_apply_cs range(0, 200, 2)``), the stored ranking reused in between; GM at every
  mask.

prunekit's choices:

* Timing (:mod:`.soft_schedules`' rule): the mask used during epoch u is computed after epoch
  u - 1 at theta(u), zeta(u), so the last epoch trains at theta3, zeta = 0 (the code masks
  after epoch e at theta(e): one epoch later). The mask after the last epoch keeps its
  selection.
* zeta = 0 is SoftPruning's hard zeroing whatever ``scale_norm``: rows, BN bias and running
  mean zeroed, gradients of rows and BN weight/bias masked, momentum reset. The code leaves BN
  alone, so its pruned channels output a BN constant that removal drops; here the last epoch
  trains the network :meth:`finalize` builds.
* Counts: prunekit's kept count of the whole rate, of which floor(theta_cs N) (capped) by CS;
  the code floors the CS and GM counts separately. Between re-scores the code attenuates the
  stored CS selection (its old count) yet excludes the current count from GM; prunekit takes
  the current count from the stored ranking.
* Data: the calibration batches given (the prune job's: augmented training images, drawn
  once), not the whole augmented training set, in order, at each re-score.
* Groups, not convs: a residual stream is one channel set (the code masks every conv, conv_b
  per block, which physical removal cannot follow).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..criteria import get_criterion
from ..criteria.base import combine_scores
from ..criteria.weight import distance_sums, producer_slices
from ..errors import ConfigError
from ..plan import make_plan
from .context import MethodContext
from .registry import MethodConfig, MethodResult, PruningMethod, option, register_method
from .soft import SoftPruning, _masked_entries
from .soft_methods import SOFT_TARGET_KINDS, soft_targets

__all__ = ["FSDP", "FSDP_POINT", "FSDP_TAU", "FractionalStepPruning", "check_options",
           "fractional_step", "fsdp_prune", "split_counts"]

#: The code's CLI default (``--tau 10.``); ``cmpAsymptoticSchedule``'s own default is 8.
FSDP_TAU = 10.0
#: theta(e3 / tau) = 3/4 theta3 (``theta2 = (3. / 4.) * theta3``).
FSDP_POINT = 0.75


def fractional_step(fraction: float, attenuation: float = 1.0,
                    zero_scaling: bool = False) -> float:
    """zeta = (1 - theta(e) / theta3) * attenuation, ``fraction`` = theta(e) / theta3; 0 with
    ``zero_scaling`` (the code's ``--use_zero_scaling``)."""
    return 0.0 if zero_scaling else max(0.0, 1.0 - fraction) * attenuation


def split_counts(size: int, removed: int, theta_cs: float) -> tuple[int, int]:
    """(filters selected by CS, by GM) of a group of ``size`` that loses ``removed``:
    floor(theta_cs size), at most ``removed``, and the rest."""
    n_cs = min(math.floor(theta_cs * size + 1e-9), removed)
    return n_cs, removed - n_cs


def check_options(cs_ratio: float, tau: float, cs_period: int, attenuation: float) -> None:
    """ValueError naming the first option out of range: ``cs_ratio`` and ``attenuation`` in
    [0, 1], ``tau`` > 4/3 (the 3/4 point must come before the end: D = 1/tau < 3/4),
    ``cs_period`` a positive int."""
    for name, value, low, high in (("cs_ratio", cs_ratio, 0, 1), ("tau", tau, 4 / 3, None),
                                   ("attenuation", attenuation, 0, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low \
                or (name == "tau" and value <= low) or (high is not None and value > high):
            span = "(4/3, inf)" if name == "tau" else f"[{low}, {high}]"
            raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    if isinstance(cs_period, bool) or not isinstance(cs_period, int) or cs_period < 1:
        raise ValueError(f"cs_period must be a positive int (epochs), got {cs_period!r}")


class FractionalStepPruning(SoftPruning):
    """FSDP's hook for :func:`prunekit.train.fit` (module docstring for the equations).

    ``calibration``: labelled batches for the CS criterion; ``cs_criterion`` (default
    ``class_separability`` without a progress bar): the criterion of the first theta_cs, any
    criterion (a weight criterion ignores the data); ``cs_ratio``: theta_cs_final, a fraction
    of each group's channels; the target (``ratio`` / ``ratios`` / ``macs_reduction`` /
    ``keep``) is the total theta3. ``epochs`` (E), ``tau``, ``cs_period``, ``attenuation``,
    ``use_zero_scaling``, ``scale_norm`` (also scale the BN bias / running mean and the BN
    gradients by zeta; FSDP leaves BN alone); ``graph`` / ``model`` / ``example_inputs`` /
    ``ignore`` / ``leaf_modules`` as for :class:`SoftPruning`.
    """

    def __init__(self, graph=None, *, model: nn.Module | None = None, example_inputs=None,
                 calibration=None, cs_criterion: Any = None, cs_ratio: float = 0.1,
                 ratio: float | None = None, ratios: dict[str, float] | None = None,
                 macs_reduction: float | None = None, keep: dict[str, int] | None = None,
                 epochs: int | None = None, tau: float = FSDP_TAU, cs_period: int = 2,
                 attenuation: float = 1.0, use_zero_scaling: bool = False,
                 scale_norm: bool = False, ignore=(), leaf_modules=()) -> None:
        check_options(cs_ratio, tau, cs_period, attenuation)
        super().__init__(graph, model=model, example_inputs=example_inputs, criterion="fpgm",
                         ratio=ratio, ratios=ratios, macs_reduction=macs_reduction, keep=keep,
                         schedule="asymptotic", epochs=epochs, asfp_d=1 / tau,
                         asfp_point=FSDP_POINT, asfp_fit="exact", ignore=ignore,
                         leaf_modules=leaf_modules)
        self.cs = get_criterion(cs_criterion if cs_criterion is not None else
                                "class_separability",
                                **({} if cs_criterion is not None else {"progress": False}))
        if getattr(self.cs, "needs_data", False) and calibration is None:
            raise ValueError(f"FSDP's criterion '{self.cs.name}' needs labelled calibration "
                             "batches: pass calibration=[(inputs, targets), ...]")
        self.calibration, self.tau, self.cs_period = calibration, float(tau), cs_period
        self.cs_ratio, self.attenuation = float(cs_ratio), float(attenuation)
        self.use_zero_scaling, self.scale_norm = bool(use_zero_scaling), bool(scale_norm)
        self.cs_scores: dict[str, list[float]] = {}   # the stored CS ranking's scores
        self.cs_selected: dict[str, list[int]] = {}   # per group: the CS part of the plan
        self.cs_scored_for = -1   # the epoch whose mask last re-scored CS (-1: never)
        self.zeta = 1.0           # the fractional step of the current plan
        self._grad_scale = 1.0

    # ------------------------------------------------------------------ schedule
    def zeta_of(self, epoch: int) -> float:
        """zeta of the mask used during ``epoch``."""
        return fractional_step(self.fraction(epoch), self.attenuation, self.use_zero_scaling)

    def cs_rate(self, name: str, epoch: int) -> float:
        """theta_cs of group ``name`` in the mask used during ``epoch``."""
        return min(self.cs_ratio, self.rates(epoch)[name])

    def _cs_due(self, epoch: int) -> bool:
        """Re-score CS for the mask of ``epoch``: before training, and after every epoch
        ``epoch - 1`` that is a multiple of ``cs_period`` (the code's range(0, E, 2))."""
        return not self.cs_scores or epoch <= 0 or (epoch - 1) % self.cs_period == 0

    # ------------------------------------------------------------------ masks
    def update_mask(self, epoch: int) -> dict[str, list[int]]:
        """Select the CS and GM filters for ``epoch`` and apply the fractional step."""
        model = self._require_model()
        last = self.epochs - 1
        if epoch > last and self.epoch >= last:  # after training: keep the last selection
            self.epoch = int(epoch)
            self.apply_mask()
            self._record(epoch, rescored=False)
            return self.plan
        counts = self.counts(epoch)
        split = {name: split_counts(self.graph.by_name[name].size,
                                    self.graph.by_name[name].size - keep,
                                    self.cs_rate(name, epoch))
                 for name, keep in counts.items()}
        rescored = bool(any(n_cs for n_cs, _ in split.values()) and self._cs_due(epoch))
        if rescored:
            scores = self.cs.score(self.graph, model, self.calibration)
            self.cs_scores = {k: [float(x) for x in v] for k, v in scores.items()}
            self.cs_scored_for = int(epoch)
        ranking, chosen = {}, {}
        for name, (n_cs, _) in split.items():
            ranking[name], chosen[name] = self._ranking(name, n_cs, model)
        plan = make_plan(self.graph, ranking, {}, counts=counts)
        self.plan = {k: [int(i) for i in v] for k, v in plan.items()}
        self.cs_selected = {}  # the CS filters the plan removes
        for name, cs in chosen.items():
            kept = set(self.plan.get(name, range(self.graph.by_name[name].size)))
            if set(cs) - kept:
                self.cs_selected[name] = sorted(set(cs) - kept)
        self.hard, self.epoch, self.zeta = {}, int(epoch), self.zeta_of(epoch)
        self.apply_mask()
        self._record(epoch, rescored)
        return self.plan

    def _ranking(self, name: str, n_cs: int, model: nn.Module) -> tuple[np.ndarray, list[int]]:
        """Scores whose lowest ``removed`` are the CS selection (the ``n_cs`` lowest CS scores)
        and then the smallest FPGM distance sums among the filters CS did not select."""
        group = self.graph.by_name[name]
        candidates = np.flatnonzero(~group.fixed)
        cs = np.zeros(0, dtype=np.int64)
        if n_cs:
            values = np.asarray(self.cs_scores[name], dtype=np.float64)
            cs = candidates[np.argsort(values[candidates], kind="stable")][:n_cs]
        parts = [(pos, distance_sums(rows, ~np.isin(pos, cs)))
                 for pos, rows in producer_slices(group, model)]
        ranking = combine_scores(group.size, parts, "mean", uncovered=0.0)
        ranking = np.zeros(group.size) if ranking is None else ranking
        if cs.size:  # below every other channel, lowest CS score lowest
            rest = np.setdiff1d(np.arange(group.size), cs)
            floor = ranking[rest].min() if rest.size else 0.0
            ranking[cs] = floor - 1.0 - np.arange(cs.size)[::-1]
        return ranking, [int(i) for i in cs]

    def _record(self, epoch: int, rescored: bool) -> None:
        n_cs = sum(len(v) for v in self.cs_selected.values())
        self.history.append({"epoch": int(epoch), "fraction": self.fraction(epoch),
                             "masked": self.masked_count(), "zeta": self.zeta, "cs": n_cs,
                             "gm": self.masked_count() - n_cs, "cs_rescored": bool(rescored)})

    @torch.no_grad()
    def apply_mask(self, fresh: bool = True) -> None:
        """Multiply the selected filters' current rows (and, with ``scale_norm``, their BN
        bias / running mean) by zeta; ``fresh=False`` (resume) does not multiply again.
        zeta = 0 zeroes them as SoftPruning does (BN bias and running mean included) and
        resets the momentum of the entries whose gradients are masked."""
        model, zeta = self._require_model(), self.zeta
        norms = self.scale_norm or zeta == 0
        for tensor, dim, drop in _masked_entries(model, self.graph, self.plan, norms=norms):
            if zeta == 0:
                tensor.index_fill_(dim, drop, 0)
            elif fresh and zeta != 1:
                tensor.index_copy_(dim, drop, tensor.index_select(dim, drop) * zeta)
        self._entries = _masked_entries(model, self.graph, self.plan, for_grads=True,
                                        norms=norms)
        self._grad_scale = zeta
        if zeta == 0 and self.optimizer is not None:
            for tensor, dim, drop in self._entries:
                buffer = self.optimizer.state.get(tensor, {}).get("momentum_buffer")
                if buffer is not None:
                    buffer.index_fill_(dim, drop, 0)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """The selected filters' gradients times zeta (the code's ``do_grad_mask``)."""
        scale = self._grad_scale
        for tensor, dim, drop in self._entries:
            if tensor.grad is None or scale == 1:
                continue
            if scale == 0:
                tensor.grad.index_fill_(dim, drop, 0)
            else:
                grad = tensor.grad
                grad.index_copy_(dim, drop, grad.index_select(dim, drop) * scale)

    # ------------------------------------------------------------------ resume, removal
    def state_dict(self) -> dict:
        return {**super().state_dict(), "zeta": self.zeta, "cs_scored_for": self.cs_scored_for,
                "cs_scores": {k: list(v) for k, v in self.cs_scores.items()},
                "cs_selected": {k: list(v) for k, v in self.cs_selected.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.zeta = float(state["zeta"])
        self.cs_scored_for = int(state["cs_scored_for"])
        self.cs_scores = {str(k): [float(x) for x in v] for k, v in state["cs_scores"].items()}
        self.cs_selected = {str(k): [int(i) for i in v]
                            for k, v in state["cs_selected"].items()}
        super().load_state_dict(state)  # re-applies the plan without multiplying again

    def finalize(self, model: nn.Module | None = None, example_inputs=None):
        """Physically remove the last mask (zeta = 0 by then); returns the PruningResult."""
        result = super().finalize(model, example_inputs)
        result.criterion = f"fsdp-{self.cs.name}+fpgm"
        return result


def fsdp_prune(model: nn.Module, train_set, val_set, config, out_dir, *, example_inputs,
               calibration, resume: bool = True, graph=None, distill=None, **options):
    """Train ``model`` with :class:`FractionalStepPruning` (``options``: its keyword
    arguments; ``epochs`` is the config's), then remove the last mask physically. Returns
    ``(model, PruningResult, fit summary, hook)``."""
    from ..train import TrainConfig, fit

    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    hook = FractionalStepPruning(graph, model=model, example_inputs=example_inputs,
                                 calibration=calibration, epochs=config.epochs, **options)
    summary = fit(model, train_set, val_set, config, out_dir, hooks=[hook], resume=resume,
                  distill=distill)
    return model, hook.finalize(model), summary, hook


@register_method
class FSDP(PruningMethod):
    """Fractional Step Discriminant Pruning (Gkalelis & Mezaris, ICMEW 2020): class
    separability selects theta_cs of each group, FPGM the rest of an ASFP-type rising rate;
    the selected filters' weights and gradients shrink by zeta(e) -> 0; removal at the end."""

    name = "fsdp"
    summary = ("fractional step discriminant pruning: class-separability + FPGM masks whose "
               "weights and gradients shrink to zero over training")
    trains = True
    target_kinds = SOFT_TARGET_KINDS
    default_criterion = "class_separability"

    @dataclass
    class Config(MethodConfig):
        cs_ratio: float = option(0.1, "final share theta_cs of each group's filters selected "
                                 "by the criterion (class separability); FPGM selects the "
                                 "rest of the target (FSDP's --prune_rate_cs)")
        tau: float = option(FSDP_TAU, "the rate reaches 3/4 of the target at epoch (E-1)/tau "
                            "(FSDP's --tau; its schedule function's default is 8)")
        cs_period: int = option(2, "re-score the criterion after every this many epochs "
                                "(FSDP's --epoch_apply_cs range(0, E, 2))")
        attenuation: float = option(1.0, "zeta = (1 - theta(e)/theta3) * attenuation")
        use_zero_scaling: bool = option(False, "zeta = 0: zero the selected filters (plain "
                                        "soft pruning) instead of fractional steps")
        scale_norm: bool = option(False, "also scale the selected channels' BN bias, running "
                                  "mean and BN gradients by zeta (FSDP leaves BN alone)")

        def validate(self) -> None:
            try:
                check_options(self.cs_ratio, self.tau, self.cs_period, self.attenuation)
            except ValueError as error:
                raise ConfigError(str(error)) from None

    def run(self, model: nn.Module, context: MethodContext) -> MethodResult:
        targets = soft_targets(context)
        data = context.require_data(f"method {self.name}")
        criterion = context.criterion_or(self.default_criterion)
        calibration = data.calibration_batches() if criterion.needs_data else None
        with context.stage("soft_prune"):
            model, result, summary, hook = fsdp_prune(
                model, data.train_set(), data.val_set(), context.finetune,
                context.out_dir / "finetune", example_inputs=context.example_inputs,
                calibration=calibration, cs_criterion=criterion, **self.config.to_dict(),
                ignore=context.target.ignore, graph=context.graph(model),
                distill=context.distill, **targets)
        return MethodResult(plan=result.plan, trained=True, summary=summary,
                            extras={"fsdp": {"history": hook.history}},
                            group_sizes=result.group_sizes)
