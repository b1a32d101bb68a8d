"""KDFS, Knowledge-driven Differential Filter Sampler: a :func:`prunekit.train.fit` hook and
the registered method ``kdfs``.

S. Lin, W. Huang, J. Xie, B. Zhang, Y. Shen, Z. Yu, J. Han, D. Doermann, "Filter Pruning for
Efficient CNNs via Knowledge-driven Differential Filter Sampler", arXiv:2307.00198 (2023); code
Osilly/KDFS @7b429e28 (../shared/research/related_methods_1.md section 2). What it computes:

* Sampler: 2 logits theta per channel (Kaiming-normal); training mask
  m = GumbelSoftmax(theta, tau, hard=True)[:, 1] (straight-through), eval mask argmax
  (:class:`~prunekit.methods.kdfs_gates.ChannelGates`); tau(e) = tau_s (tau_e/tau_s)^(e/E),
  1 -> 0.1 over the E search epochs.
* Loss (the code's total): CE + 0.05 T^2 KL(t || s) (T = 3, teacher = the frozen pretrained
  model) + 1000 RC + 1e4 (F(m)/F_base - r)^2, r the kept-MACs target. RC = mean over feature
  points of mean((a(D(s)) - a(t))^2), a(F) = L2-normalised mean_c F^2 per sample, D a 1x1 conv
  decoder per feature point (the code's ``covert1..3``, stage outputs).
* Search then fine-tune: the code searches 350 epochs and fine-tunes 50 with masks frozen, CE
  only; here both phases share ``context.finetune.epochs`` (``search_epochs``, default the
  code's 350/400 share, at most all but one epoch).

prunekit's choices (each an option or forced by physical removal):

* Gates per prunekit group, not per conv. By default only inner groups (one producer:
  ``streams=False``); ``streams=True`` also gates residual-stream groups, one gate per stream
  channel shared by every block writing it. KDFS masks each block's second conv on its own
  and scatters its kept outputs back into a full-width stream
  (``padded_feature_map[mask==1] = out``), crediting the reduced output in its FLOPs count
  while the stream stays wide; physical removal cannot express that, so at the same MACs
  target the inner groups carry all the reduction (or the streams lose whole channels), which
  costs accuracy against the paper's setting. Groups with fixed channels are not gated. With
  zero-padding (option-A) shortcuts between gated streams the plan also keeps every channel
  a kept channel carries (``graph.requirements``), which its mask may have dropped: then the
  compact model differs from the masked one there (option-B / projection shortcuts: exact).
* The mask multiplies the output of the group's norm layers (conv+BN+mask as the code's
  masked block; producers when a group has no norm), so masked == pruned exactly.
* F(m): :class:`~prunekit.methods.kdfs_gates.MaskedMacs` from prunekit's per-module MACs and the
  graph (any model), on the sampled straight-through masks; BN / activation MACs are constant
  (the code also counts BN FLOPs h w sum(m)).
* Optimisers: fit trains the weights with the run's optimiser (prunekit's fit has SGD only;
  the code: Adamax lr 1e-2 wd 1e-4); the gates and decoders use Adamax lr ``gate_lr`` (1e-2,
  gates no wd, decoders ``decoder_weight_decay`` 1e-4) with a per-epoch cosine to
  ``gate_lr_min`` (1e-4), without the code's 20-epoch warm-up.
* ``student_init="pretrained"`` (default, deviation): the student starts from the given
  weights; ``"random"``: the code's (reset_parameters of every layer; the teacher keeps them).
* Final plan: a macs_reduction target keeps the argmax masks (reported as achieved MACs);
  ``counts`` (explicit per-group counts, e.g. the equal-MACs benchmark's) keep each group's
  top-k channels by theta_1 - theta_0. A group keeps at least its best channel. The hard
  Gumbel sample follows softmax(theta) whatever tau, so the MACs penalty sets the *expected*
  mask to r and argmax overshoots until the logits saturate (the code: 0.591 for r = 0.57);
  ``macs_fit="threshold"`` (deviation) moves the argmax threshold 0 on theta_1 - theta_0 to
  the one global threshold whose kept MACs come nearest r.
* ``context.distill`` (the run's own KD) applies to the fine-tune phase only (the search has
  KDFS's own KD); resume works through fit's hook state (gates, optimiser, decoders).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..plan import MacsEstimator
from ..plan.streams import is_stream
from ..pruning import prune
from ..surgery import ModelSnapshot
from ..train import TrainConfig, fit
from .context import MethodContext
from .kdfs_gates import (ChannelGates, MaskedMacs, _feature_widths, gate_temperature, kd_term,
                         kdfs_plan, rc_term)
from .registry import MethodConfig, MethodResult, PruningMethod, option, register_method

__all__ = ["KDFS", "KDFSSearch", "default_feature_points", "gated_groups", "kdfs_plan"]

#: The code's search / fine-tune epochs on CIFAR (350 + 50).
SEARCH_SHARE = 350 / 400


def gated_groups(graph, streams: bool = False) -> list[str]:
    """The groups KDFS gates: prunable, no fixed channel, inner (or also streams)."""
    return [g.name for g in graph.prunable_groups()
            if not g.fixed.any() and (streams or not is_stream(g))]


def default_feature_points(model: nn.Module) -> tuple[str, ...]:
    """The stage outputs of a ResNet-like model (``layer1`` .. ``layer4`` when present)."""
    names = dict(model.named_children())
    return tuple(n for n in ("layer1", "layer2", "layer3", "layer4") if n in names)


class KDFSSearch:
    """The search-phase hook (module docstring for the terms). ``teacher``: the frozen model;
    ``target``: r, the kept-MACs fraction; ``epochs``: E of the tau and lr schedules."""

    def __init__(self, model: nn.Module, graph, example_inputs, teacher: nn.Module, *,
                 target: float, epochs: int, streams: bool = False,
                 feature_points: tuple[str, ...] | None = None, tau_start: float = 1.0,
                 tau_end: float = 0.1, macs_weight: float = 1e4, kd_weight: float = 0.05,
                 kd_temperature: float = 3.0, rc_weight: float = 1000.0,
                 gate_lr: float = 1e-2, gate_lr_min: float = 1e-4,
                 decoder_weight_decay: float = 1e-4) -> None:
        self.graph, self.teacher = graph, teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.names = gated_groups(graph, streams)
        if not self.names:
            raise ConfigError("KDFS found no group to gate (every prunable group is a residual "
                              "stream or has fixed channels); try streams=True")
        self.gates = ChannelGates(graph, self.names)
        self.macs = MaskedMacs(model, graph, example_inputs, self.names)
        self.points = default_feature_points(model) if feature_points is None \
            else tuple(feature_points)
        widths = _feature_widths(model, self.points, example_inputs)
        self.decoders = nn.ModuleList(nn.Conv2d(c, c, 1) for c in widths)
        self.target, self.epochs = float(target), int(epochs)
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.macs_weight, self.kd_weight = float(macs_weight), float(kd_weight)
        self.kd_temperature, self.rc_weight = float(kd_temperature), float(rc_weight)
        self.gate_lr, self.gate_lr_min = float(gate_lr), float(gate_lr_min)
        self.optimizer = torch.optim.Adamax(
            [{"params": self.gates.parameters(), "weight_decay": 0.0},
             {"params": list(self.decoders.parameters()),
              "weight_decay": float(decoder_weight_decay)}], lr=self.gate_lr)
        self.history: list[dict[str, Any]] = []
        self._seen: dict[str, Any] = {}
        self._handles: list = []

    # ---------------------------------------------------------------- fit hooks
    def on_train_start(self, model: nn.Module, optimizer) -> None:
        self.detach()
        self.gates.attach(model)
        self.decoders.to(next(model.parameters()).device)
        self.teacher.to(next(model.parameters()).device)
        self._handles.append(model.register_forward_pre_hook(self._inputs))
        self._handles.append(model.register_forward_hook(self._logits))
        for i, name in enumerate(self.points):
            self._handles.append(model.get_submodule(name).register_forward_hook(
                self._feature(f"s{i}")))
            self._handles.append(self.teacher.get_submodule(name).register_forward_hook(
                self._feature(f"t{i}")))

    def on_epoch_start(self, epoch: int) -> None:
        self.gates.tau = gate_temperature(epoch, self.epochs, self.tau_start, self.tau_end)
        lr = self.gate_lr_min + 0.5 * (self.gate_lr - self.gate_lr_min) * (
            1 + math.cos(math.pi * epoch / max(self.epochs, 1)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if not model.training or "inputs" not in self._seen or self.gates.current is None:
            return None
        loss = self.macs_weight * (self.macs.ratio(self.gates.current) - self.target) ** 2
        device = self._seen["logits"].device
        loss = loss.to(device)
        with torch.no_grad():
            teacher_logits = self.teacher(*self._seen["inputs"])
        if self.kd_weight:
            loss = loss + self.kd_weight * kd_term(self._seen["logits"], teacher_logits,
                                                   self.kd_temperature)
        if self.points and self.rc_weight:
            decoded = [d(self._seen[f"s{i}"]) for i, d in enumerate(self.decoders)]
            teacher = [self._seen[f"t{i}"] for i in range(len(self.points))]
            loss = loss + self.rc_weight * rc_term(decoded, teacher)
        self._seen = {}
        return loss

    def after_step(self, step: int) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def on_epoch_end(self, epoch: int) -> None:
        masks = self.gates.eval_masks()
        self.history.append({"epoch": int(epoch), "tau": self.gates.tau,
                             "kept_macs": float(self.macs.ratio(masks)),
                             "kept_channels": int(sum(m.sum() for m in masks.values()))})

    def state_dict(self) -> dict:
        return {"logits": {n: t.detach().clone() for n, t in self.gates.logits.items()},
                "optimizer": self.optimizer.state_dict(),
                "decoders": {k: v.detach().cpu().clone()
                             for k, v in self.decoders.state_dict().items()},
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["logits"].items():
                self.gates.logits[name].copy_(value)
        self.decoders.load_state_dict(state["decoders"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = [dict(h) for h in state["history"]]

    # ---------------------------------------------------------------- helpers
    def detach(self) -> None:
        self.gates.detach()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _inputs(self, module, args) -> None:
        if module.training:
            self._seen = {"inputs": tuple(a.detach() if torch.is_tensor(a) else a for a in args)}

    def _logits(self, module, args, output) -> None:
        if module.training:
            self._seen["logits"] = output

    def _feature(self, key: str):
        def hook(module, args, output):
            if key.startswith("t") or module.training:
                self._seen[key] = output
        return hook


def _split_epochs(total: int, search: int | None) -> tuple[int, int]:
    if search is None:  # the code's share, leaving a fine-tune epoch whenever there are two
        search = max(1, min(total - 1, round(total * SEARCH_SHARE)))
    search = int(search)
    if not 1 <= search <= total:
        raise ConfigError(f"KDFS search_epochs must be in [1, {total}] (the total budget is "
                          f"--finetune-epochs {total}); got {search}")
    return search, total - search


@register_method
class KDFS(PruningMethod):
    """KDFS (Lin et al., arXiv:2307.00198): Gumbel-softmax channel gates searched with KD,
    the masked-filter-modelling RC loss and a MACs penalty, then masks frozen, channels
    removed and the compact model fine-tuned."""

    name = "kdfs"
    summary = ("knowledge-driven differential filter sampler: Gumbel channel gates trained with "
               "KD + RC + a MACs penalty, then removal and fine-tuning")
    trains = True
    target_kinds = ("macs_reduction", "counts")

    @dataclass
    class Config(MethodConfig):
        search_epochs: Any = option(None, "epochs of the gate search out of --finetune-epochs "
                                    "(default the code's 350/400 share; the rest fine-tunes)",
                                    cli=False)
        streams: bool = option(False, "also gate residual-stream groups (one gate per stream "
                               "channel; KDFS's per-block scatter cannot be removed)")
        feature_points: Any = option(None, "RC feature points (module names; default "
                                     "layer1..layer4 present; [] turns RC off)", cli=False)
        student_init: str = option("pretrained", "student start: the given weights, or "
                                   "random (the code's from-scratch student)",
                                   choices=("pretrained", "random"))
        tau_start: float = option(1.0, "Gumbel temperature at the first search epoch")
        tau_end: float = option(0.1, "Gumbel temperature reached at the end of the search")
        macs_weight: float = option(1e4, "weight of (F(m)/F_base - r)^2 (the code's 1e4)")
        kd_weight: float = option(0.05, "weight of T^2 KL (the code's 0.05)")
        kd_temperature: float = option(3.0, "KD temperature T (the code's 3)")
        rc_weight: float = option(1000.0, "weight of the RC loss (the code's 1000)")
        gate_lr: float = option(1e-2, "Adamax lr of the gates and decoders (the code's 1e-2)")
        gate_lr_min: float = option(1e-4, "cosine end lr of the gates (the code's 1e-4)")
        macs_fit: str = option("argmax", "final masks under a macs_reduction target: argmax "
                               "(the code's) or threshold (one global margin threshold "
                               "nearest the MACs target)", choices=("argmax", "threshold"))
        search: dict = option({}, "training settings of the search phase (TrainConfig keys "
                              "over the run's)", cli=False)

        def validate(self) -> None:
            if self.search_epochs is not None and (isinstance(self.search_epochs, bool) or
                                                   not isinstance(self.search_epochs, int)
                                                   or self.search_epochs < 1):
                raise ConfigError(f"search_epochs must be a positive int, got "
                                  f"{self.search_epochs!r}")
            if not 0 < self.tau_end <= self.tau_start:
                raise ConfigError(f"need 0 < tau_end <= tau_start, got tau_start="
                                  f"{self.tau_start}, tau_end={self.tau_end}")
            for key in ("macs_weight", "kd_weight", "rc_weight", "gate_lr", "gate_lr_min"):
                if not getattr(self, key) >= 0:
                    raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
            if self.kd_temperature <= 0:
                raise ConfigError(f"kd_temperature must be > 0, got {self.kd_temperature}")
            if self.feature_points is not None and (
                    isinstance(self.feature_points, str) or
                    not all(isinstance(p, str) for p in self.feature_points)):
                raise ConfigError("feature_points must be a list of module names (or [])")
            known = {f.name for f in fields(TrainConfig)}
            if set(self.search) - known:
                raise ConfigError(f"method.search: unknown keys {sorted(set(self.search) - known)}"
                                  f"; valid: {sorted(known)}")

    def run(self, model: nn.Module, context: MethodContext) -> MethodResult:
        c, target = self.config, context.target
        data = context.require_data(f"method {self.name}")
        search_epochs, finetune_epochs = _split_epochs(context.finetune.epochs, c.search_epochs)
        graph = context.graph(model)
        example = context.example_inputs
        counts = dict(target.counts) if target.counts is not None else None
        if counts is not None:
            names = gated_groups(graph, c.streams)
            # an ungated group may be named if it keeps every channel (the equal-MACs
            # benchmark's common counts name the kept residual streams)
            bad = sorted(n for n in set(counts) - set(names)
                         if n not in graph.by_name or int(counts[n]) != graph.by_name[n].size)
            if bad:
                raise ConfigError(f"KDFS gates {names}; counts name other groups {bad} "
                                  "(streams=True gates residual streams)")
            plan = {n: list(range(min(max(1, int(counts[n])), graph.by_name[n].size)))
                    if n in counts else list(range(graph.by_name[n].size)) for n in names}
            kept = MacsEstimator(model, graph, example)(plan)
            keep_ratio = kept / MaskedMacs(model, graph, example, names).base_total
        else:
            keep_ratio = 1.0 - float(target.macs_reduction)
        teacher = copy.deepcopy(model)
        snapshot = ModelSnapshot(model)
        if c.student_init == "random":
            for module in model.modules():
                if module is not model and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        hook = KDFSSearch(model, graph, example, teacher, target=keep_ratio,
                          epochs=search_epochs, streams=c.streams,
                          feature_points=c.feature_points, tau_start=c.tau_start,
                          tau_end=c.tau_end, macs_weight=c.macs_weight, kd_weight=c.kd_weight,
                          kd_temperature=c.kd_temperature, rc_weight=c.rc_weight,
                          gate_lr=c.gate_lr, gate_lr_min=c.gate_lr_min)
        try:
            return self._search_and_finetune(model, context, hook, counts, keep_ratio,
                                             search_epochs, finetune_epochs)
        except BaseException:  # put the user's model back: structure, then the weights
            snapshot.restore()
            with torch.no_grad():
                model.load_state_dict(teacher.state_dict())
            raise

    def _search_and_finetune(self, model, context, hook, counts, keep_ratio, search_epochs,
                             finetune_epochs) -> MethodResult:
        c, data, target, example = self.config, context.data, context.target, \
            context.example_inputs
        graph = context.graph(model)
        search = TrainConfig.from_dict({**context.finetune.to_dict(), **c.search,
                                        "epochs": search_epochs})
        with context.stage("kdfs_search"):
            try:
                summary = fit(model, data.train_set(), data.val_set(), search,
                              context.out_dir / "kdfs_search", hooks=[hook])
            finally:
                hook.detach()
        plan = kdfs_plan(hook, counts, c.macs_fit)
        result = prune(model, example, plan=plan, ignore=target.ignore, graph=graph)
        extras = {"kdfs": {"history": hook.history, "target_kept_macs": keep_ratio,
                           "achieved_kept_macs": result.macs_after / result.macs_before,
                           "search_epochs": search_epochs, "finetune_epochs": finetune_epochs,
                           "search": summary}}
        if finetune_epochs:
            config = TrainConfig.from_dict({**context.finetune.to_dict(),
                                            "epochs": finetune_epochs})
            with context.stage("kdfs_finetune"):
                summary = fit(model, data.train_set(), data.val_set(), config,
                              context.out_dir / "finetune", distill=context.distill)
        return MethodResult(plan=result.plan, trained=True, summary=summary, extras=extras,
                            group_sizes=result.group_sizes)
