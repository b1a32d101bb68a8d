"""Peak memory of the calibration runner: CHIP and HRank on ResNet-56 over 640 images.

    python benchmarks/calibration_memory.py [--criterion chip] [--images 640]

Runs in this process from a clean start: measures the resident-set high-water mark
(``ru_maxrss``) after loading the model and the calibration batches, then after scoring, and
reports the growth. For scale it also prints what keeping every hooked feature map would take
(the CHIP reference code writes them all to disk as .npy files).
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from prunekit import build_graph, data, models
from prunekit.criteria import get_criterion
from prunekit.pipeline import calibration_batches


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--criterion", default="chip")
    p.add_argument("--images", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "calibration_memory"))
    args = p.parse_args()
    root = data.resolve_data_root()
    model = models.create("cifar_resnet56", weights="pretrained").eval()
    x = torch.randn(1, 3, 32, 32)
    graph = build_graph(model, x)
    batches = calibration_batches(root, {"batches": args.images // args.batch_size,
                                         "batch_size": args.batch_size}, seed=0)
    criterion = get_criterion(args.criterion)
    loaded = max_rss_mb()
    # One warm-up batch so allocator pools and lazy imports are in the baseline: what remains
    # is how memory grows with the number of images (it should not).
    criterion.score(graph, model, batches[:1])
    before = max_rss_mb()
    start = time.perf_counter()
    criterion.score(graph, model, batches)
    seconds = time.perf_counter() - start
    after = max_rss_mb()
    maps = []
    for g in graph.prunable_groups():
        maps.extend(node for node, _ in g.feature_maps())
    shapes = {}
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(graph.traced).propagate(x)
    for node in graph.traced.graph.nodes:
        if node.name in set(maps) and "tensor_meta" in node.meta:
            shapes[node.name] = tuple(node.meta["tensor_meta"].shape)
    all_maps_mb = sum(torch.Size(s[1:]).numel() * 4 for s in shapes.values()) * \
        len(batches) * args.batch_size / 2**20
    result = {"criterion": args.criterion, "images": len(batches) * args.batch_size,
              "batch_size": args.batch_size, "rss_loaded_mb": loaded,
              "rss_after_one_batch_mb": before, "rss_peak_mb": after,
              "one_batch_working_set_mb": before - loaded,
              "growth_mb": after - before, "seconds": seconds, "feature_maps": len(shapes),
              "all_maps_if_kept_mb": all_maps_mb, "threads": torch.get_num_threads()}
    Path(f"{args.out}_{args.criterion}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
