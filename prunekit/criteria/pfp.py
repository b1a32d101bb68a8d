"""PFP, Provable Filter Pruning (Liebenwein, Baykal, Lang, Feldman, Rus, "Provable Filter
Pruning for Efficient Neural Networks", ICLR 2020, arXiv:1911.07412; code lucaslie/torchprune,
deterministic ``PFPNet``), as the reference code computes it (the paper's equation numbers
were not read: shared/research/related_methods_2.md section 3; ``base_sens_tracker.py``,
``pfp_allocator.py``, ``base_util.py``, ``experiment/util/data.py`` read at commit 14b392c).

Sensitivity of input channel c of a conv/linear layer l (the paper's empirical sensitivity,
in "in mode": dropping input channel c of l is what removes filter c of its producer). For one
input a (split into a+ and -a- as two points when it has negative entries, the stem's image),
W+ / W- the positive / negative parts of the weight (bias left out), z±_{i,p} = sum_j W±_{i,j}
a_{j,p} over the unfolded patch p (j = (c, u, v)), and |z| <= float32 eps counted as infinite:

    g_{i,j,p} = max(W+_{i,j} a_{j,p} / z+_{i,p},  W-_{i,j} a_{j,p} / z-_{i,p})   in [0, 1]
    s_c = max over images, filters i, kernel offsets (u, v) of channel c and patches p of g.

Since each weight is either positive or negative, max_p g = |W_{i,j}| max_p a_{j,p} r_{i,p}
with r = 1/|z| of the weight's sign (0 where z counts as infinite): the same numbers as the
reference's loop over filters, computed in chunks of at most ``chunk_elements`` products.

Allocation (``pfp_allocator.py``): per layer S_l = sum_c s_c, q_c = s_c / S_l,
alpha_l = 2 C ln(8 (P_l + 1) k_l / delta) (P_l patches, k_l = kh kw), S~_l = alpha_l S_l,
m_l(eps) = ceil(3 (6 + 2 eps) S~_l / eps^2) samples, kept = ceil(sum_c [1 - (1 - q_c)^m]) (the
expected number of unique channels among m draws), clipped to [1, C_l]; the deterministic
PFPNet keeps the top of s_c. One error level eps for every layer is found against a budget
(:mod:`prunekit.plan.error_level`: the target ``macs_reduction`` with ``allocation:
criterion``). The scores carry that one-parameter family as ``counts_at(eps)``.

prunekit's adaptations (documented guesses, not in the paper or the code):
1. a group read by several layers (a residual stream: every block's conv1, the classifier)
   scores each channel by the max of its s_c over those layers and keeps the max over them of
   the channels each layer's top-m_l(eps) holds of the group (residual streams only with
   ``streams="prune"``; by default they keep their width, as the reference's do physically);
2. channels are removed physically; the reference counts non-zero weights, so dropping a
   stream's columns in some consumers counts as compression there and PFP's paper sizes are
   not comparable with prunekit's on ResNets (less is removed here at the same eps);
3. the budget is prunekit's MACs counter, where the reference bisects a parameter count with a
   chain-of-layers estimate and an outer loop on the measured non-zero ratio; a group whose
   next channel alone overshoots the 1% tolerance is held (:mod:`prunekit.plan.error_level`).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..graph import ChannelGraph
from ..plan.error_level import ScoresWithLevels
from ..plan.streams import is_stream
from .base import (Criterion, ScoreError, check_choice, combine_scores, nonfinite_cause,
                   register_criterion, require_calibration)
from .calibration import check_max_batches, run_calibration
from .weight import L1Norm

__all__ = ["PFP", "input_sensitivity", "pfp_sample_size", "sample_size_from_etas",
           "unique_count", "sample_count"]

#: The reference's search interval for the error level eps (``_get_boundaries``).
EPS_RANGE = (1e-300, 1e150)
_Z_EPS = float(np.finfo(np.float32).eps)
#: How PFP's counts treat a residual stream (a group several layers produce).
STREAM_MODES = ("keep", "prune")


def _adapted(x: torch.Tensor) -> torch.Tensor:
    """The reference's ``_adapt_activations``: a signed input becomes two non-negative points,
    its positive part and its negated negative part (concatenated along the batch)."""
    if bool((x >= 0).all()):
        return x
    return torch.cat((x.clamp(min=0), (-x).clamp(min=0)))


def _inverse(z: torch.Tensor) -> torch.Tensor:
    """1/|z|, 0 where |z| <= float32 eps (the reference sets such z to inf)."""
    small = z.abs() <= _Z_EPS
    return torch.where(small, torch.zeros_like(z), 1.0 / z.abs().masked_fill(small, 1.0))


def input_sensitivity(x: torch.Tensor, weight: torch.Tensor, *, stride=1, padding=0,
                      dilation=1, chunk_elements: int = 2 ** 22) -> tuple[torch.Tensor, int]:
    """``(s, P)``: the sensitivity of each input channel of a layer with ``weight``
    (``[O, C, kh, kw]`` conv or ``[O, C]`` linear) on the input batch ``x``, max-reduced over
    the batch (see the module doc), and the number of patches P per image."""
    a = _adapted(x.float() if x.dtype not in (torch.float32, torch.float64) else x)
    w = weight.detach().to(a.dtype)
    if w.dim() == 2:
        cols = a.reshape(-1, a.shape[-1]).unsqueeze(-1)  # [N, C, 1]
        patches, kk = max(1, a[:1].numel() // a.shape[-1]), 1
    else:
        cols = F.unfold(a, w.shape[2:], dilation=dilation, padding=padding, stride=stride)
        patches, kk = cols.shape[-1], int(np.prod(w.shape[2:]))
    flat = w.reshape(w.shape[0], -1)  # [O, K], K = C * kk, channel-major like unfold
    w_pos, w_neg = flat.clamp(min=0), (-flat).clamp(min=0)
    r_pos = _inverse(torch.einsum("ok,nkp->nop", w_pos, cols))
    r_neg = _inverse(torch.einsum("ok,nkp->nop", w_neg, cols))
    n, k, p = cols.shape
    out = flat.shape[0]
    per_image = max(1, chunk_elements // max(1, k * p))
    images = min(n, per_image)
    filters = max(1, min(out, chunk_elements // max(1, images * k * p)))
    best = torch.zeros(k, dtype=a.dtype)
    for i in range(0, n, images):
        c = cols[i:i + images].unsqueeze(1)  # [b, 1, K, P]
        for o in range(0, out, filters):
            sl = slice(o, o + filters)
            m_pos = (c * r_pos[i:i + images, sl].unsqueeze(2)).amax(dim=(0, 3))  # [f, K]
            m_neg = (c * r_neg[i:i + images, sl].unsqueeze(2)).amax(dim=(0, 3))
            g = torch.maximum(w_pos[sl] * m_pos, w_neg[sl] * m_neg).amax(dim=0)
            best = torch.maximum(best, g)
    return best.reshape(-1, kk).amax(dim=1), patches


def sample_count(sensitivity: np.ndarray, eps, patches: int, kernel: int,
                 c_constant: float = 3.0, delta: float = 1e-16) -> np.ndarray:
    """m_l(eps) = ceil(3 (6 + 2 eps) alpha_l S_l / eps^2) with alpha_l = 2 C ln(8 (P_l + 1)
    k_l / delta) (at least 1, as the reference); float64, inf where it overflows."""
    total = float(np.sum(sensitivity))
    alpha = 2.0 * c_constant * math.log(8.0 * (patches + 1) * kernel / delta)
    eps = np.asarray(eps, dtype=np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        m = np.ceil(3.0 * (6.0 + 2.0 * eps) * (alpha * total) / eps ** 2)
    return np.where(m == 0, 1.0, m)


def unique_count(probabilities: np.ndarray, samples: float) -> int:
    """ceil(sum_c [1 - (1 - q_c)^m]): the expected number of distinct channels among
    ``samples`` draws from q (the reference's ``expected_unique``); exact at m = inf."""
    q = np.asarray(probabilities, dtype=np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        hit = -np.expm1(samples * np.log1p(-np.minimum(q, 1.0)))
    return int(math.ceil(float(np.sum(np.where(q > 0, hit, 0.0))) - 1e-9))


def sample_size_from_etas(etas, c_constant: float = 3.0, delta: float = 1e-16,
                          available: int | None = None) -> int:
    """|S| = ceil(C ln(8 eta* / delta')) with delta' = delta / eta, eta = sum of the layers'
    output sizes per image and eta* their max (``experiment/util/data.py``), capped at half of
    ``available`` (the validation images the reference draws S from) when given."""
    etas = [int(e) for e in etas]
    if not etas:
        raise ConfigError("the model has no conv or linear layer to size the sample S for")
    size = math.ceil(c_constant * math.log(8.0 * max(etas) / (delta / sum(etas))))
    return size if available is None else min(size, math.ceil(0.5 * available))


def pfp_sample_size(model: nn.Module, example_inputs, c_constant: float = 3.0,
                    delta: float = 1e-16, available: int | None = None) -> int:
    """The number of calibration images PFP's code uses for ``model`` (186 for the CIFAR
    ResNet-56): one forward of ``example_inputs`` measures every conv's C_out H W and every
    linear layer's out features (eta of each layer), then :func:`sample_size_from_etas`."""
    etas: dict[nn.Module, int] = {}

    def hook(module, inputs, output):
        size = output.shape[-1] if isinstance(module, nn.Linear) else output[0].numel()
        etas[module] = max(etas.get(module, 0), int(size))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return sample_size_from_etas(etas.values(), c_constant, delta, available)


def _positive(value, what: str, *, integer: bool = False, below_one: bool = False):
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) \
            or value <= 0 or (below_one and value >= 1):
        bound = "(0, 1)" if below_one else "> 0"
        raise ConfigError(f"pfp: {what} must be a {'whole ' if integer else ''}number "
                          f"{bound}; got {value!r}")
    return value


class _Layer:
    """One consumer layer: its sensitivities, patch/kernel sizes and its inputs' groups."""

    def __init__(self, name: str, sens: np.ndarray, patches: int, kernel: int):
        self.name, self.sens, self.patches, self.kernel = name, sens, patches, kernel
        total = sens.sum()
        self.probs = sens / total if total > 0 else None
        self.order = np.argsort(-sens, kind="stable")
        self.groups: dict[str, np.ndarray] = {}  # group -> cumulative channels of it in top-k

    def add_group(self, group: str, pos: np.ndarray) -> None:
        mine = (np.asarray(pos) >= 0)[self.order].astype(np.int64)
        self.groups[group] = np.concatenate([[0], np.cumsum(mine)])

    def kept(self, eps: float, c_constant: float, delta: float) -> int:
        """The layer's kept input channels at error level ``eps`` (all of them when every
        sensitivity is 0: nothing to judge by)."""
        size = len(self.sens)
        if self.probs is None:
            return size
        m = float(sample_count(self.sens, eps, self.patches, self.kernel, c_constant, delta))
        return min(size, max(1, unique_count(self.probs, m)))


@register_criterion
class PFP(Criterion):
    """PFP's deterministic input-channel sensitivities (see the module doc for the equations
    and the adaptations). Scores: per group the max over its consumer layers of s_c. The
    scores carry ``counts_at(eps)``, so the target ``macs_reduction`` with ``allocation:
    criterion`` finds PFP's one global error level; any other target just ranks by s_c.

    Options (the reference's defaults): ``c_constant`` 3 (C), ``delta`` 1e-16; ``chunk_elements``
    bounds the products held at once (memory, not results); ``max_batches``, ``device``,
    ``progress`` as the activation criteria. Data: |S| validation images,
    :func:`pfp_sample_size` (186 on the CIFAR ResNet-56), any batch size (every reduction is a
    max). Only ungrouped Conv2d/Linear consumers are scored; a group with none is scored by l1
    with a warning and keeps all its channels under ``allocation: criterion``. ``streams``:
    ``"keep"`` (default: a residual stream keeps its width, what the reference's ResNet ends up
    with physically: it only zeroes stream columns inside some consumers, which prunekit
    cannot express) or ``"prune"`` (the stream keeps the max over its readers, adaptation 1).
    Pretrained ResNet-56, 186 val images, 47% fewer MACs, test-lossless top-1 right after the
    cut / after BN re-estimation on 8 x 64 train images: keep (eps ~ 1780) 9.6 / 68.4%, prune
    (eps ~ 680, the stage-1 stream held at 11) 15.3 / 32.6%; scoring ~46 s on 1 core.
    """

    name = "pfp"
    needs_data = True

    def __init__(self, *, c_constant: float = 3.0, delta: float = 1e-16, streams: str = "keep",
                 chunk_elements: int = 2 ** 22, max_batches: int | None = None, device=None,
                 progress: bool = True):
        self.streams = check_choice(streams, STREAM_MODES, "pfp streams")
        self.c_constant = float(_positive(c_constant, "c_constant"))
        self.delta = float(_positive(delta, "delta", below_one=True))
        self.chunk_elements = _positive(chunk_elements, "chunk_elements", integer=True)
        self.max_batches = check_max_batches(max_batches)
        self.device = device
        self.progress = bool(progress)

    def options(self) -> dict:
        opts = {"c_constant": self.c_constant, "delta": self.delta}
        if self.streams != "keep":
            opts["streams"] = self.streams
        if self.max_batches is not None:
            opts["max_batches"] = self.max_batches
        return opts

    def score_group(self, group, model):
        raise TypeError("'pfp' needs calibration data; call score(graph, model, calibration)")

    @staticmethod
    def consumers(graph: ChannelGraph, model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        """{module name: (module, input node)} of the linear and ungrouped, zero-padded conv
        layers that read a prunable group's channels."""
        found = {}
        for group in graph.prunable_groups():
            for member, _ in group.members:
                if member.role != "in" or not member.module or not member.input_node \
                        or member.blocks != 1 or not member.tensor.endswith("weight"):
                    continue
                try:
                    module = model.get_submodule(member.module)
                except AttributeError:
                    continue
                if isinstance(module, nn.Linear) or (
                        isinstance(module, nn.Conv2d) and module.groups == 1
                        and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
                    found.setdefault(member.module, (module, member.input_node))
        return found

    def sensitivities(self, graph: ChannelGraph, model: nn.Module, calibration
                      ) -> dict[str, tuple[np.ndarray, int]]:
        """{consumer module: (s over its input channels, patches per image)}."""
        consumers = self.consumers(graph, model)
        by_node: dict[str, list[str]] = {}
        for name, (_, node) in consumers.items():
            by_node.setdefault(node, []).append(name)
        groups_of = {node: sorted({g.name for g in graph.prunable_groups() for m, _ in g.members
                                   if m.role == "in" and m.input_node == node}) for node in by_node}
        best: dict[str, torch.Tensor] = {}
        patches: dict[str, int] = {}
        batch = [0]

        def consume(node: str, x) -> None:
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                bad = int((~torch.isfinite(x)).sum())
                if bad:
                    raise ScoreError(f"pfp: feature map '{node}' (group(s) "
                                     f"{', '.join(groups_of[node])}) on calibration batch "
                                     f"{batch[0]} (counting from 0) holds {bad} NaN/inf "
                                     f"value(s): {nonfinite_cause(model)}")
            for name in by_node.get(node, ()):
                module = consumers[name][0]
                width = module.weight.shape[1]
                linear = isinstance(module, nn.Linear)
                if not isinstance(x, torch.Tensor) or x.dim() < 2 or (not linear and x.dim() != 4) \
                        or (x.shape[-1] if linear else x.shape[1]) != width:
                    continue  # not the layer's input as the graph recorded it
                conv = {} if linear else dict(stride=module.stride, padding=module.padding,
                                              dilation=module.dilation)
                s, patches[name] = input_sensitivity(x, module.weight, **conv,
                                                     chunk_elements=self.chunk_elements)
                best[name] = s if name not in best else torch.maximum(best[name], s)

        if by_node:
            run_calibration(graph, model, calibration, by_node, consume,
                            max_batches=self.max_batches, device=self.device,
                            progress=self.progress, desc=self.name,
                            on_batch=lambda index: batch.__setitem__(0, index))
        return {name: (best[name].double().cpu().numpy(), patches[name]) for name in best}

    def score(self, graph: ChannelGraph, model: nn.Module, calibration=None):
        """Scores and the ``counts_at(eps)`` family (see the class doc)."""
        require_calibration(self, calibration)
        found = self.sensitivities(graph, model, calibration)
        layers: dict[str, _Layer] = {}
        for name, (sens, patches) in found.items():
            weight = model.get_submodule(name).weight
            layers[name] = _Layer(name, sens, patches, int(np.prod(weight.shape[2:])))
        scores, decided = {}, []
        for group in graph.prunable_groups():
            parts = []
            for member, pos in group.members:
                layer = layers.get(member.module) if member.role == "in" else None
                if layer is not None and member.tensor.endswith("weight") \
                        and len(pos) == len(layer.sens) and member.blocks == 1:
                    parts.append((pos, layer.sens))
                    layer.add_group(group.name, pos)
            values = combine_scores(group.size, parts, "max", uncovered="max",
                                    where=f"pfp, group '{group.name}'")
            if values is None:
                warnings.warn(f"pfp: group '{group.name}' is read by no conv/linear layer PFP "
                              "can score; scoring it by l1 (all its channels kept under "
                              "allocation 'criterion')", stacklevel=2)
                values = L1Norm().score_group(group, model)
            elif self.streams == "prune" or not is_stream(group):
                decided.append(group)
            scores[group.name] = values
        c_constant, delta = self.c_constant, self.delta

        def counts_at(eps: float) -> dict[str, int]:
            counts = {}
            for layer in layers.values():
                top = layer.kept(eps, c_constant, delta)
                for group, cumulative in layer.groups.items():
                    counts[group] = max(counts.get(group, 1), int(cumulative[top]))
            return {g.name: min(g.size, counts.get(g.name, g.size)) for g in decided}

        return ScoresWithLevels(scores, counts_at, EPS_RANGE, criterion=self.name)
