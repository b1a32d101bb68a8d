"""Soft pruning methods and LFPC at the same MACs reduction and the same epoch budget.

    python benchmarks/soft_compare.py [--model cifar_resnet20] [--target 0.526] [--epochs 3]

From the pretrained CIFAR-10 network, every method removes ``target`` of the MACs (prunekit's
MACs search: the same per-group counts for all, within 1%) and gets ``epochs`` epochs of
weight training with the same seed, optimiser and schedule (SGD lr 0.01 cosine, momentum 0.9,
wd 5e-4, batch 128, the 45k train split):

* ``fpgm-oneshot``: prune once by FPGM, then fine-tune ``epochs`` epochs;
* ``sfp`` (l2, masks re-computed every epoch, regrowth), ``fpgm-soft`` (fpgm, gradients of
  masked filters zeroed), ``asfp`` (l2, asymptotic rate): ``epochs`` epochs of soft pruning,
  then physical removal;
* ``lfpc``: 1 epoch of criteria search (the weights train on the train split, the sampler on
  the 5k val split), then ``epochs - 1`` epochs of SFP with the learned per-group criteria, so
  its weights see the same number of training epochs; the search's sampler lr is 0.01 (the
  reconstruction's 1e-4 is meant for a 600-epoch search);
* ``unpruned``: the unpruned network with the same budget (the JPEG-derived data shifts
  every model).

Accuracy on ``test`` (10,000 JPEG-decoded images: compare methods) and ``test-lossless`` (the
first 1,000 original test images). Latency is measured at the end for all final models in one
run, interleaved (benchmarks/machine.py). Each method's result is appended to the JSON as it
finishes, and each method's training resumes from its checkpoints, so an interrupted run
continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import cpu_busy, cpu_name, interleaved_latency  # benchmarks/machine.py

from prunekit import data, io, measure, models, prune
from prunekit.methods import lfpc_prune, plot_choices, soft_prune
from prunekit.train import TrainConfig, fit

RESULTS = Path(__file__).parent / "results"
METHODS = ["unpruned", "fpgm-oneshot", "sfp", "fpgm-soft", "asfp", "lfpc"]
SOFT = {"sfp": ("l2", "constant", False), "fpgm-soft": ("fpgm", "constant", True),
        "asfp": ("l2", "asymptotic", False)}
# ...-g0: the same with the BN weight (gamma) of masked channels zeroed too (zero_norm_weight);
# ...-m0: the same with the masked entries' momentum zeroed at every masking (reset_momentum)
SOFT.update({f"{name}-{v}": spec for name, spec in dict(SOFT).items() for v in ("g0", "m0")})
SPLITS = ("test", "test-lossless")


def evaluate(model, root) -> dict:
    out = {}
    for split in SPLITS:
        loader = data.build_loader(data.CIFAR10(root, split=split), batch_size=500, shuffle=False)
        out[split] = measure.evaluate(model.eval(), loader, desc=split)["top1"]
    return out


def train_config(args, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=0.01, momentum=0.9, weight_decay=5e-4,
                       schedule="cosine", batch_size=128, seed=args.seed,
                       max_steps_per_epoch=args.max_steps)


def run_one(name: str, root, args) -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(args.seed)
    model = models.create(args.model, weights="pretrained").eval()
    x = torch.randn(1, 3, 32, 32)
    macs_before = measure.count_macs(model, x)
    train = data.CIFAR10(root, split="train", train_augment=True)
    val = data.CIFAR10(root, split="val")
    work = Path(args.work) / name
    row: dict = {"method": name}
    start = time.perf_counter()
    if name == "unpruned":
        fit(model, train, val, train_config(args, args.epochs), work)
    elif name == "fpgm-oneshot":
        result = prune(model, x, criterion="fpgm", macs_reduction=args.target)
        row["after_pruning"] = evaluate(model, root)
        fit(model, train, val, train_config(args, args.epochs), work)
    elif name in SOFT:
        criterion, schedule, mask_grads = SOFT[name]
        model, result, _ = soft_prune(model, train, val, train_config(args, args.epochs), work,
                                      criterion=criterion, schedule=schedule,
                                      mask_grads=mask_grads, example_inputs=x,
                                      macs_reduction=args.target,
                                      zero_norm_weight=name.endswith("-g0"),
                                      reset_momentum=name.endswith("-m0"))
    elif name == "lfpc":
        model, result, info = lfpc_prune(
            model, train, val, train_config(args, 1), train_config(args, args.epochs - 1),
            work, example_inputs=x, macs_reduction=args.target, alpha_lr=args.alpha_lr)
        row["lfpc_choices"] = info["choices"]
        row["lfpc_search_history"] = info["search_history"]
    else:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    row["seconds"] = time.perf_counter() - start
    row["macs"] = measure.count_macs(model, x)
    row["params"] = measure.count_params(model)
    row["macs_reduction"] = 1 - row["macs"] / macs_before
    row["accuracy"] = evaluate(model, root)
    if name != "unpruned":
        row["plan_groups"] = len(result.plan)
    io.save(model.eval(), work / "final.safetensors", method={"name": name})
    return row, model


def plot(rows, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    names = [r["method"] for r in rows]
    acc = [r["accuracy"]["test"] for r in rows]
    colors = ["#999" if n == "unpruned" else "#d9822b" if n == "lfpc" else "#3574b3"
              for n in names]
    ax.bar(range(len(rows)), acc, color=colors)
    for i, r in enumerate(rows):
        lat = r.get("latency_ms", {}).get("1")
        label = f"{acc[i]:.2f}\n-{100 * r['macs_reduction']:.1f}% MACs"
        if lat:
            label += f"\n{lat:.2f} ms"
        ax.text(i, acc[i] + 0.3, label, ha="center", fontsize=7)
    lo = min(acc) - 8
    ax.set_ylim(max(0, lo), 100)
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("top-1 % on test (10,000 JPEG-decoded)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows) -> str:
    lines = ["| method | MACs | MACs -% | params | test | test-lossless (1k) | "
             "latency bs1 ms | latency bs64 ms | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat = r.get("latency_ms", {})
        lines.append(f"| {r['method']} | {r['macs'] / 1e6:.2f}M | {100 * r['macs_reduction']:.1f} | "
                     f"{r['params'] / 1e6:.3f}M | {r['accuracy']['test']:.2f} | "
                     f"{r['accuracy']['test-lossless']:.1f} | {lat.get('1', float('nan')):.2f} | "
                     f"{lat.get('64', float('nan')):.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def choices_table(rows) -> str:
    criteria = list(rows[0]["probabilities"])
    lines = ["| group | channels | kept | " + " | ".join(f"p({c})" for c in criteria) +
             " | choice |", "|---|---:|---:|" + "---:|" * len(criteria) + "---|"]
    for r in rows:
        probs = " | ".join(f"{r['probabilities'][c]:.2f}" for c in criteria)
        lines.append(f"| {r['group']} | {r['size']} | {r['kept']} | {probs} | {r['choice']} |")
    return "\n".join(lines)


def write(rows, meta, out: str) -> None:
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = table(rows) + "\n"
    lfpc = next((r for r in rows if r["method"] == "lfpc"), None)
    if lfpc:
        text += "\nLFPC's learned criteria (sampler probabilities after the search):\n\n"
        text += choices_table(lfpc["lfpc_choices"]) + "\n"
        plot_choices(lfpc["lfpc_choices"], Path(f"{out}_lfpc_choices.png"),
                     title=f"LFPC on {meta['model']}: learned criterion per group")
    Path(f"{out}.md").write_text(text)
    plot(rows, Path(f"{out}.png"),
         f"{meta['model']} at ~{100 * meta['target']:.1f}% MACs removed, {meta['epochs']} "
         "training epochs each (latency bs1 under the bars' labels)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--target", type=float, default=0.526)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--alpha-lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--data", default=None)
    p.add_argument("--work", default="runs/soft_compare")
    p.add_argument("--out", default=str(RESULTS / "soft_compare"))
    p.add_argument("--latency-rounds", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None, help="steps per epoch (smoke runs)")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (LFPC spends one on the search)")
    root = data.resolve_data_root(args.data)
    out_json = Path(f"{args.out}.json")
    rows = json.loads(out_json.read_text())["rows"] if out_json.exists() else []
    meta = {"model": args.model, "target": args.target, "epochs": args.epochs,
            "seed": args.seed, "alpha_lr": args.alpha_lr, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "date": time.strftime("%Y-%m-%d"), "splits": {
                "test": "10,000 JPEG-decoded test images (compare methods)",
                "test-lossless": "first 1,000 original test images"}}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    for name in args.methods.split(","):
        if name in {r["method"] for r in rows}:
            continue
        print(f"== {name}", flush=True)
        row, _ = run_one(name, root, args)
        rows.append(row)
        write(rows, meta, args.out)
        print(table(rows), flush=True)
    # latency of every final model, in one interleaved run
    nets = {r["method"]: io.load(Path(args.work) / r["method"] / "final.safetensors").eval()
            for r in rows}
    meta["cpu_busy_before_latency"] = cpu_busy()
    latency = interleaved_latency(nets, torch.randn(1, 3, 32, 32), rounds=args.latency_rounds)
    meta["cpu_busy_after_latency"] = cpu_busy()
    for r in rows:
        r["latency_ms"] = latency[r["method"]]
    write(rows, meta, args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
