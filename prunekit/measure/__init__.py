"""Cost and quality measurements: MACs, parameters, latency, accuracy.

* :mod:`.counting` -- MACs and parameters; its docstring states the counting conventions
  (read it before comparing numbers with papers).
* :mod:`.reference_flops` -- FLOPs as SWP's reference code counts them (2 x MACs + BN + ...).
* :mod:`.latency` -- timed forward passes per batch size, with how they were measured.
* :mod:`.interleaved` -- several models timed in one interleaved run (before/after speed-ups).
* :mod:`.machine_load` -- the machine's load during a timing; when a figure is unreliable.
* :mod:`.evaluation` -- accuracy and loss over a loader; batch-norm recalibration.
* :mod:`.comparison` -- before/after factors from two measurements.
* :mod:`.context` -- device, dtype, eval mode and example inputs shared by the above.
"""

from .comparison import speedup
from .context import eval_mode, resolve_device
from .counting import MAC_CONVENTIONS, count_macs, count_params, macs_by_module, profile
from .evaluation import NonFiniteWarning, evaluate, first_nonfinite, recalibrate_bn
from .interleaved import InterleavedLatency, interleaved_latency
from .latency import BatchLatency, LatencyResult, LatencyWarning, measure_latency
from .reference_flops import reference_flops

__all__ = [
    "count_macs",
    "count_params",
    "macs_by_module",
    "profile",
    "reference_flops",
    "BatchLatency",
    "LatencyResult",
    "measure_latency",
    "InterleavedLatency",
    "interleaved_latency",
    "LatencyWarning",
    "evaluate",
    "first_nonfinite",
    "NonFiniteWarning",
    "recalibrate_bn",
    "resolve_device",
    "speedup",
    "eval_mode",
]
