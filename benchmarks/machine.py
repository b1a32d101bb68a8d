"""What the benchmarks record about the machine they ran on (shared by the scripts here)."""
from __future__ import annotations

import time


def cpu_name() -> str:
    from prunekit.measure.machine_load import cpu_model_name
    return cpu_model_name()


def load_avg() -> float | None:
    from prunekit.measure.machine_load import load_average
    return load_average()


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
    """Median over rounds of each round's median latency (ms) per model and batch size, from
    :func:`prunekit.measure.interleaved_latency` (every model timed once per round, back to
    back, so load from other processes hits all models alike). ``example``: a tensor or a
    shape with a batch dimension; ``memory_formats`` maps a model name to its inputs' layout."""
    import statistics

    import torch

    from prunekit import measure

    if not isinstance(example, torch.Tensor):
        example = torch.randn(*example)
    measured = measure.interleaved_latency(nets, example, batch_sizes=batch_sizes,
                                           rounds=rounds, runs=runs, warmup=10,
                                           memory_formats=memory_formats)
    return {name: {str(bs): statistics.median(v) for bs, v in per.items()}
            for name, per in measured.round_medians_ms.items()}
