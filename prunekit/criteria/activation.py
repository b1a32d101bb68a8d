"""Criteria computed from feature maps on calibration data: hrank, chip, apoz.

All three share one streaming pass (:func:`prunekit.criteria.calibration.run_calibration`):
every feature map a group's channels are consumed from (``group.feature_maps()``: after BN and
activation, and for a residual stream the block output after the add) is captured once per
batch, reduced at once to a per-image, per-channel statistic, summed, and dropped.

How a group with several feature maps is scored
-----------------------------------------------
A residual stream is seen at the stem output and at every block output, maps that may differ in
width (16, 32 and 64 channels on a CIFAR ResNet, whose option-A shortcuts pad the stream
stage by stage). Each map's channels are mapped to group channels through ``pos``; a channel's
score is then combined over the maps in which it appears: ``combine="mean"`` (default), ``"sum"``,
``"first"`` or ``"last"`` (the first / last such map in graph order). Because every map carries
the same channel set in the same positions, the whole stream keeps one channel set.

The CHIP and HRank reference code do otherwise: they score each block's conv2 on its own block
output and keep a different channel set per block, although the identity shortcut adds the
tensors position by position, so after pruning channel k of the block input and channel k of
conv2's output come from different original channels (methods.md §1.6, pitfall 2). prunekit
deliberately does not reproduce that misalignment.

Maps that are not 4-D are skipped by hrank and chip, which need an H x W (or C x HW) matrix per
image; apoz uses them (a neuron of a ``[B, C]`` map is "zero" on an image when its value is 0).
One rule for all three: when the consumed map is a pooled / flattened / dropped-out view of a
4-D map with the same channels (``relu -> maxpool -> conv`` in a VGG, ``relu -> avgpool ->
flatten -> linear`` before a classifier), the 4-D map before the pooling is used instead: the
map the papers hook (HRank's and CHIP's ReLU modules, a ResNet's last block output). A group none of whose maps is usable falls back to
``l1`` with a warning; channels that appear in no usable map of a group that has some get the
group's highest score (kept), with a warning.

A feature map holding NaN/inf, or whose decomposition (hrank's rank, chip's spectra) fails,
raises :class:`~prunekit.criteria.base.ScoreError` naming the map, its groups and the batch.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ChannelGraph, ChannelGroup
from .base import (Criterion, ScoreError, check_choice, combine_scores, nonfinite_cause,
                   register_criterion, require_calibration)
from .calibration import check_max_batches, run_calibration
from .weight import L1Norm

MAP_COMBINE = ("mean", "sum", "first", "last")


class _MapStats:
    """Running per-channel sum of a per-image statistic of one map; ``result()``: the mean."""

    __slots__ = ("total", "images", "ndim")

    def __init__(self, ndim: int):
        self.total: torch.Tensor | None = None
        self.images = 0
        self.ndim = ndim

    def add(self, per_image: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        part = per_image.detach().double().sum(dim=0)
        self.total = part if self.total is None else self.total + part
        self.images += per_image.shape[0]

    def result(self) -> np.ndarray:
        return (self.total / self.images).cpu().numpy()


class ActivationCriterion(Criterion):
    """Base of the feature-map criteria; subclasses define :meth:`per_image`.

    Options common to all: ``combine`` (see the module docstring), ``max_batches`` (use at most
    that many calibration batches; None: all), ``device`` (run there; default the model's),
    ``progress`` (tqdm bar).
    """

    needs_data = True
    needs_labels = False  # True: per-image statistics accumulate with the batch's labels
    map_ndims: tuple[int, ...] = (4,)

    def __init__(self, combine: str = "mean", *, max_batches: int | None = None, device=None,
                 progress: bool = True):
        self.combine = check_choice(combine, MAP_COMBINE, "combine")
        self.max_batches = check_max_batches(max_batches)
        self.device = device
        self.progress = bool(progress)

    def options(self) -> dict:
        opts = {"combine": self.combine}
        if self.max_batches is not None:
            opts["max_batches"] = self.max_batches
        if self.device is not None:
            opts["device"] = self.device
        return opts

    # -- what a subclass defines -----------------------------------------------------------------
    def per_image(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` statistic of a feature map whose channels are on dim 1."""
        raise NotImplementedError

    def finish(self, mean: np.ndarray) -> np.ndarray:
        """Score (higher = kept) from :meth:`statistics`' ``result()`` (default: the mean)."""
        return mean

    def statistics(self, ndim: int):
        """A fresh accumulator of one map: ``add(per_image, labels)``, ``result()``."""
        return _MapStats(ndim)

    def checked_labels(self, targets, batch_size: int, index: int) -> torch.Tensor:
        """Batch ``index``'s labels as :meth:`statistics` takes them (``needs_labels``)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Called once before the calibration pass (e.g. to import what per_image needs)."""

    # -------------------------------------------------------------------------------------------
    def score_group(self, group, model):
        data = "labelled calibration data" if self.needs_labels else "calibration data"
        raise TypeError(f"'{self.name}' needs {data}; call score(graph, model, calibration)")

    def score(self, graph: ChannelGraph, model: nn.Module, calibration=None
              ) -> dict[str, np.ndarray]:
        require_calibration(self, calibration)
        groups = graph.prunable_groups()
        fx_nodes = {n.name: n for n in graph.traced.graph.nodes}
        order = {name: i for i, name in enumerate(fx_nodes)}
        maps: dict[str, list[tuple[str, np.ndarray, int]]] = {}
        for g in groups:
            found = [(node, pos, _channel_dim(g, node, model)) for node, pos in g.feature_maps()]
            maps[g.name] = sorted(found, key=lambda t: order.get(t[0], 0))
        channel_dim: dict[str, int] = {}
        width: dict[str, int] = {}
        sources: dict[str, list[str]] = {}
        for fm in maps.values():
            for node, pos, cdim in fm:
                channel_dim[node], width[node] = cdim, len(pos)
                sources[node] = _pooled_sources(fx_nodes, node, model)
        further: dict[str, list[str]] = {}  # sources preferred to a node when usable
        for node, chain in sources.items():
            further[node] = chain
            for k, src in enumerate(chain):
                channel_dim.setdefault(src, 1)
                width.setdefault(src, width[node])
                further.setdefault(src, chain[k + 1:])
        stats: dict[str, _MapStats] = {}
        skipped: dict[str, str] = {}
        groups_of: dict[str, list[str]] = {}
        for name, fm in maps.items():
            for node, _, _ in fm:
                for n in [node, *sources[node]]:
                    groups_of.setdefault(n, []).append(name)
        batch = [0]

        def consume(node: str, x, targets=None) -> None:
            if any(src in stats for src in further.get(node, ())):
                return  # a map before the pooling is used instead (computed earlier)
            if not isinstance(x, torch.Tensor):
                skipped[node] = f"output is a {type(x).__name__}"
                return
            cdim = channel_dim[node] % x.dim() if x.dim() else 0
            if x.dim() not in self.map_ndims or (x.dim() > 2 and cdim != 1):
                skipped[node] = f"{x.dim()}-D map"
                return
            if x.shape[cdim] != width[node]:
                skipped[node] = f"{x.shape[cdim]} channels, the graph expects {width[node]}"
                return
            per_image = self._checked_per_image(
                x, model, f"feature map '{node}' (group(s) {', '.join(groups_of.get(node, []))}) on "
                          f"calibration batch {batch[0]} (counting from 0)")
            labels = (self.checked_labels(targets, x.shape[0], batch[0]) if self.needs_labels
                      else None)
            stats.setdefault(node, self.statistics(x.dim())).add(per_image, labels)

        def on_batch(index: int) -> None:
            batch[0] = index

        if channel_dim:
            self.prepare()
            run_calibration(graph, model, calibration, channel_dim, consume,
                            max_batches=self.max_batches, device=self.device,
                            progress=self.progress, desc=self.name, on_batch=on_batch,
                            with_targets=self.needs_labels)
        means = {node: self.finish(st.result()) for node, st in stats.items()}

        def best(node: str, pos: np.ndarray) -> str | None:
            """The 4-D map before any pooling/flattening of the consumed map, else the consumed
            map itself if usable."""
            fits = [n for n in sources[node][::-1] + [node]
                    if n in stats and len(means[n]) == len(pos)]
            four_d = [n for n in fits if stats[n].ndim == 4]
            return (four_d or fits[-1:] or [None])[0]

        result = {}
        for g in groups:
            chosen = [(best(node, pos), pos) for node, pos, _ in maps[g.name]]
            parts = [(pos, means[n]) for n, pos in chosen if n is not None]
            scores = combine_scores(g.size, parts, self.combine, uncovered="max",
                                    where=f"{self.name}, group '{g.name}'")
            if scores is None:
                why = "; ".join(f"{n}: {skipped[n]}" for n, _, _ in maps[g.name] if n in skipped)
                warnings.warn(f"{self.name}: group '{g.name}' has no usable feature map"
                              f"{' (' + why + ')' if why else ''}; scoring it by l1",
                              stacklevel=2)
                scores = L1Norm().score_group(g, model)
            result[g.name] = scores
        return result

    def _checked_per_image(self, x: torch.Tensor, model: nn.Module, where: str) -> torch.Tensor:
        """per_image of a finite map; ScoreError naming ``where`` for NaN/inf or a failed
        decomposition (svd/eigh do not converge on such input, or on extreme values)."""
        if x.is_floating_point():
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise ScoreError(f"{self.name}: {where} holds {bad} NaN/inf value(s): "
                                 f"{nonfinite_cause(model)}")
        try:
            return self.per_image(x)
        except torch.linalg.LinAlgError as error:
            raise ScoreError(f"{self.name}: the decomposition of {where} failed ({error}); "
                             "check that the calibration data is finite and on the model's "
                             "usual scale, or score this model with a weight criterion "
                             "(e.g. l1)") from error


_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d,
                 nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout2d)
_POOL_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d,
                   F.max_pool2d, F.dropout, torch.mean}
_POOL_METHODS = {"flatten", "view", "reshape", "mean", "contiguous"}


def _pooled_sources(fx_nodes, name: str, model: nn.Module, limit: int = 4) -> list[str]:
    """The nodes a map is a pooled / flattened / dropped-out view of, nearest first. Whether
    one of them really carries the same channels is checked on the values (4-D, same count)."""
    chain = []
    node = fx_nodes.get(name)
    while node is not None and len(chain) < limit:
        if node.op == "call_module":
            try:
                passes = isinstance(model.get_submodule(node.target), _POOL_MODULES)
            except AttributeError:
                passes = False
        elif node.op == "call_function":
            passes = node.target in _POOL_FUNCTIONS
        elif node.op == "call_method":
            passes = node.target in _POOL_METHODS
        else:
            passes = False
        if not passes or not node.args or not isinstance(node.args[0], type(node)):
            break
        node = node.args[0]
        chain.append(node.name)
    return chain


def _channel_dim(group: ChannelGroup, node: str, model: nn.Module) -> int:
    """Channel dim of a feature map: last for a map a Linear consumes, else 1 (NCHW)."""
    for member, _ in group.members:
        if member.role == "in" and member.input_node == node and member.module:
            try:
                if isinstance(model.get_submodule(member.module), nn.Linear):
                    return -1
            except AttributeError:
                pass
            return 1
    return 1


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@register_criterion
class HRank(ActivationCriterion):
    """HRank (Lin et al., "HRank: Filter Pruning using High-Rank Feature Map", CVPR 2020, Eq. 3
    and 8): the average over images of the rank of each channel's H x W feature map,
    rank(O_j) averaged over the calibration images; low average rank = less information = pruned
    first.

    Ranks are ``torch.linalg.matrix_rank`` of all [B, C] maps of a batch at once, with torch's
    default tolerance: singular values above ``max(H, W) * eps(dtype) * sigma_max`` count
    (the deprecated ``torch.matrix_rank`` the HRank code calls used the same rule); maps are
    taken in their own dtype (half precision is promoted to float32). The paper's data: 5
    batches of 128 augmented training images (``--limit 5``), model in eval mode, maps after
    BN+ReLU (block outputs after the add) — what ``group.feature_maps()`` gives. Only 4-D maps
    are used; see the module docstring for residual streams (``combine``).
    """

    name = "hrank"
    map_ndims = (4,)

    def per_image(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_rank(_as_float(x))


@register_criterion
class CHIP(ActivationCriterion):
    """CHIP (Sui et al., "CHIP: CHannel Independence-based Pruning for Compact Neural Networks",
    NeurIPS 2021, Eq. 3 and Algorithm 1): channel independence
    CI(i) = ||A||_* - ||A with row i removed||_* of each image's [C, H*W] feature-map matrix
    A (nuclear norms), averaged over images; low CI = the channel is well explained by the
    others = pruned first.

    Per batch the [B, C, H*W] map goes to ``prunekit.criteria.nuclear.channel_independence``
    (``method``, ``dtype`` and ``ci_options`` are passed on to it when given; by default it
    picks its fast exact method and computes in float64) and the [B, C] result is summed; the
    score is the mean over all calibration images (the reference code averages per batch and
    then over its 5 equal batches: the same number).

    Paper defaults: ``calibration`` should be 5 batches of 128 images (640) of the *training*
    set with *training augmentation* (random crop + flip; the reference code draws them from its
    shuffled train loader), the model in eval mode (the runner sets it), maps after BN+ReLU
    and, for a residual stream, after the add (``group.feature_maps()``).
    ``round_decimals=4`` reproduces the reference code's ``np.round(features, 4)`` before the
    SVDs, in the maps' own precision as numpy does (default None: no rounding). ``dtype``
    (``torch.float32`` or ``"float32"``, ...): the compute dtype of ``channel_independence``
    (default: its own, float64). ``ci_options``: further keyword arguments for it (e.g.
    ``{"factorization": "svd", "chunk_elements": 2**20}``). Only 4-D maps are used; see
    the module docstring for how a residual stream's maps are combined (``combine``) and why the
    reference code's per-block channel sets are not reproduced.
    """

    name = "chip"
    map_ndims = (4,)

    def __init__(self, combine: str = "mean", *, round_decimals: int | None = None,
                 method: str | None = None, dtype: torch.dtype | None = None,
                 ci_options: dict | None = None, max_batches: int | None = None, device=None, progress: bool = True):
        super().__init__(combine, max_batches=max_batches, device=device, progress=progress)
        if round_decimals is not None and (isinstance(round_decimals, bool)
                                           or not isinstance(round_decimals, int)):
            raise ValueError(f"round_decimals must be an int or None, got {round_decimals!r}")
        if method is not None and not isinstance(method, str):
            raise ValueError(f"method must be a string or None, got {method!r}")
        if isinstance(dtype, str):  # "float64" / "torch.float64" from a recipe
            dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
        if dtype is not None and (not isinstance(dtype, torch.dtype)
                                  or not dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if ci_options is not None and not isinstance(ci_options, dict):
            raise ValueError(f"ci_options must be a dict or None, got {ci_options!r}")
        self.round_decimals = round_decimals
        self.method = method
        self.dtype = dtype
        self.ci_options = dict(ci_options or {})
        self._ci = None

    def options(self) -> dict:
        opts = super().options()
        for key in ("round_decimals", "method", "dtype"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        if self.ci_options:
            opts["ci_options"] = self.ci_options
        return opts

    def prepare(self) -> None:
        from .nuclear import channel_independence  # lazy: written alongside this module
        self._ci = channel_independence

    def per_image(self, x: torch.Tensor) -> torch.Tensor:
        if self._ci is None:
            self.prepare()
        features = _as_float(x.reshape(x.shape[0], x.shape[1], -1))
        if self.round_decimals is not None:
            features = torch.round(features, decimals=self.round_decimals)
        kwargs = dict(self.ci_options)
        if self.method is not None:
            kwargs["method"] = self.method
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        return self._ci(features, **kwargs)


@register_criterion
class APoZ(ActivationCriterion):
    """Average Percentage of Zeros (Hu et al., "Network Trimming: A Data-Driven Neuron Pruning
    Approach towards Efficient Deep Architectures", arXiv 1607.03250, 2016, Eq. 1):
    APoZ_c = sum_k sum_j [O_c,j(k) = 0] / (N * M) over N images and the M positions of channel
    c's post-activation map. Channels with many zeros are pruned first, so the score is
    -APoZ. Uses 4-D maps and 2-D ``[B, C]`` maps (fully connected neurons, as in the paper);
    the pre-classifier map of a CIFAR ResNet is pooled, so a zero there means the channel was
    zero over the whole image.
    """

    name = "apoz"
    map_ndims = (2, 3, 4, 5)

    def per_image(self, x: torch.Tensor) -> torch.Tensor:
        zeros = (x == 0)
        if x.dim() == 2:
            return zeros.double()
        zeros = zeros.flatten(2)
        return zeros.sum(dim=2, dtype=torch.float64) / zeros.shape[2]

    def finish(self, mean: np.ndarray) -> np.ndarray:
        return -mean
