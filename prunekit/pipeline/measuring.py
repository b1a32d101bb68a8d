"""Measuring a model for the job's report (accuracy per split, MACs, params, latency), the
before/after speed-up from one interleaved measurement of both models (optionally both
deployed), the stage timer, and the readable before / pruned / fine-tuned table."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

from .. import data, measure
from ..deployment import DEPLOY_ATTR, deploy as deploy_model

__all__ = ["StageTimer", "measure_model", "paired_speedup", "summary_table"]

# The interleaved before/after measurement: this many rounds share the run's latency_runs.
PAIRED_ROUNDS = 5


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


def paired_speedup(unpruned, final, example, *, latency_batches=(1, 64), latency_runs=30,
                   deploy: bool = False) -> dict:
    """Speed-up of ``final`` over ``unpruned`` from ONE interleaved measurement of both
    (:func:`prunekit.measure.interleaved_latency`), ``deploy``: both deployed first
    (:func:`prunekit.deploy`), the comparison a user shipping either would see. The models
    themselves are left as they were."""
    device = next((t.device for t in final.parameters()), example.device)
    unpruned = unpruned.to(device).eval()
    example = example.to(device)
    models = {"unpruned": unpruned, "final": final}
    records = {}
    if deploy:
        models = {name: deploy_model(m, example) for name, m in models.items()}
        records = {name: getattr(m, DEPLOY_ATTR) for name, m in models.items()}
    runs = max(2, math.ceil(latency_runs / PAIRED_ROUNDS))
    measured = measure.interleaved_latency(models, example, batch_sizes=latency_batches,
                                           rounds=PAIRED_ROUNDS, runs=runs)
    out = measured.as_dict(before="unpruned", after="final")
    out["deployed"] = bool(deploy)
    if records:
        out["deploy"] = {name: {k: (len(v) if isinstance(v, list) else v)
                                for k, v in record.items()} for name, record in records.items()}
    return out


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
    swp = report.get("swp") or {}
    if swp.get("reference_flops_after") is not None:  # the paper's percentages use this count
        flops = [swp["reference_flops_before"], swp["reference_flops_after"]]
        rows.append(("FLOPs (SWP count)", [f"{f / 1e6:.2f}M" for f in flops] +
                     [""] * (len(columns) - 2)))
    for bs in report["before"].get("latency_ms", {}):
        rows.append((f"latency bs={bs}", [f"{m['latency_ms'][bs]:.2f} ms" for _, m in columns]))
    sp = report["speedup"]
    widths = [max(len(r[0]) for r in rows)] + [12] * len(columns)
    lines = ["  ".join([r[0].ljust(widths[0])] + [v.rjust(12) for v in r[1]]) for r in rows]
    lat = ", ".join(f"bs={k}: {v:.2f}x" for k, v in (sp.get("latency_x") or {}).items())
    lines.append(f"MACs speed-up {sp['macs_x']:.2f}x; measured latency speed-up "
                 f"{lat or 'not measured'}")
    paired = sp.get("latency_measurement")
    if paired:
        how = "deployed, " if paired["deployed"] else ""
        trust = f"; UNRELIABLE: {'; '.join(paired['warnings'])}" if paired["warnings"] else ""
        lines.append(f"  (one interleaved measurement of both models, {how}"
                     f"{paired['rounds']} rounds x {paired['runs_per_round']} runs{trust})")
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
