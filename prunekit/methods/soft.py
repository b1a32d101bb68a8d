"""Training-time soft pruning: SFP (He et al., IJCAI 2018), FPGM-soft (He et al., CVPR 2019),
ASFP (asymptotic SFP, He et al., TCyb 2020), and decaying / gradually hard masks (SRFP, GHFP,
annealing decay).

:class:`SoftPruning` is a :func:`prunekit.train.fit` hook. Before the first training step and
at the end of every epoch it scores the channels of every prunable group on the *current*
weights (``"l2"`` = SFP, ``"fpgm"`` = FPGM, or any criterion that needs no data), makes a plan
at the current rate and zeroes the masked channels: the producers' rows and biases, and the
bias (beta) and running mean of their normalisation layer, so that a BN shift cannot keep a
masked channel alive (the reference code leaves BN alone, methods.md 4.4 pitfall 3): the
channel's output is then exactly zero in train and eval mode. The BN weight (gamma) is kept by
default, because a zero gamma also zeroes every gradient reaching the filter through the BN
layer, so the filter could never regrow (only a leftover momentum buffer could revive it);
``zero_norm_weight=True`` zeroes it too. Consumer columns are NOT zeroed and nothing freezes
the filter (SFP's code), so it may regrow during the next epoch. Caveat: a channel whose output
is exactly zero and then goes through a ReLU gets no gradient (ReLU'(0) = 0); in practice it
regrows through the momentum buffer it carried when it was masked, and a filter masked before
any training step (no momentum yet) stays at zero until it is unmasked. With
``mask_grads=True`` the gradients of masked producer rows and BN weight/bias are zeroed after
every backward, as FPGM's code does (``do_grad_mask``); prunekit also zeroes their momentum
buffers when masking, which closes the reference code's momentum/nesterov leak, so masked
channels stay exactly zero until the next re-masking. ``reset_momentum=True`` zeroes those
momentum buffers at every masking without masking gradients: a masked filter then restarts from
zero with no velocity and regrows only through its own gradients. That matters for ASFP from a
pretrained network: channels masked after training started carry momentum, regrow to a few
percent of their old size within steps, and BN (gamma kept) normalises that small, stale signal
back to full scale; on ResNet-20 with 3 epochs the training loss diverged (train top-1 90 -> 35,
benchmarks/results/soft_compare.md, rows asfp / asfp-m0).

At the end, :meth:`SoftPruning.finalize` / :func:`finalize` removes the channels of the last
mask physically (:func:`prunekit.prune` with ``plan=``). Because masked channels are exactly
zero in producers and norm affine parameters, the compact model computes what the masked one
computes (eval mode).

Schedules (:mod:`prunekit.methods.soft_schedules` defines them and cites the sources):
``schedule``, the fraction of the target ratio of the mask used during epoch ``e``:
``"constant"`` (SFP, FPGM) or ``"asymptotic"`` (ASFP, d = 1/8; prunekit's old d = 1/4 is
``asfp_d=0.25, asfp_fit="approximate"``), the full target from the last epoch on (reaching it
only with the mask computed after the last epoch, an earlier version, left BN statistics of
the wider network: ResNet-20, 3 epochs, 12-47%, benchmarks/results/soft_compare.md).
``decay`` (``"exponential"`` SRFP/GHFP, ``"anneal"``): the soft-masked entries are multiplied
by alpha(e) instead of zeroed: the entries zeroing would zero, so alpha = 0 is zeroing and in
eval mode the channel's output is multiplied by exactly alpha; in train mode BN re-normalises
the scaled rows (the reference code scales conv weights only), so the decay acts through beta,
and gamma with ``zero_norm_weight``. ``hard_fraction`` (``"cubic"``, GHFP): the lowest-scoring
lambda(e) of each group's masked channels are hard: zeroed, gradients masked and momentum
reset, so they stay exactly zero until the next mask (HFP); the rest stay soft.

The mask used during epoch ``e`` is computed at ``on_epoch_end(e - 1)`` (or before training
for ``e = 0``), at ``rate(e)``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..criteria import get_criterion
from ..graph import ChannelGraph, build_graph, kept_positions
from ..measure import count_macs
from ..plan import check_ratio, counts_for_macs, keep_count, make_plan, ratios_for_groups
from ..pruning import prune
from ..surgery import tensor_by_name
from ..utils import as_tuple
from .soft_schedules import (ASFP_D, ASFP_POINT, SOFT_SCHEDULES, SoftSchedule, asymptotic_rate,
                             hard_channels, part_of_plan)

__all__ = ["SOFT_SCHEDULES", "SoftPruning", "asymptotic_rate", "finalize", "soft_prune",
           "zero_masked_channels"]

def _masked_entries(model: nn.Module, graph: ChannelGraph, plan: dict[str, list[int]], *,
                    zero_norm_weight: bool = False, for_grads: bool = False,
                    norms: bool = True) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(tensor, dim, positions) of every entry the plan masks (``norms=False``: producers
    only, for FSDP's fractional steps, which leave BN alone).

    Values (``for_grads=False``): producer rows and biases, norm biases and running means, and
    norm weights only with ``zero_norm_weight``. Gradients (``for_grads=True``): producer rows
    and biases, norm weights and biases. Consumer columns ("in") are never touched.
    """
    removed = graph.removed_roots(plan)
    entries = []
    if not removed:
        return entries
    for member, roots in graph.tensor_members():
        if member.blocks > 1 or member.role not in ("out", "norm") or \
                (member.role == "norm" and not norms):
            continue
        if member.role == "norm":
            attr = member.tensor.rpartition(".")[2]
            wanted = {"bias", "weight"} if for_grads else \
                {"bias", "running_mean"} | ({"weight"} if zero_norm_weight else set())
            if attr not in wanted:
                continue
        keep = kept_positions(roots, removed)
        if len(keep) == len(roots):
            continue
        drop = sorted(set(range(len(roots))) - set(keep.tolist()))
        tensor = tensor_by_name(model, member.tensor)
        entries.append((tensor, member.dim,
                        torch.as_tensor(drop, dtype=torch.long, device=tensor.device)))
    return entries


@torch.no_grad()
def zero_masked_channels(model: nn.Module, graph: ChannelGraph, plan: dict[str, list[int]],
                         *, zero_norm_weight: bool = False) -> nn.Module:
    """Soft-mask variant of :func:`prunekit.zero_removed_channels`: zeroes, for the channels
    ``plan`` removes, the producers' rows and biases and the norm layers' bias (beta) and
    running mean, but NOT the consumers' input columns, so the filters may regrow.

    That makes the channel's output exactly zero in train mode (batch mean of zeros is 0) and
    in eval mode ((0 - 0) / sigma * gamma + 0). The norm weight (gamma) is zeroed only with
    ``zero_norm_weight=True``: a zero gamma also zeroes every gradient reaching the filter
    through the norm layer, so the channel could never regrow (except through a leftover
    momentum buffer).
    """
    for tensor, dim, drop in _masked_entries(model, graph, plan,
                                             zero_norm_weight=zero_norm_weight):
        tensor.index_fill_(dim, drop, 0)
    return model


class SoftPruning:
    """Soft filter pruning hook for :func:`prunekit.train.fit` (SFP / FPGM-soft / ASFP /
    SRFP / GHFP).

    Arguments: ``graph`` (a :class:`ChannelGraph` of the model) or ``model`` +
    ``example_inputs`` to build it (``ignore`` / ``leaf_modules`` as in :func:`prunekit.prune`);
    ``criterion``: a name or instance of a criterion that needs no data (``"l2"`` SFP,
    ``"fpgm"`` FPGM); ``ratio`` (uniform fraction removed per prunable group) and/or ``ratios``
    (per group/module, fnmatch patterns, see :func:`prunekit.plan.ratios_for_groups`), or
    ``macs_reduction`` (per-group counts that remove this fraction of the MACs, within 1%, as
    :func:`prunekit.prune` finds them; needs ``model`` and ``example_inputs``), or ``keep``
    (channels kept per group name, e.g. LFPC's search counts);
    ``schedule``: ``"constant"`` or ``"asymptotic"`` (needs ``epochs``, the total epochs of
    training; ``asfp_d``, ``asfp_point``, ``asfp_fit`` shape it); ``mask_grads``: zero the
    gradients of masked entries after every backward (FPGM's code) instead of letting them
    regrow (SFP's code); ``reset_momentum``: zero the masked entries' momentum at every
    masking, so they regrow from zero velocity; ``decay`` (+ ``decay_start``, alpha(0)) and
    ``hard_fraction``: the soft masks' decay factor and the hard share (module doc; they need
    ``epochs``).

    Lifecycle inside ``fit``: ``on_train_start`` records the model and optimizer; the initial
    mask (rate(start epoch), current weights) is applied at the first ``on_epoch_start``, i.e.
    still before any training step. It is deferred from ``on_train_start`` because ``fit``
    calls ``load_state_dict`` *after* ``on_train_start`` when resuming: masking there would
    zero channels of the restored weights that the saved plan kept. A resumed hook instead
    re-applies its saved plan (a no-op on the restored, already masked, weights).
    ``on_epoch_end(e)`` recomputes the mask for epoch ``e + 1`` from the current weights.
    """

    def __init__(self, graph: ChannelGraph | None = None, *, model: nn.Module | None = None,
                 example_inputs=None, criterion: Any = "l2", ratio: float | None = None,
                 ratios: dict[str, float] | None = None, schedule: str = "constant",
                 mask_grads: bool = False, epochs: int | None = None, ignore: Sequence = (),
                 leaf_modules: Sequence = (), zero_norm_weight: bool = False,
                 macs_reduction: float | None = None, keep: dict[str, int] | None = None,
                 reset_momentum: bool = False, asfp_d: float = ASFP_D,
                 asfp_point: float = ASFP_POINT, asfp_fit: str = "exact", decay: str = "none",
                 decay_start: float | None = None, hard_fraction: str = "none") -> None:
        self.schedules = SoftSchedule(schedule, epochs, asfp_d, asfp_point, asfp_fit, decay,
                                      decay_start, hard_fraction)
        given = [ratio is not None or ratios is not None, macs_reduction is not None,
                 keep is not None]
        if sum(given) != 1:
            raise ValueError("give one target: ratio=... and/or ratios={...}, macs_reduction=... "
                             "or keep={group: channels kept}")
        if ratio is not None:
            check_ratio(ratio)
        self.example_inputs = as_tuple(example_inputs)
        self.ignore, self.leaf_modules = list(ignore), list(leaf_modules)
        if graph is None:
            if model is None or self.example_inputs is None:
                raise ValueError("give graph=... or model=... and example_inputs=...")
            graph = build_graph(model, self.example_inputs, leaf_modules=self.leaf_modules,
                                ignore=self.ignore)
        self.graph = graph
        self.criterion = get_criterion(criterion)
        if getattr(self.criterion, "needs_data", False):
            raise ValueError(f"criterion '{self.criterion.name}' needs calibration data; soft "
                             "pruning re-scores every epoch and supports weight criteria only "
                             "(e.g. 'l2', 'fpgm', 'l1')")
        if keep is not None:
            self.target_keep = self._checked_keep(keep)
        elif macs_reduction is None:
            self.target = ratios_for_groups(graph, ratio, ratios)  # {group: target ratio}
            self.target_keep = {name: keep_count(graph.by_name[name], r)
                                for name, r in self.target.items()}
        else:
            self.target_keep = self._counts_for_macs(model, macs_reduction)
        if ratio is None and ratios is None:
            self.target = {name: 1 - k / graph.by_name[name].size
                           for name, k in self.target_keep.items()}
        self.schedule, self.mask_grads, self.epochs = schedule, bool(mask_grads), epochs
        self.zero_norm_weight, self.reset_momentum = bool(zero_norm_weight), bool(reset_momentum)
        self.model: nn.Module | None = model
        self.optimizer: torch.optim.Optimizer | None = None
        self.plan: dict[str, list[int]] = {}
        self.hard: dict[str, list[int]] = {}  # per group: the masked channels that are hard
        self.epoch = -1          # the epoch the current plan was computed for (-1: none yet)
        self.history: list[dict[str, Any]] = []  # per mask: epoch, rate fraction, #masked
        self._entries: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # grads masked
        self._pending_initial = False

    # ------------------------------------------------------------------ schedule and masks
    def fraction(self, epoch: int) -> float:
        """Fraction of the target ratios applied to the mask used during ``epoch``."""
        return self.schedules.fraction(epoch)

    def rates(self, epoch: int) -> dict[str, float]:
        """Per-group removal ratios of the mask used during ``epoch``."""
        f = self.fraction(epoch)
        return {name: min(r * f, r) for name, r in self.target.items()}

    def counts(self, epoch: int) -> dict[str, int]:
        """Kept channels per group in the mask used during ``epoch``: the target counts at
        the full rate (exactly, also for a ``macs_reduction`` target), else the channel count
        of the scaled ratio."""
        if self.fraction(epoch) >= 1:
            return dict(self.target_keep)
        return {name: keep_count(self.graph.by_name[name], r)
                for name, r in self.rates(epoch).items()}

    def _checked_keep(self, keep: dict[str, int]) -> dict[str, int]:
        out = {}
        for name, k in keep.items():
            if name not in self.graph.by_name:
                raise ValueError(f"keep names unknown group '{name}'")
            size = self.graph.by_name[name].size
            if not 1 <= int(k) <= size:
                raise ValueError(f"group '{name}' of {size} channels cannot keep {k}")
            out[name] = int(k)
        return out

    def _counts_for_macs(self, model: nn.Module | None, target: float) -> dict[str, int]:
        if model is None or self.example_inputs is None:
            raise ValueError("macs_reduction needs model=... and example_inputs=...")
        check_ratio(target, "macs_reduction")
        scores = self.criterion.score(self.graph, model)
        return counts_for_macs(model, self.graph, scores, self.example_inputs, target,
                               count_macs(model, self.example_inputs), 1)

    def update_mask(self, epoch: int) -> dict[str, list[int]]:
        """Recompute the plan for ``epoch`` from the current weights and apply it."""
        model = self._require_model()
        scores = self.criterion.score(self.graph, model)
        plan = make_plan(self.graph, scores, {}, counts=self.counts(epoch))
        self.plan = {k: [int(i) for i in v] for k, v in plan.items()}
        self.hard = hard_channels(self.plan, scores, self._sizes(),
                                  self.schedules.hard_share(epoch))
        self.epoch = int(epoch)
        self.apply_mask()
        self.history.append({"epoch": int(epoch), "fraction": self.fraction(epoch),
                             "masked": self.masked_count(),
                             "decay": self.schedules.decay_factor(epoch),
                             "hard": sum(len(v) for v in self.hard.values())})
        return self.plan

    def _sizes(self) -> dict[str, int]:
        return {name: self.graph.by_name[name].size for name in self.plan}

    @torch.no_grad()
    def apply_mask(self, fresh: bool = True) -> None:
        """Zero the current plan's producer rows/biases and norm bias/running mean (norm
        weight too with ``zero_norm_weight``), or multiply the soft ones by the decay factor
        (``fresh=False``, the re-application on resume, does not multiply again); reset the
        momentum of the producer rows/biases and norm weight/bias of the hard channels, of
        all masked ones with ``mask_grads`` or ``reset_momentum``."""
        model, alpha = self._require_model(), self.schedules.decay_factor(self.epoch)
        hard_plan = part_of_plan(self.plan, self.hard, self._sizes(), hard_part=True)
        soft_plan = part_of_plan(self.plan, self.hard, self._sizes(), hard_part=False)
        for plan, scale in ((hard_plan, 0.0), (soft_plan, alpha)):
            for tensor, dim, drop in _masked_entries(model, self.graph, plan,
                                                     zero_norm_weight=self.zero_norm_weight):
                if scale == 0:
                    tensor.index_fill_(dim, drop, 0)
                elif fresh:
                    tensor.index_copy_(dim, drop, tensor.index_select(dim, drop) * scale)
        frozen = self.plan if self.mask_grads or self.reset_momentum else hard_plan
        self._entries = _masked_entries(model, self.graph, self.plan if self.mask_grads
                                        else hard_plan, for_grads=True)
        for tensor, dim, drop in _masked_entries(model, self.graph, frozen, for_grads=True):
            if self.optimizer is not None:
                buffer = self.optimizer.state.get(tensor, {}).get("momentum_buffer")
                if buffer is not None:
                    buffer.index_fill_(dim, drop, 0)

    def masked_count(self) -> int:
        return sum(self.graph.by_name[name].size - len(kept) for name, kept in self.plan.items())

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("SoftPruning has no model yet: pass model=... or call "
                               "on_train_start(model, optimizer) first")
        return self.model

    # ------------------------------------------------------------------ fit hook protocol
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        if self.epoch < 0:  # fresh hook; a resume replaces this by load_state_dict
            self._pending_initial = True
        else:
            self.apply_mask(fresh=False)

    def on_epoch_start(self, epoch: int) -> None:
        if self._pending_initial:
            self._pending_initial = False
            self.update_mask(epoch)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        for tensor, dim, drop in self._entries:
            if tensor.grad is not None:
                tensor.grad.index_fill_(dim, drop, 0)

    def on_epoch_end(self, epoch: int) -> None:
        self.update_mask(epoch + 1)

    def state_dict(self) -> dict:
        return {"plan": {k: list(v) for k, v in self.plan.items()}, "epoch": self.epoch,
                "hard": {k: list(v) for k, v in self.hard.items()},
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.plan = {str(k): [int(i) for i in v] for k, v in state["plan"].items()}
        self.hard = {str(k): [int(i) for i in v] for k, v in state.get("hard", {}).items()}
        self.epoch = int(state["epoch"])
        self.history = [dict(h) for h in state.get("history", [])]
        self._pending_initial = self.epoch < 0
        if self.model is not None and not self._pending_initial:
            self.apply_mask(fresh=False)

    # ------------------------------------------------------------------ the compact model
    def finalize(self, model: nn.Module | None = None, example_inputs=None):
        """Physically remove the channels of the last mask; returns the PruningResult."""
        return finalize(model if model is not None else self._require_model(), self.graph,
                        self, example_inputs)


def finalize(model: nn.Module, graph: ChannelGraph, hook, example_inputs=None):
    """Remove the masked channels of ``hook`` (a :class:`SoftPruning`, or a plan dict) from
    ``model`` in place with :func:`prunekit.prune` and return the PruningResult.

    The mask is re-applied first (a no-op after training), so that the compact model computes
    exactly what the masked model computes (eval mode).
    """
    if isinstance(hook, SoftPruning):
        plan = hook.plan
        example_inputs = example_inputs if example_inputs is not None else hook.example_inputs
        ignore, leaf_modules = hook.ignore, hook.leaf_modules
    else:
        plan, ignore, leaf_modules = dict(hook), (), ()
    example_inputs = as_tuple(example_inputs)
    if example_inputs is None:
        raise ValueError("finalize needs example_inputs (the hook was built from a graph)")
    device = next(model.parameters()).device
    example_inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x
                           for x in example_inputs)
    zero_masked_channels(model, graph, plan)
    # The graph refers to tensors by name and soft training changes no shape: reuse it.
    result = prune(model, example_inputs, plan=plan, ignore=ignore, leaf_modules=leaf_modules,
                   graph=graph)
    if isinstance(hook, SoftPruning):
        result.criterion = f"soft-{getattr(hook.criterion, 'name', hook.criterion)}"
    return result


def soft_prune(model: nn.Module, train_set, val_set, config, out_dir, *, example_inputs=None,
               resume: bool = True, graph: ChannelGraph | None = None, distill=None,
               **options):
    """Soft-prune ``model`` during :func:`prunekit.train.fit`, then remove the last mask.

    ``options``: :class:`SoftPruning`'s keyword arguments (``criterion``, ``ratio``,
    ``schedule``, ``decay``, ...; ``epochs`` is the config's). ``graph``: the model's
    ChannelGraph if already built (same ``ignore``); else it is traced.

    Returns ``(model, PruningResult, fit summary)``; ``model`` is pruned in place and holds the
    weights of the last epoch (``best.pt`` in ``out_dir`` is the best *masked* model on the
    val split, kept for reference; the compact model is built from the last mask).
    """
    from ..train import TrainConfig, fit

    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if example_inputs is None:
        raise ValueError("soft_prune needs example_inputs (e.g. torch.randn(1, 3, 32, 32))")
    hook = SoftPruning(graph, model=model, example_inputs=example_inputs, epochs=config.epochs,
                       **options)
    summary = fit(model, train_set, val_set, config, out_dir, hooks=[hook], resume=resume,
                  distill=distill)
    result = hook.finalize(model)
    return model, result, summary
