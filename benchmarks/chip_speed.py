"""Time the CHIP channel-independence step on ResNet-56: reference style vs batched vs fast.

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

Usage::

    python benchmarks/chip_speed.py                    # full run (~15 min on 2 slow cores)
    python benchmarks/chip_speed.py --layers 3 --direct-images 128 --ref-images 2   # smoke

Writes JSON to ``--out`` (default benchmarks/results/chip_speed.json) and Markdown next to it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
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
    args = ap.parse_args(argv)
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
