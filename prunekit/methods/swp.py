"""SWP: stripe-wise pruning with a learnable Filter Skeleton ("Pruning Filter in Filter",
Meng, Cheng, Zhou, Zhao, Tang, NeurIPS 2020, arXiv 2009.14410; methods.md section 3).

Training (:class:`FilterSkeleton`, a :func:`prunekit.train.fit` hook): every chosen conv
``W ∈ R^{N×C×K×K}`` gets a skeleton ``I ∈ R^{N×K×K}`` initialised to ones and computes with
``W ⊙ I`` (a ``torch.nn.utils.parametrize`` parametrization, so it works on any conv of any
model). The loss is ``CE + alpha * sum ||I||_1`` (paper Eq. 2), applied as the reference code
does: ``I.grad += sr * sign(I)`` before each step. Stripes with ``|I| <= threshold`` (delta)
are hard-zeroed before every step together with their gradient *and* their optimiser
momentum (the reference leaves the momentum, which can push a zeroed stripe back above the
threshold), so a removed stripe stays exactly zero. A filter with no live stripe has its
bias zeroed and, by ``mask_norms`` (:mod:`prunekit.methods.swp_parts`), the affine weight and
bias of the norm reading it: ``"reference"`` only after a conv that is its channels' single
producer (each block's bn1, as the reference's ``BatchNorm.update_mask``), ``"all"``
(prunekit's addition, the default) also after convs writing a residual stream (bn2, the stem's
bn1), which makes such a filter's output channel exactly zero.

Pruning (:func:`swp_prune`): the skeleton is baked into the weights (``W ← W ⊙ I``); channels
that are exactly zero everywhere (every producer's rows and biases zero, every norm's weight
and bias zero) are removed through the channel graph with their consumers; a residual
:class:`~prunekit.models.cifar_resnet.BasicBlock` whose conv1 or conv2 lost every stripe is
replaced by its shortcut plus the constant its branch still adds (``bn2`` of zeros, which the
reference drops together with the block's ReLU: ``empty_blocks="reference"``); the remaining partial filters become
:class:`~prunekit.nn.StripeConv2d` modules (``executor="stripe"``) or stay dense convolutions
with zero stripes (``executor="dense"``). Every step is exact in eval mode. The result reports
MACs and, beside them, FLOPs as the reference counts them
(:func:`prunekit.measure.reference_flops`: 2 x MACs + BN + linear biases, no ReLU or pooling
for its ResNet), the basis of the paper's percentages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import PrunekitError
from ..graph import build_graph
from ..measure import count_macs, count_params, reference_flops
from ..nn import ShortcutBlock, StripeConv2d
from ..pruning import reduction
from ..utils import as_tuple, first_output, set_submodule
from .swp_parts import norms_reading, replace_empty_blocks

__all__ = ["FilterSkeleton", "SWPExactnessError", "SWPResult", "ShortcutBlock", "SkeletonMask",
           "swp_prune"]


class SkeletonMask(nn.Module):
    """Parametrization ``W -> W * I[:, None]`` with the learnable skeleton ``I`` (N, K, K)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        n, _, kh, kw = weight.shape
        self.skeleton = nn.Parameter(torch.ones(n, kh, kw, dtype=weight.dtype,
                                                device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.skeleton.unsqueeze(1)


def _skeleton(conv: nn.Conv2d) -> torch.Tensor:
    return conv.parametrizations.weight[0].skeleton


class FilterSkeleton:
    """SWP's Filter Skeleton on ``model`` as a :func:`prunekit.train.fit` hook.

    ``sr`` is alpha of Eq. 2 (reference ``--sr``, 1e-5), ``threshold`` delta (``--threshold``,
    0.01). ``modules``: names of the convs to skeletonise (default: every ``nn.Conv2d`` with
    ``groups == 1`` and a kernel larger than 1x1, outside ``ignore``). ``example_inputs`` let
    the channel graph find the norm layer that reads each conv. Attach before building the
    optimizer (``fit`` builds it), so the skeletons are trained.

    ``lr_scale`` and ``weight_decay`` give the skeletons their own learning rate (``lr_scale``
    times the weights' lr, same schedule) and weight decay (default: the weights'). The
    reference uses one lr and decay for all (``lr_scale=1``), which suits its 160 epochs from
    scratch. From a pretrained network in a few epochs it does not work: conv -> BN makes the
    loss blind to a filter's skeleton scale (nothing resists a common shrink), so the L1 term
    shrinks every stripe at the same speed and the loss, which only sees how the stripes of a
    filter compare, separates them too slowly at the weights' lr: they all cross the threshold
    within a few dozen steps (benchmarks/results/swp_pretrained.md). A larger skeleton lr
    makes the stripes spread (the loss's pull within each filter acts faster) while a small
    ``sr`` keeps the common drift slow, so stripes cross the threshold over hundreds of steps.
    ``penalty_epochs``: train the skeleton (with its L1 term) only in the first epochs
    (default: all); later epochs freeze it (no gradient, no momentum, dead stripes stay zero)
    and train the weights, so the network recovers from the last cuts instead of losing more
    stripes that drift below the threshold.
    """

    def __init__(self, model: nn.Module, example_inputs, *, sr: float = 1e-5,
                 threshold: float = 0.01, modules: Sequence[str] | None = None,
                 ignore: Sequence[str] = (), lr_scale: float = 1.0,
                 weight_decay: float | None = None, penalty_epochs: int | None = None,
                 mask_norms: str = "all"):
        if not sr >= 0:
            raise ValueError(f"sr (alpha) must be >= 0, got {sr!r}")
        if penalty_epochs is not None and (not isinstance(penalty_epochs, int)
                                           or penalty_epochs < 0):
            raise ValueError(f"penalty_epochs must be an int >= 0 or None, got {penalty_epochs!r}")
        if not lr_scale > 0:
            raise ValueError(f"lr_scale must be > 0, got {lr_scale!r}")
        if weight_decay is not None and not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold (delta) must be in [0, 1), got {threshold!r}; the "
                             "skeleton starts at 1, so a threshold >= 1 would empty every conv")
        example_inputs = as_tuple(example_inputs)
        named = dict(model.named_modules())
        if modules is None:
            modules = [n for n, m in named.items() if isinstance(m, nn.Conv2d) and m.groups == 1
                       and m.kernel_size != (1, 1) and n not in set(ignore)]
        for name in modules:
            conv = named.get(name)
            if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
                raise ValueError(f"'{name}' is not an nn.Conv2d with groups=1; SWP skeletons "
                                 "apply to ordinary convolutions")
        if not modules:
            raise ValueError("no convolution to skeletonise (only 1x1 or grouped convs?)")
        self.model, self.sr, self.threshold = model, float(sr), float(threshold)
        self.penalty_epochs, self.penalising = penalty_epochs, True
        self.names = list(modules)
        self.norms = norms_reading(model, example_inputs, self.names, mask_norms)
        self.optimizer: torch.optim.Optimizer | None = None
        # every 50 steps: step, live stripe fraction and the 10/50/90% quantiles of |I|
        self.history: list[dict[str, float]] = []
        for name in self.names:
            conv = named[name]
            if not parametrize.is_parametrized(conv, "weight"):
                parametrize.register_parametrization(conv, "weight", SkeletonMask(conv.weight))
        for skeleton in self.skeletons().values():  # read by prunekit.train.build_optimizer
            skeleton.prunekit_lr_scale = float(lr_scale)
            if weight_decay is not None:
                skeleton.prunekit_weight_decay = float(weight_decay)

    def skeletons(self) -> dict[str, torch.Tensor]:
        return {name: _skeleton(self.model.get_submodule(name)) for name in self.names}

    def stripe_masks(self) -> dict[str, torch.Tensor]:
        """Per conv, the live stripes (N, K, K) as bools: ``|I| > threshold``."""
        return {name: (s.detach().abs() > self.threshold) for name, s in self.skeletons().items()}

    def stripe_fraction(self) -> float:
        """Fraction of all stripes still alive."""
        masks = self.stripe_masks().values()
        return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    # ------------------------------------------------------------------ fit hook protocol
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(s) not in owned for s in self.skeletons().values()):
            raise RuntimeError("the optimizer does not train the filter skeletons: create "
                               "FilterSkeleton before the optimizer (before fit)")

    def on_epoch_start(self, epoch: int) -> None:
        self.penalising = self.penalty_epochs is None or epoch < self.penalty_epochs

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        for name, skeleton in self.skeletons().items():
            if skeleton.grad is None:
                skeleton.grad = torch.zeros_like(skeleton)
            if self.penalising:
                skeleton.grad.add_(torch.sign(skeleton), alpha=self.sr)  # d/dI of sr * |I|_1
            else:  # frozen: no gradient, no momentum, so no stripe crosses the threshold now
                skeleton.grad.zero_()
                state = self.optimizer.state.get(skeleton, {}) if self.optimizer else {}
                if state.get("momentum_buffer") is not None:
                    state["momentum_buffer"].zero_()
            self._hard_zero(name, skeleton)
        if step % 50 == 0:
            values = torch.cat([s.detach().abs().flatten() for s in self.skeletons().values()])
            q10, q50, q90 = torch.quantile(values.float(), torch.tensor([0.1, 0.5, 0.9])).tolist()
            self.history.append({"step": int(step), "alive": self.stripe_fraction(),
                                 "q10": q10, "q50": q50, "q90": q90})

    @torch.no_grad()
    def _hard_zero(self, name: str, skeleton: torch.Tensor) -> None:
        live = skeleton.abs() > self.threshold
        dead = ~live
        tensors = [(skeleton, dead)]
        filters_dead = ~live.flatten(1).any(1)
        if filters_dead.any():
            bias = self.model.get_submodule(name).bias
            if bias is not None:  # a dead filter outputs exactly zero, bias included
                tensors.append((bias, filters_dead))
            for norm in self.norms.get(name, ()):
                module = self.model.get_submodule(norm)
                for t in (module.weight, module.bias):
                    if t is not None:
                        tensors.append((t, filters_dead))
        for tensor, where in tensors:
            tensor.masked_fill_(where, 0)
            if tensor.grad is not None:
                tensor.grad.masked_fill_(where, 0)
            state = self.optimizer.state.get(tensor, {}) if self.optimizer is not None else {}
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if state.get(key) is not None:
                    state[key].masked_fill_(where, 0)

    def state_dict(self) -> dict:
        # the skeletons are model parameters (fit's checkpoints hold them); the history is not
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state.get("history", [])]

    def remove(self) -> dict[str, torch.Tensor]:
        """Bake ``W ⊙ I`` into every conv weight, drop the parametrizations and return the
        stripe masks (the stripes at or below the threshold are zero in the baked weight)."""
        masks = self.stripe_masks()
        with torch.no_grad():
            for name, skeleton in self.skeletons().items():
                skeleton.mul_(masks[name])
        for name in self.names:
            parametrize.remove_parametrizations(self.model.get_submodule(name), "weight",
                                                leave_parametrized=True)
        return masks


@dataclass
class SWPResult:
    """What :func:`swp_prune` did."""

    stripes_before: int
    stripes_after: int
    removed_channels: dict[str, int]
    replaced_blocks: list[str]
    stripe_convs: list[str]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    plan: dict[str, list[int]] = field(default_factory=dict)
    reference_flops_before: int | None = None   # SWP flops.py's convention, same inputs
    reference_flops_after: int | None = None

    macs_reduction = property(lambda self: reduction(self.macs_before, self.macs_after))
    reference_flops_reduction = property(lambda self: None if self.reference_flops_after is None
                                         else reduction(self.reference_flops_before,
                                                        self.reference_flops_after))
    params_reduction = property(lambda self: reduction(self.params_before, self.params_after))

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return {**asdict(self), "macs_reduction": self.macs_reduction,
                "params_reduction": self.params_reduction,
                "reference_flops_reduction": self.reference_flops_reduction}


class SWPExactnessError(PrunekitError, RuntimeError):
    """The stripe-pruned model does not compute what the skeleton-masked model computed."""


@torch.no_grad()
def swp_prune(model: nn.Module, skeleton: FilterSkeleton, example_inputs, *,
              executor: str = "stripe", check_atol: float = 1e-4,
              empty_blocks: str = "exact") -> SWPResult:
    """Turn a skeleton-trained ``model`` into its stripe-pruned form, in place (eval mode).

    The output on ``example_inputs`` before (skeleton baked) and after every structural change
    must agree to ``check_atol`` (relative to the output's scale), else
    :class:`SWPExactnessError` (e.g. a zero channel feeding an activation with f(0) != 0).
    """
    from ..pruning import prune

    if executor not in ("stripe", "dense"):
        raise ValueError(f"executor must be 'stripe' or 'dense', got {executor!r}")
    example_inputs = as_tuple(example_inputs)
    model.eval()
    macs_before, params_before = count_macs(model, example_inputs), count_params(model)
    flops_before = reference_flops(model, example_inputs)
    if skeleton.stripe_fraction() == 0:
        raise ValueError("every stripe of every skeletonised conv is at or below the threshold, "
                         "so nothing of the network would remain: lower sr (alpha), lower the "
                         "threshold, or train fewer steps (the skeleton training checkpoint "
                         "is kept)")
    masks = skeleton.remove()
    reference = first_output(model(*example_inputs)).clone()
    stripes_before = sum(m.numel() for m in masks.values())
    replaced = replace_empty_blocks(model, masks, example_inputs, empty_blocks)
    if empty_blocks == "reference" and replaced:  # a deliberate change: check the rest
        reference = first_output(model(*example_inputs)).clone()
    plan, removed = _zero_channel_plan(model, example_inputs)
    if plan:
        prune(model, example_inputs, plan=plan)
    stripe_convs, stripes_after = [], 0
    for name in masks:
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            continue  # inside a replaced block
        mask = conv.weight.detach().abs().amax(1) > 0  # (N, K, K): baked, sliced weights
        stripes_after += int(mask.sum())
        if executor == "stripe" and not bool(mask.all()):
            set_submodule(model, name, StripeConv2d.from_dense(conv, mask))
            stripe_convs.append(name)
    after = first_output(model(*example_inputs))
    error = float((after - reference).abs().max())
    scale = max(float(reference.abs().max()), 1.0)
    if error > check_atol * scale:
        raise SWPExactnessError(f"the stripe-pruned model differs from the masked model by "
                                f"{error:.3g} (tolerance {check_atol * scale:.3g}); a removed "
                                "zero channel probably feeds an op with f(0) != 0")
    return SWPResult(
        stripes_before=stripes_before, stripes_after=stripes_after, removed_channels=removed,
        replaced_blocks=replaced, stripe_convs=stripe_convs, macs_before=macs_before,
        macs_after=count_macs(model, example_inputs), params_before=params_before,
        params_after=count_params(model), plan=plan, reference_flops_before=flops_before,
        reference_flops_after=reference_flops(model, example_inputs))


def _zero_channel_plan(model: nn.Module, example_inputs
                       ) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Kept channels per group, dropping those that are exactly zero in every producer row,
    producer bias and norm weight/bias (so removing them changes nothing). A group whose every
    channel is zero keeps its first one (it then carries zeros)."""
    graph = build_graph(model, example_inputs)
    state = dict(model.state_dict(keep_vars=True))
    zeros: dict[int, np.ndarray] = {}  # group index -> channels provably zero
    for group in graph.prunable_groups():
        zero = np.ones(group.size, dtype=bool)
        for member, pos in group.members:
            if member.role == "in":
                continue
            attr = member.tensor.rpartition(".")[2]
            if member.role == "norm" and attr not in ("weight", "bias"):
                if getattr(model.get_submodule(member.module), "weight", None) is None:
                    zero[:] = False  # no affine: (0 - mean) / std is not zero
                    break
                continue
            if member.role not in ("out", "norm") or member.blocks > 1:
                zero[:] = False  # a bare parameter or grouped producer: not provably zero
                break
            tensor = state[member.tensor].detach()
            nonzero = tensor.abs().transpose(0, member.dim).reshape(tensor.shape[member.dim], -1)
            nonzero = (nonzero.amax(1) > 0).cpu().numpy()
            mine = pos >= 0
            zero[pos[mine][nonzero[mine]]] = False
        zero &= ~group.fixed
        if zero.all():
            zero[0] = False
        zeros[group.index] = zero
    # a channel that carries another group's channel (a zero-padding shortcut) is zero only
    # if that channel goes too; chains settle in a few passes
    changed = True
    while changed:
        changed = False
        for (ga, ca), (gb, cb) in getattr(graph, "requirements", ()):
            if ga in zeros and zeros[ga][ca] and not (gb in zeros and zeros[gb][cb]):
                zeros[ga][ca] = False
                changed = True
    plan, removed = {}, {}
    for group in graph.prunable_groups():
        zero = zeros[group.index]
        if zero.any():
            plan[group.name] = np.flatnonzero(~zero).tolist()
            removed[group.name] = int(zero.sum())
    return plan, removed
