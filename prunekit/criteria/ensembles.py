"""Linear filter ensembles: channel importance as the coefficients of a linear surrogate of the
network's performance over random channel masks: ``lfe``.

Sándor, Pável and Csató, "Pruning CNN's with linear filter ensembles", arXiv:2001.08142
(2020). The abstract (all that could be read; no code is published) defines the method: sample
filter masks ("filter ensembles"), measure the network's performance with the masked filters
disabled, rank the filters by a linear additive model of performance in the mask,

    perf(m) ~ beta_0 + sum_i beta_i m_i        (m_i = 1: channel i kept, 0: removed),

and remove the least important. Everything numeric is a documented guess of prunekit (see
../shared/research/related_methods_1.md §10, "unverified"), each an option:

* masks: every free channel of every prunable group kept independently with probability
  ``keep_probability`` (default 0.95: on prunekit's pretrained ResNet-56 the median masked
  loss on 256 training images is 3.0 at 0.95 and 5.0 at 0.9, against 0.57 unmasked, and the
  fitted ranking was more stable at 0.95); fixed channels are always kept;
* ``samples`` masks (default 256) evaluated on the calibration batches (a slice of the
  training set; the recipe uses 2 x 128 images);
* ``target="loss"`` (default: perf = -mean cross-entropy, smoother than accuracy on a small
  slice) or ``"accuracy"`` (perf = top-1 in [0, 1]);
* ``fit="global"`` (default): one regression with one coefficient per channel of every group,
  so scores are comparable across layers (a global plan may rank them together);
  ``"group"``: one regression per group on that group's bits (the other groups' effects are
  noise of mean zero, independent of the bits; fewer unknowns per solve);
* ``ridge`` (default 10): the centred least-squares problem
  (Xcᵀ Xc / M + ridge · p(1-p) I) beta = Xcᵀ yc / M, the intercept unpenalised; p(1-p) is the
  bits' variance, so a well-determined coefficient shrinks by about 1 / (1 + ridge), and a
  large ridge tends to the marginal estimator beta_i ∝ cov(m_i, perf) (how much better the
  masks that keep channel i do). ResNet-56 has ~1,100 prunable channels, more than a few
  hundred samples: the ridge makes the solution unique, and 10 gave the best held-out R^2 of
  0.1, 1, 10, 100 there (``fit_info["r2_heldout"]``). ``ridge=0``: ordinary least squares
  (minimum-norm when underdetermined);
* one shot (no iteration between sampling and pruning).

At the defaults the surrogate is weak on ResNet-56 (256 masks for 1,120 coefficients): the
held-out R^2 was ~0.04 and the rankings fitted on two disjoint halves of the masks agreed at
Spearman ~0.1 (the first stream's 16 channels: ~0.35-0.5). More ``samples`` buy better scores
at one masked evaluation each (~1.6 s for 256 images on one idle core).

Sign convention: the score of channel i is beta_i, the expected *gain* in performance from
keeping it (loss decrease or accuracy increase), so higher = more important, like every
prunekit criterion; a channel whose presence hurts gets a negative score and goes first. A
fixed channel gets its group's highest score. Masks come from ``numpy.random.default_rng(seed)``
and the masked model is evaluated without surgery (:mod:`prunekit.criteria.masked_eval`), so the scores
are deterministic for a seed on a given machine and the model is left bit-identical.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..graph import ChannelGraph, ChannelGroup
from .base import Criterion, ScoreError, check_choice, nonfinite_cause, register_criterion, \
    require_calibration
from .calibration import check_max_batches, moved_to
from .masked_eval import evaluate_masked, prepared_batches

LFE_TARGETS = ("loss", "accuracy")
LFE_FITS = ("global", "group")


def sample_masks(count: int, samples: int, keep_probability: float, seed: int) -> np.ndarray:
    """``samples x count`` 0/1 masks (float64), each bit 1 with ``keep_probability``."""
    rng = np.random.default_rng(seed)
    return (rng.random((samples, count)) < keep_probability).astype(np.float64)


def fit_additive(masks: np.ndarray, perf: np.ndarray, ridge: float,
                 bit_variance: float) -> tuple[float, np.ndarray]:
    """``(beta_0, beta)`` of perf ~ beta_0 + masks @ beta by centred (ridge) least squares;
    the ridge is ``ridge * bit_variance`` on the mean normal equations, not on beta_0."""
    mean_x = masks.mean(0)
    mean_y = float(perf.mean())
    xc = masks - mean_x
    yc = perf - mean_y
    if ridge == 0:
        beta = np.linalg.lstsq(xc, yc, rcond=None)[0]
    else:
        m = masks.shape[0]
        gram = xc.T @ xc / m + ridge * bit_variance * np.eye(masks.shape[1])
        beta = np.linalg.solve(gram, xc.T @ yc / m)
    return mean_y - float(mean_x @ beta), beta


def _number(value, name: str, condition: str, ok) -> float:
    """``value`` as a float, or a ConfigError saying it must be a number ``condition``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not np.isfinite(value) or not ok(value):
        raise ConfigError(f"lfe: {name} must be a number {condition}, got {value!r}")
    return float(value)


@register_criterion
class LinearFilterEnsembles(Criterion):
    """``lfe``: beta of a linear surrogate of performance over random channel masks (see the
    module docstring for the method, its guesses and the sign convention). Needs labelled
    ``(inputs, targets)`` calibration batches."""

    name = "lfe"
    needs_data = True
    needs_labels = True  # a loss or an accuracy: (inputs, targets) batches

    def __init__(self, samples: int = 256, keep_probability: float = 0.95, *,
                 target: str = "loss", fit: str = "global", ridge: float = 10.0, seed: int = 0,
                 loss_fn: Callable | None = None, max_batches: int | None = None, device=None,
                 progress: bool = True):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ConfigError(f"lfe: samples must be an int >= 2 (masks to evaluate), "
                              f"got {samples!r}")
        self.samples = samples
        self.keep_probability = _number(keep_probability, "keep_probability",
                                        "in (0, 1)", lambda p: 0 < p < 1)
        self.target = check_choice(target, LFE_TARGETS, "lfe target")
        self.fit = check_choice(fit, LFE_FITS, "lfe fit")
        self.ridge = _number(ridge, "ridge", ">= 0", lambda r: r >= 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"lfe: seed must be an int, got {seed!r}")
        self.seed = seed
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError("lfe: loss_fn must be callable(output, targets) -> batch-mean loss")
        self.loss_fn = loss_fn
        self.max_batches = check_max_batches(max_batches)
        self.device = device
        self.progress = bool(progress)
        # of the last score(): samples, coefficients, perf range, R^2 of the global fit in
        # sample and on the last fifth of the masks when fitted on the first four fifths
        self.fit_info: dict = {}

    def options(self) -> dict:
        opts = {"samples": self.samples, "keep_probability": self.keep_probability,
                "target": self.target, "fit": self.fit, "ridge": self.ridge, "seed": self.seed}
        for key in ("loss_fn", "max_batches", "device"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts

    def score_group(self, group, model):
        raise TypeError("'lfe' needs labelled calibration data; call "
                        "score(graph, model, calibration)")

    def score(self, graph: ChannelGraph, model: nn.Module, calibration=None
              ) -> dict[str, np.ndarray]:
        require_calibration(self, calibration)
        groups = graph.prunable_groups()
        free = [np.flatnonzero(~g.fixed) for g in groups]
        offsets = np.cumsum([0] + [len(f) for f in free])
        masks = sample_masks(int(offsets[-1]), self.samples, self.keep_probability, self.seed)
        perf = np.empty(self.samples)
        with moved_to(model, self.device) as dev:
            batches = prepared_batches(calibration, self.max_batches, dev, what=self.name)
            for s in tqdm(range(self.samples), desc=self.name, unit="mask", leave=False,
                          disable=not self.progress):
                plan = _plan_of(groups, free, offsets, masks[s])
                result = evaluate_masked(model, graph, plan, batches, loss_fn=self.loss_fn)
                perf[s] = -result["loss"] if self.target == "loss" else result["accuracy"]
                if not np.isfinite(perf[s]):
                    raise ScoreError(f"lfe: the {self.target} of sampled mask {s} is "
                                     f"{perf[s]:.4g}: {nonfinite_cause(model)}")
        betas = self._fit(masks, perf, offsets)
        return {g.name: _with_fixed(g, f, betas[offsets[k]:offsets[k + 1]])
                for k, (g, f) in enumerate(zip(groups, free))}

    def _fit(self, masks: np.ndarray, perf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        variance = self.keep_probability * (1 - self.keep_probability)
        if np.ptp(perf) == 0:
            warnings.warn(f"lfe: all {self.samples} sampled masks scored the same {self.target} "
                          f"({perf[0]:.4g}); every channel gets score 0. Use target='loss', "
                          "more calibration data or a lower keep_probability", stacklevel=3)
        r2 = r2_heldout = None
        if self.fit == "global":
            b0, betas = fit_additive(masks, perf, self.ridge, variance)
            r2 = _r2(perf, b0 + masks @ betas)
            cut = (4 * self.samples) // 5  # does the surrogate predict masks it has not seen?
            if self.samples - cut >= 5:
                b0_train, beta_train = fit_additive(masks[:cut], perf[:cut], self.ridge, variance)
                r2_heldout = _r2(perf[cut:], b0_train + masks[cut:] @ beta_train)
        else:
            betas = np.concatenate([fit_additive(masks[:, lo:hi], perf, self.ridge, variance)[1]
                                    for lo, hi in zip(offsets[:-1], offsets[1:])])
        self.fit_info = {"samples": self.samples, "coefficients": int(offsets[-1]),
                         "perf_min": float(perf.min()), "perf_max": float(perf.max()),
                         "r2_in_sample": r2, "r2_heldout": r2_heldout}
        return betas


def _r2(actual: np.ndarray, predicted: np.ndarray) -> float | None:
    total = float(((actual - actual.mean()) ** 2).sum())
    return None if total == 0 else 1 - float(((actual - predicted) ** 2).sum()) / total


def _plan_of(groups: list[ChannelGroup], free: list[np.ndarray], offsets: np.ndarray,
             bits: np.ndarray) -> dict[str, list[int]]:
    """{group: kept indices} of one mask, listing only the groups it removes channels from."""
    plan = {}
    for k, (group, positions) in enumerate(zip(groups, free)):
        mine = bits[offsets[k]:offsets[k + 1]]
        if mine.all():
            continue
        kept = np.union1d(np.flatnonzero(group.fixed), positions[mine > 0])
        plan[group.name] = kept.tolist()
    return plan


def _with_fixed(group: ChannelGroup, free: np.ndarray, beta: np.ndarray) -> np.ndarray:
    scores = np.zeros(group.size)
    scores[free] = beta
    if group.fixed.any():
        scores[group.fixed] = beta.max()
    return scores
