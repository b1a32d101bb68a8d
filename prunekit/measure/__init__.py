"""Cost and quality measurements: MACs, parameters, latency, accuracy.

* :mod:`.counting` -- MACs and parameters; its docstring states the counting conventions
  (read it before comparing numbers with papers).
* :mod:`.latency` -- timed forward passes per batch size.
* :mod:`.evaluation` -- accuracy and loss over a loader; batch-norm recalibration.
* :mod:`.comparison` -- before/after factors from two measurements.
* :mod:`.context` -- device, dtype, eval mode and example inputs shared by the above.
"""

from .comparison import speedup
from .context import eval_mode, resolve_device
from .counting import MAC_CONVENTIONS, count_macs, count_params, macs_by_module, profile
from .evaluation import NonFiniteWarning, evaluate, first_nonfinite, recalibrate_bn
from .latency import BatchLatency, LatencyResult, measure_latency

__all__ = [
    "count_macs",
    "count_params",
    "macs_by_module",
    "profile",
    "BatchLatency",
    "LatencyResult",
    "measure_latency",
    "evaluate",
    "first_nonfinite",
    "NonFiniteWarning",
    "recalibrate_bn",
    "resolve_device",
    "speedup",
    "eval_mode",
]
