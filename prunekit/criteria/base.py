"""The criterion interface, the registry of criteria by name, and the one place that makes
sure every criterion's scores are finite (:class:`ScoreError`)."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, PrunekitError
from ..graph import ChannelGraph, ChannelGroup
from ..measure.evaluation import first_nonfinite

CRITERIA: dict[str, type["Criterion"]] = {}


class ScoreError(PrunekitError, ValueError):
    """A criterion cannot give every channel a finite score: NaN/inf in the weights, the
    calibration data or the model's feature maps, or a decomposition that failed."""


def register_criterion(cls):
    """Class decorator: make ``cls`` available by its ``name``. Its ``score`` is checked
    like every :class:`Criterion`'s (see :func:`checked_score`)."""
    if not issubclass(cls, Criterion) and "score" in vars(cls):
        cls.score = checked_score(vars(cls)["score"])
    CRITERIA[cls.name] = cls
    return cls


def list_criteria() -> list[str]:
    """The registered criterion names, sorted."""
    return sorted(CRITERIA)


def layers_of(group: ChannelGroup) -> str:
    """The modules producing ``group``'s channels, for messages (the group name if none)."""
    names = sorted({m.module for m, _ in group.producers() if m.module})
    return ", ".join(names) or group.name


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def nonfinite_cause(model: nn.Module) -> str:
    """Why a data-driven statistic of ``model`` is not finite, as far as can be told."""
    found = first_nonfinite(model)
    if found is not None:
        return (f"the model's tensor '{found[0]}' holds {found[1]} NaN/inf value(s); load "
                "finite weights")
    return ("the weights and calibration inputs are finite, so the forward pass overflows "
            "(inputs far outside the range the model was trained on?); check the calibration "
            "data's scale and normalisation")


def check_finite_weights(criterion, graph: ChannelGraph, model: nn.Module) -> None:
    """ScoreError naming the first tensor of a prunable group (weights, biases, norm
    parameters and statistics, consumers' weights) that holds NaN/inf."""
    tensors = _tensors(model)
    seen: set[str] = set()
    groups = graph.prunable_groups()
    # a layer's own group first: conv2.weight is named with group conv2, not as conv1's consumer
    members = [(m, g) for consumers in (False, True) for g in groups for m, _ in g.members
               if (m.role == "in") == consumers]
    for member, group in members:
        tensor = tensors.get(member.tensor)
        if tensor is None or member.tensor in seen or not tensor.is_floating_point():
            continue
        seen.add(member.tensor)
        bad = int((~torch.isfinite(tensor.detach())).sum())
        if bad:
            raise ScoreError(
                f"criterion '{criterion.name}': '{member.tensor}' (layer "
                f"'{member.module or member.tensor}', group '{group.name}') holds {bad} "
                f"NaN/inf value(s) of {tensor.numel()}, so no score computed from this model "
                "means anything. Load finite weights (a training that diverged writes such "
                "weights) before scoring or pruning")


def check_finite_scores(criterion, graph: ChannelGraph, model: nn.Module, scores) -> None:
    """ScoreError naming the first group whose scores are not all finite, with the likely
    cause (a non-finite model tensor, else the calibration data or the feature maps)."""
    for name, values in scores.items():
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().double().numpy()
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            continue  # not numbers: another check's business
        bad = int((~np.isfinite(values)).sum())
        if not bad:
            continue
        group = graph.by_name.get(name)
        layer = layers_of(group) if group is not None else name
        if getattr(criterion, "needs_data", False) or first_nonfinite(model) is not None:
            cause = nonfinite_cause(model)
        else:
            cause = "the weights are finite, so the criterion itself failed (please report it)"
        raise ScoreError(f"criterion '{criterion.name}': {bad} of {values.size} scores of "
                         f"group '{name}' (layer {layer}) are not finite (NaN/inf): {cause}")


def checked_score(score):
    """Wrap a ``score(self, graph, model, calibration=None)`` method so that it refuses a
    model with non-finite group tensors before scoring and non-finite scores after it.
    Applied to every :class:`Criterion` subclass that defines ``score``, so criteria written
    later are checked too."""
    if getattr(score, "_checks_finite", False):
        return score

    @functools.wraps(score)
    def score_checked(self, graph, model, calibration=None, *args, **kwargs):
        check_finite_weights(self, graph, model)
        scores = score(self, graph, model, calibration, *args, **kwargs)
        check_finite_scores(self, graph, model, scores)
        return scores

    score_checked._checks_finite = True
    return score_checked


class Criterion:
    """Scores every channel of every prunable group; higher = more important.

    Every criterion is called as ``score(graph, model, calibration=None)``. Criteria with
    ``needs_data = True`` need ``calibration`` (an iterable of batches, see
    :mod:`prunekit.criteria.calibration`) and raise ``ValueError`` without it
    (:func:`require_calibration`); weight criteria ignore it.
    """

    name = "base"
    needs_data = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "score" in vars(cls):
            cls.score = checked_score(vars(cls)["score"])

    def score(self, graph: ChannelGraph, model: nn.Module,
              calibration=None) -> dict[str, np.ndarray]:
        """``{group name: scores}``; raises :class:`ScoreError` when the group tensors or
        the scores are not finite (every subclass's ``score`` is checked the same way)."""
        return {g.name: self.score_group(g, model) for g in graph.prunable_groups()}

    def score_group(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        raise NotImplementedError

    def options(self) -> dict:
        """The constructor options of this instance (shown by ``repr``)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


Criterion.score = checked_score(Criterion.score)


def get_criterion(criterion, **kwargs) -> Criterion:
    """A criterion instance from a name, a class or an instance."""
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, type) and issubclass(criterion, Criterion):
        return criterion(**kwargs)
    if isinstance(criterion, str) and criterion in CRITERIA:
        return CRITERIA[criterion](**kwargs)
    raise ConfigError(f"unknown criterion {criterion!r}; available: {', '.join(sorted(CRITERIA))}")


def require_calibration(criterion: Criterion, calibration):
    """``calibration`` unchanged, or a ValueError saying what a data criterion needs."""
    if calibration is None:
        raise ConfigError(f"criterion '{criterion.name}' needs calibration data: call "
                         f"score(graph, model, calibration) / prune(..., calibration=batches) "
                         "with an iterable of input batches or (inputs, targets) batches")
    return calibration


def check_choice(value, choices, what: str):
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def combine_scores(size: int, parts, mode: str, *, uncovered: str | float = "max",
                   where: str = "") -> np.ndarray | None:
    """One score per group channel from several partial score vectors.

    ``parts`` yields ``(pos, values)``: ``values[p]`` scores group channel ``pos[p]`` (``-1``:
    a position of another group, ignored), one part per layer or feature map, in graph order.
    ``mode``: ``"sum"``, ``"mean"`` (over the parts in which the channel appears), ``"max"``,
    ``"first"`` / ``"last"`` (the first / last part in which it appears).
    Channels no part covers get ``uncovered``: a number, or ``"max"`` (the highest covered
    score, with a warning naming ``where``: keep what the criterion could not judge).
    Returns None when no part covers any channel.
    """
    total = np.zeros(size)
    count = np.zeros(size)
    high = np.full(size, -np.inf)
    first = np.full(size, np.nan)
    last = np.full(size, np.nan)
    for pos, values in parts:
        pos = np.asarray(pos)
        values = np.asarray(values, dtype=np.float64)
        mine = pos >= 0
        idx, vals = pos[mine], values[mine]
        np.add.at(total, idx, vals)
        np.add.at(count, idx, 1)
        np.maximum.at(high, idx, vals)
        fresh = np.isnan(first[idx])
        first[idx[fresh]] = vals[fresh]
        last[idx] = vals
    covered = count > 0
    if not covered.any():
        return None
    result = {"sum": total, "mean": total / np.maximum(count, 1), "max": high,
              "first": first, "last": last}[mode].copy()
    if not covered.all():
        if uncovered == "max":
            warnings.warn(f"{where}: {int((~covered).sum())} of {size} channels appear in no "
                          "scored layer/feature map; they get the highest score (kept first)",
                          stacklevel=3)
            result[~covered] = result[covered].max()
        else:
            result[~covered] = float(uncovered)
    return result
