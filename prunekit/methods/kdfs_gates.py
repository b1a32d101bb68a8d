"""KDFS's pieces (:mod:`prunekit.methods.kdfs`): per-channel Gumbel gates on prunekit groups, a
differentiable MACs model of the masks, the distillation / "masked filter modelling" terms and
the final plan from the gates (:func:`kdfs_plan`).

S. Lin, W. Huang, J. Xie, B. Zhang, Y. Shen, Z. Yu, J. Han, D. Doermann, "Filter Pruning for
Efficient CNNs via Knowledge-driven Differential Filter Sampler", arXiv:2307.00198; code
Osilly/KDFS (../shared/research/related_methods_1.md section 2).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..graph import ChannelGraph
from ..measure import count_macs, macs_by_module

__all__ = ["ChannelGates", "MaskedMacs", "attention_map", "gate_temperature", "kd_term",
           "kdfs_plan", "rc_term"]


def gate_temperature(epoch: int, epochs: int, tau_start: float = 1.0,
                     tau_end: float = 0.1) -> float:
    """tau(e) = tau_s (tau_e / tau_s)^(e / E), the code's per-epoch exponential decay."""
    return float(tau_start) * (float(tau_end) / float(tau_start)) ** (epoch / max(epochs, 1))


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """a(F) = normalize_L2(mean_c F^2 flattened per sample) (the code's RC attention)."""
    return F.normalize(feature.float().pow(2).mean(1).flatten(1), dim=1)


def rc_term(decoded: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """RC = mean over feature points of mean((a(D(s)) - a(t))^2)."""
    terms = [(attention_map(s) - attention_map(t)).pow(2).mean()
             for s, t in zip(decoded, teacher)]
    return torch.stack(terms).mean()


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(z_t/T) || softmax(z_s/T)), batch mean (the code's ``KDLoss``; the
    same form as :func:`prunekit.train.distill.distillation_loss`, reused)."""
    from ..train.distill import distillation_loss
    return distillation_loss(student_logits, teacher_logits, temperature)


class ChannelGates:
    """One 2-logit gate per channel of each named group: ``logits[name]`` (size x 2),
    Kaiming-normal initialised as the code (``nn.init.kaiming_normal_``).

    :meth:`sample` draws m = GumbelSoftmax(theta, tau, hard=True)[:, 1] (straight-through:
    the value is 0/1, the gradient the soft sample's); :meth:`eval_masks` is argmax. The
    masks multiply the outputs of the group's norm layers (after BN, as the code masks the
    conv+BN output) or, in a group without one, of its producers: forward hooks
    (:meth:`attach`), training mode -> the sampled masks, eval mode -> argmax (or the
    ``frozen`` masks once set).
    """

    def __init__(self, graph: ChannelGraph, names, generator: torch.Generator | None = None):
        self.graph, self.names = graph, list(names)
        self.logits: dict[str, torch.Tensor] = {}
        for name in self.names:
            theta = torch.empty(graph.by_name[name].size, 2)
            nn.init.kaiming_normal_(theta, generator=generator)
            self.logits[name] = theta.requires_grad_(True)
        self.tau = 1.0
        self.current: dict[str, torch.Tensor] | None = None
        self.frozen: dict[str, torch.Tensor] | None = None
        self.handles: list = []

    def parameters(self) -> list[torch.Tensor]:
        return [self.logits[n] for n in self.names]

    def sample(self) -> dict[str, torch.Tensor]:
        self.current = {n: F.gumbel_softmax(t, tau=self.tau, hard=True)[:, 1]
                        for n, t in self.logits.items()}
        return self.current

    def eval_masks(self) -> dict[str, torch.Tensor]:
        if self.frozen is not None:
            return self.frozen
        return {n: (t[:, 1] > t[:, 0]).float().detach() for n, t in self.logits.items()}

    def kept(self, name: str) -> list[int]:
        return [int(i) for i in torch.nonzero(self.eval_masks()[name]).flatten()]

    # ---------------------------------------------------------------- masking
    def targets(self) -> list[tuple[str, str, np.ndarray]]:
        """(module, group, channel index per output position) of every masked module."""
        out = []
        for name in self.names:
            members = self.graph.by_name[name].members
            norms = [(m, p) for m, p in members if m.role == "norm" and m.tensor.endswith(
                "weight")]
            chosen = norms or [(m, p) for m, p in members if m.role == "out"
                               and m.tensor.endswith("weight")]
            out += [(m.module, name, p) for m, p in chosen]
        return out

    def attach(self, model: nn.Module) -> None:
        self.detach()
        self.handles.append(model.register_forward_pre_hook(self._pre_forward))
        for module, name, positions in self.targets():
            layer = model.get_submodule(module)
            dim = -1 if isinstance(layer, (nn.Linear, nn.LayerNorm)) else 1
            index = torch.as_tensor(np.maximum(positions, 0), dtype=torch.long)
            other = torch.as_tensor(positions < 0)
            self.handles.append(layer.register_forward_hook(
                self._masker(name, index, other, dim)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.current = [], None

    def _pre_forward(self, module, args) -> None:
        if module.training and self.frozen is None:
            self.sample()

    def _masker(self, name, index, other, dim):
        def hook(module, args, output):
            if module.training and self.frozen is None and self.current is not None:
                mask = self.current[name]
            else:
                mask = self.eval_masks()[name]
            mask = mask.to(output.device, output.dtype)[index.to(output.device)]
            mask = torch.where(other.to(output.device), torch.ones_like(mask), mask)
            shape = [1] * output.dim()
            shape[dim] = -1
            return output * mask.view(shape)
        return hook


class MaskedMacs:
    """F(m): the MACs of the model with channel masks m, differentiable in m.

    Built from prunekit's per-module MACs (:func:`prunekit.measure.macs_by_module`) and the
    graph, as :class:`prunekit.plan.MacsEstimator`: a conv / linear layer's MACs times, for
    each of its channel dimensions, the kept share of its positions; here the share is the mean
    of the masks at those positions (1 for channels of other groups), so any model the graph
    handles works and a 0/1 mask gives exactly the MACs of the pruned model.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, example_inputs, names):
        base = macs_by_module(model, example_inputs)
        self.base_total = float(count_macs(model, example_inputs))
        self.other = self.base_total - float(sum(base.values()))
        self.names = list(names)
        slot, start = {}, 1  # slot 0: the constant 1
        for name in self.names:
            group = graph.by_name[name]
            for ci, root in enumerate(group.channels.tolist()):
                slot[int(root)] = start + ci
            start += group.size
        self.layers: list[tuple[float, list[torch.Tensor]]] = []
        dims: dict[str, list[torch.Tensor]] = {}
        for member, roots in graph.tensor_members():
            if member.tensor.endswith("weight") and member.role in ("out", "in") \
                    and member.module in base:
                index = [slot.get(int(r), 0) for r in roots.tolist()]
                if any(index):
                    dims.setdefault(member.module, []).append(torch.tensor(index))
        for module, macs in base.items():
            if module in dims:
                self.layers.append((float(macs), dims[module]))
            else:
                self.other += float(macs)

    def __call__(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([torch.ones(1)] + [masks[n].float().cpu() for n in self.names])
        total = torch.tensor(self.other)
        for macs, dims in self.layers:
            fraction = torch.ones(())
            for index in dims:
                fraction = fraction * flat[index].mean()
            total = total + macs * fraction
        return total

    def ratio(self, masks) -> torch.Tensor:
        """F(m) / F_base."""
        return self(masks) / self.base_total


def _feature_widths(model, points, example_inputs) -> list[int]:
    seen, handles = {}, []
    for name in points:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"KDFS feature point '{name}' is not a module of the model; "
                              "give module names (e.g. layer1) or [] to turn RC off") from None
        handles.append(module.register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out)))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    for name in points:
        if not (torch.is_tensor(seen.get(name)) and seen[name].dim() == 4):
            raise ConfigError(f"KDFS feature point '{name}' must output an N x C x H x W "
                              "tensor (RC's 1x1 decoder and attention map)")
    return [int(seen[name].shape[1]) for name in points]


def kdfs_plan(hook, counts: dict[str, int] | None = None,
              macs_fit: str = "argmax") -> dict[str, list[int]]:
    """Kept channels per gated group: argmax masks, or with ``counts`` the top-k of
    theta_1 - theta_0; at least one channel (the best) per group. ``macs_fit="threshold"``
    (no counts): one global threshold on theta_1 - theta_0 instead of 0, the one whose kept
    MACs come nearest the target (:func:`_threshold_plan`)."""
    if counts is None and macs_fit == "threshold":
        return _honour_requirements(hook.graph, _threshold_plan(hook))
    plan = {}
    for name in hook.names:
        theta = hook.gates.logits[name].detach()
        margin = theta[:, 1] - theta[:, 0]
        if counts is not None and name in counts:
            k = max(1, min(int(counts[name]), margin.numel()))
            kept = torch.argsort(margin, descending=True, stable=True)[:k]
        else:
            kept = torch.nonzero(margin > 0).flatten()
            if kept.numel() == 0:
                kept = margin.argmax().view(1)
        plan[name] = sorted(int(i) for i in kept)
    return _honour_requirements(hook.graph, plan)


def _threshold_plan(hook) -> dict[str, list[int]]:
    """Keep the j channels of largest margin theta_1 - theta_0 over all gated groups (each
    group's best always), j by bisection on the MACs model so the kept MACs come nearest r.
    The hard Gumbel sample is distributed as softmax(theta) whatever tau, so the MACs penalty
    drives the *expected* mask to r while argmax keeps every p > 1/2: until the logits
    saturate (long searches) argmax overshoots r (the code: 0.591 for r = 0.57)."""
    margins = {n: hook.gates.logits[n].detach() @ torch.tensor([-1.0, 1.0]) for n in hook.names}
    best = {n: int(m.argmax()) for n, m in margins.items()}
    order = sorted(((float(m[i]), n, i) for n, m in margins.items() for i in range(m.numel())
                    if i != best[n]), reverse=True)

    def masks(j: int) -> dict[str, torch.Tensor]:
        out = {n: torch.zeros(m.numel()) for n, m in margins.items()}
        for n, i in best.items():
            out[n][i] = 1.0
        for _, n, i in order[:j]:
            out[n][i] = 1.0
        return out

    def kept(j: int) -> float:
        return float(hook.macs.ratio(masks(j)))

    lo, hi = 0, len(order)  # kept(lo) <= r unless even lo is above; kept(hi) = 1
    if kept(lo) < hook.target:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if kept(mid) <= hook.target else (lo, mid)
        j = min((lo, hi), key=lambda k: abs(kept(k) - hook.target))
    else:
        j = lo
    return {n: [int(i) for i in torch.nonzero(m).flatten()] for n, m in masks(j).items()}


def _honour_requirements(graph, plan: dict[str, list[int]]) -> dict[str, list[int]]:
    """Keep a channel whose values a kept channel carries (a zero-padding shortcut between
    gated streams, ``graph.requirements``); with such shortcuts and ``streams=True`` the
    compact model then keeps a channel its mask had dropped."""
    kept = {n: set(v) for n, v in plan.items()}
    changed = True
    while changed:
        changed = False
        for (ga, ca), (gb, cb) in getattr(graph, "requirements", ()):
            a, b = graph.groups[ga].name, graph.groups[gb].name
            if a in kept and ca not in kept[a] and cb in kept.get(b, {cb}):
                kept[a].add(ca)
                changed = True
    return {n: sorted(v) for n, v in kept.items()}
