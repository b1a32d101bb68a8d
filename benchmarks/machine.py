"""What the benchmarks record about the machine they ran on (shared by the scripts here)."""
from __future__ import annotations

import os
import platform
import time


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy (any process) during ``seconds`` while this one sleeps:
    timings taken while other processes load the machine are not to be trusted."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (i1 - i0) / max(t1 - t0, 1), 3)


def interleaved_latency(nets: dict, example, *, rounds: int = 5, runs: int = 30,
                        batch_sizes=(1, 64), memory_formats: dict | None = None) -> dict:
    """Median latency (ms) per model and batch size, timing every model once per round, back
    to back, so load from other processes hits all models alike. ``memory_formats`` maps a
    model name to the layout of its inputs (default: contiguous NCHW)."""
    import statistics

    import torch

    from prunekit import measure

    samples = {name: {bs: [] for bs in batch_sizes} for name in nets}
    for _ in range(rounds):
        for name, net in nets.items():
            fmt = (memory_formats or {}).get(name, torch.contiguous_format)
            lat = measure.measure_latency(net, example, batch_sizes=batch_sizes, runs=runs,
                                          memory_format=fmt)
            for bs, ms in lat.median_ms.items():
                samples[name][bs].append(ms)
    return {name: {str(bs): statistics.median(v) for bs, v in per.items()}
            for name, per in samples.items()}
