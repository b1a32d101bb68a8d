"""Measured latency of an unpruned and a pruned model in ONE run, interleaved.

    python benchmarks/latency_pair.py BASE_MODEL PRUNED.safetensors [--rounds 5] [--deploy]

Each round times both models (batch 1 and 64) back to back, so load from other processes hits
both alike (prunekit.measure.interleaved_latency, the measurement `prunekit prune` reports);
the medians, the speed-up, its per-round range and the machine-load verdict go to
benchmarks/results/. ``--deploy`` compares both models as prunekit.deploy makes them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import cpu_busy, cpu_name  # benchmarks/machine.py

import prunekit
from prunekit import io, measure, models
from prunekit.files import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base", help="zoo model name with pretrained weights, e.g. cifar_resnet56")
    p.add_argument("pruned", help="a .safetensors file written by prunekit")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--deploy", action="store_true", help="compare both models deployed")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_pair.json"))
    args = p.parse_args()
    nets = {"unpruned": models.create(args.base, weights="pretrained").eval(),
            "pruned": io.load(args.pruned).eval()}
    x = torch.randn(1, 3, 32, 32)
    macs = {n: measure.count_macs(m, x) for n, m in nets.items()}
    if args.deploy:
        nets = {n: prunekit.deploy(m, x) for n, m in nets.items()}
    busy = cpu_busy()
    measured = measure.interleaved_latency(nets, x, rounds=args.rounds, runs=args.runs)
    medians = {n: {str(bs): ms for bs, ms in per.items()} for n, per in measured.median_ms.items()}
    result = {"base": args.base, "pruned": args.pruned, "rounds": args.rounds,
              "runs_per_round": args.runs, "threads": torch.get_num_threads(),
              "cpu": cpu_name(), "cpu_busy_before": busy, "cpu_busy_after": cpu_busy(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "deployed": args.deploy, "macs": macs,
              "measurement": measured.as_dict(before="unpruned", after="pruned")}
    for name in nets:
        result[f"{name}_ms"] = medians[name]
    result["latency_speedup"] = {bs: result["unpruned_ms"][bs] / result["pruned_ms"][bs]
                                 for bs in ("1", "64")}
    result["macs_speedup"] = result["macs"]["unpruned"] / result["macs"]["pruned"]
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
