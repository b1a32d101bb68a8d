"""Latency of several models measured in ONE interleaved run, and the speed-up between them.

Two separate measurements of a before and an after model can differ by the load that came and
went between them (on a shared machine, by far more than the pruning gained). Here every round
times each model back to back (``rounds`` x ``runs`` passes each, after a warm-up per round), so
load hits all models alike; each model's statistics are over all its runs, the speed-up per
batch size is the ratio of medians, and the per-round ratios give its range. The machine's load
during the whole measurement and the spreads are judged as in :mod:`.machine_load`.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from .context import eval_mode, model_device_and_dtype
from .latency import LatencyResult, _device_name, _summarise, _time_batch, warn_unreliable
from .machine_load import DEFAULT_BUSY_FRACTION, DEFAULT_MAX_SPREAD, LoadMonitor, judge

__all__ = ["InterleavedLatency", "interleaved_latency"]


@dataclass
class InterleavedLatency:
    """Per model a :class:`LatencyResult` (all rounds pooled), and the speed-ups."""

    results: dict[str, LatencyResult]
    rounds: int
    runs_per_round: int
    machine: dict | None = None
    warnings: list[str] = field(default_factory=list)
    round_medians_ms: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    @property
    def median_ms(self) -> dict[str, dict[int, float]]:
        return {name: r.median_ms for name, r in self.results.items()}

    def speedup(self, before: str, after: str) -> dict[int, float]:
        """``before`` median / ``after`` median per batch size (> 1: ``after`` is faster)."""
        b, a = self.results[before].median_ms, self.results[after].median_ms
        return {bs: b[bs] / a[bs] for bs in b if bs in a and a[bs] > 0}

    def speedup_range(self, before: str, after: str) -> dict[int, tuple[float, float]]:
        """Lowest and highest per-round ratio per batch size."""
        b, a = self.round_medians_ms[before], self.round_medians_ms[after]
        return {bs: (min(r), max(r)) for bs in b
                if (r := [x / y for x, y in zip(b[bs], a.get(bs, [])) if y > 0])}

    def as_dict(self, before: str | None = None, after: str | None = None) -> dict:
        out = {"method": "interleaved", "rounds": self.rounds,
               "runs_per_round": self.runs_per_round, "machine": self.machine,
               "warnings": list(self.warnings), "reliable": not self.warnings,
               "models": {name: r.as_dict() for name, r in self.results.items()}}
        if before is not None and after is not None:
            out["latency_x"] = {str(bs): x for bs, x in self.speedup(before, after).items()}
            out["latency_x_round_range"] = {str(bs): list(r) for bs, r in
                                            self.speedup_range(before, after).items()}
        return out


def interleaved_latency(models: Mapping[str, nn.Module], example_input: torch.Tensor, *,
                        batch_sizes: Iterable[int] = (1, 64), rounds: int = 5, runs: int = 10,
                        warmup: int = 3, threads: int | None = None,
                        memory_formats: Mapping[str, torch.memory_format] | None = None,
                        warn: bool = True, max_spread: float = DEFAULT_MAX_SPREAD,
                        busy_fraction: float = DEFAULT_BUSY_FRACTION) -> InterleavedLatency:
    """Time every model in ``models`` once per round, back to back, on the same random batch.

    Each model runs where it is (on its own device and dtype); ``memory_formats`` maps a name to
    its inputs' layout (default contiguous NCHW). ``threads`` sets ``torch.set_num_threads``
    for the measurement only. Thresholds and warnings as in :func:`measure_latency`.
    """
    batch_sizes = [int(bs) for bs in batch_sizes]
    if rounds < 1 or runs < 1 or warmup < 0 or not models:
        raise ValueError("need at least one model, rounds >= 1, runs >= 1 and warmup >= 0")
    per_example = list(example_input.shape[1:])
    samples = {name: {bs: [] for bs in batch_sizes} for name in models}
    round_medians = {name: {bs: [] for bs in batch_sizes} for name in models}
    previous_threads = torch.get_num_threads()
    inputs = {}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for name, model in models.items():
            device, dtype = model_device_and_dtype(model)
            fmt = (memory_formats or {}).get(name, torch.contiguous_format)
            generator = torch.Generator().manual_seed(0)  # the same images for every model
            inputs[name] = {bs: torch.randn(bs, *per_example, generator=generator).to(
                device=device, dtype=example_input.dtype if example_input.is_floating_point()
                else dtype).contiguous(memory_format=fmt) for bs in batch_sizes}
        with LoadMonitor() as monitor, torch.inference_mode():
            for _ in range(rounds):
                for name, model in models.items():
                    with eval_mode(model):
                        for bs in batch_sizes:
                            times = _time_batch(model, inputs[name][bs], warmup, runs)
                            samples[name][bs] += times
                            round_medians[name][bs].append(statistics.median(times))
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    results = {}
    for name, model in models.items():
        device, _ = model_device_and_dtype(model)
        result = LatencyResult(device=str(device), device_name=_device_name(device),
                               num_threads=used_threads, torch_version=torch.__version__,
                               input_shape=per_example, warmup=warmup)
        result.batches = {bs: _summarise(bs, samples[name][bs]) for bs in batch_sizes}
        result.judge(monitor.result, max_spread=max_spread, busy_fraction=busy_fraction)
        results[name] = result
    spreads = {f"{name} bs={bs}": b.spread for name, r in results.items()
               for bs, b in r.batches.items()}
    reasons = judge(monitor.result, spreads, used_threads, max_spread=max_spread,
                    busy_fraction=busy_fraction)
    measured = InterleavedLatency(results=results, rounds=rounds, runs_per_round=runs,
                                  machine=monitor.result.as_dict() if monitor.result else None,
                                  warnings=reasons, round_medians_ms=round_medians)
    if warn:
        warn_unreliable("this interleaved latency measurement", reasons)
    return measured
