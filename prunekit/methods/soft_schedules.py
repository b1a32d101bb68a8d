"""The schedules of soft pruning over the epochs: ASFP's pruning rate, the decay factor of
masked filters (SRFP / GHFP, annealing decay) and GHFP's hard fraction.

Every function takes ``epoch`` = the epoch a mask is *used* in (prunekit computes the mask
used during epoch ``u`` at the end of epoch ``u - 1``, or before training for ``u = 0``) and
``epochs`` = E, the total training epochs. prunekit's rule holds for all of them: the last
epoch (``u >= E - 1``) trains under the final state (full target rate, decay factor 0, every
masked filter hard), so the mask ``finalize`` removes is one the network and its BN
statistics were trained with.

Sources are the implementation notes ../shared/research/related_methods_2.md (sections 1, 5
and 6); what they could not verify in the papers themselves is said below as "reconstructed".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ASFP_D", "ASFP_FITS", "ASFP_POINT", "DECAY_SCHEDULES", "HARD_FRACTIONS",
           "SOFT_SCHEDULES", "SoftSchedule", "asfp_xi",
           "asymptotic_rate", "check_asfp", "check_decay_start", "decay_factor",
           "hard_channels", "hard_fraction", "part_of_plan"]

#: ASFP's fraction of the epochs at which the rate reaches ``ASFP_POINT`` of the target.
ASFP_D = 1 / 8
ASFP_POINT = 3 / 4
#: "exact": the three-point fit (NNCF, FSDP); "approximate": k = -ln(1 - point) / (d E) (PGMPF,
#: Acxyle), prunekit's schedule before (with d = 1/4), both normalised to reach the target.
ASFP_FITS = ("exact", "approximate")
SOFT_SCHEDULES = ("constant", "asymptotic")
DECAY_SCHEDULES = ("none", "exponential", "anneal")
HARD_FRACTIONS = ("none", "cubic")
#: PGMPF's sigma: the exponential decay reaches ~sigma at the last epoch.
_SIGMA = 1e-5


# ---------------------------------------------------------------------------- ASFP's rate
def check_asfp(d: float, point: float) -> None:
    """``0 < d < 1``, ``0 < point < 1`` and ``point > d``: an exponential ``a e^(-k e) + b``
    through (0, 0), (d T, point), (T, 1) exists only when the middle point lies above the
    chord, i.e. ``point > d``."""
    for name, value in (("asfp_d", d), ("asfp_point", point)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 < value < 1:
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    if point <= d:
        raise ValueError(f"asfp_point ({point}) must exceed asfp_d ({d}): no rising "
                         "exponential reaches that fraction of the target so late")


def asfp_xi(d: float = ASFP_D, point: float = ASFP_POINT) -> float:
    """The root in (0, 1) of ``point * xi^(1/d) - xi + (1 - point) = 0``, i.e. of
    ``(xi - 1) / (xi^(1/d) - 1) = point`` with ``xi = exp(-k d T)``: 0.2500114 for ASFP's
    d = 1/8, point = 3/4 (related_methods_2.md 1.1; FSDP's numpy root gives the same).

    The polynomial is convex with f(0) = 1 - point > 0 and f(1) = 0, and f'(1) = point/d - 1 > 0,
    so its only root in (0, 1) lies left of the minimum ``(d / point)^(d / (1 - d))``: found by
    bisection there (NNCF's fsolve of the same system stalls for T = 99 and 199, the notes).
    """
    check_asfp(d, point)
    n = 1 / d
    f = lambda xi: point * xi ** n - xi + (1 - point)  # noqa: E731
    lo, hi = 0.0, (d / point) ** (1 / (n - 1))
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def asymptotic_rate(target: float, epoch: float, epochs: int, d: float = ASFP_D,
                    point: float = ASFP_POINT, fit: str = "exact") -> float:
    """ASFP (He et al., IEEE TCyb 2020, arXiv 1808.07471), the rate of epoch ``e``:
    ``P(e) = a exp(-k e) + b`` with ``P(0) = 0``, ``P(d T) = point * target`` and
    ``P(T) = target``, T = E - 1, i.e. ``target * (1 - xi^(e / (d T))) / (1 - xi^(1 / d))``
    with ``xi`` = :func:`asfp_xi` (``k = -ln(xi) / (d T)``, about ``8 ln 4 / (E - 1)`` for
    d = 1/8); ``target`` from epoch ``E - 1`` on.

    d = 1/8 and the 3/4 point: four independent implementations agree (related_methods_2.md
    1.1): Intel NNCF's ``ExponentialWithBiasPruningScheduler`` (cites arXiv 1808.07471,
    ``factor=0.125``), FSDP's ``cmpAsymptoticSchedule`` (cites ASFP, tau = 8), the GHFP
    author's PGMPF code (``D = 1/8``) and Acxyle's SFP re-implementation (``x3_percentile``
    0.125); the paper's own text was not read, and T = E - 1 is the choice of the two that fit
    the three points exactly.

    ``fit="approximate"``: ``k = -ln(1 - point) / (d E)`` (PGMPF's and Acxyle's constant,
    which reaches the point only roughly), normalised as above. prunekit's schedule before
    this fix was exactly ``d=0.25, fit="approximate"`` (``k = 4 ln 4 / E``); ``d=0.25`` with
    the exact fit differs from it by at most 0.0014 of the target for E = 200, 0.033 for
    E = 10 and 0.076 for E = 3.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    if fit not in ASFP_FITS:
        raise ValueError(f"unknown asfp_fit {fit!r}; valid: {', '.join(ASFP_FITS)}")
    if epoch >= epochs - 1:
        return float(target)
    if fit == "approximate":
        check_asfp(d, point)
        k = -math.log(1 - point) / (d * epochs)
        return float(target * (1 - math.exp(-k * max(epoch, 0)))
                     / (1 - math.exp(-k * (epochs - 1))))
    xi, span = asfp_xi(d, point), d * (epochs - 1)
    return float(target * (1 - xi ** (max(epoch, 0) / span)) / (1 - xi ** (1 / d)))


# ------------------------------------------------------------- decay of the masked filters
def check_decay_start(schedule: str, start: float | None) -> None:
    if schedule not in DECAY_SCHEDULES:
        raise ValueError(f"unknown decay {schedule!r}; valid: {', '.join(DECAY_SCHEDULES)}")
    if schedule == "none" and start is not None:
        raise ValueError("decay_start sets the first decay factor: give decay='exponential' "
                         "or 'anneal' too")
    if start is not None and (isinstance(start, bool) or not isinstance(start, (int, float))
                              or not 0 <= start <= 1):
        raise ValueError(f"decay_start must be a number in [0, 1], got {start!r}")


def decay_factor(schedule: str, epoch: int, epochs: int, start: float | None = None) -> float:
    """The factor alpha(u) the soft-masked filters are multiplied by when the mask used in
    epoch ``u`` is applied (their *current* weights, so it compounds while a filter stays
    masked); 0 is SFP's zeroing.

    * ``"none"``: 0 (SFP, ASFP, FPGM).
    * ``"exponential"`` (SRFP, Cai et al., ICPR 2020, arXiv 2010.09498; GHFP's soft part):
      ``alpha = a0 exp(-c (u - 1))`` with ``c = -ln(sigma / (a0 + 0.01 sigma)) / E``,
      sigma = 1e-5 (so alpha(E) ~ sigma), ``alpha(0) = a0`` and ``alpha = 0`` once
      ``u - 1 >= 0.9 E``; a0 = ``start``, default 0.5. Reconstructed from the first author's
      PGMPF code (``pruning_resnet_soft_hard.py``: ``mask_0_decay`` default 0.5, its main loop
      runs 0 and 1; the mask after epoch e uses ``exp(-c e)``), related_methods_2.md 5: the
      papers' own equations were not readable.
    * ``"anneal"`` (filter pruning via annealing decaying, Huang et al., Cluster Computing
      2025): ``alpha = a0 max(0, 1 - 2 (u - 1) / E)`` rounded to 4 decimals, zero from
      ``u - 1 >= E / 2`` on, ``alpha(0) = 0`` (the mask before training zeroes); a0 =
      ``start``, default 1. Reconstructed from an SFP fork of unconfirmed authorship
      (Jiawen-Huang-98/soft-filter-pruning ``pruning_cifar10_resnet_decay.py``, "linear
      annealing"; its Mask starts with decay_rate 0), related_methods_2.md 6.

    ``u >= E - 1`` gives 0 (module doc: the last epoch trains at the final state).
    """
    check_decay_start(schedule, start)
    if schedule == "none" or epoch >= epochs - 1:
        return 0.0
    if schedule == "exponential":
        a0 = 0.5 if start is None else float(start)
        if epoch >= 1 and epoch - 1 >= 0.9 * epochs:
            return 0.0
        rate = -math.log(_SIGMA / (a0 + 0.01 * _SIGMA)) / epochs
        return a0 * math.exp(-rate * max(epoch - 1, 0))
    a0 = 1.0 if start is None else float(start)
    if epoch <= 0:
        return 0.0
    return float(f"{a0 * max(0.0, 1 - 2 * (epoch - 1) / epochs):.4f}")


# ------------------------------------------------------------------- GHFP's hard fraction
def hard_fraction(schedule: str, epoch: int, epochs: int) -> float:
    """lambda(u), the fraction of a group's masked filters (its lowest-scoring ones) that are
    hard in the mask used in epoch ``u``: zeroed, gradients masked and momentum reset, so they
    stay exactly zero; the others are soft (they may regrow, and ``decay`` scales them).

    * ``"none"``: 0 (every masked filter soft).
    * ``"cubic"`` (GHFP, Cai, An, Xu, arXiv 2011.03170: "smoothly switch from SFP-based methods
      to HFP"): ``lambda = 1 - (1 - max(u, 1) / E)^3``, rising from ~3/E to 1. Reconstructed
      from the first author's PGMPF code (``soft_to_hard``: ``1 - (1 - (e + 1) / E)^3`` after
      epoch e, and the e = 0 value before training), related_methods_2.md 5; GHFP's own
      equation was not readable. The hard count is ``floor(lambda * masked)``.

    ``u >= E - 1`` gives 1 (module doc).
    """
    if schedule not in HARD_FRACTIONS:
        raise ValueError(f"unknown hard_fraction {schedule!r}; valid: "
                         f"{', '.join(HARD_FRACTIONS)}")
    if schedule == "none":
        return 0.0
    if epoch >= epochs - 1:
        return 1.0
    return 1 - (1 - max(epoch, 1) / epochs) ** 3


def hard_channels(plan: dict[str, list[int]], scores: dict, sizes: dict[str, int],
                  share: float) -> dict[str, list[int]]:
    """Per group of ``plan`` (kept channels), the hard ones: the ``floor(share * masked)``
    masked channels of lowest score (PGMPF: ``argsort(norm)[:int(N (1 - rate) lambda)]``;
    prunekit floors on its integer masked count), ties by index."""
    hard = {}
    for name, kept in plan.items():
        masked = sorted(set(range(sizes[name])) - set(kept))
        order = np.argsort(np.asarray(scores[name], dtype=np.float64)[masked], kind="stable")
        count = math.floor(share * len(masked) + 1e-9)
        if count:
            hard[name] = sorted(masked[i] for i in order[:count])
    return hard


def part_of_plan(plan: dict[str, list[int]], hard: dict[str, list[int]],
                 sizes: dict[str, int], *, hard_part: bool) -> dict[str, list[int]]:
    """A plan (kept channels) that removes only the hard (``hard_part``) or only the soft
    masked channels of ``plan``; groups removing nothing are left out."""
    out = {}
    for name, kept in plan.items():
        chosen = set(hard.get(name, ()))
        removed = chosen if hard_part else set(range(sizes[name])) - set(kept) - chosen
        if removed:
            out[name] = sorted(set(range(sizes[name])) - removed)
    return out


# ------------------------------------------------------------ the three, for one training
@dataclass
class SoftSchedule:
    """What :class:`prunekit.methods.SoftPruning` asks per epoch: the fraction of the target
    rate (``schedule``: ``"constant"`` or ``"asymptotic"`` with ``asfp_d``, ``asfp_point``,
    ``asfp_fit``), the decay factor of soft masks and the hard share. Checked on creation
    (ValueError naming the option); every schedule but constant / none needs ``epochs``."""

    schedule: str = "constant"
    epochs: int | None = None
    asfp_d: float = ASFP_D
    asfp_point: float = ASFP_POINT
    asfp_fit: str = "exact"
    decay: str = "none"
    decay_start: float | None = None
    hard_fraction: str = "none"

    def __post_init__(self) -> None:
        if self.schedule not in SOFT_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: "
                             f"{', '.join(SOFT_SCHEDULES)}")
        check_asfp(self.asfp_d, self.asfp_point)
        asymptotic_rate(1.0, 0, 1, fit=self.asfp_fit)  # names the valid fits
        check_decay_start(self.decay, self.decay_start)
        hard_fraction(self.hard_fraction, 0, 1)
        for name in ("schedule", "decay", "hard_fraction"):
            value = getattr(self, name)
            if value not in ("constant", "none") and (
                    isinstance(self.epochs, bool) or not isinstance(self.epochs, int)
                    or self.epochs < 1):
                raise ValueError(f"{name}={value!r} needs epochs=<total training epochs>")

    def fraction(self, epoch: float) -> float:
        if self.schedule == "constant":
            return 1.0
        return asymptotic_rate(1.0, epoch, self.epochs, self.asfp_d, self.asfp_point,
                               self.asfp_fit)

    def decay_factor(self, epoch: int) -> float:
        return 0.0 if self.decay == "none" else \
            decay_factor(self.decay, epoch, self.epochs, self.decay_start)

    def hard_share(self, epoch: int) -> float:
        return 0.0 if self.hard_fraction == "none" else \
            hard_fraction(self.hard_fraction, epoch, self.epochs)
