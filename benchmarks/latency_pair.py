"""Measured latency of an unpruned and a pruned model in ONE run, interleaved.

    python benchmarks/latency_pair.py BASE_MODEL PRUNED.safetensors [--rounds 5]

Each round times both models (batch 1 and 64) back to back, so load from other processes hits
both alike; the medians over rounds and the speed-up go to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import cpu_busy, cpu_name, interleaved_latency  # benchmarks/machine.py

from prunekit import io, measure, models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base", help="zoo model name with pretrained weights, e.g. cifar_resnet56")
    p.add_argument("pruned", help="a .safetensors file written by prunekit")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_pair.json"))
    args = p.parse_args()
    nets = {"unpruned": models.create(args.base, weights="pretrained").eval(),
            "pruned": io.load(args.pruned).eval()}
    x = torch.randn(1, 3, 32, 32)
    busy = cpu_busy()
    medians = interleaved_latency(nets, x, rounds=args.rounds, runs=args.runs)
    result = {"base": args.base, "pruned": args.pruned, "rounds": args.rounds,
              "runs_per_round": args.runs, "threads": torch.get_num_threads(),
              "cpu": cpu_name(), "cpu_busy_before": busy, "cpu_busy_after": cpu_busy(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "macs": {n: measure.count_macs(m, x) for n, m in nets.items()}}
    for name in nets:
        result[f"{name}_ms"] = medians[name]
    result["latency_speedup"] = {bs: result["unpruned_ms"][bs] / result["pruned_ms"][bs]
                                 for bs in ("1", "64")}
    result["macs_speedup"] = result["macs"]["unpruned"] / result["macs"]["pruned"]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
