"""The wide stripe kernel build (16-float vectors, AVX-512) against the default width.
Per layer and on whole deployed networks, in one interleaved run per row.

    python benchmarks/wide_vectors.py [--models swp56,r56_l1_macs50] [--rounds 7] [--out FILE]

Layer rows first (ResNet-56's 3x3 shapes with 50% of the stripes removed at random, as in
stripe_speed.py; 1 thread, batch 1 / 16 / 64): the same StripeConv2d laid out on each width.
Network rows: (model, threads 1 | 2, batch 1 | 64). Each row deploys the pruned model twice,
with every conv on the C kernel (``native_convs=True``, NCHW, sequences on), once with
``stripe_native.WIDE_VECTORS`` off (every conv on 8-float vectors: the kernel before the wide
build) and once on (convs whose output rows are whole 16-float vectors on the wide build), runs
each once so its plans are laid out under that setting, and times both with
``prunekit.measure.interleaved_latency``. Models as in deploy_speed.py. Needs a CPU with
AVX-512 (otherwise there is no wide build and the script says so). Resumable per row.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import prunekit
from prunekit import measure
from prunekit.files import atomic_write_json, atomic_write_text
from prunekit.nn import stripe_native

from deploy_speed import MODELS  # benchmarks/deploy_speed.py
from stripe_speed import LAYERS, random_mask  # benchmarks/stripe_speed.py

OUT = Path(__file__).parent / "results" / "wide_vectors.json"


def _both_widths(make, example, threads) -> dict:
    """``make()`` twice, once with ``stripe_native.WIDE_VECTORS`` off and once on, each run
    once on ``example`` so that its plans are laid out under that setting (the settings and
    torch's thread count are restored)."""
    previous = (torch.get_num_threads(), stripe_native.WIDE_VECTORS)
    models = {}
    try:
        torch.set_num_threads(threads)
        for wide in (False, True):
            stripe_native.WIDE_VECTORS = wide
            models["wide" if wide else "narrow"] = model = make()
            with torch.no_grad():
                model(example)
    finally:
        torch.set_num_threads(previous[0])
        stripe_native.WIDE_VECTORS = previous[1]
    return models


def _timed_row(name, models, x, batch, threads, rounds, runs) -> dict:
    """Both widths in one interleaved run: the row of the results file."""
    measured = measure.interleaved_latency(models, x, batch_sizes=(batch,), rounds=rounds,
                                           runs=runs, threads=threads)
    lo, hi = measured.speedup_range("narrow", "wide")[batch]
    return {"model": name, "threads": threads, "batch": batch,
            "narrow_ms": measured.results["narrow"].median_ms[batch],
            "wide_ms": measured.results["wide"].median_ms[batch],
            "speedup": measured.speedup("narrow", "wide")[batch], "round_range": [lo, hi],
            "warnings": list(measured.warnings), "machine": measured.machine,
            "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": rounds}


def _row(name, pruned, x, threads, batch, rounds) -> dict:
    example = x.expand(batch, *x.shape[1:]).contiguous()
    models = _both_widths(lambda: prunekit.deploy(pruned, example, native_convs=True,
                                                  channels_last=False), example, threads)
    return _timed_row(name, models, x, batch, threads, rounds, 10 if batch == 1 else 4)


def _layer_row(cin, cout, size, stride, rounds) -> list[dict]:
    from torch import nn

    from prunekit.nn import StripeConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False).eval()
    mask = random_mask(cout, 0.5, seed=cin + cout + stride)
    rows = []
    for batch in (1, 16, 64):
        x = torch.randn(batch, cin, size, size)
        models = _both_widths(lambda: StripeConv2d.from_dense(conv, mask), x, 1)
        rows.append(_timed_row(f"layer {cin}->{cout} {size}x{size} s{stride}", models, x[:1],
                               batch, 1, rounds, 10))
    return rows


def write_md(done: dict, path: Path) -> None:
    lines = ["# Wide (16-float) vs default (8-float) stripe kernel, deployed pruned networks", "",
             "`python benchmarks/wide_vectors.py`; median ms of interleaved rounds; speed-up = "
             "narrow / wide, per-round range in brackets.", "",
             "| model | threads | batch | narrow ms | wide ms | speed-up [range] | measured | "
             "trust |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in done["rows"]:
        lo, hi = r["round_range"]
        lines.append(f"| {r['model']} | {r['threads']} | {r['batch']} | {r['narrow_ms']:.3f} | "
                     f"{r['wide_ms']:.3f} | {r['speedup']:.3f} [{lo:.3f}..{hi:.3f}] | "
                     f"{r['date']} | "
                     f"{'UNRELIABLE: ' + '; '.join(r['warnings']) if r['warnings'] else 'ok'} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="swp56,r56_l1_macs50")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}: choose from {list(MODELS)}")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    if stripe_native.wide_library() is None:
        raise SystemExit("no wide build on this machine (it needs AVX-512 and the kernel)")
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {"rows": []}
    have = {(r["model"], r["threads"], r["batch"]) for r in done["rows"]}
    if have:
        print(f"{out}: {len(have)} rows measured before are kept and not measured again "
              "(another --out measures everything anew)")
    for cin, cout, size, stride in LAYERS:
        if (f"layer {cin}->{cout} {size}x{size} s{stride}", 1, 64) in have:
            continue
        rows = _layer_row(cin, cout, size, stride, args.rounds)
        done["rows"] += rows
        atomic_write_json(out, done, indent=1)
        print(json.dumps([{k: r[k] for k in ("model", "batch", "speedup")} for r in rows]))
    for name in names:
        pair = MODELS[name]()
        if pair is None:
            print(f"{name}: no model found (see deploy_speed.py)")
            continue
        _, pruned, x, _ = pair
        for threads in (1, 2):
            for batch in (1, 64):
                if (name, threads, batch) in have:
                    continue
                row = _row(name, pruned, x, threads, batch, args.rounds)
                done["rows"].append(row)
                atomic_write_json(out, done, indent=1)  # per row: a killed run keeps its rows
                print(json.dumps({k: row[k] for k in ("model", "threads", "batch", "speedup")}))
    write_md(done, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
