"""Timing forward passes: latency statistics per batch size and the conditions measured under.

Inputs are random tensors of the example's shape; CUDA timings use events and synchronise,
CPU timings use ``time.perf_counter``. The result records device, CPU/GPU name, thread count and
torch version, because a latency is meaningless without them, and how it was measured: runs
and warm-up per batch size, median, p10/p90 and their ratio (the spread), and the machine's load
during the timing (:mod:`.machine_load`, which documents when a figure is judged unreliable).
An unreliable measurement says so in ``LatencyResult.warnings`` (and so in its JSON) and, unless
``warn=False``, with a :class:`LatencyWarning`.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .context import eval_mode, model_device_and_dtype, on_device
from .machine_load import (DEFAULT_BUSY_FRACTION, DEFAULT_MAX_SPREAD, LoadMonitor, MachineLoad,
                           cpu_model_name, judge)

__all__ = ["BatchLatency", "LatencyResult", "LatencyWarning", "measure_latency"]


class LatencyWarning(UserWarning):
    """A latency was measured under conditions that make it unreliable (its message and the
    result's ``warnings`` say which)."""


@dataclass
class BatchLatency:
    """Timing statistics of one batch size, in milliseconds per forward pass."""

    batch_size: int
    median_ms: float
    mean_ms: float
    std_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    throughput_per_s: float  # examples per second at the median latency
    spread: float | None = None  # p90 / p10 (1.0: every run alike)


@dataclass
class LatencyResult:
    """Latency per batch size plus the conditions it was measured under."""

    device: str
    device_name: str
    num_threads: int
    torch_version: str
    input_shape: list[int]  # per-example shape (without the batch dimension)
    warmup: int
    batches: dict[int, BatchLatency] = field(default_factory=dict)
    machine: dict | None = None  # MachineLoad.as_dict() during the timing
    warnings: list[str] = field(default_factory=list)  # why the figures may not be trusted

    @property
    def reliable(self) -> bool:
        return not self.warnings

    @property
    def median_ms(self) -> dict[int, float]:
        return {bs: stats.median_ms for bs, stats in self.batches.items()}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict. Batch sizes become string keys so a JSON round trip is lossless."""
        result = asdict(self)
        result["batches"] = {str(bs): asdict(stats) for bs, stats in self.batches.items()}
        result["reliable"] = self.reliable
        return result

    def judge(self, load: MachineLoad | None, **thresholds) -> list[str]:
        """Record ``load`` and the reasons (spread, load) these figures are unreliable."""
        self.machine = load.as_dict() if load is not None else None
        self.warnings = judge(load, {bs: b.spread for bs, b in self.batches.items()},
                              self.num_threads, **thresholds)
        return self.warnings

    def describe(self) -> str:
        """One line saying how the figures were measured (for tables and logs)."""
        runs = sorted({b.runs for b in self.batches.values()})
        text = (f"{self.device_name}, {self.num_threads} thread(s), {'/'.join(map(str, runs))} "
                f"runs after {self.warmup} warm-up per batch size, median")
        if self.machine and self.machine.get("other_cpu_cores") is not None:
            text += f"; other processes used {self.machine['other_cpu_cores']:.2f} cores"
        return text + ("; UNRELIABLE: " + "; ".join(self.warnings) if self.warnings else "")


def warn_unreliable(what: str, reasons: list[str], stacklevel: int = 3) -> None:
    if reasons:
        warnings.warn(f"{what} may not be trusted: {'; '.join(reasons)}. Measure again on a "
                      "quiet machine (see prunekit.measure.machine_load for the rule).",
                      LatencyWarning, stacklevel=stacklevel)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def _summarise(batch_size: int, times_ms: list[float]) -> BatchLatency:
    median = statistics.median(times_ms)
    p10, p90 = float(np.percentile(times_ms, 10)), float(np.percentile(times_ms, 90))
    return BatchLatency(
        batch_size=batch_size,
        median_ms=median,
        mean_ms=statistics.fmean(times_ms),
        std_ms=statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0,
        p10_ms=p10,
        p90_ms=p90,
        min_ms=min(times_ms),
        runs=len(times_ms),
        throughput_per_s=batch_size * 1000.0 / median if median > 0 else float("inf"),
        spread=p90 / p10 if p10 > 0 else None,
    )


def _time_batch(model: nn.Module, batch: torch.Tensor, warmup: int, runs: int,
                min_time_s: float | None = None, bar=None) -> list[float]:
    """Warm up, then time ``runs`` forward passes (more while under ``min_time_s``)."""
    on_cuda = batch.device.type == "cuda"
    for _ in range(warmup):
        model(batch)
        if bar is not None:
            bar.update()
    if on_cuda:
        torch.cuda.synchronize(batch.device)
    times_ms: list[float] = []
    total_ms, wanted_ms = 0.0, (min_time_s or 0.0) * 1000.0
    while len(times_ms) < runs or total_ms < wanted_ms:  # a running total: no O(n^2) sum
        times_ms.append(_time_once_ms(model, batch, on_cuda))
        total_ms += times_ms[-1]
        if bar is not None and len(times_ms) <= runs:
            bar.update()
    return times_ms


def _time_once_ms(model: nn.Module, batch: torch.Tensor, on_cuda: bool) -> float:
    if on_cuda:
        # Kernel launches are asynchronous; events measure GPU time, synchronize waits for it.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(batch)
        end.record()
        torch.cuda.synchronize(batch.device)
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    model(batch)
    return (time.perf_counter() - start_s) * 1000.0


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int] | torch.Size,
    *,
    batch_sizes: Iterable[int] = (1, 64),
    warmup: int = 10,
    runs: int = 50,
    device: torch.device | str | None = None,
    threads: int | None = None,
    min_time_s: float | None = None,
    progress: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
    warn: bool = True,
    max_spread: float = DEFAULT_MAX_SPREAD,
    busy_fraction: float = DEFAULT_BUSY_FRACTION,
) -> LatencyResult:
    """Time forward passes for each batch size on random inputs.

    ``example_input`` is a tensor or a full shape *including* a batch dimension, e.g.
    ``(1, 3, 32, 32)``; only the per-example part is used. ``device=None`` measures where
    the model already is; an explicit device moves the model there for the measurement and
    back afterwards. ``threads`` sets ``torch.set_num_threads`` during the measurement only.
    ``min_time_s`` keeps timing past ``runs`` until that much timed time has accumulated.
    ``memory_format`` lays the random inputs out as, e.g., ``torch.channels_last`` for a model
    converted with ``model.to(memory_format=torch.channels_last)`` (4-D inputs only), so the
    timing holds no layout conversion the model would not see in a channels-last pipeline.
    The machine's load is sampled during the timing; ``max_spread`` (p90/p10) and
    ``busy_fraction`` (of the cores other processes may use) set when the result is judged
    unreliable (``result.warnings``; a :class:`LatencyWarning` unless ``warn=False``).
    """
    if isinstance(example_input, torch.Tensor):
        per_example_shape, dtype = list(example_input.shape[1:]), example_input.dtype
    else:
        per_example_shape, dtype = list(example_input)[1:], None
    batch_sizes = [int(bs) for bs in batch_sizes]
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")

    previous_threads = torch.get_num_threads()
    bar = tqdm(total=len(batch_sizes) * (warmup + runs), desc="latency", disable=not progress, leave=False)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with on_device(model, device) as run_device, eval_mode(model), torch.inference_mode():
            _, model_dtype = model_device_and_dtype(model)
            result = LatencyResult(
                device=str(run_device),
                device_name=_device_name(run_device),
                num_threads=torch.get_num_threads(),
                torch_version=torch.__version__,
                input_shape=per_example_shape,
                warmup=warmup,
            )
            with LoadMonitor() as monitor:
                for batch_size in batch_sizes:
                    batch = torch.randn(batch_size, *per_example_shape, device=run_device,
                                        dtype=dtype or model_dtype
                                        ).contiguous(memory_format=memory_format)
                    times_ms = _time_batch(model, batch, warmup, runs, min_time_s, bar)
                    result.batches[batch_size] = _summarise(batch_size, times_ms)
        result.judge(monitor.result, max_spread=max_spread, busy_fraction=busy_fraction)
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    if warn:
        warn_unreliable("this latency measurement", result.warnings)
    return result
