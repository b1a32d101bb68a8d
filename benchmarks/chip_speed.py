"""Time the CHIP channel-independence step on ResNet-56 (and ResNet-50): reference style vs
batched vs fast.

CHIP (Sui et al., NeurIPS 2021) scores every channel of every hooked layer by the drop of the
nuclear norm when the channel's row is removed from the per-image feature matrix (Eq. 3),
averaged over 5 batches x 128 = 640 augmented training images. For ResNet-56 the hooked
layers are the stem ``relu`` and every block's ``relu1`` and ``relu2``: 1 + 27 x 2 = 55
layers (16x(32x32) maps x19, 32x(16x16) x18, 64x(8x8) x18), i.e. 2,087 SVDs per image and
~1.34M SVDs for 640 images in the reference code.

Per layer the script captures the 640 post-ReLU maps (pretrained ``cifar_resnet56``, CIFAR-10
``split="train", train_augment=True``, a fresh shuffled pass per layer as CHIP does; random
post-ReLU maps of the same shapes when the shared data/weights are missing) and times

(a) reference style: one ``torch.linalg.svdvals`` per image and channel (float32, the CHIP
    code's precision; without its whole-batch clone per SVD, so a lower bound), timed on
    ``--ref-images`` images per layer and extrapolated linearly to 640;
(b) the definition batched over images: per channel one ``matrix_norm(..., "nuc")`` over all
    images (float32), on ``--direct-images`` images (default all 640; extrapolated if fewer);
(c) ``prunekit.criteria.nuclear.channel_independence`` (method "auto" = "quadrature",
    float64 internally) on all 640 images;

plus, on ``--extra-images`` images (extrapolated), the other exact methods ("secular",
"gram_eig") and (b) in float64. Accuracy: on the (a) subset, (c) is compared with a float64
run of the reference recipe and with (a) itself; (c) is also compared with (b) on all images
(b) ran on.

``--model resnet50``: the ImageNet case at 224 px (torchvision's resnet50, random init, random
images: the cost does not depend on the weights). CHIP hooks 53 maps there (``maxpool``, every
bottleneck's relu1/relu2/relu3, the stage-first relu3 twice): 26,613 SVDs per image up to
256x3136, 512x784 and 2048x49, ~17M for 640 images. Whole runs are out of reach for (a) and
(b), so per map shape (11 of them) each repeat times (a) on a few channels of one image, (b) on
the same channels over a few images, (c) on a few images, in rotating order; the per-image cost
is the sum over the 53 maps, reported as median [min-max] over the repeats. Then prunekit's
whole criterion ("chip": forward passes, its own 49 maps, exact CI) runs on ``--e2e-images``
images. Writes ``--r50-out`` (default benchmarks/results/chip_speed_resnet50.json) as it goes,
then Markdown and a PNG next to it.

Usage::

    python benchmarks/chip_speed.py                    # full run (~15 min on 2 slow cores)
    python benchmarks/chip_speed.py --layers 3 --direct-images 128 --ref-images 2   # smoke
    python benchmarks/chip_speed.py --model resnet50   # ResNet-50 (~10 min)

Writes JSON to ``--out`` (default benchmarks/results/chip_speed.json) and Markdown next to it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import cpu_busy, cpu_name, load_avg  # benchmarks/machine.py

from prunekit.criteria.nuclear import (
    channel_independence,
    channel_independence_direct,
    channel_independence_reference,
    nuclear_norms,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "chip_speed.json"
N_IMAGES = 640
BATCH = 128


# --------------------------------------------------------------------------- environment
# --------------------------------------------------------------------------- features
def hooked_layers() -> list[str]:
    names = ["relu"]
    for stage in (1, 2, 3):
        for block in range(9):
            names += [f"layer{stage}.{block}.relu1", f"layer{stage}.{block}.relu2"]
    return names


def layer_shape(name: str) -> tuple[int, int]:
    stage = 1 if name == "relu" else int(name[5])
    return {1: (16, 1024), 2: (32, 256), 3: (64, 64)}[stage]


class _Stop(Exception):
    pass


class FeatureSource:
    """640 post-ReLU maps per layer: real (pretrained ResNet-56, augmented CIFAR-10 train
    images, a fresh shuffled pass per layer like CHIP) or random of the same shapes."""

    def __init__(self, kind: str, n_images: int):
        self.n_images = n_images
        self.kind = kind
        self.description = ""
        if kind in ("auto", "real"):
            try:
                import prunekit.data
                import prunekit.models

                self.model = prunekit.models.create("cifar_resnet56", weights="pretrained").eval()
                self.data = prunekit.data.CIFAR10(split="train", train_augment=True)
                self.kind = "real"
                self.description = (f"real: pretrained cifar_resnet56, CIFAR-10 "
                                    f"{self.data.description}, train augmentation, "
                                    f"{n_images // BATCH} shuffled batches of {BATCH} per layer "
                                    "(a fresh pass per layer, as CHIP)")
            except Exception as exc:  # noqa: BLE001 - any missing piece -> random maps
                if kind == "real":
                    raise
                print(f"note: real features unavailable ({type(exc).__name__}: {exc}); "
                      "using random post-ReLU maps", file=sys.stderr)
                self.kind = "random"
        if self.kind == "random":
            self.description = "random: relu(randn) maps of the hooked shapes"

    def get(self, index: int, name: str) -> torch.Tensor:
        c, n = layer_shape(name)
        if self.kind == "random":
            gen = torch.Generator().manual_seed(index)
            return torch.relu(torch.randn(self.n_images, c, n, generator=gen))
        from torch.utils.data import DataLoader

        torch.manual_seed(1000 + index)  # the augmentation uses the global RNG
        loader = DataLoader(self.data, batch_size=BATCH, shuffle=True,
                            generator=torch.Generator().manual_seed(index))
        module = self.model.get_submodule(name)
        chunks = []

        def hook(mod, inp, out):
            chunks.append(out.detach().flatten(2).clone())
            raise _Stop  # nothing after this layer is needed

        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                for images, _ in loader:
                    try:
                        self.model(images)
                    except _Stop:
                        pass
                    if sum(len(c_) for c_ in chunks) >= self.n_images:
                        break
        finally:
            handle.remove()
        feats = torch.cat(chunks)[: self.n_images]
        assert feats.shape == (self.n_images, c, n), feats.shape
        return feats


# --------------------------------------------------------------------------- timing
def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def rel_errors(approx: torch.Tensor, exact: torch.Tensor, feats: torch.Tensor) -> dict:
    """max |diff| / |exact| over entries with exact > 1e-6 x norm, and max |diff| / norm."""
    approx, exact = approx.double(), exact.double()
    norm = nuclear_norms(feats)[:, None].expand_as(exact)
    diff = (approx - exact).abs()
    big = exact.abs() > 1e-6 * norm
    rel = (diff[big] / exact.abs()[big]).max().item() if big.any() else 0.0
    return {"max_rel": rel, "max_abs_over_norm": (diff / norm.clamp_min(1e-300)).max().item()}


def merge_err(acc: dict, new: dict) -> dict:
    return {k: max(acc.get(k, 0.0), v) for k, v in new.items()}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    names = hooked_layers()[: args.layers] if args.layers else hooked_layers()
    source = FeatureSource(args.features, N_IMAGES)
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_avg_1min_start": load_avg(), "cpu_busy_start": cpu_busy(),
        "features": source.description, "n_layers": len(names), "n_images": N_IMAGES,
        "ref_images": args.ref_images, "direct_images": args.direct_images,
        "extra_images": args.extra_images,
        "dtypes": {"a_reference": "float32", "b_direct": "float32", "c_fast": "float64 inside"},
    }
    print(f"torch {meta['torch']} | threads {meta['torch_threads']} | CPU {meta['cpu']} "
          f"({meta['cpu_count']} logical) | load {meta['load_avg_1min_start']} | busy "
          f"{meta['cpu_busy_start']}\nfeatures: {source.description}\n"
          f"{len(names)} layers x {N_IMAGES} images; (a) on {args.ref_images} images/layer "
          f"(x{N_IMAGES / args.ref_images:g} extrapolated); (b) on {args.direct_images} "
          f"images/layer" + ("" if args.direct_images == N_IMAGES else
                             f" (x{N_IMAGES / args.direct_images:g} extrapolated)"), flush=True)
    if meta["cpu_busy_start"] is not None and meta["cpu_busy_start"] > 0.2:
        print(f"warning: {100 * meta['cpu_busy_start']:.0f}% of the CPU was busy with other "
              "processes at the start; absolute times are inflated", file=sys.stderr)

    # warm-up (LAPACK/MKL initialisation) outside the timed region
    w = torch.relu(torch.randn(4, 16, 64))
    channel_independence(w), channel_independence_direct(w, dtype=torch.float32)
    channel_independence_reference(w[:1], dtype=torch.float32)

    layers = []
    err_c_ref64, err_c_ref32, err_ref32_ref64, err_c_b = {}, {}, {}, {}
    for index, name in enumerate(names):
        t_feat, feats = timed(source.get, index, name)
        c, n = layer_shape(name)
        row = {"layer": name, "C": c, "N": n, "feature_seconds": t_feat}
        # (c) ours, all images
        row["c_seconds"], ci = timed(channel_independence, feats)
        # (b) batched definition
        sub_b = feats[: args.direct_images]
        t_b, ci_b = timed(channel_independence_direct, sub_b, dtype=torch.float32)
        row["b_seconds_measured"] = t_b
        row["b_seconds"] = t_b * N_IMAGES / len(sub_b)
        err_c_b = merge_err(err_c_b, rel_errors(ci[: len(sub_b)], ci_b, sub_b))
        # what CHIP does with the scores: rank channels by the mean CI over the images
        mean_c, mean_b = ci[: len(sub_b)].mean(0), ci_b.double().mean(0)
        keep = c - int(c * 0.4)  # the paper's ResNet-56 mid-channel sparsity 0.4
        row["same_order_b_c"] = bool(torch.equal(mean_c.argsort(), mean_b.argsort()))
        row["same_keep40_b_c"] = bool(torch.equal(mean_c.argsort()[-keep:].sort().values,
                                                  mean_b.argsort()[-keep:].sort().values))
        # (a) reference style on a subset
        sub_a = feats[: args.ref_images]
        t_a, ci_a = timed(channel_independence_reference, sub_a, dtype=torch.float32)
        row["a_seconds_measured"] = t_a
        row["a_seconds"] = t_a * N_IMAGES / len(sub_a)
        ref64 = channel_independence_reference(sub_a)  # ground truth (float64), untimed
        err_c_ref64 = merge_err(err_c_ref64, rel_errors(ci[: len(sub_a)], ref64, sub_a))
        err_c_ref32 = merge_err(err_c_ref32, rel_errors(ci[: len(sub_a)], ci_a, sub_a))
        err_ref32_ref64 = merge_err(err_ref32_ref64, rel_errors(ci_a, ref64, sub_a))
        # extras on a subset
        if args.extra_images:
            sub_x = feats[: args.extra_images]
            scale = N_IMAGES / len(sub_x)
            for key, fn in (("secular", lambda x: channel_independence(x, method="secular")),
                            ("gram_eig", lambda x: channel_independence(x, method="gram_eig")),
                            ("b64", lambda x: channel_independence_direct(x))):
                t_x, out_x = timed(fn, sub_x)
                row[f"{key}_seconds"] = t_x * scale
                row[f"{key}_max_abs_over_norm_vs_c"] = rel_errors(
                    out_x, ci[: len(sub_x)], sub_x)["max_abs_over_norm"]
        layers.append(row)
        print(f"[{index + 1:2d}/{len(names)}] {name:<16} {c}x{n:<5} (a) {row['a_seconds']:8.2f}s* "
              f"(b) {row['b_seconds']:7.2f}s (c) {row['c_seconds']:6.3f}s  "
              f"features {t_feat:5.1f}s", flush=True)

    meta["load_avg_1min_end"] = load_avg()
    meta["cpu_busy_end"] = cpu_busy()
    groups = []
    for (c, n) in ((16, 1024), (32, 256), (64, 64)):
        rows = [r for r in layers if (r["C"], r["N"]) == (c, n)]
        if rows:
            groups.append(summarise(f"{c}x({int(math.isqrt(n))}x{int(math.isqrt(n))})", rows))
    total = summarise("all", layers)
    return {"meta": meta, "groups": groups, "total": total, "layers": layers,
            "accuracy": {"c_vs_reference_float64": err_c_ref64,
                         "c_vs_reference_float32_a": err_c_ref32,
                         "reference_float32_a_vs_float64": err_ref32_ref64,
                         "c_vs_direct_float32_b": err_c_b,
                         "note": f"(a)/float64 reference on the first {args.ref_images} images of "
                                 f"every layer; (b) on its {args.direct_images} images. max_rel "
                                 "over entries with |CI| > 1e-6 x nuclear norm."}}


def summarise(label: str, rows: list[dict]) -> dict:
    out = {"label": label, "layers": len(rows)}
    for key in ("a_seconds", "b_seconds", "c_seconds", "secular_seconds", "gram_eig_seconds",
                "b64_seconds"):
        if all(key in r for r in rows):
            out[key] = sum(r[key] for r in rows)
    out["b_over_c"] = out["b_seconds"] / out["c_seconds"]
    out["a_over_c"] = out["a_seconds"] / out["c_seconds"]
    return out


# --------------------------------------------------------------------------- reporting
def table(result: dict) -> tuple[list[str], list[list[str]]]:
    has_extra = "secular_seconds" in result["total"]
    header = ["maps", "layers", "(a) reference s*", "(b) direct s", "(c) ours s",
              "(b)/(c)", "(a)/(c)"]
    if has_extra:
        header += ["secular s*", "gram_eig s*", "(b) float64 s*"]
    body = []
    for g in result["groups"] + [result["total"]]:
        line = [g["label"], str(g["layers"]), f"{g['a_seconds']:.1f}", f"{g['b_seconds']:.1f}",
                f"{g['c_seconds']:.2f}", f"{g['b_over_c']:.1f}x", f"{g['a_over_c']:.0f}x"]
        if has_extra:
            line += [f"{g['secular_seconds']:.1f}", f"{g['gram_eig_seconds']:.1f}",
                     f"{g['b64_seconds']:.1f}"]
        body.append(line)
    return header, body


def notes(result: dict) -> list[str]:
    m, acc = result["meta"], result["accuracy"]
    ext_b = "" if m["direct_images"] == N_IMAGES else \
        f", extrapolated linearly from {m['direct_images']} images per layer"
    lines = [
        f"(a) = one `svdvals` per image and channel (float32, like the CHIP code; "
        f"C+1 SVDs per image) timed on {m['ref_images']} images per layer and extrapolated "
        f"linearly to {N_IMAGES} (marked *).",
        f"(b) = per channel one batched `matrix_norm(ord='nuc')` over the images (float32){ext_b}.",
        f"(c) = `channel_independence(features)` (method 'auto' = 'quadrature', float64 inside) "
        f"on all {N_IMAGES} images.",
    ]
    if "secular_seconds" in result["total"]:
        lines.append(f"secular / gram_eig / (b) float64: other exact methods, timed on "
                     f"{m['extra_images']} images per layer and extrapolated (marked *).")
    def fmt(e):
        return f"max rel {e['max_rel']:.2e}, max abs/norm {e['max_abs_over_norm']:.2e}"

    feature_s = sum(r["feature_seconds"] for r in result["layers"])
    lines += [
        f"Accuracy of (c) vs float64 reference (same recipe as (a)): "
        f"{fmt(acc['c_vs_reference_float64'])}.",
        f"(c) vs (a) as timed (float32): {fmt(acc['c_vs_reference_float32_a'])}; "
        f"(a) float32 vs float64 reference: {fmt(acc['reference_float32_a_vs_float64'])}.",
        f"(c) vs (b) (float32): {fmt(acc['c_vs_direct_float32_b'])}; channel ranking by mean "
        f"CI identical in {sum(r['same_order_b_c'] for r in result['layers'])}/{m['n_layers']} "
        f"layers, kept set at sparsity 0.4 identical in "
        f"{sum(r['same_keep40_b_c'] for r in result['layers'])}/{m['n_layers']}.",
        f"Feature capture (not timed above): {feature_s:.0f} s total.",
    ]
    return lines


def text_report(result: dict) -> str:
    header, body = table(result)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body]
                     + [""] + notes(result))


def markdown_report(result: dict) -> str:
    m = result["meta"]
    header, body = table(result)
    out = ["# CHIP channel independence on ResNet-56: speed", "",
           f"{m['n_layers']} hooked layers x {m['n_images']} images; features: {m['features']}.  ",
           f"torch {m['torch']}, {m['torch_threads']} torch thread(s), {m['cpu']} "
           f"({m['cpu_count']} logical CPUs), load average {m['load_avg_1min_start']} at start / "
           f"{m['load_avg_1min_end']} at end, CPU busy (all processes, 1 s sample) "
           f"{m['cpu_busy_start']} / {m['cpu_busy_end']}; {m['date']}.", "",
           "| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    out += ["| " + " | ".join(b) + " |" for b in body]
    out += [""] + [f"- {n}" for n in notes(result)]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- ResNet-50 case
R50_OUT = Path(__file__).resolve().parent / "results" / "chip_speed_resnet50.json"


def r50_layers() -> list[tuple[str, int, int, int]]:
    """CHIP's 53 hooked ResNet-50 maps as ``(name, C, H*W, times scored)``: ``maxpool``, then
    every bottleneck's relu1, relu2, relu3 (post-add); stage-first relu3s are scored twice (once
    for the downsample, once for conv3; methods.md 1.1). Stride sits on conv2 (v1.5)."""
    out, res = [("maxpool", 64, 56 * 56, 1)], 56
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for b in range(blocks):
            after = res // (2 if stage > 1 and b == 0 else 1)
            out += [(f"layer{stage}.{b}.relu1", planes, res * res, 1),
                    (f"layer{stage}.{b}.relu2", planes, after * after, 1),
                    (f"layer{stage}.{b}.relu3", 4 * planes, after * after, 2 if b == 0 else 1)]
            res = after
    return out


def r50_features(model, images: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The post-ReLU maps ``names`` (as r50_layers names them) of torchvision's resnet50."""
    found, handles = {}, []

    def keep(name, relu):
        def hook(mod, inp, out):
            found[name] = (torch.relu(out) if relu else out).detach().flatten(2).clone()
        return hook
    for name in names:
        if name == "maxpool":
            handles.append(model.maxpool.register_forward_hook(keep(name, False)))
            continue
        block, relu = name.rsplit(".", 1)
        module = model.get_submodule(block)
        target = {"relu1": module.bn1, "relu2": module.bn2, "relu3": module}[relu]
        handles.append(target.register_forward_hook(keep(name, relu != "relu3")))
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return found


def r50_time_shape(feats: torch.Tensor, rep: int, args) -> dict:
    """Seconds per image for one map shape: (a) one svdvals per image and channel (float32) on
    ``--r50-channels`` channels of one image, (b) the batched definition (float32) on that many
    channels over ``--r50-direct-images`` images, (c) prunekit on ``--r50-images`` images; the
    order of (a), (b), (c) rotates with ``rep``."""
    c = feats.shape[1]
    chans = torch.linspace(0, c - 1, args.r50_channels).round().long().tolist()

    def ref():
        a = feats[rep % len(feats)].float()
        t_full, _ = timed(torch.linalg.svdvals, a)
        start = time.perf_counter()
        for i in chans:
            m = a.clone()
            m[i] = 0
            torch.linalg.svdvals(m)
        return t_full + c * (time.perf_counter() - start) / len(chans)

    def direct():
        block = feats[: args.r50_direct_images].float()
        t_full, _ = timed(torch.linalg.matrix_norm, block, ord="nuc")
        masked, start = block.clone(), time.perf_counter()
        for i in chans:
            saved = masked[:, i].clone()
            masked[:, i] = 0
            torch.linalg.matrix_norm(masked, ord="nuc")
            masked[:, i] = saved
        return (t_full + c * (time.perf_counter() - start) / len(chans)) / len(block)

    def ours():
        sub = feats[: args.r50_images]
        return timed(channel_independence, sub)[0] / len(sub)
    order = [("a", ref), ("b", direct), ("c", ours)]
    order = order[rep % 3:] + order[: rep % 3]
    return {key: fn() for key, fn in order}


def r50_accuracy(feats: torch.Tensor, channels: int) -> float:
    """max |CI(c) - CI(float64 reference)| / ||A||_* on sampled channels of the first image."""
    a = feats[0].double()
    ci = channel_independence(feats[:1])[0]
    full = torch.linalg.svdvals(a).sum()
    worst = 0.0
    for i in torch.linspace(0, a.shape[0] - 1, channels).round().long().tolist():
        m = a.clone()
        m[i] = 0
        worst = max(worst, abs(float(full - torch.linalg.svdvals(m).sum() - ci[i])) / float(full))
    return worst


def r50_end_to_end(model, images: int, batch: int) -> dict:
    """prunekit's whole CHIP scoring (criterion "chip": forward passes, its own map set, exact
    CI) on ``images`` random images at 224 px, seconds per image."""
    import prunekit
    from prunekit.criteria import get_criterion

    x = torch.randn(1, 3, 224, 224)
    graph = prunekit.build_graph(model, x)
    gen = torch.Generator().manual_seed(7)
    calib = [torch.randn(batch, 3, 224, 224, generator=gen) for _ in range(images // batch)]
    crit = get_criterion("chip", progress=False)
    seconds, _ = timed(crit.score, graph, model, calib)
    maps = {n for g in graph.prunable_groups() for n, _ in g.feature_maps()}
    return {"images": len(calib) * batch, "batch": batch, "seconds": seconds,
            "seconds_per_image": seconds / (len(calib) * batch), "maps_hooked": len(maps)}


def r50_stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def run_r50(args) -> dict:
    torch.set_num_threads(args.threads)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    layers = r50_layers()
    shapes: dict[tuple[int, int], dict] = {}
    for name, c, n, times in layers:
        entry = shapes.setdefault((c, n), {"C": c, "N": n, "layer": name, "maps": 0})
        entry["maps"] += times
    need = max(args.r50_images, args.r50_direct_images, args.repeats)
    feats = r50_features(model, torch.randn(need, 3, 224, 224,
                                            generator=torch.Generator().manual_seed(0)),
                         [s["layer"] for s in shapes.values()])
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "torch": torch.__version__, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg_1min_start": load_avg(),
            "cpu_busy_start": cpu_busy(), "repeats": args.repeats,
            "features": "torchvision resnet50, random init (weights=None), eval mode, "
                        "randn images at 224 px", "hooked_maps": sum(t for *_, t in layers),
            "svds_per_image": sum((c + 1) * t for _, c, _, t in layers),
            "sample": {"a_channels_of_one_image": args.r50_channels,
                       "b_images": args.r50_direct_images, "b_channels": args.r50_channels,
                       "c_images": args.r50_images}}
    print(f"ResNet-50: {meta['hooked_maps']} maps, {meta['svds_per_image']:,} SVDs per image "
          f"in the reference; {len(shapes)} map shapes, {args.repeats} interleaved repeats",
          flush=True)
    tiny = argparse.Namespace(r50_channels=1, r50_direct_images=1, r50_images=1)
    for s in shapes.values():  # warm-up, untimed
        r50_time_shape(feats[s["layer"]][:2], 0, tiny)
    runs = {key: [] for key in shapes}
    result = {"meta": meta, "shapes": [], "total": {}, "end_to_end": None}
    for rep in range(args.repeats):
        keys = list(shapes)
        for key in keys[rep % len(keys):] + keys[: rep % len(keys)]:
            runs[key].append(r50_time_shape(feats[shapes[key]["layer"]], rep, args))
        r50_summarise(result, shapes, runs)
        args.r50_out.write_text(json.dumps(result, indent=2) + "\n")  # as it goes
        t = result["total"]
        print(f"repeat {rep + 1}/{args.repeats}: per image (a) {t['a']['median']:.0f}s "
              f"(b) {t['b']['median']:.0f}s (c) {t['c']['median']:.2f}s", flush=True)
    for key, s in zip(shapes, result["shapes"]):
        s["c_max_abs_err_over_norm"] = r50_accuracy(feats[shapes[key]["layer"]], args.r50_channels)
    if args.e2e_images:
        result["end_to_end"] = r50_end_to_end(model, args.e2e_images, args.e2e_batch)
    meta["load_avg_1min_end"], meta["cpu_busy_end"] = load_avg(), cpu_busy()
    return result


def r50_summarise(result: dict, shapes: dict, runs: dict) -> None:
    result["shapes"] = []
    for key, s in shapes.items():
        row = dict(s)
        for x in "abc":
            row[x] = r50_stats([r[x] for r in runs[key]])
        result["shapes"].append(row)
    reps = min(len(v) for v in runs.values())
    for x in "abc":
        per_image = [sum(shapes[k]["maps"] * runs[k][r][x] for k in shapes) for r in range(reps)]
        result["total"][x] = r50_stats(per_image)
        result["total"][x]["images_640_median"] = result["total"][x]["median"] * N_IMAGES
    med = {x: result["total"][x]["median"] for x in "abc"}
    result["total"]["a_over_c"], result["total"]["b_over_c"] = med["a"] / med["c"], \
        med["b"] / med["c"]


def r50_report(result: dict) -> str:
    m, t = result["meta"], result["total"]
    fmt = lambda s, d=2: f"{s['median']:.{d}f} [{s['min']:.{d}f}-{s['max']:.{d}f}]"  # noqa: E731
    out = ["# CHIP channel independence on ResNet-50 (224 px): speed", "",
           f"{m['hooked_maps']} hooked maps (CHIP's ResNet-50 set, methods.md 1.1), "
           f"{m['svds_per_image']:,} SVDs per image and {m['svds_per_image'] * N_IMAGES:,} for "
           f"{N_IMAGES} images in the reference recipe; features: {m['features']}.  ",
           f"torch {m['torch']}, {m['torch_threads']} torch thread(s), {m['cpu']} "
           f"({m['cpu_count']} logical CPUs), load average {m['load_avg_1min_start']} / "
           f"{m.get('load_avg_1min_end')}, CPU busy {m['cpu_busy_start']} / "
           f"{m.get('cpu_busy_end')} (start / end); {m['date']}.", "",
           "Seconds per image for one map of each shape, and (last row) for all of an image's "
           "maps: median [min-max] over the repeats.", "",
           "| map C x (H x W) | maps | (a) reference s* | (b) batched s* | (c) prunekit s* "
           "| (a)/(c) | (b)/(c) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s in result["shapes"]:
        side = int(math.isqrt(s["N"]))
        out.append(f"| {s['C']} x ({side}x{side}) | {s['maps']} | {fmt(s['a'])} | "
                   f"{fmt(s['b'])} | {fmt(s['c'], 4)} | {s['a']['median'] / s['c']['median']:.0f}x"
                   f" | {s['b']['median'] / s['c']['median']:.0f}x |")
    out.append(f"| **per image** | {m['hooked_maps']} | {fmt(t['a'], 0)} | {fmt(t['b'], 0)} | "
               f"{fmt(t['c'])} | **{t['a_over_c']:.0f}x** | **{t['b_over_c']:.0f}x** |")
    hours = {x: t[x]["images_640_median"] / 3600 for x in "abc"}
    out += ["", f"- {N_IMAGES} images: (a) {hours['a']:.1f} h, (b) {hours['b']:.1f} h, "
                f"(c) {t['c']['images_640_median'] / 60:.1f} min (medians x {N_IMAGES}).",
            f"- * sampled and extrapolated: per repeat and map shape, (a) = one float32 "
            f"`svdvals` of the full matrix plus {m['sample']['a_channels_of_one_image']} "
            f"row-zeroed ones of one image, scaled to C + 1 SVDs (the CHIP code's recipe without "
            f"its whole-batch clone per SVD: a lower bound); (b) = per channel one float32 "
            f"`matrix_norm(ord='nuc')` over {m['sample']['b_images']} images, "
            f"{m['sample']['b_channels']} channels, scaled to C + 1; (c) = "
            f"`channel_independence` (method auto = quadrature, float64 inside) on "
            f"{m['sample']['c_images']} images. Shapes scale by how many of the "
            f"{m['hooked_maps']} maps have them; the three run interleaved, order rotating.",
            f"- (c) vs a float64 reference on the sampled channels: max |diff| / nuclear norm "
            f"{max(s['c_max_abs_err_over_norm'] for s in result['shapes']):.1e}."]
    e2e = result.get("end_to_end")
    if e2e:
        out.append(f"- prunekit's whole CHIP scoring (criterion `chip`: forward passes, its "
                   f"{e2e['maps_hooked']} maps, exact CI) on {e2e['images']} images in batches "
                   f"of {e2e['batch']}: {e2e['seconds_per_image']:.2f} s per image, i.e. "
                   f"{e2e['seconds_per_image'] * N_IMAGES / 60:.1f} min for {N_IMAGES} images.")
    return "\n".join(out) + "\n"


def r50_plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["shapes"] + [{"C": "all", "N": 0, **result["total"]}]
    labels = [f"{r['C']}x{int(math.isqrt(r['N']))}²" if r["N"] else "per image" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=120)
    for k, (x, name, color) in enumerate((("a", "(a) reference", "#bbb"),
                                          ("b", "(b) batched", "#8fb7de"),
                                          ("c", "(c) prunekit", "#3574b3"))):
        med = [r[x]["median"] for r in rows]
        err = [[m - r[x]["min"] for m, r in zip(med, rows)],
               [r[x]["max"] - m for m, r in zip(med, rows)]]
        ax.bar([i + (k - 1) * 0.27 for i in range(len(rows))], med, 0.27, yerr=err,
               label=name, color=color, capsize=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, rotation=30, fontsize=7)
    ax.set_ylabel("s per image and map; last: all maps\n(median, min-max)")
    ax.set_title(f"CHIP scoring cost, ResNet-50 224 px, {result['meta']['torch_threads']} "
                 f"thread(s): (a)/(c) = {result['total']['a_over_c']:.0f}x")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main_r50(args) -> int:
    result = run_r50(args)
    report = r50_report(result)
    print("\n" + report)
    args.r50_out.write_text(json.dumps(result, indent=2) + "\n")
    args.r50_out.with_suffix(".md").write_text(report)
    r50_plot(result, args.r50_out.with_suffix(".png"))
    print(f"wrote {args.r50_out} (.md, .png)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: MKL's threaded LAPACK on tiny matrices is "
                         "erratic when other processes share the CPU)")
    ap.add_argument("--features", choices=("auto", "real", "random"), default="auto")
    ap.add_argument("--ref-images", type=int, default=8, help="images per layer timed for (a)")
    ap.add_argument("--direct-images", type=int, default=N_IMAGES,
                    help="images per layer timed for (b) (default all 640)")
    ap.add_argument("--extra-images", type=int, default=32,
                    help="images per layer for secular/gram_eig/(b) float64 (0 = skip)")
    ap.add_argument("--layers", type=int, default=0, help="only the first k layers (smoke test)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--model", choices=("resnet56", "resnet50"), default="resnet56",
                    help="resnet50: the ImageNet case (224 px), sampled (--r50-*, --repeats)")
    ap.add_argument("--repeats", type=int, default=7, help="resnet50: interleaved repeats")
    ap.add_argument("--r50-channels", type=int, default=4,
                    help="resnet50: channels timed per map shape for (a) and (b)")
    ap.add_argument("--r50-direct-images", type=int, default=4, help="resnet50: images for (b)")
    ap.add_argument("--r50-images", type=int, default=16, help="resnet50: images for (c)")
    ap.add_argument("--e2e-images", type=int, default=64,
                    help="resnet50: images for the whole criterion (0 = skip)")
    ap.add_argument("--e2e-batch", type=int, default=16)
    ap.add_argument("--r50-out", type=Path, default=R50_OUT)
    args = ap.parse_args(argv)
    if args.model == "resnet50":
        args.r50_out.parent.mkdir(parents=True, exist_ok=True)
        return main_r50(args)
    for key in ("ref_images", "direct_images"):
        if not 1 <= getattr(args, key) <= N_IMAGES:
            ap.error(f"--{key.replace('_', '-')} must be in 1..{N_IMAGES}")
    result = run(args)
    print()
    print(text_report(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown_report(result))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
