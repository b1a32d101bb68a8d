"""HASTE without data or training: accuracy, measured MACs and CPU latency of pretrained CIFAR
ResNets whose convolutions are swapped for hashing convolutions, at several settings.

    nice -n 19 python benchmarks/haste_table.py --threads 1 [--splits test-lossless,test]
        [--models cifar_resnet56,cifar_resnet20] [--hyperplanes 16,12,10,8,6] [--patch 4]
        [--limit N] [--out benchmarks/results/haste]

Per model (``models.create(name, weights="pretrained")``) one dense row and one row per
(patch, L) setting (prunekit.nn.hash_convolutions; the other options at their reconstructed
defaults). Per row:

* top-1 on each split (``test-lossless``: the first 1000 lossless test images; ``test``: all
  10k, or the first ``--limit``);
* mean MACs per image measured on the first split's images while evaluating them: the hashed
  layers' conv MACs on the merged channel counts plus the hashing, centring and merging
  overhead (prunekit.nn.hashconv counts each add as a MAC), plus the dense stem and
  classifier; reduction vs the dense model;
* CPU latency on real test images, hashed and dense timed in alternation, round by round:
  median and min..max of the per-round medians, batch 1 and batch 64.

The table resumes: rows already in OUT.json are kept (same settings), each new row is written
atomically as soon as it is measured. The paper's headline for comparison (arXiv:2309.17211
abstract): 46.72% fewer FLOPs at -1.25 points on a CIFAR-10 ResNet-34; ResNet-56/20 were not
reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prunekit import data, measure, models
from prunekit.files import atomic_write_json, atomic_write_text
from prunekit.nn import hash_convolutions, hashed_modules, macs_summary

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cifar_resnet56,cifar_resnet20")
    ap.add_argument("--hyperplanes", default="16,12,10,8,6", help="L values (comma list)")
    ap.add_argument("--patch", default="4", help="patch sizes (comma list)")
    ap.add_argument("--centring", default="patch_mean", help="centrings (comma list; "
                    "prunekit.nn.hashconv CENTRINGS)")
    ap.add_argument("--splits", default="test-lossless", help="comma list; the first one is "
                    "where MACs are measured")
    ap.add_argument("--limit", type=int, default=None, help="at most N images per split")
    ap.add_argument("--data", default=str(SHARED / "cifar10"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="latency rounds")
    ap.add_argument("--runs-bs1", type=int, default=5, help="timed calls per round, batch 1")
    ap.add_argument("--runs-bs64", type=int, default=1, help="timed calls per round, batch 64")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "haste"))
    return ap.parse_args(argv)


def evaluate(model, loader, desc: str, count_macs: bool) -> tuple[float, dict | None]:
    for m in hashed_modules(model).values():
        m.reset_macs()
    correct = total = 0
    with torch.no_grad():
        for x, y in tqdm(loader, desc=desc, leave=False):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    summary = macs_summary(model) if count_macs and hashed_modules(model) else None
    return 100.0 * correct / total, summary


def _time(model, x, runs: int) -> float:
    samples = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def latency(nets: dict, images: torch.Tensor, args) -> dict:
    """Per net and batch size: median and range of the per-round medians (ms); every round
    times each net once, back to back."""
    per = {name: {"1": [], "64": []} for name in nets}
    for _ in tqdm(range(args.rounds), desc="latency", leave=False):
        for name, net in nets.items():
            per[name]["1"].append(_time(net, images[:1], args.runs_bs1))
            per[name]["64"].append(_time(net, images[:64], args.runs_bs64))
    return {name: {bs: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
                   for bs, v in d.items()} for name, d in per.items()}


def run_row(name, base, dense_macs, setting, loaders, images, args) -> dict:
    model = copy.deepcopy(base)
    row = {"model": name, "setting": setting}
    if setting != "dense":
        swap = hash_convolutions(model, hyperplanes=setting["L"], patch=setting["patch"],
                                 centring=setting.get("centring", "patch_mean"))
        row["swapped"], row["skipped"] = len(swap.swapped), swap.skipped
    row["top1"] = {}
    for i, (split, loader) in enumerate(loaders.items()):
        acc, macs = evaluate(model, loader, f"{name} {setting} {split}", i == 0)
        row["top1"][split] = acc
        if macs is not None:
            whole = dense_macs - macs["dense_macs"] + macs["hashed_macs"]
            row["macs"] = {"model": whole, "hashed_layers": macs["hashed_macs"],
                           "hashed_layers_dense": macs["dense_macs"],
                           "conv": macs["conv_macs"], "overhead": macs["overhead_macs"],
                           "channel_ratio": macs["conv_macs"] / macs["dense_macs"],
                           "measured_on": f"{split} ({macs['images']} images)"}
    if setting == "dense":
        row["macs"] = {"model": dense_macs, "measured_on": "static count"}
    row["reduction"] = 1 - row["macs"]["model"] / dense_macs
    if not args.no_latency:
        lat = latency({"dense": base, "row": model}, images, args) if setting != "dense" \
            else latency({"row": model}, images, args)
        row["latency"] = lat["row"]
        if "dense" in lat:
            row["latency_dense_interleaved"] = lat["dense"]
    return row


def key(row_or_name, setting=None) -> str:
    if setting is None:
        row_or_name, setting = row_or_name["model"], row_or_name["setting"]
    return f"{row_or_name}|{json.dumps(setting, sort_keys=True)}"


def write_md(result: dict, path: Path) -> None:
    rows = result["rows"]
    splits = result["config"]["splits"]
    lines = ["# HASTE (arXiv:2309.17211) on pretrained CIFAR-10 ResNets: no data, no training",
             "", "Reconstructed HashConv2d (prunekit.nn.hashconv; centring patch_mean, halo "
             "include, sparsity 2/3, stem dense). MACs: mean per image measured on "
             f"{splits[0]}, hashing/merging overhead included. Latency: CPU, "
             f"{result['config']['threads']} thread(s), real test images, hashed and dense "
             "timed in alternation (median [min..max] of per-round medians).", "",
             f"Command: `{result['config']['command']}`", "",
             "Paper headline for comparison: ResNet-34 on CIFAR-10, 46.72% fewer FLOPs at "
             "-1.25 points (not reported for ResNet-56/20).", "",
             "| model | setting | " + " | ".join(f"top-1 {s}" for s in splits) +
             " | MACs (M) | reduction | overhead (M) | lat bs1 ms | dense bs1 ms | "
             "lat bs64 ms | dense bs64 ms |",
             "|" + "---|" * (9 + len(splits))]

    def lat(entry, bs):
        if not entry:
            return "-"
        e = entry[bs]
        return f"{e['median_ms']:.1f} [{e['min_ms']:.1f}..{e['max_ms']:.1f}]"
    for row in rows.values():
        s = row["setting"]
        label = "dense" if s == "dense" else f"P={s['patch']} L={s['L']}" + (
            f" {s['centring']}" if "centring" in s else "")
        m = row["macs"]
        lines.append(f"| {row['model']} | {label} | " +
                     " | ".join(f"{row['top1'].get(sp, float('nan')):.2f}" for sp in splits) +
                     f" | {m['model'] / 1e6:.2f} | {100 * row['reduction']:.1f}% | "
                     f"{m.get('overhead', 0) / 1e6:.2f} | {lat(row.get('latency'), '1')} | "
                     f"{lat(row.get('latency_dense_interleaved'), '1')} | "
                     f"{lat(row.get('latency'), '64')} | "
                     f"{lat(row.get('latency_dense_interleaved'), '64')} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    split = result["config"]["splits"][0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in result["rows"].values()):
        rows = [r for r in result["rows"].values() if r["model"] == name]
        rows.sort(key=lambda r: r["reduction"])
        ax.plot([100 * r["reduction"] for r in rows], [r["top1"][split] for r in rows], "o-",
                label=name)
    ax.set_xlabel("measured MACs reduction vs dense (%)")
    ax.set_ylabel(f"top-1 on {split} (%)")
    ax.set_title("HASTE (reconstructed), no data, no training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from io import BytesIO
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    from prunekit.files import atomic_write_bytes
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> None:
    import sys
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    splits = [s for s in args.splits.split(",") if s]
    config = {"splits": splits, "limit": args.limit, "threads": args.threads,
              "rounds": args.rounds, "runs_bs1": args.runs_bs1, "runs_bs64": args.runs_bs64,
              "command": "python benchmarks/haste_table.py " + " ".join(sys.argv[1:])}
    path = out.with_suffix(".json")
    result = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    same = {k: v for k, v in config.items() if k != "command"}
    if {k: result.get("config", {}).get(k) for k in same} != same:
        result = {"rows": {}}  # other settings: start over
    result["config"] = config
    loaders, images = {}, None
    for split in splits:
        ds = data.CIFAR10(args.data, split=split, limit=args.limit)
        loaders[split] = data.build_loader(ds, batch_size=100, shuffle=False)
        if images is None:
            images = torch.stack([ds[i][0] for i in range(64)])
    # a setting names its centring only when it is not the default, so older rows still match
    settings = ["dense"] + [{"patch": p, "L": L, **({} if c == "patch_mean" else {"centring": c})}
                            for c in args.centring.split(",") if c
                            for p in _ints(args.patch) for L in _ints(args.hyperplanes)]
    todo = [(name, s) for name in args.models.split(",") for s in settings]
    for name, setting in tqdm(todo, desc="rows"):
        if key(name, setting) in result["rows"]:
            continue
        base = models.create(name, weights="pretrained").eval()
        dense_macs = measure.count_macs(base, (1, 3, 32, 32))
        row = run_row(name, base, dense_macs, setting, loaders, images, args)
        result["rows"][key(row)] = row
        atomic_write_json(path, result, indent=1)
        write_md(result, out.with_suffix(".md"))
    write_md(result, out.with_suffix(".md"))
    plot(result, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
