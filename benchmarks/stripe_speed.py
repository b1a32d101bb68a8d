"""Measured speed of stripe-wise pruned convolutions (SWP) on CPU, in one run.

    python benchmarks/stripe_speed.py [--swp-model runs/swp/model.safetensors] [--threads 1]

Per layer (ResNet-56's 3x3 shapes; random stripe masks with 25/50/75% of the stripes removed;
batch 1 and 64), the median latency of:

* ``dense``: ``nn.Conv2d`` with the removed stripes zeroed, NCHW (oneDNN, which reorders
  to and from its blocked layout inside every call);
* ``dense-cl``: the same conv in ``channels_last`` on channels-last inputs (no reorders; on
  this CPU often the faster dense conv). Speed-ups are quoted against the faster of the two
  ("best dense") as well as against NCHW ``dense``;
* ``native``: :class:`prunekit.nn.StripeConv2d`'s C kernel (what inference uses on CPU);
* ``torch``: StripeConv2d's pure-torch formulation (one GEMM per kernel position on the
  strided, shifted input + row scatter; used for autograd and export);
* ``reference``: the SWP reference code's execution (fxmeng/Pruning-Filter-in-Filter,
  ``FilterStripe.forward``): one 1x1 conv producing every kept stripe at full input
  resolution, then a Python loop of shifts that adds each position's chunk into the output
  (sub-sampled afterwards for stride 2).

Whole network: the unpruned ResNet-56 vs a stripe-pruned one (``--swp-model``, e.g. the real
SWP run, or, without it, the pretrained ResNet-56 with 50% of every conv's stripes removed at
random), native and torch executors, at batch 1 and 64, against the dense network in NCHW and
in channels_last. Reported: latency speed-up (over the faster dense network) next to the
MACs speed-up, and their ratio (target >= 0.7). All timings interleave the candidates round by
round (benchmarks/machine.py) and record how busy the machine was.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_busy, cpu_name, interleaved_latency, load_avg  # benchmarks/machine.py
from torch import nn

from prunekit import io, measure, models
from prunekit.files import atomic_write_text
from prunekit.nn import StripeConv2d, stripe_native

RESULTS = Path(__file__).parent / "results"
LAYERS = [(16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1)]
REMOVED = (0.25, 0.5, 0.75)
BATCHES = (1, 64)


class ReferenceStripe(nn.Module):
    """The reference code's execution of a stripe-pruned 3x3 conv (padding K // 2)."""

    def __init__(self, conv: nn.Conv2d, mask: torch.Tensor):
        super().__init__()
        k = conv.kernel_size[0]
        self.k, self.stride, self.out_channels = k, conv.stride[0], conv.out_channels
        rows, self.chunks, start = [], [], 0
        for i in range(k):
            for j in range(k):
                idx = mask[:, i, j].nonzero().flatten()
                if len(idx):
                    rows.append(conv.weight.detach()[idx, :, i, j])
                    self.chunks.append((i, j, start, start + len(idx), idx))
                    start += len(idx)
        self.register_buffer("weight", torch.cat(rows)[:, :, None, None])

    def forward(self, x):
        y = F.conv2d(x, self.weight)  # every kept stripe, at full input resolution
        n, _, h, w = x.shape
        out = x.new_zeros(n, self.out_channels, (h - 1) // self.stride + 1,
                          (w - 1) // self.stride + 1)
        half = self.k // 2
        for i, j, lo, hi, idx in self.chunks:
            shifted = F.pad(y[:, lo:hi], (half - j, j - half, half - i, i - half))
            out[:, idx] += shifted[:, :, ::self.stride, ::self.stride]
        return out


class TorchStripe(nn.Module):
    def __init__(self, stripe: StripeConv2d):
        super().__init__()
        self.stripe = stripe

    def forward(self, x):
        return self.stripe.forward_torch(x)


def random_mask(out: int, removed: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    total = out * 9
    mask = torch.ones(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=g)[:round(removed * total)]] = False
    return mask.view(out, 3, 3)


def layer_latency(nets: dict, shape, args) -> tuple[dict, dict]:
    """Median latency (ms) per candidate and batch, and every round's median (for per-round
    ratios), from prunekit.measure.interleaved_latency (candidates timed back to back)."""
    measured = measure.interleaved_latency(
        nets, torch.randn(*shape), batch_sizes=BATCHES, rounds=args.rounds, runs=args.runs,
        warmup=10, memory_formats={"dense-cl": torch.channels_last})
    rounds = measured.round_medians_ms
    return ({n: {str(bs): statistics.median(v) for bs, v in per.items()}
             for n, per in rounds.items()}, rounds)


def layer_rows(args) -> list[dict]:
    rows = []
    for cin, cout, size, stride in LAYERS:
        for removed in args.removed:
            torch.manual_seed(0)
            conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False).eval()
            mask = random_mask(cout, removed, seed=cin + cout + stride)
            with torch.no_grad():
                conv.weight.mul_(mask[:, None])
            stripe = StripeConv2d.from_dense(conv, mask).eval()
            conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
            nets = {"dense": conv, "dense-cl": conv_cl, "native": stripe,
                    "torch": TorchStripe(stripe), "reference": ReferenceStripe(conv, mask).eval()}
            x = torch.randn(2, cin, size, size)
            with torch.no_grad():
                for name, net in nets.items():  # every candidate computes the same thing
                    torch.testing.assert_close(net(x), conv(x), rtol=1e-4, atol=1e-4,
                                               msg=lambda m, name=name: f"{name}: {m}")
            lat, rounds = layer_latency(nets, (1, cin, size, size), args)
            for batch in BATCHES:
                b = str(batch)
                best = min(lat["dense"][b], lat["dense-cl"][b])
                row = {"layer": f"{cin}->{cout} {size}x{size} s{stride}", "removed": removed,
                       "batch": batch, **{f"{n}_ms": lat[n][b] for n in nets},
                       "best_dense_ms": best}
                row.update({f"{n}_speedup": best / lat[n][b]
                            for n in ("native", "torch", "reference")})
                # the same ratio within each round (candidates timed back to back), so that
                # load from other processes cancels: median and range over rounds
                per_round = [min(d, c) / n for d, c, n in zip(
                    rounds["dense"][batch], rounds["dense-cl"][batch], rounds["native"][batch])]
                row["native_speedup_rounds"] = per_round
                row["native_speedup_round_median"] = statistics.median(per_round)
                row["native_speedup_round_range"] = [min(per_round), max(per_round)]
                row["native_speedup_vs_nchw"] = lat["dense"][b] / lat["native"][b]
                row["macs_speedup"] = 1 / (1 - removed)
                rows.append(row)
                print(f"{row['layer']:>20} -{int(100 * removed)}% bs{batch:<3} "
                      + " ".join(f"{n} {lat[n][b]:.3f}" for n in nets)
                      + f"  native x{row['native_speedup']:.2f}", flush=True)
    return rows


def network_rows(args) -> tuple[list[dict], dict]:
    x = (1, 3, 32, 32)
    dense = models.create("cifar_resnet56", weights="pretrained").eval()
    if args.swp_model:
        pruned = io.load(args.swp_model).eval()
        source = args.swp_model
    else:
        from prunekit.methods.swp import FilterSkeleton, swp_prune
        pruned = models.create("cifar_resnet56", weights="pretrained").eval()
        skeleton = FilterSkeleton(pruned, torch.randn(x))
        with torch.no_grad():
            for i, s in enumerate(skeleton.skeletons().values()):
                s.copy_(random_mask(s.shape[0], 0.5, seed=i).float())
        swp_prune(pruned, skeleton, torch.randn(x))
        source = "pretrained ResNet-56, 50% of every conv's stripes removed at random"
    torch_pruned = io.load(args.swp_model).eval() if args.swp_model else None
    if torch_pruned is None:
        torch_pruned = copy.deepcopy(pruned)
    for m in torch_pruned.modules():
        if isinstance(m, StripeConv2d):
            m.use_native = False
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    nets = {"dense": dense, "dense-cl": dense_cl, "stripe-native": pruned,
            "stripe-torch": torch_pruned}
    example = torch.randn(x)
    macs = {n: measure.count_macs(m, example) for n, m in nets.items()}
    rows = []
    for threads in args.net_threads:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        lat = interleaved_latency(nets, x, rounds=args.rounds, runs=args.runs,
                                  batch_sizes=BATCHES,
                                  memory_formats={"dense-cl": torch.channels_last})
        torch.set_num_threads(previous)
        for batch in BATCHES:
            b = str(batch)
            best = min(lat["dense"][b], lat["dense-cl"][b])
            for name in ("stripe-native", "stripe-torch"):
                speed = best / lat[name][b]
                macs_x = macs["dense"] / macs[name]
                rows.append({"threads": threads, "batch": batch, "executor": name,
                             "dense_ms": lat["dense"][b], "dense_cl_ms": lat["dense-cl"][b],
                             "pruned_ms": lat[name][b], "latency_speedup": speed,
                             "latency_speedup_vs_nchw": lat["dense"][b] / lat[name][b],
                             "macs_speedup": macs_x, "speedup_over_macs": speed / macs_x})
                print(f"net {name} t{threads} bs{batch}: dense {lat['dense'][b]:.2f} ms "
                      f"(channels_last {lat['dense-cl'][b]:.2f}), pruned {lat[name][b]:.2f} ms, "
                      f"x{speed:.2f} vs MACs x{macs_x:.2f}", flush=True)
    return rows, {"source": source, "macs": macs,
                  "params": {n: measure.count_params(m) for n, m in nets.items()}}


def tables(layers, net, net_meta) -> str:
    out = ["Per layer (1 thread; speed-up = best dense latency / candidate latency, best dense ="
           " the faster of NCHW and channels_last; `native x NCHW` is against NCHW dense):", "",
           "| layer | stripes removed | batch | dense ms | dense-cl ms | native ms | torch ms "
           "| reference ms | native x | native x per round: median [range] | native x NCHW "
           "| torch x | reference x | MACs x |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in layers:
        out.append(f"| {r['layer']} | {int(100 * r['removed'])}% | {r['batch']} | "
                   f"{r['dense_ms']:.3f} | {r['dense-cl_ms']:.3f} | {r['native_ms']:.3f} | "
                   f"{r['torch_ms']:.3f} | {r['reference_ms']:.3f} | "
                   f"**{r['native_speedup']:.2f}** | {r['native_speedup_round_median']:.2f} "
                   f"[{r['native_speedup_round_range'][0]:.2f}, "
                   f"{r['native_speedup_round_range'][1]:.2f}] | {r['native_speedup_vs_nchw']:.2f} | "
                   f"{r['torch_speedup']:.2f} | {r['reference_speedup']:.2f} | "
                   f"{r['macs_speedup']:.2f} |")
    if not net:
        return "\n".join(out) + "\n"
    out += ["", f"Whole ResNet-56 ({net_meta['source']}; MACs "
            f"{net_meta['macs']['dense'] / 1e6:.2f}M -> {net_meta['macs']['stripe-native'] / 1e6:.2f}M):",
            "", "| executor | threads | batch | dense ms | dense-cl ms | pruned ms | latency x "
            "| latency x NCHW | MACs x | latency x / MACs x |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in net:
        out.append(f"| {r['executor']} | {r['threads']} | {r['batch']} | {r['dense_ms']:.2f} | "
                   f"{r['dense_cl_ms']:.2f} | {r['pruned_ms']:.2f} | {r['latency_speedup']:.2f} | "
                   f"{r['latency_speedup_vs_nchw']:.2f} | {r['macs_speedup']:.2f} | "
                   f"**{r['speedup_over_macs']:.2f}** |")
    return "\n".join(out) + "\n"


def plot(layers, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120, sharey=True)
    for ax, batch in zip(axes, BATCHES):
        rows = [r for r in layers if r["batch"] == batch and r["removed"] == 0.5]
        xs = range(len(rows))
        for k, (name, color) in enumerate((("native", "#3574b3"), ("torch", "#8fb7de"),
                                           ("reference", "#bbb"))):
            ax.bar([i + (k - 1) * 0.27 for i in xs], [r[f"{name}_speedup"] for r in rows],
                   width=0.27, label=name, color=color)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.5, color="#d9822b", lw=1, ls="--", label="target 1.5x")
        ax.axhline(2.0, color="#999", lw=1, ls=":", label="MACs speed-up 2x")
        ax.set_xticks(list(xs), [r["layer"] for r in rows], rotation=20, fontsize=7)
        ax.set_title(f"50% of the stripes removed, batch {batch}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("speed-up over the faster dense conv (1 thread)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)  # atomic


def pool(paths: list[str], out: str) -> str:
    """Pool the per-round native speed-ups of several runs (same code) per layer, batch and
    pruning level: on a shared machine one run's median moves by tens of percent."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    groups: dict = {}
    for run in runs:
        for r in run["layers"]:
            groups.setdefault((r["layer"], r["removed"], r["batch"]), []).append(r)
    loads = ", ".join(f"{r['meta'].get('load_avg_before')} -> {r['meta'].get('load_avg_after')}"
                      for r in runs)
    lines = [f"Native speed-up over the best dense conv, per round (candidates timed back to "
             f"back), pooled over {len(runs)} runs ({', '.join(paths)}); load average during "
             f"the runs: {loads}.", "",
             "| layer | stripes removed | batch | pooled median | p25 | p75 | per-run medians |",
             "|---|---:|---:|---:|---:|---:|---|"]
    pooled = []
    for (layer, removed, batch), rows in groups.items():
        rounds = [x for r in rows for x in r["native_speedup_rounds"]]
        q = statistics.quantiles(rounds, n=4) if len(rounds) > 1 else [rounds[0]] * 3
        med = statistics.median(rounds)
        per_run = [r["native_speedup_round_median"] for r in rows]
        pooled.append({"layer": layer, "removed": removed, "batch": batch, "median": med,
                       "p25": q[0], "p75": q[2], "per_run": per_run})
        lines.append(f"| {layer} | {int(100 * removed)}% | {batch} | **{med:.2f}** | {q[0]:.2f} "
                     f"| {q[2]:.2f} | {', '.join(f'{x:.2f}' for x in per_run)} |")
    atomic_write_text(f"{out}.json", json.dumps({"runs": paths, "layers": pooled}, indent=1))
    atomic_write_text(f"{out}.md", "\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--swp-model", default=None, help="a stripe-pruned ResNet-56 .safetensors")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--net-threads", default="1,2", help="'' skips the whole-network part")
    p.add_argument("--removed", default=",".join(str(r) for r in REMOVED),
                   help="fractions of stripes removed, comma-separated")
    p.add_argument("--out", default=str(RESULTS / "stripe_speed"))
    p.add_argument("--pool", default=None, help="comma-separated results .json of earlier runs: "
                   "pool their per-round speed-ups into --out (no measuring)")
    args = p.parse_args()
    if args.pool:
        print(pool(args.pool.split(","), args.out))
        return
    args.net_threads = [int(t) for t in args.net_threads.split(",") if t]
    args.removed = [float(r) for r in args.removed.split(",")]
    if stripe_native.library() is None:
        raise SystemExit(f"the native kernel is unavailable: {stripe_native.unavailable_reason()}")
    busy = cpu_busy()
    torch.set_num_threads(1)
    meta = {"cpu": cpu_name(), "torch": torch.__version__, "cpu_busy_before": busy,
            "load_avg_before": load_avg(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "rounds": args.rounds, "runs": args.runs, "layer_threads": 1,
            "kernel": {"vector_floats": stripe_native.library().prunekit_stripe_vl(),
                       "wide_vector_floats": (stripe_native.wide_library().prunekit_stripe_vl()
                                              if stripe_native.wide_library() else None),
                       "filters_per_chunk": stripe_native.library().prunekit_stripe_chunk()}}

    def write(layers, net, net_meta):  # after each part, atomically: a killed run keeps results
        meta.update(cpu_busy_after=cpu_busy(0.2), load_avg_after=load_avg())
        atomic_write_text(f"{args.out}.json", json.dumps(
            {"meta": meta, "layers": layers, "network": net, "network_meta": net_meta}, indent=1))
        atomic_write_text(f"{args.out}.md", tables(layers, net, net_meta)
                          + f"\nMachine: {meta}\n")

    layers = layer_rows(args)
    write(layers, [], {})
    plot(layers, Path(f"{args.out}.png"))
    net, net_meta = network_rows(args) if args.net_threads else ([], {})
    write(layers, net, net_meta)
    print(tables(layers, net, net_meta))


if __name__ == "__main__":
    main()
