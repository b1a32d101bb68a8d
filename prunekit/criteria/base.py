"""The criterion interface and the registry of criteria by name."""
from __future__ import annotations

import warnings

import numpy as np
from torch import nn

from ..errors import ConfigError
from ..graph import ChannelGraph, ChannelGroup

CRITERIA: dict[str, type["Criterion"]] = {}


def register_criterion(cls):
    """Class decorator: make ``cls`` available by its ``name``."""
    CRITERIA[cls.name] = cls
    return cls


class Criterion:
    """Scores every channel of every prunable group; higher = more important.

    Every criterion is called as ``score(graph, model, calibration=None)``. Criteria with
    ``needs_data = True`` need ``calibration`` (an iterable of batches, see
    :mod:`prunekit.criteria.calibration`) and raise ``ValueError`` without it
    (:func:`require_calibration`); weight criteria ignore it.
    """

    name = "base"
    needs_data = False

    def score(self, graph: ChannelGraph, model: nn.Module,
              calibration=None) -> dict[str, np.ndarray]:
        return {g.name: self.score_group(g, model) for g in graph.prunable_groups()}

    def score_group(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        raise NotImplementedError

    def options(self) -> dict:
        """The constructor options of this instance (shown by ``repr``)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


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
