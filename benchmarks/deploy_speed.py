"""Deployed unpruned vs deployed pruned latency, side by side in one interleaved run per row.

    python benchmarks/deploy_speed.py [--rows N] [--models a,b] [--rounds 5] [--runs 10]
        [--runs-64 4] [--out FILE]
    python benchmarks/deploy_speed.py --pool run1.json,run2.json,... --out pooled.json

Rows: (model, batch 1 | 64, threads 1 | 2) for
  * ``r56_l1_macs50``: cifar_resnet56 (pretrained) with L1 at 50% of its MACs removed
    (``prunekit.prune(criterion="l1", macs_reduction=0.5)``, the run of
    results/l1_r56_macs50_report.json), 32 px;
  * ``r56_l1_macs50_r8`` / ``resnet18_macs50_r8``: the same with ``round_to=8`` (every kept
    count a multiple of 8);
  * ``resnet18_macs50``: torchvision resnet18 (random init: latency does not depend on the
    weights) with L1 at 50% of its MACs removed, 224 px;
  * ``swp56``: a trained stripe-pruned ResNet-56 (a ``*.safetensors`` holding StripeConv2d
    layers under benchmarks/ or runs/); when none is found, one row says so.
Both models of a row are deployed with ``prunekit.deploy`` (BatchNorm folded, epilogues fused,
channels_last, post-ops and dense convs on the C kernel measured) and timed by
``prunekit.measure.interleaved_latency``; a row records
the latency speed-up, the MACs speed-up, their ratio (the issue's targets: >= 0.9 for channel
pruning, >= 0.8 for stripes), the per-round range and the machine-load verdict.
Resumable: every finished row is written at once (atomically) and skipped on a rerun.
Do not trust rows whose ``warnings`` are not empty (another process was busy).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import prunekit
from prunekit import io, measure, models
from prunekit.deployment import layout
from prunekit.files import atomic_write_json, atomic_write_text
from prunekit.nn.stripe import StripeConv2d

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "deploy_speed.json"
BATCHES, THREADS = (1, 64), (1, 2)


def _r56_l1(round_to: int = 1):
    base = models.create("cifar_resnet56", weights="pretrained").eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = models.create("cifar_resnet56", weights="pretrained").eval()
    prunekit.prune(pruned, x, criterion="l1", macs_reduction=0.5, round_to=round_to)
    return base, pruned, x, "channels"


def _resnet18(round_to: int = 1):
    import torchvision

    x = torch.randn(1, 3, 224, 224)
    base = torchvision.models.resnet18().eval()
    pruned = torchvision.models.resnet18().eval()
    pruned.load_state_dict(base.state_dict())
    prunekit.prune(pruned, x, criterion="l1", macs_reduction=0.5, ignore=("fc",),
                   round_to=round_to)
    return base, pruned, x, "channels"


def _find_swp() -> Path | None:
    for folder in (ROOT / "benchmarks", ROOT / "runs"):
        for path in sorted(folder.rglob("*.safetensors")) if folder.exists() else []:
            if "swp" not in str(path.relative_to(ROOT)).lower():
                continue
            try:
                model = io.load(path)
            except Exception:  # noqa: BLE001 - an unreadable candidate is skipped
                continue
            if any(isinstance(m, StripeConv2d) for m in model.modules()):
                return path
    return None


def _swp():
    path = _find_swp()
    if path is None:
        return None
    return (models.create("cifar_resnet56", weights="pretrained").eval(), io.load(path).eval(),
            torch.randn(1, 3, 32, 32), "stripes")


# "_r8": the same target with every kept count a multiple of 8 (round_to=8: whole 8-float
# vectors on AVX2, the counts oneDNN's blocked kernels run well; the hardware-aware idea of HFP)
MODELS = {"r56_l1_macs50": _r56_l1, "r56_l1_macs50_r8": lambda: _r56_l1(round_to=8),
          "swp56": _swp, "resnet18_macs50": _resnet18,
          "resnet18_macs50_r8": lambda: _resnet18(round_to=8)}
TARGET = {"channels": 0.9, "stripes": 0.8}
# A model timed interleaved more than this factor away from its time in deploy's own decision
# (alone, minutes earlier) gets a warning: the figure is not what either would see alone.
DRIFT = 1.3


def _decision_ms(deployed) -> float | None:
    """The deployed variant's median ms as deploy's layout decision timed it (None: cached
    from an older run without timings, or not timed)."""
    decision = getattr(deployed, "prunekit_deploy")["channels_last"]
    variant = layout.variant_name(
        "channels_last" if decision.get("channels_last") else "contiguous",
        bool(decision.get("dense_post_ops")), bool(decision.get("native_convs")))
    return (decision.get("ms") or {}).get(variant)


def _row(name, pair, batch, threads, rounds, runs) -> dict:
    base, pruned, x, kind = pair
    macs_x = measure.count_macs(base, x) / measure.count_macs(pruned, x)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the layout decision is timed (and cached) per threads
    try:
        example = x.expand(batch, *x.shape[1:]).contiguous()
        deployed = {"unpruned": prunekit.deploy(base, example),
                    "pruned": prunekit.deploy(pruned, example)}
    finally:
        torch.set_num_threads(previous)
    measured = measure.interleaved_latency(deployed, x, batch_sizes=(batch,), rounds=rounds,
                                           runs=runs, threads=threads)
    latency_x = measured.speedup("unpruned", "pruned")[batch]
    warnings = list(measured.warnings)
    for n, m in deployed.items():  # alone (deploy's timing) vs interleaved with the other model
        alone, together = _decision_ms(m), measured.results[n].median_ms[batch]
        if alone and not 1 / DRIFT <= together / alone <= DRIFT:
            warnings.append(f"{n} ran {together / alone:.2f}x its time alone ({together:.2f} vs "
                            f"{alone:.2f} ms when deploy timed it): the two models disturb "
                            "each other, or the load changed")
    return {"model": name, "kind": kind, "batch": batch, "threads": threads,
            "unpruned_ms": measured.results["unpruned"].median_ms[batch],
            "pruned_ms": measured.results["pruned"].median_ms[batch],
            "latency_x": latency_x, "macs_x": macs_x, "ratio_to_macs": latency_x / macs_x,
            "target_ratio": TARGET[kind], "met": latency_x / macs_x >= TARGET[kind],
            "round_range": list(measured.speedup_range("unpruned", "pruned")[batch]),
            "warnings": warnings, "machine": measured.machine,
            "channels_last": {n: getattr(m, "prunekit_deploy")["channels_last"]["channels_last"]
                              for n, m in deployed.items()},
            "dense_post_ops": {n: getattr(m, "prunekit_deploy").get("dense_post_ops")
                               for n, m in deployed.items()},
            "native_convs": {n: len(getattr(m, "prunekit_deploy").get("native_convs", []))
                             for n, m in deployed.items()},
            "convs": {n: sum(isinstance(c, torch.nn.Conv2d) for c in m.modules())
                      for n, m in deployed.items()},
            "decision_ms": {n: _decision_ms(m) for n, m in deployed.items()},
            "runs": runs, "rounds": rounds,
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=None, help="stop after this many new rows")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=10, help="runs per round at batch 1")
    p.add_argument("--runs-64", type=int, default=4, help="runs per round at batch 64")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--pool", default=None, help="comma-separated results .json of earlier runs: "
                   "pool their rows into --out (.json and .md; no measuring)")
    args = p.parse_args()
    out = Path(args.out)
    if args.pool:
        paths = [Path(f) for f in args.pool.split(",") if f]
        missing = [str(f) for f in paths if not f.is_file()]
        if missing:
            raise SystemExit(f"--pool: no such results file {missing}")
        if out.exists() and "runs" not in json.loads(out.read_text()):
            raise SystemExit(f"--pool would overwrite {out}, a file of measured rows: give a "
                             "new --out for the pooled table")
        print(pool(paths, out))
        return
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}: choose from {list(MODELS)}")
    done = json.loads(out.read_text()) if out.exists() else {"rows": []}
    have = {(r["model"], r.get("batch"), r.get("threads")) for r in done["rows"]}
    new = 0
    for name in names:
        todo = [(b, t) for b in BATCHES for t in THREADS if (name, b, t) not in have]
        if not todo or (args.rows is not None and new >= args.rows):
            continue
        pair = MODELS[name]()
        if pair is None:
            if (name, None, None) not in have:
                done["rows"].append({"model": name, "batch": None, "threads": None,
                                     "note": "no trained stripe-pruned ResNet-56 found under "
                                             "benchmarks/ or runs/ (train one with the "
                                             "README's SWP command)"})
                atomic_write_json(out, done, indent=1)
            continue
        for batch, threads in todo:
            if args.rows is not None and new >= args.rows:
                break
            row = _row(name, pair, batch, threads, args.rounds,
                       args.runs if batch == 1 else args.runs_64)
            done["rows"].append(row)
            atomic_write_json(out, done, indent=1)  # per row: a killed run keeps its rows
            new += 1
            print(json.dumps({k: row[k] for k in ("model", "batch", "threads", "latency_x",
                                                  "macs_x", "ratio_to_macs", "warnings")}))
    write_md(done, out.with_suffix(".md"))


def write_md(done: dict, path: Path) -> None:
    """The rows as a Markdown table (ratio = latency speed-up / MACs speed-up)."""
    lines = ["# Deployed unpruned vs deployed pruned, one interleaved run per row", "",
             "`python benchmarks/deploy_speed.py`; median ms of the interleaved rounds, the "
             "speed-up's per-round range in brackets; target ratio 0.9 (channels) / 0.8 "
             "(stripes).", "",
             "| model | batch | threads | unpruned ms | pruned ms | latency x [range] | MACs x | "
             "ratio | target met | channels_last (unpruned / pruned) | dense post-ops | "
             "native convs | measured | trust |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(MODELS)}
    for r in sorted(done["rows"], key=lambda r: (order.get(r["model"], len(order)),
                                                 r.get("batch") or 0, r.get("threads") or 0)):
        if r.get("batch") is None:
            lines.append(f"| {r['model']} | - | - | - | - | - | - | - | - | - | - | - | - | "
                         f"{r['note']} |")
            continue
        lo, hi = r["round_range"]
        cl = r["channels_last"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['unpruned_ms']:.2f} | "
                     f"{r['pruned_ms']:.2f} | {r['latency_x']:.2f} [{lo:.2f}..{hi:.2f}] | "
                     f"{r['macs_x']:.2f} | {r['ratio_to_macs']:.2f} | "
                     f"{'yes' if r['met'] else 'no'} | {cl['unpruned']} / {cl['pruned']} | "
                     f"{_pair(r.get('dense_post_ops'))} | {_native(r)} | {r.get('date', '-')} | "
                     f"{'UNRELIABLE: ' + '; '.join(r['warnings']) if r['warnings'] else 'ok'} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def pool(paths: list[Path], out: Path) -> str:
    """Rows of several runs per (model, batch, threads): the median ratio to the MACs speed-up
    over the runs, its range, and each run's. One run's row moves by up to 10% with the load of
    this shared machine (the same unpruned ResNet-56 took 150-166 ms at batch 64 in rows minutes
    apart), so a target counts as met when the median over runs meets it."""
    import statistics

    groups: dict = {}
    for path in paths:
        rows = json.loads(path.read_text()).get("rows")
        if not isinstance(rows, list) or any(r.get("latency_x") is None for r in rows
                                             if r.get("batch") is not None):
            raise SystemExit(f"--pool: {path} is not a deploy_speed.py results file (no rows "
                             "of measured speed-ups)")
        for r in rows:
            if r.get("batch") is not None:
                groups.setdefault((r["model"], r["batch"], r["threads"]), []).append(r)
    order = {name: i for i, name in enumerate(MODELS)}
    pooled, lines = [], [
        f"# deploy_speed pooled over {len(paths)} runs",
        "", f"Runs: {', '.join(p.name for p in paths)}. Ratio = latency speed-up / MACs "
        "speed-up of one interleaved run; median over the runs (range); target 0.9 (channels) "
        "/ 0.8 (stripes), judged on the median.", "",
        "| model | batch | threads | runs | median ratio | range | per-run ratios | median "
        "latency x | MACs x | target met (median) | in every run | unreliable runs |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---|---|---:|"]
    for key in sorted(groups, key=lambda k: (order.get(k[0], len(order)), k[1], k[2])):
        rows = groups[key]
        ratios = [r["ratio_to_macs"] for r in rows]
        med = statistics.median(ratios)
        entry = {"model": key[0], "batch": key[1], "threads": key[2], "runs": len(rows),
                 "median_ratio": med, "range": [min(ratios), max(ratios)], "ratios": ratios,
                 "median_latency_x": statistics.median(r["latency_x"] for r in rows),
                 "macs_x": rows[0]["macs_x"], "met": med >= rows[0]["target_ratio"],
                 "met_every_run": min(ratios) >= rows[0]["target_ratio"],
                 "dates": [r.get("date") for r in rows],
                 "unreliable": sum(bool(r["warnings"]) for r in rows)}
        pooled.append(entry)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(rows)} | **{med:.2f}** | "
                     f"{min(ratios):.2f}..{max(ratios):.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in ratios)} | "
                     f"{entry['median_latency_x']:.2f} | {entry['macs_x']:.2f} | "
                     f"{'yes' if entry['met'] else 'no'} | "
                     f"{'yes' if entry['met_every_run'] else 'no'} | {entry['unreliable']} |")
    atomic_write_json(out, {"runs": [str(p) for p in paths], "rows": pooled}, indent=1)
    text = "\n".join(lines) + "\n"
    atomic_write_text(out.with_suffix(".md"), text)
    return text


def _native(r: dict) -> str:
    """Dense convs on the C kernel / convs, unpruned and pruned ("-" for rows from before)."""
    native, convs = r.get("native_convs"), r.get("convs")
    if not native or not convs:
        return "-"
    return " / ".join(f"{native[n]}/{convs[n]}" for n in ("unpruned", "pruned"))


def _pair(values: dict | None) -> str:
    return "-" if not values else f"{values['unpruned']} / {values['pruned']}"


if __name__ == "__main__":
    main()
