"""EPruner: the exemplar filters affinity propagation finds in each layer are kept (Lin et al.,
"Network Pruning using Adaptive Exemplar Filters", IEEE TNNLS 33(12), 2022, arXiv:2101.07985;
code lmbxmu/EPruner, ``utils/common.py: cluster_weight``).

Affinity propagation (Frey & Dueck, Science 2007) is implemented here in NumPy, message for
message as scikit-learn's ``affinity_propagation`` (which the reference calls), so no new
dependency: responsibilities r(i,k) = s(i,k) - max_{k' != k} [a(i,k') + s(i,k')], availabilities
a(i,k) = min(0, r(k,k) + sum_{i' not in {i,k}} max(0, r(i',k))), a(k,k) = sum_{i' != k}
max(0, r(i',k)), both damped; exemplars are the k with r(k,k) + a(k,k) > 0.
"""
from __future__ import annotations

import warnings
from fnmatch import fnmatchcase

import numpy as np
from torch import nn

from ..errors import ConfigError
from ..graph import ChannelGraph, ChannelGroup
from ..plan.criterion_counts import ScoresWithCounts
from .base import Criterion, check_choice, register_criterion

__all__ = ["EPruner", "STREAM_MODES", "affinity_propagation", "exemplar_filters",
           "negative_squared_distances"]

#: How EPruner treats a group several convolutions produce (a residual stream).
STREAM_MODES = ("spare", "concat")


def negative_squared_distances(rows: np.ndarray) -> np.ndarray:
    """S_ij = -||a_i - a_j||^2 of the rows, in float64, exactly 0 on the diagonal (sklearn's
    ``-euclidean_distances(A, squared=True)``)."""
    rows = np.asarray(rows, dtype=np.float64)
    sq = np.einsum("ij,ij->i", rows, rows)
    dist = sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return -dist


def affinity_propagation(similarity: np.ndarray, preference, *, damping: float = 0.5,
                         max_iter: int = 200, convergence_iter: int = 15, seed: int = 0):
    """``(exemplar indices, labels, converged)`` of affinity propagation on ``similarity``.

    The steps of scikit-learn's ``affinity_propagation``: ``preference`` (a number or one per
    point) on the diagonal; tiny noise (eps * S + 100 * tiny) * N(0, 1) from
    ``RandomState(seed)`` to break ties; damped parallel updates; stop when the exemplar set
    has not changed for ``convergence_iter`` iterations (and is not empty), else after
    ``max_iter``; then each cluster's exemplar is refined to the member with the largest
    similarity sum. Not converging warns and returns the last iteration's exemplars; no
    exemplar at all returns none. Checked against sklearn 1.9.1 with ``random_state=0``
    (tests/test_epruner.py). The reference pins sklearn 0.20.1, which was not read: an early
    sklearn source read hard-codes ``RandomState(0)`` and treats non-convergence the same way,
    so seed 0 is the default; that 0.20.1 does so too is unverified.
    """
    S = np.array(similarity, dtype=np.float64)
    n = S.shape[0]
    if S.ndim != 2 or S.shape[1] != n:
        raise ValueError(f"similarity must be a square matrix, got shape {S.shape}")
    pref = np.broadcast_to(np.asarray(preference, dtype=np.float64), (n,)).copy()
    if n == 1:
        return np.array([0]), np.array([0]), True
    off = ~np.eye(n, dtype=bool)
    if np.all(pref == pref[0]) and np.all(S[off] == S[off][0]):
        # sklearn: nothing to choose; every point or the first one, by the preference
        if pref[0] > S[0, n - 1]:
            return np.arange(n), np.arange(n), True
        return np.array([0]), np.zeros(n, dtype=np.int64), True
    S[np.diag_indices(n)] = pref
    rng = np.random.RandomState(seed)
    S += (np.finfo(np.double).eps * S + np.finfo(np.double).tiny * 100) * rng.randn(n, n)

    A, R = np.zeros((n, n)), np.zeros((n, n))
    history = np.zeros((n, convergence_iter), dtype=bool)
    rows = np.arange(n)
    converged = False
    for it in range(max_iter):
        AS = A + S
        best = np.argmax(AS, axis=1)
        first = AS[rows, best]
        AS[rows, best] = -np.inf
        second = np.max(AS, axis=1)
        R_new = S - first[:, None]
        R_new[rows, best] = S[rows, best] - second
        R = damping * R + (1 - damping) * R_new

        Rp = np.maximum(R, 0)
        Rp[rows, rows] = R[rows, rows]
        A_new = Rp.sum(axis=0)[None, :] - Rp
        self_avail = A_new[rows, rows].copy()
        A_new = np.minimum(A_new, 0)
        A_new[rows, rows] = self_avail
        A = damping * A + (1 - damping) * A_new

        E = (A[rows, rows] + R[rows, rows]) > 0
        history[:, it % convergence_iter] = E
        if it >= convergence_iter:
            stable = history.sum(axis=1)
            if np.all((stable == convergence_iter) | (stable == 0)) and E.any():
                converged = True
                break
    exemplars = np.flatnonzero(E)
    if not converged:
        warnings.warn(f"affinity propagation did not converge in {max_iter} iterations; "
                      f"using the last iteration's {exemplars.size} exemplars", stacklevel=2)
    if exemplars.size == 0:
        return exemplars, np.full(n, -1), converged
    cluster = np.argmax(S[:, exemplars], axis=1)
    cluster[exemplars] = np.arange(exemplars.size)
    for k in range(exemplars.size):
        members = np.flatnonzero(cluster == k)
        exemplars[k] = members[np.argmax(S[np.ix_(members, members)].sum(axis=0))]
    cluster = np.argmax(S[:, exemplars], axis=1)
    cluster[exemplars] = np.arange(exemplars.size)
    centres = np.unique(exemplars[cluster])
    return centres, np.searchsorted(centres, exemplars[cluster]), converged


def exemplar_filters(rows: np.ndarray, beta: float, **options):
    """The reference's ``cluster_weight``: similarities of the flattened filters, preference
    p_k = beta * median_i S_ik (a vector; the zero diagonal counts in the median), then
    :func:`affinity_propagation`. Returns ``(exemplars, labels, similarity)``."""
    S = negative_squared_distances(rows)
    exemplars, labels, _ = affinity_propagation(S, beta * np.median(S, axis=0), **options)
    return exemplars, labels, S


def _number(value, what: str, *, low: float, high: float = np.inf, low_open: bool = True,
            high_open: bool = False, integer: bool = False):
    kind = (int,) if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{what} must be {'a whole number' if integer else 'a number'} in "
                          f"{lo}{low}, {high}{hi}; got {value!r}")
    return value


@register_criterion
class EPruner(Criterion):
    """EPruner (Lin et al., TNNLS 2022), as the code's ``cluster_weight`` computes it (the
    paper's equation numbers were not read; shared/research/related_methods_1.md section 7):
    per layer, affinity propagation on the flattened filters A (n x c*k*k) with
    S_ij = -||a_i - a_j||^2 and preference p = beta * median(S, axis 0); the exemplars are
    kept, so the layer's kept count is the number of exemplars (use the target
    ``counts_from: criterion``). A larger ``beta`` (a more negative preference) gives fewer
    exemplars. On prunekit's pretrained ResNet-56, beta 0.52 removes 47.2% of the MACs and the
    paper's 0.76 removes 91.4% (the paper reports 61.3% on its own checkpoint).

    Options, with the reference's defaults (sklearn's for AP): ``beta`` 0.75 (the code's
    ``--preference_beta``; the README's ResNet-56 run uses 0.76), ``damping`` 0.5,
    ``max_iter`` 200, ``convergence_iter`` 15, ``seed`` 0 (the tie-breaking noise).
    ``betas``: ``{group or producing-module name (fnmatch pattern): beta}`` over ``beta``,
    later keys winning, for the reference's hidden per-depth betas (``epruner_cifar.py``'s VGG
    uses 0.92 from the 9th conv on; ``epruner_imagenet.py`` one per ResNet depth).

    Which groups: those one convolution produces alone, every channel free (in a CIFAR
    ResNet-56 the first conv of each block, in a bottleneck conv1 and conv2, in a VGG every
    conv: what the reference clusters; an ImageNet ResNet's stem conv is such a group too, but
    the reference does not cluster it: ignore ``conv1`` to match). Groups with fixed
    channels, grouped/depthwise layers and linear layers are not clustered (the reference
    clusters 4-D conv weights only) and keep all their channels under ``counts_from:
    criterion``. Residual streams (several producing convs): ``streams="spare"`` (default, as
    the code: the stream keeps its width) or ``"concat"`` (prunekit's guess, not in the paper:
    one row per channel, the producers' filter rows concatenated, when every producer writes
    every channel).

    Scores (for a target that sets the counts itself, e.g. a MACs budget; prunekit's
    extension): exemplars 1 + (cluster size)/n, so they go last and big clusters' exemplars
    last of all; the other filters d/(2 d_max) in [0, 0.5], d the squared distance to their
    exemplar, so the filters their exemplar represents worst are kept first. Unclustered
    groups score 1 everywhere.

    Not reproduced: the reference resets the pruned layer's BN to its fresh initialisation
    before fine-tuning (``bn1.*`` skipped when copying; a post-surgery rewrite prunekit has no
    hook for yet); ``epruner_imagenet.py``'s per-depth beta tables are not shipped (``betas``
    can express them). Unverified: the reference runs sklearn 0.20.1 on float32 weights, so
    its similarities are float32 (and its tie-breaking noise then likely below float32
    resolution); here they are float64, so exemplars can differ where two filters are (nearly)
    equidistant. sklearn 1.9.1 on the float32 and the float64 weights of prunekit's pretrained
    ResNet-56 gives this class's exemplars in all 27 layers (beta 0.76).
    """

    name = "epruner"

    def __init__(self, beta: float = 0.75, *, betas: dict[str, float] | None = None,
                 streams: str = "spare", damping: float = 0.5, max_iter: int = 200,
                 convergence_iter: int = 15, seed: int = 0):
        self.beta = float(_number(beta, "beta (the preference factor)", low=0.0))
        if betas is not None and not isinstance(betas, dict):
            raise ConfigError(f"betas must map group or module names to betas, got {betas!r}")
        self.betas = {str(k): float(_number(v, f"beta for '{k}'", low=0.0))
                      for k, v in (betas or {}).items()}
        self.streams = check_choice(streams, STREAM_MODES, "streams")
        self.damping = float(_number(damping, "damping", low=0.5, high=1.0, low_open=False,
                                     high_open=True))
        self.max_iter = _number(max_iter, "max_iter", low=1, low_open=False, integer=True)
        self.convergence_iter = _number(convergence_iter, "convergence_iter", low=1,
                                        low_open=False, integer=True)
        self.seed = _number(seed, "seed", low=0, high=2**32 - 1, low_open=False, integer=True)

    def options(self) -> dict:
        opts = {"beta": self.beta, "betas": self.betas, "streams": self.streams,
                "damping": self.damping, "max_iter": self.max_iter,
                "convergence_iter": self.convergence_iter, "seed": self.seed}
        return {k: v for k, v in opts.items() if k != "betas" or v}

    def beta_for(self, group: ChannelGroup) -> float:
        """``beta``, or the last ``betas`` entry naming the group or a producing module."""
        beta = self.beta
        for key, value in self.betas.items():
            if self.names_group(group, key):
                beta = value
        return beta

    def _check_betas_match(self, graph: ChannelGraph) -> None:
        for key in self.betas:
            if not any(self.names_group(g, key) for g in graph.prunable_groups()):
                names = ", ".join(g.name for g in graph.prunable_groups())
                raise ConfigError(f"epruner betas: '{key}' names no prunable group or producing "
                                  f"module; prunable groups: {names}")

    @staticmethod
    def names_group(group: ChannelGroup, key: str) -> bool:
        """Whether the ``betas`` key ``key`` names ``group`` or one of its producing modules."""
        return fnmatchcase(group.name, key) or any(
            fnmatchcase(m.module, key) for m, _ in group.producers() if m.module)

    def filters_of(self, group: ChannelGroup, model: nn.Module) -> np.ndarray | None:
        """The flattened filters, one row per channel in channel order, when convolutions
        produce every channel of ``group`` (one conv, or several with ``streams="concat"``)
        and none is fixed or blocked; else None (the group is not clustered)."""
        if group.fixed.any() or group.blocks:
            return None
        weights = [(m, pos) for m, pos in group.producers() if m.tensor.endswith("weight")]
        if not weights or (len(weights) > 1 and self.streams == "spare"):
            return None
        parts = []
        for member, pos in weights:
            weight = model.get_parameter(member.tensor).detach()
            if weight.dim() < 3 or not np.array_equal(np.sort(pos), np.arange(group.size)):
                return None  # a linear layer, or a producer that writes only some channels
            rows = weight.movedim(member.dim, 0).reshape(weight.shape[member.dim], -1)
            ordered = np.empty(tuple(rows.shape), dtype=np.float64)
            ordered[pos] = rows.double().cpu().numpy()
            parts.append(ordered)
        return np.concatenate(parts, axis=1)

    def score(self, graph: ChannelGraph, model: nn.Module, calibration=None):
        """Scores as the class doc says, carrying each clustered group's exemplar count."""
        self._check_betas_match(graph)
        scores, counts = {}, {}
        for group in graph.prunable_groups():
            rows = self.filters_of(group, model)
            if rows is None:
                scores[group.name] = np.ones(group.size)
                continue
            scores[group.name], counts[group.name] = self.score_rows(
                rows, group.name, self.beta_for(group))
        return ScoresWithCounts(scores, counts, self.name)

    def score_rows(self, rows: np.ndarray, where: str = "",
                   beta: float | None = None) -> tuple[np.ndarray, int]:
        """(scores, number of exemplars) of one layer's flattened filters."""
        n = rows.shape[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exemplars, labels, S = exemplar_filters(
                rows, self.beta if beta is None else beta, damping=self.damping,
                max_iter=self.max_iter, convergence_iter=self.convergence_iter, seed=self.seed)
        for w in caught:
            warnings.warn(f"epruner, group '{where}': {w.message}", stacklevel=3)
        if exemplars.size == 0:
            warnings.warn(f"epruner, group '{where}': affinity propagation found no exemplar; "
                          "the group keeps all its channels", stacklevel=3)
            return np.ones(n), n
        centre = exemplars[labels]
        dist = -S[np.arange(n), centre]
        scores = dist / (2 * dist.max()) if dist.max() > 0 else np.zeros(n)
        sizes = np.bincount(labels, minlength=exemplars.size)
        scores[exemplars] = 1.0 + sizes / n
        return scores, int(exemplars.size)
