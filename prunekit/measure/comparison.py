"""Comparing two measurements: compression and speed-up factors of a model before and after pruning."""

from __future__ import annotations

from typing import Any, Mapping

from .latency import LatencyResult

__all__ = ["speedup"]


def _latency_medians(summary: Mapping[str, Any]) -> dict[int, float] | None:
    """Batch size -> median ms from a LatencyResult, its as_dict(), or a plain mapping."""
    latency = summary.get("latency", summary.get("median_ms"))
    if latency is None:
        return None
    if isinstance(latency, LatencyResult):
        return latency.median_ms
    if isinstance(latency, Mapping) and "batches" in latency:
        return {int(bs): float(stats["median_ms"]) for bs, stats in latency["batches"].items()}
    if isinstance(latency, Mapping) and "median_ms" in latency:
        latency = latency["median_ms"]
    return {int(bs): float(ms) for bs, ms in latency.items()}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def speedup(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Compression/speed-up factors ``before / after`` (> 1 means smaller or faster).

    ``before``/``after`` are :func:`profile`-style dicts, optionally with a ``"latency"``
    entry (a :class:`LatencyResult`, its ``as_dict()``, or ``{batch_size: median_ms}``).
    Missing quantities give ``None``. Reductions in percent are included because papers
    quote "FLOPs down 47.4%"; compare only numbers counted under the same convention.
    """
    result: dict[str, Any] = {
        "macs_x": _ratio(before.get("macs"), after.get("macs")),
        "params_x": _ratio(before.get("params"), after.get("params")),
    }
    if "macs_thop" in before and "macs_thop" in after:
        result["macs_thop_x"] = _ratio(before["macs_thop"], after["macs_thop"])
    for key in ("macs", "params"):
        old, new = before.get(key), after.get(key)
        result[f"{key}_reduction_pct"] = 100.0 * (1 - new / old) if old and new is not None else None
    medians_before, medians_after = _latency_medians(before), _latency_medians(after)
    result["latency_x"] = (
        {
            bs: _ratio(medians_before[bs], medians_after[bs])
            for bs in medians_before
            if bs in medians_after
        }
        if medians_before is not None and medians_after is not None
        else None
    )
    return result
