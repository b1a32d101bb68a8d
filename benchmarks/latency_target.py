"""Latency targets measured (issue 21 item 2): does a ``latency_reduction`` plan land on its
target, and is it faster than the uniform plan at equal MACs?

    python benchmarks/latency_target.py [--settings r56_b1_30,r18_b1_50] [--rounds 10]
        [--runs 10] [--kernel onednn|native] [--out benchmarks/results/latency_target.json]

Settings ``<model>_b<batch>_<target%>``: ``r56`` = cifar_resnet56 (pretrained, 32 px), ``r18``
= torchvision resnet18 (random init: latency does not depend on the weights; 224 px, the
classifier kept). Default: r56 and r18 at batch 1, 30% and 50%. For each setting:

1. ``prunekit.prune(criterion="l1", target=PlanTarget(latency_reduction=t, latency_batch=b))``
   (greedy allocation, auto rounding, closed loop: its own report is kept as ``loop``);
2. the uniform plan at the same MACs: ``prunekit.prune(criterion="l1",
   macs_reduction=<the latency plan's MACs reduction>)`` (one ratio, within 1%);
3. a *separate* verification: the unpruned, latency-aware and uniform models deployed
   (``prunekit.deploy``, BatchNorm folded, ``channels_last=False`` and the conv kernel of
   ``--kernel`` as the loop measures: ``latency_kernel``, default onednn) and
   timed in ONE interleaved run (``prunekit.measure.interleaved_latency``, ``--rounds`` x
   ``--runs``, default 150 x 1: single runs alternating): reductions as the median over rounds
   of each round's ``1 - pruned / unpruned`` (paired adjacent runs: far less sensitive to
   load that comes and goes than pooled medians; their range and the ratio of pooled medians
   beside them), and the uniform / latency-aware ratio likewise.

One thread throughout. The machine's load (other processes' cores, load average) is recorded
with every measurement; rows with warnings were measured on a busy machine. Resumable: each
finished setting is written at once (JSON + md + png, atomically) and skipped on a rerun.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import prunekit
from prunekit import models
from prunekit.deployment import deploy
from prunekit.files import atomic_write_json, atomic_write_text
from prunekit.measure import interleaved_latency
from prunekit.measure.machine_load import cpu_model_name, load_average
from prunekit.plan import PlanTarget

OUT = Path(__file__).parent / "results" / "latency_target.json"
DEFAULT = ("r56_b1_30", "r56_b1_50", "r18_b1_30", "r18_b1_50")
TOLERANCE = 0.05


def _model(name: str):
    if name == "r56":
        return (models.create("cifar_resnet56", weights="pretrained").eval(),
                torch.randn(1, 3, 32, 32), ())
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224), ("fc",)


def _parse(setting: str) -> tuple[str, int, float]:
    name, batch, target = setting.split("_")
    return name, int(batch[1:]), int(target) / 100


def _per_round(measured, name: str, base: str, bs: int) -> list[float]:
    rounds = measured.round_medians_ms
    return [1 - a / b for a, b in zip(rounds[name][bs], rounds[base][bs])]


def _p10_p90(values: list[float]) -> list[float]:
    return [float(np.percentile(values, 10)), float(np.percentile(values, 90))]


def _median_ci95(values: list[float], draws: int = 2000) -> list[float]:
    """A bootstrap 95% interval of the median (resampled with a fixed seed)."""
    rng = np.random.default_rng(0)
    arr = np.asarray(values)
    medians = np.median(rng.choice(arr, size=(draws, arr.size), replace=True), axis=1)
    return [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]


def _ms(result, bs):
    b = result.batches[bs]
    return {"median": b.median_ms, "p10": b.p10_ms, "p90": b.p90_ms, "spread": b.spread,
            "runs": b.runs}


def run_setting(setting: str, rounds: int, runs: int, kernel: str = "onednn") -> dict:
    name, bs, target = _parse(setting)
    base, x, ignore = _model(name)
    torch.set_num_threads(1)
    row = {"setting": setting, "model": name, "batch": bs, "target": target, "threads": 1,
           "kernel": kernel,
           "load_average_before": load_average()}
    aware = copy.deepcopy(base)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = prunekit.prune(aware, x, criterion="l1", ignore=ignore,
                                target=PlanTarget(latency_reduction=target, latency_batch=bs,
                                                  latency_kernel=kernel))
    row["plan_seconds"] = time.perf_counter() - start
    row["plan_warnings"] = sorted({str(w.message)[:200] for w in caught})
    row["loop"] = {k: v for k, v in result.latency.items() if k != "table"}
    row["table"] = result.latency["table"]
    uniform = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uni = prunekit.prune(uniform, x, criterion="l1", ignore=ignore,
                             macs_reduction=round(result.macs_reduction, 4))
    row["macs"] = {"unpruned": result.macs_before, "latency_aware": result.macs_after,
                   "uniform": uni.macs_after, "latency_aware_reduction": result.macs_reduction,
                   "uniform_reduction": uni.macs_reduction}
    xb = torch.randn(bs, *x.shape[1:])
    deployed = {k: deploy(m, xb, channels_last=False, native_convs=kernel == "native")
                for k, m in (("unpruned", base), ("latency_aware", aware), ("uniform", uniform))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = interleaved_latency(deployed, xb, batch_sizes=(bs,), rounds=rounds, runs=runs,
                                       warmup=1 if runs > 1 else 0)
    aware_r = _per_round(measured, "latency_aware", "unpruned", bs)
    uni_r = _per_round(measured, "uniform", "unpruned", bs)
    ratio = [u / a for u, a in zip(measured.round_medians_ms["uniform"][bs],
                                   measured.round_medians_ms["latency_aware"][bs])]
    ms = {k: _ms(r, bs) for k, r in measured.results.items()}
    reached = statistics.median(aware_r)
    row["verification"] = {
        "ms": ms,
        "latency_aware_reduction": reached,
        "latency_aware_reduction_of_medians":
            1 - ms["latency_aware"]["median"] / ms["unpruned"]["median"],
        "latency_aware_reduction_p10": 1 - ms["latency_aware"]["p10"] / ms["unpruned"]["p10"],
        "latency_aware_reduction_range": _p10_p90(aware_r),
        "uniform_reduction": statistics.median(uni_r),
        "uniform_reduction_range": _p10_p90(uni_r),
        "within_tolerance": abs(reached - target) <= TOLERANCE * target,
        "relative_error": (reached - target) / target,
        "uniform_over_aware": statistics.median(ratio),
        "uniform_over_aware_ci95": _median_ci95(ratio),
        "latency_aware_reduction_ci95": _median_ci95(aware_r),
        "paired": {"latency_aware_reduction": aware_r, "uniform_reduction": uni_r,
                   "uniform_over_aware": ratio},
        "uniform_over_aware_of_medians": ms["uniform"]["median"] / ms["latency_aware"]["median"],
        "uniform_over_aware_range": _p10_p90(ratio),
        "rounds": rounds, "runs_per_round": runs, "machine": measured.machine,
        "warnings": measured.warnings}
    return row


def _table(rows: list[dict]) -> str:
    head = ("| setting | target | measured (verification) [p10, p90 of rounds] | in loop | predicted "
            "| within 5% | MACs removed | aware ms | uniform ms at equal MACs | uniform / aware "
            "[p10, p90] | loop steps | plan s | others' cores | load |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        v, loop = r["verification"], r["loop"]
        lo, hi = v["latency_aware_reduction_range"]
        ulo, uhi = v["uniform_over_aware_range"]
        machine = v.get("machine") or {}
        ci = (" (median's 95% CI {:.3f}-{:.3f})".format(*v["uniform_over_aware_ci95"])
              if "uniform_over_aware_ci95" in v else "")
        lines.append(
            f"| {r['setting']} | {r['target']:.2f} | {v['latency_aware_reduction']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] | {loop['measured']:.3f} | {loop['predicted']:.3f} | "
            f"{'yes' if v['within_tolerance'] else 'NO'} "
            f"({100 * v['relative_error']:+.1f}%) | "
            f"{100 * r['macs']['latency_aware_reduction']:.1f}% / "
            f"{100 * r['macs']['uniform_reduction']:.1f}% | "
            f"{v['ms']['latency_aware']['median']:.2f} | {v['ms']['uniform']['median']:.2f} | "
            f"{v['uniform_over_aware']:.3f} [{ulo:.3f}, {uhi:.3f}]{ci} | {len(loop['steps'])} | "
            f"{r['plan_seconds']:.0f} | {machine.get('other_cpu_cores')} | "
            f"{machine.get('load_average_1min')}"
            f"{' UNRELIABLE' if v['warnings'] else ''} |")
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    atomic_write_json(out, results, indent=1, default=str)
    rows = [results["rows"][k] for k in sorted(results["rows"])]
    text = [f"# Latency targets, measured ({results['cpu']}, torch {results['torch']}, "
            f"1 thread, {results.get('kernel', 'onednn')} convs)", "",
            "Written by `benchmarks/latency_target.py`. *measured* = separate interleaved "
            "verification of the deployed unpruned, latency-aware and uniform-at-equal-MACs "
            "models (median of the paired per-round reductions, p10-p90 of them in brackets; single "
            "runs alternating); *in loop* = the closed "
            "loop's own last measurement; *predicted* = the lookup table's prediction for the "
            "chosen plan. *uniform / aware* > 1: the latency-aware plan is faster at equal MACs.",
            "", _table(rows), ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(text))
    try:
        _plot(rows, out.with_suffix(".png"))
    except ImportError:
        pass


def _plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["setting"] for r in rows]
    pos = range(len(rows))
    a.bar([p - 0.2 for p in pos], [r["target"] for r in rows], 0.4, label="target")
    got = [r["verification"]["latency_aware_reduction"] for r in rows]
    err = [[max(0.0, g - r["verification"]["latency_aware_reduction_range"][0])
            for g, r in zip(got, rows)],
           [max(0.0, r["verification"]["latency_aware_reduction_range"][1] - g)
            for g, r in zip(got, rows)]]
    a.bar([p + 0.2 for p in pos], got, 0.4, yerr=err, label="measured (p10-p90 of paired rounds)")
    a.set_xticks(list(pos), names, rotation=20)
    a.set_ylabel("latency reduction")
    a.legend()
    aware = [r["verification"]["ms"]["latency_aware"]["median"] for r in rows]
    uni = [r["verification"]["ms"]["uniform"]["median"] for r in rows]
    full = [r["verification"]["ms"]["unpruned"]["median"] for r in rows]
    b.bar([p - 0.2 for p in pos], [u / f for u, f in zip(uni, full)], 0.4,
          label="uniform at equal MACs")
    b.bar([p + 0.2 for p in pos], [x / f for x, f in zip(aware, full)], 0.4,
          label="latency-aware")
    b.set_xticks(list(pos), names, rotation=20)
    b.set_ylabel("latency / unpruned (deployed, median)")
    b.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=",".join(DEFAULT))
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--kernel", choices=("onednn", "native"), default="onednn",
                   help="the conv kernel the loop times and every model is deployed on")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {"cpu": cpu_model_name(), "torch": torch.__version__, "kernel": args.kernel,
               "rows": {}}
    if args.out.exists():
        results = json.loads(args.out.read_text())
        if results.get("kernel", "onednn") != args.kernel:
            raise SystemExit(f"{args.out} holds rows measured on {results.get('kernel', 'onednn')} "
                             f"convs, not {args.kernel}: give another --out")
    for setting in [s for s in args.settings.split(",") if s]:
        if setting in results["rows"]:
            print(f"{setting}: done already")
            continue
        row = run_setting(setting, args.rounds, args.runs, args.kernel)
        results["rows"][setting] = row
        write(results, args.out)
        v = row["verification"]
        print(f"{setting}: target {row['target']:.2f} measured "
              f"{v['latency_aware_reduction']:.3f} (loop {row['loop']['measured']:.3f}), "
              f"uniform/aware {v['uniform_over_aware']:.3f}, warnings {v['warnings']}",
              flush=True)


if __name__ == "__main__":
    main()
