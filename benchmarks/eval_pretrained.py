"""Evaluate the shared pretrained CIFAR-10 ResNets on every test split; write JSON + Markdown.

    python benchmarks/eval_pretrained.py [--data DIR] [--out benchmarks/results]

Checks the model zoo, the loader and the normalisation against ../shared/data/README.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prunekit import data, measure, models

EXPECTED = {  # ../shared/data/README.md, measured with its verify.py
    "cifar_resnet20": {"test": 81.03, "test-lossless": 91.5},
    "cifar_resnet32": {"test": 82.56, "test-lossless": 92.8},
    "cifar_resnet44": {"test": 82.67, "test-lossless": 93.3},
    "cifar_resnet56": {"test": 83.20, "test-lossless": 92.6},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    root = data.resolve_data_root(args.data)
    rows = []
    for name, expected in EXPECTED.items():
        model = models.create(name, weights="pretrained").eval()
        sizes = measure.profile(model, torch.randn(1, 3, 32, 32))
        for split, want in expected.items():
            ds = data.CIFAR10(root, split=split)
            loader = data.build_loader(ds, batch_size=500, shuffle=False)
            t = time.perf_counter()
            acc = measure.evaluate(model, loader, desc=f"{name} {split}")
            rows.append({"model": name, "split": split, "split_description": ds.description,
                         "images": acc["n"], "top1": acc["top1"], "top5": acc["top5"],
                         "expected_top1": want, "diff": acc["top1"] - want,
                         "seconds": time.perf_counter() - t, **sizes})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    (out / "pretrained_eval.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| model | split | images | top-1 | expected | diff | top-5 | MACs | params |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['split']} | {r['images']:,} | {r['top1']:.2f} | "
                     f"{r['expected_top1']:.2f} | {r['diff']:+.2f} | {r['top5']:.2f} | "
                     f"{r['macs']:,} | {r['params']:,} |")
    table = "\n".join(lines)
    (out / "pretrained_eval.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
