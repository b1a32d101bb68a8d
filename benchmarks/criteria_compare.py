"""Every criterion on the pretrained ResNet-56 at the same MACs reduction and fine-tuning budget.

    python benchmarks/criteria_compare.py [--target 0.47] [--epochs 1] [--criteria l1,chip,...]

For each criterion: prune the pretrained CIFAR-10 ResNet-56 (shortcut A) to ``target`` of its
MACs removed (prunekit's MACs search: within 1%), evaluate, fine-tune ``epochs`` epochs with
the same seed and schedule for all (SGD lr 0.01 cosine, momentum 0.9, wd 5e-4, batch 128, on
the 45k train split), evaluate again. The unpruned network gets the same fine-tuning budget,
because the JPEG-derived training data shifts every model. Accuracy is reported on `test`
(10,000 JPEG-decoded images: compare methods with each other) and `test-lossless` (the 1,000
original images). Results are appended to benchmarks/results/criteria_compare.json as each
criterion finishes, so an interrupted run resumes where it stopped.

``--plan chip`` replaces the uniform ratio by CHIP's per-layer ResNet-56 sparsity (residual
streams 15%/15%/0%, every block's inner channels 40%; 47% of the MACs), to see whether a
criterion's ranking depends on where the channels are removed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prunekit import data, measure, models, prune
from prunekit.pipeline import calibration_batches
from prunekit.plan import PlanTarget
from prunekit.train import TrainConfig, fit

RESULTS = Path(__file__).parent / "results"
# CHIP's ResNet-56 sparsity (methods.md 1.3): residual streams 0 / 15% / 15% / 0 (stage 3),
# every block's inner channels 40%: about the same MACs as the uniform plan, spread differently.
CHIP_RESNET56 = "[0.]+[0.15]*2+[0.4]*27"
CRITERIA = ["random", "l1", "l2", "fpgm", "bn_scale", "taylor", "apoz", "hrank", "chip"]
SPLITS = ("test", "test-lossless")


def evaluate(model, root) -> dict:
    out = {}
    for split in SPLITS:
        loader = data.build_loader(data.CIFAR10(root, split=split), batch_size=500, shuffle=False)
        out[split] = measure.evaluate(model, loader, desc=split)["top1"]
    return out


def run_one(name: str, root, args, calibration) -> dict:
    torch.manual_seed(args.seed)
    model = models.create("cifar_resnet56", weights="pretrained").eval()
    x = torch.randn(1, 3, 32, 32)
    row: dict = {"criterion": name}
    start = time.perf_counter()
    if name == "unpruned":
        row.update(macs=measure.count_macs(model, x), params=measure.count_params(model))
        row["macs_reduction"] = 0.0
    elif args.plan == "chip":
        row["criterion"] = f"{name}@chip-plan"
        result = prune(model, x, criterion=name, target=PlanTarget(chip_sparsity=CHIP_RESNET56),
                       calibration=calibration)
        row.update(macs=result.macs_after, params=result.params_after,
                   macs_reduction=result.macs_reduction)
    else:
        result = prune(model, x, criterion=name, macs_reduction=args.target,
                       calibration=calibration)
        row.update(macs=result.macs_after, params=result.params_after,
                   macs_reduction=result.macs_reduction)
    row["prune_seconds"] = time.perf_counter() - start
    row["after_pruning"] = evaluate(model, root)
    start = time.perf_counter()
    if args.epochs > 0:
        config = TrainConfig(epochs=args.epochs, lr=0.01, momentum=0.9, weight_decay=5e-4,
                             schedule="cosine", batch_size=128, seed=args.seed)
        fit(model, data.CIFAR10(root, split="train", train_augment=True),
            data.CIFAR10(root, split="val"), config, Path(args.work) / name, resume=False)
        row["after_finetune"] = evaluate(model.eval(), root)
    else:
        row["after_finetune"] = None
    row["finetune_seconds"] = time.perf_counter() - start
    return row


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["criterion"] for r in rows]
    pruned = [r["after_pruning"]["test"] for r in rows]
    tuned = [(r["after_finetune"] or {}).get("test") for r in rows]
    has_tuned = any(v is not None for v in tuned)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    xs = range(len(rows))
    width = 0.4 if has_tuned else 0.6
    left = [i - 0.2 for i in xs] if has_tuned else list(xs)
    ax.bar(left, pruned, width=width, label="right after pruning", color="#bbb")
    for x, v in zip(left, pruned):
        ax.text(x, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
    if has_tuned:
        ax.bar([i + 0.2 for i in xs], [v or 0 for v in tuned], width=0.4,
               label="after fine-tuning", color="#3574b3")
        for i, v in enumerate(tuned):
            if v is not None:
                ax.text(i + 0.2, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=30)
    ax.set_ylabel("top-1 % on test (10,000 JPEG-decoded images)")
    ax.set_title("ResNet-56, ~47% MACs removed" + (", same fine-tuning budget" if has_tuned
                                                     else ", no fine-tuning (one-shot)"))
    ax.legend(loc="upper right", ncol=2, fontsize=8, framealpha=0.9)
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows) -> str:
    lines = ["| criterion | MACs | MACs -% | params | test after pruning | test after FT | "
             "lossless-1k after FT | prune s | FT s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tuned = r["after_finetune"] or {}
        lines.append(f"| {r['criterion']} | {r['macs'] / 1e6:.2f}M | {100 * r['macs_reduction']:.1f} | "
                     f"{r['params'] / 1e6:.3f}M | {r['after_pruning']['test']:.2f} | "
                     f"{tuned.get('test', float('nan')):.2f} | "
                     f"{tuned.get('test-lossless', float('nan')):.1f} | {r['prune_seconds']:.0f} | "
                     f"{r['finetune_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", type=float, default=0.47)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--criteria", default=",".join(["unpruned"] + CRITERIA))
    p.add_argument("--plan", default="uniform", choices=("uniform", "chip"),
                   help="uniform: one ratio for every group, found for --target; chip: CHIP's "
                        "per-layer sparsity string (rows are named CRITERION@chip-plan)")
    p.add_argument("--data", default=None)
    p.add_argument("--work", default="runs/criteria_compare")
    p.add_argument("--out", default=str(RESULTS / "criteria_compare"))
    args = p.parse_args()
    root = data.resolve_data_root(args.data)
    out_json = Path(f"{args.out}.json")
    done = json.loads(out_json.read_text())["rows"] if out_json.exists() else []
    finished = {r["criterion"] for r in done}
    calibration = calibration_batches(root, {"batches": 5, "batch_size": 128}, args.seed)
    for name in args.criteria.split(","):
        label = name if args.plan == "uniform" or name == "unpruned" else f"{name}@chip-plan"
        if label in finished:
            continue
        print(f"== {name}", flush=True)
        done.append(run_one(name, root, args, calibration))
        meta = {"target": args.target, "epochs": args.epochs, "seed": args.seed,
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "splits": {
                    "test": "10,000 JPEG-decoded test images (compare methods)",
                    "test-lossless": "first 1,000 original test images"}}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({"meta": meta, "rows": done}, indent=1))
        Path(f"{args.out}.md").write_text(table(done) + "\n")
        plot(done, Path(f"{args.out}.png"))
        print(table(done), flush=True)


if __name__ == "__main__":
    main()
