"""Measuring a model for the job's report (accuracy per split, MACs, params, latency), the
stage timer, and the readable before / pruned / fine-tuned table."""
from __future__ import annotations

import time
from contextlib import contextmanager

from .. import data, measure

__all__ = ["StageTimer", "measure_model", "summary_table"]


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def measure_model(model, run_data, splits, *, example, latency_batches=(1, 64),
                  latency_runs=30, batch_size=500, device=None, progress=True,
                  num_workers: int = 0) -> dict:
    """Accuracy on each split of ``run_data`` (``eval_set(split)``, labelled), MACs, params
    and measured latency on ``example``'s shape. ``num_workers`` decode images in parallel
    (image folders)."""
    result = {"accuracy": {}, **measure.profile(model, example)}
    for split in splits:
        ds = run_data.eval_set(split)
        loader = data.build_loader(ds, batch_size=batch_size, shuffle=False,
                                   num_workers=num_workers)
        acc = measure.evaluate(model, loader, device=device, progress=progress, desc=split)
        result["accuracy"][split] = {**acc, "description": ds.description}
    if latency_batches:
        lat = measure.measure_latency(model, example, batch_sizes=tuple(latency_batches),
                                      runs=latency_runs)
        result["latency"] = lat.as_dict()
        result["latency_ms"] = {str(k): v for k, v in lat.median_ms.items()}
    return result


def summary_table(report: dict) -> str:
    """A readable before / pruned / fine-tuned table."""
    columns = [("before", report["before"]), ("pruned", report["pruned"])]
    if "finetuned" in report:
        columns.append(("fine-tuned", report["finetuned"]))
    rows = [("", [c for c, _ in columns])]
    for split in report["before"]["accuracy"]:
        rows.append((f"top-1 [{split}]", [f"{m['accuracy'][split]['top1']:.2f}%"
                                          for _, m in columns]))
    rows.append(("MACs", [f"{m['macs'] / 1e6:.2f}M" for _, m in columns]))
    rows.append(("params", [f"{m['params'] / 1e6:.3f}M" for _, m in columns]))
    for bs in report["before"].get("latency_ms", {}):
        rows.append((f"latency bs={bs}", [f"{m['latency_ms'][bs]:.2f} ms" for _, m in columns]))
    sp = report["speedup"]
    widths = [max(len(r[0]) for r in rows)] + [12] * len(columns)
    lines = ["  ".join([r[0].ljust(widths[0])] + [v.rjust(12) for v in r[1]]) for r in rows]
    lat = ", ".join(f"bs={k}: {v:.2f}x" for k, v in (sp.get("latency_x") or {}).items())
    lines.append(f"MACs speed-up {sp['macs_x']:.2f}x; measured latency speed-up "
                 f"{lat or 'not measured'}")
    model, data_info = report.get("model") or {}, report.get("data") or {}
    if model:
        if model.get("path"):
            lines.append(f"model: {model['path']} (saved {model.get('source')}:"
                         f"{model.get('name')})")
        else:
            lines.append(f"model: {model.get('source')}:{model.get('name')} (weights: "
                         f"{model.get('weights') or 'random init'})")
    if data_info:
        lines.append(f"data: {data_info['dataset']} at {data_info['root']}; preprocessing "
                     f"{data_info.get('preprocessing_text', '')}")
    lines.append("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["stage_seconds"].items()))
    return "\n".join(lines)
