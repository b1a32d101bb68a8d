"""Plan errors and the checks every target value passes before any work starts."""
from __future__ import annotations

import numbers

import numpy as np

from ..errors import PrunekitError

__all__ = ["PlanError", "check_ratio"]


class PlanError(PrunekitError, ValueError):
    """A plan or ratio that cannot be applied; the message says why and what to change."""


def check_ratio(ratio: float, what: str = "ratio") -> float:
    # numbers.Real covers numpy scalars (np.float32(0.5)); a bool is not a ratio.
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, (bool, np.bool_)) \
            or not 0 <= ratio < 1:
        removed = "MACs" if "macs" in what.replace("-", "_").lower() else "channels"
        raise PlanError(f"{what} must be a number in [0, 1) (the fraction of {removed} "
                        f"removed); got {ratio!r}")
    return float(ratio)
