"""Time "trace + prune" for torchvision ResNet-50 and DenseNet-121 and three timm CNNs
(ResNet-26-D, EfficientNet-B0, ConvNeXt-Atto), against Torch-Pruning.

Each model (weights=None / pretrained=False, eval mode, example input 1x3x224x224) is pruned
at a uniform ratio of 0.5 with the classifier (``fc`` / ``classifier`` / ``head.fc``) ignored.
Timings, each on a fresh model built outside the timed region:

* prunekit full: the whole ``prunekit.prune(model, x, criterion="l1", ratio=0.5, ignore=[...])``
  call, which also counts MACs/params before and after (two FlopCounterMode forward passes);
* prunekit core: graph + scores + plan + surgery only (``build_graph``, L1 ``score``,
  ``make_plan``, ``apply_plan``) -- the part comparable to Torch-Pruning;
* Torch-Pruning (if ``import torch_pruning`` works): ``MetaPruner(...)`` (DependencyGraph
  construction) + ``pruner.step()`` with L1 magnitude importance and the same ratio.

The three jobs take turns within each repeat (full, core, TP, full, core, TP, ...) so that a
burst of load from other processes does not land on one of them only; the JSON also records
process CPU time per run and how busy the CPU was just before and after. The table gives the
median and, as its spread, the fastest and slowest run. If Torch-Pruning raises on a model,
the error is recorded and that model's TP column stays empty.

After timing, the pruned models of the last repeat are run forward once and their MACs are
counted with ``prunekit.count_macs`` so the two tools are compared at similar pruned size.

Usage::

    python benchmarks/graph_speed.py                      # all five models, 3 repeats
    python benchmarks/graph_speed.py --models resnet50 timm:resnet26d --repeats 5 --out /tmp/gs.json
    python benchmarks/graph_speed.py --threads 1 --warmup 1 --repeats 5   # a shared machine

Writes JSON to ``--out`` (default benchmarks/results/graph_speed.json) and a Markdown table
next to it (same name, ``.md``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from tqdm.auto import tqdm

import prunekit
import prunekit.criteria
import prunekit.plan
from machine import cpu_busy, cpu_name, load_avg  # benchmarks/machine.py

RATIO = 0.5
INPUT_SHAPE = (1, 3, 224, 224)
# model name -> name of the classifier module that is left unpruned; "timm:" names are built
# with timm.create_model (pretrained=False, 1000 classes)
MODELS = {"resnet50": "fc", "densenet121": "classifier", "timm:resnet26d": "fc",
          "timm:efficientnet_b0": "classifier", "timm:convnext_atto": "head.fc"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "graph_speed.json"

try:  # optional comparison target
    import torch_pruning as tp
except ImportError:  # pragma: no cover - depends on the environment
    tp = None

try:  # needed for the timm: models only
    import timm
except ImportError:  # pragma: no cover - depends on the environment
    timm = None


# --------------------------------------------------------------------------- helpers
def tp_version() -> str | None:
    if tp is None:
        return None
    try:
        return importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        return getattr(tp, "__version__", "unknown")


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)  # same random weights every time, so every repeat prunes alike
    if name.startswith("timm:"):
        return timm.create_model(name[len("timm:"):], pretrained=False).eval()
    return getattr(torchvision.models, name)(weights=None).eval()


def example_input() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(*INPUT_SHAPE)


# --------------------------------------------------------------------------- the three timed jobs
def prune_full(model, x, ignore_name):
    return prunekit.prune(model, x, criterion="l1", ratio=RATIO, ignore=[ignore_name])


def prune_core(model, x, ignore_name, stages: dict | None = None):
    """graph + scores + plan + surgery; ``stages`` (if given) collects seconds per stage."""
    t0 = time.perf_counter()
    graph = prunekit.build_graph(model, x, ignore=[ignore_name])
    t1 = time.perf_counter()
    scores = prunekit.criteria.get_criterion("l1").score(graph, model)
    t2 = time.perf_counter()
    plan = prunekit.plan.make_plan(graph, scores, prunekit.plan.ratios_for_groups(graph, RATIO))
    t3 = time.perf_counter()
    prunekit.apply_plan(model, graph, plan)
    t4 = time.perf_counter()
    if stages is not None:
        for key, dt in zip(("graph", "scores", "plan", "surgery"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages.setdefault(key, []).append(dt)
    return plan


def prune_tp(model, x, ignore_name):
    kwargs = dict(importance=tp.importance.MagnitudeImportance(p=1),
                  ignored_layers=[model.get_submodule(ignore_name)])
    try:
        pruner = tp.pruner.MetaPruner(model, x, pruning_ratio=RATIO, **kwargs)
    except TypeError:  # Torch-Pruning < 1.3 calls it ch_sparsity
        pruner = tp.pruner.MetaPruner(model, x, ch_sparsity=RATIO, **kwargs)
    pruner.step()
    return pruner


def time_jobs(jobs: dict, model_name, ignore_name, repeats, warmup, errors: dict):
    """Run every job of ``jobs`` (label -> callable) ``warmup + repeats`` times, each on a fresh
    model built outside the timed region. The jobs take turns (A B C A B C ...), so a burst of
    load from other processes hits all of them alike rather than one.

    A job that raises is dropped from the remaining turns; its error (type and first line)
    goes to ``errors[label]``.

    Returns ``{label: (wall seconds, process CPU seconds, last pruned model)}``.
    """
    x = example_input()
    out = {label: ([], [], None) for label in jobs}
    jobs = dict(jobs)
    with tqdm(total=(warmup + repeats) * len(jobs), desc=f"{model_name:<12}", leave=False,
              file=sys.stderr) as bar:
        for i in range(warmup + repeats):
            for label, job in list(jobs.items()):
                bar.set_postfix_str(label)
                model = build_model(model_name)  # outside the timed region
                gc.collect()
                cpu0, start = time.process_time(), time.perf_counter()
                try:
                    job(model, x, ignore_name)
                except Exception as e:  # noqa: BLE001 - a tool failing on a model is a result
                    first = (str(e).strip().splitlines() or [""])[0]
                    errors[label] = f"{type(e).__name__}: {first}"
                    print(f"warning: {model_name}: {label} failed: {errors[label]}",
                          file=sys.stderr)
                    del jobs[label]
                    out[label] = ([], [], None)
                    bar.update(warmup + repeats - i)
                    continue
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
                walls, cpus, _ = out[label]
                if i >= warmup:
                    walls.append(elapsed)
                    cpus.append(cpu)
                out[label] = (walls, cpus, model)
                bar.update()
    return out


def check_pruned(model, x) -> dict:
    """One forward pass of the pruned model, and its size."""
    with torch.no_grad():
        out = model(x)
    return {"output_shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
            "macs": prunekit.count_macs(model, x), "params": prunekit.count_params(model)}


def conv_out_channels(model) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def stats(times, cpu_times):
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times, "cpu_median_s": statistics.median(cpu_times),
            "cpu_times_s": cpu_times}


# --------------------------------------------------------------------------- benchmark one model
def bench_model(name: str, repeats: int, warmup: int) -> dict:
    ignore_name = MODELS[name]
    x = example_input()
    base = build_model(name)
    macs_before, params_before = prunekit.count_macs(base, x), prunekit.count_params(base)
    channels_before = conv_out_channels(base)
    del base

    row = {"model": name, "ignored": ignore_name, "ratio": RATIO,
           "macs_before": macs_before, "params_before": params_before,
           "conv_channels_before": channels_before}

    stages: dict[str, list[float]] = {}
    jobs = {"prunekit full": prune_full,
            "prunekit core": lambda m, x_, ig: prune_core(m, x_, ig, stages)}
    if tp is not None:
        jobs["torch-pruning"] = prune_tp
    errors: dict[str, str] = {}
    timed = time_jobs(jobs, name, ignore_name, repeats, warmup, errors)
    if "prunekit full" in errors or "prunekit core" in errors:
        raise RuntimeError(f"{name}: prunekit failed: {errors}")
    row["tp_error"] = errors.get("torch-pruning")
    full_times, full_cpu, full_model = timed["prunekit full"]
    core_times, core_cpu, core_model = timed["prunekit core"]
    tp_times, tp_cpu, tp_model = timed.pop("torch-pruning", (None, None, None))
    row["prunekit_full"] = stats(full_times, full_cpu)
    row["prunekit_core"] = stats(core_times, core_cpu)
    # per-stage medians of the timed core runs (warm-up runs dropped)
    row["prunekit_core"]["stages_median_s"] = {k: statistics.median(v[warmup:])
                                              for k, v in stages.items()}
    pk_full = check_pruned(full_model, x)
    pk_core = check_pruned(core_model, x)
    if pk_full["macs"] != pk_core["macs"]:
        print(f"warning: {name}: prunekit full and core pruned to different MACs "
              f"({pk_full['macs']} vs {pk_core['macs']})", file=sys.stderr)
    row["prunekit_pruned"] = {**pk_full, "conv_channels": conv_out_channels(full_model)}
    del full_model, core_model, timed

    if tp is not None and row["tp_error"] is None:
        row["tp"] = stats(tp_times, tp_cpu)
        row["tp_pruned"] = {**check_pruned(tp_model, x), "conv_channels": conv_out_channels(tp_model)}
        row["tp_over_prunekit_full"] = row["tp"]["median_s"] / row["prunekit_full"]["median_s"]
        row["tp_over_prunekit_core"] = row["tp"]["median_s"] / row["prunekit_core"]["median_s"]
        del tp_model
    else:
        row["tp"] = None
        row["tp_pruned"] = None
        row["tp_over_prunekit_full"] = None
        row["tp_over_prunekit_core"] = None
    gc.collect()
    return row


# --------------------------------------------------------------------------- reporting
def _s(v):
    return "-" if v is None else f"{v:.3f}"


def _g(v):
    return "-" if v is None else f"{v / 1e9:.3f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _spread(st):
    """median [fastest - slowest] of one job's runs."""
    return "-" if st is None else f"{_s(st['median_s'])} [{_s(st['min_s'])}-{_s(st['max_s'])}]"


def table_rows(rows):
    header = ["model", "prunekit full med [min-max] (s)", "prunekit core med [min-max] (s)",
              "TP med [min-max] (s)", "TP/pk full", "TP/pk core",
              "GMACs before", "GMACs pk", "GMACs TP", "Mparams pk", "Mparams TP"]
    body = []
    for r in rows:
        tpr, tpp = r["tp"], r["tp_pruned"]
        body.append([
            r["model"],
            _spread(r["prunekit_full"]), _spread(r["prunekit_core"]),
            "failed" if r.get("tp_error") else _spread(tpr),
            _x(r["tp_over_prunekit_full"]), _x(r["tp_over_prunekit_core"]),
            _g(r["macs_before"]), _g(r["prunekit_pruned"]["macs"]),
            "-" if tpp is None else _g(tpp["macs"]),
            f"{r['prunekit_pruned']['params'] / 1e6:.2f}",
            "-" if tpp is None else f"{tpp['params'] / 1e6:.2f}",
        ])
    return header, body


def stage_line(r) -> str:
    st = r["prunekit_core"]["stages_median_s"]
    return "prunekit core by stage (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in st.items())


def cpu_line(r) -> str:
    parts = [f"prunekit full {r['prunekit_full']['cpu_median_s']:.3f}",
             f"prunekit core {r['prunekit_core']['cpu_median_s']:.3f}"]
    if r["tp"] is not None:
        parts.append(f"TP {r['tp']['cpu_median_s']:.3f}")
    return "process CPU time (median s, all threads): " + ", ".join(parts)


def text_table(rows) -> str:
    header, body = table_rows(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def markdown_table(rows, meta) -> str:
    header, body = table_rows(rows)
    out = ["# Trace + prune speed: prunekit vs Torch-Pruning", "",
           f"Uniform ratio {RATIO}, L1 criterion, classifier ignored, input "
           f"{'x'.join(map(str, INPUT_SHAPE))}, eval mode, weights=None; "
           f"{meta['repeats']} repeats (+{meta['warmup']} warm-up), fresh model each, jobs "
           "interleaved.  ",
           f"torch {meta['torch']}, torchvision {meta['torchvision']}, timm "
           f"{meta['timm'] or 'not installed'}, torch-pruning "
           f"{meta['torch_pruning'] or 'not installed'}, {meta['threads']} threads, "
           f"{meta['cpu']}, CPU busy (other processes, 1 s sample) {meta['cpu_busy_before']} "
           f"before / {meta['cpu_busy_after']} after, 1-min load average "
           f"{meta['load_avg_1min_at_start']} / {meta['load_avg_1min_at_end']}, "
           f"{meta['date']}.", "",
           "*full* = whole `prunekit.prune` call (includes two MAC-counting forward passes); "
           "*core* = build_graph + L1 scores + make_plan + apply_plan; "
           "*TP* = `MetaPruner(...)` + `step()`. Ratios are TP median / prunekit median.", "",
           "| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(b) + " |" for b in body]
    out += [""] + [f"- {r['model']}: {stage_line(r)}; {cpu_line(r)}" for r in rows]
    out += [f"- {r['model']}: Torch-Pruning failed: {r['tp_error']}" for r in rows
            if r.get("tp_error")]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                    help="models to benchmark (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default 3)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed runs before the timed ones, per measurement (default 0)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own choice). On a machine "
                         "shared with other jobs, 1 thread gives far steadier timings")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="JSON output path; the Markdown table goes next to it as .md")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")

    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if timm is None and any(m.startswith("timm:") for m in args.models):
        ap.error("the timm: models need timm (pip install timm) or pick others with --models")
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": getattr(timm, "__version__", None),
            "prunekit": prunekit.__version__, "torch_pruning": tp_version(),
            "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "python": platform.python_version(), "load_avg_1min_at_start": load_avg(),
            "cpu_busy_before": cpu_busy(),
            "repeats": args.repeats, "warmup": args.warmup,
            "ratio": RATIO, "input_shape": list(INPUT_SHAPE),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    print(f"torch {meta['torch']} | torchvision {meta['torchvision']} | torch-pruning "
          f"{meta['torch_pruning'] or 'not installed'} | threads {meta['threads']} | "
          f"CPU {meta['cpu']} | repeats {args.repeats}")
    busy = meta["cpu_busy_before"]
    if busy is not None and busy > 0.2:
        print(f"warning: {100 * busy:.0f}% of the CPU was busy with other processes just before "
              "starting; these timings are unreliable", file=sys.stderr)

    rows = [bench_model(name, args.repeats, args.warmup) for name in args.models]
    meta["load_avg_1min_at_end"] = load_avg()
    meta["cpu_busy_after"] = cpu_busy()

    print()
    print(text_table(rows))
    print()
    for r in rows:
        if r["tp"] is not None:
            print(f"{r['model']}: tp_time / prunekit_time = {r['tp_over_prunekit_full']:.2f} "
                  f"(full prune call), {r['tp_over_prunekit_core']:.2f} (graph+plan+surgery)")
    for r in rows:
        print(f"{r['model']}: {stage_line(r)}")
        print(f"{r['model']}: {cpu_line(r)}")
    for r in rows:
        pk, tpp = r["prunekit_pruned"], r["tp_pruned"]
        line = (f"{r['model']}: forward ok (prunekit out {pk['output_shape']}"
                + (f", TP out {tpp['output_shape']}" if tpp else "") + "); conv channels "
                f"{r['conv_channels_before']} -> prunekit {pk['conv_channels']}"
                + (f", TP {tpp['conv_channels']}" if tpp else ""))
        print(line)
    print("note: prunekit removes floor(0.5*n) channels of every prunable group; Torch-Pruning "
          "removes n - int(n*(1-0.5)) = ceil(0.5*n) per group (equal for even n).")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(markdown_table(rows, meta))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
