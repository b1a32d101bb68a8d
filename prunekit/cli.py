"""The ``prunekit`` command line.

    prunekit eval --model cifar_resnet56 --weights pretrained [--data DIR] [--split test] [--json]
    prunekit prune --model cifar_resnet56 --weights pretrained --criterion l1 --macs-reduction 0.5
                   [--finetune-epochs 2 ...] --out runs/l1_50
    prunekit prune --recipe chip_resnet56_47 --out runs/chip47
    prunekit finetune RUN_DIR --epochs 10      prunekit export RUN_DIR/model.safetensors --onnx
    prunekit report RUN_DIR...                 prunekit models | explain
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import data, measure, models
from .graph import GraphError, explain

CIFAR_INPUT = (1, 3, 32, 32)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name (see `prunekit models`)")
    p.add_argument("--weights", default=None,
                   help="checkpoint path, or 'pretrained' for the shared CIFAR ResNet weights")
    p.add_argument("--shortcut", default=None, help="CIFAR ResNet shortcut: A, A_append or B")


def _model_spec(args) -> dict:
    """A zoo model by name, or a saved (pruned) model given as a .safetensors path."""
    if args.model.endswith(".safetensors"):
        return {"path": args.model}
    kwargs = {"shortcut": args.shortcut} if args.shortcut else {}
    return {"name": args.model, "weights": args.weights, "kwargs": kwargs}


def _build_model(args) -> torch.nn.Module:
    from .pipeline import load_model
    return load_model(_model_spec(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="accuracy, MACs, params and measured latency of a model")
    _add_model_args(ev)
    ev.add_argument("--data", default=None,
                    help=f"CIFAR-10 location (default: ${data.DATA_ENV_VAR} or known places)")
    ev.add_argument("--split", default="test", choices=data.SPLITS,
                    help="which images to evaluate on (test-lossless: the 1,000 original-pixel "
                         "test images, comparable to published numbers)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate a class-balanced subset")
    ev.add_argument("--batch-size", type=int, default=500)
    ev.add_argument("--workers", type=int, default=0)
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ev.add_argument("--latency-batches", default="1,64",
                    help="batch sizes to time, comma-separated; empty to skip")
    ev.add_argument("--latency-runs", type=int, default=30)
    ev.add_argument("--threads", type=int, default=None, help="CPU threads for timing")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("prune", help="prune, fine-tune, measure and save (report.json)")
    pr.add_argument("--recipe", default=None, help="a recipe name (recipes/) or YAML file")
    pr.add_argument("--model", default=None, help="model name or saved .safetensors")
    pr.add_argument("--weights", default=None)
    pr.add_argument("--shortcut", default=None)
    pr.add_argument("--criterion", default=None, help="l1, l2, fpgm, bn_scale, hrank, chip, ...")
    pr.add_argument("--method", default=None,
                    choices=("oneshot", "sfp", "asfp", "fpgm-soft", "lfpc", "swp"),
                    help="one-shot pruning + fine-tuning (default), soft pruning during "
                         "fine-tuning (SFP, ASFP, FPGM-soft), or LFPC (criteria search, then "
                         "SFP with the learned per-layer criteria); these need --ratio or "
                         "--macs-reduction; or SWP (trains a filter skeleton for "
                         "--finetune-epochs, then removes stripes, filters and blocks)")
    pr.add_argument("--sr", type=float, default=None,
                    help="SWP: L1 weight alpha of the filter skeleton (default 1e-5)")
    pr.add_argument("--threshold", type=float, default=None,
                    help="SWP: stripes with |skeleton| <= threshold are removed (default 0.01)")
    pr.add_argument("--skeleton-lr-scale", type=float, default=None,
                    help="SWP: the skeleton's lr as a multiple of --finetune-lr (default 1)")
    pr.add_argument("--skeleton-weight-decay", type=float, default=None,
                    help="SWP: weight decay of the skeleton (default: the weights')")
    pr.add_argument("--penalty-epochs", type=int, default=None,
                    help="SWP: train the skeleton (L1 term) only in the first N epochs, "
                         "then freeze it and train the weights to recover (default: all)")
    pr.add_argument("--bn-recalibration", type=int, default=None, metavar="BATCHES",
                    help="SWP: re-estimate BN statistics on BATCHES training batches after "
                         "pruning (default 0: off, as the paper)")
    pr.add_argument("--stripe-executor", default=None, choices=("stripe", "dense"),
                    help="SWP: run pruned convs as StripeConv2d (default) or as dense convs "
                         "with zero stripes")
    pr.add_argument("--search-epochs", type=int, default=None,
                    help="LFPC: epochs of the criteria search (default 1)")
    pr.add_argument("--alpha-lr", type=float, default=None,
                    help="LFPC: Adam lr of the sampler logits (default 1e-4)")
    pr.add_argument("--frozen-search", action="store_true",
                    help="LFPC: keep the weights fixed during the search (sampler only)")
    target = pr.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, default=None, help="uniform fraction removed")
    target.add_argument("--macs-reduction", type=float, default=None,
                        help="fraction of MACs to remove (uniform ratio found by bisection)")
    target.add_argument("--chip-sparsity", default=None, help="e.g. '[0.]+[0.15]*2+[0.4]*27'")
    target.add_argument("--global-ratio", type=float, default=None,
                        help="fraction of all channels removed by one global ranking")
    pr.add_argument("--ignore", default="", help="comma-separated modules whose outputs stay")
    pr.add_argument("--round-to", type=int, default=None)
    pr.add_argument("--out", required=True, help="run directory (rerun to resume)")
    _add_train_args(pr, prefix="finetune-")
    _add_common_run_args(pr)
    pr.set_defaults(func=cmd_prune)

    ft = sub.add_parser("finetune", help="fine-tune a saved model (resumable)")
    ft.add_argument("model", help="a .safetensors file written by prunekit, or a run directory")
    ft.add_argument("--out", default=None, help="default: <run dir>/finetune-more")
    _add_train_args(ft, prefix="")
    _add_common_run_args(ft)
    ft.set_defaults(func=cmd_finetune)

    exp = sub.add_parser("export", help="export a saved model to ONNX and/or TorchScript")
    exp.add_argument("model", help="a .safetensors file written by prunekit, or a run directory")
    exp.add_argument("--onnx", action="store_true")
    exp.add_argument("--torchscript", action="store_true")
    exp.add_argument("--out", default=None, help="output path stem (default: next to the model)")
    exp.add_argument("--input-size", type=int, default=32)
    exp.set_defaults(func=cmd_export)

    rep = sub.add_parser("report", help="Markdown table + PNG plot of accuracy vs MACs")
    rep.add_argument("runs", nargs="+", help="run directories containing report.json")
    rep.add_argument("--out", default="report", help="output stem: OUT.md and OUT.png")
    rep.add_argument("--split", default=None, help="which accuracy to plot (default: test)")
    rep.set_defaults(func=cmd_report)

    ls = sub.add_parser("models", help="list the registered models")
    ls.add_argument("pattern", nargs="?", default=None)
    ls.set_defaults(func=lambda a: print("\n".join(models.list_models(a.pattern))) or 0)

    ex = sub.add_parser("explain", help="print the channel groups of a model")
    _add_model_args(ex)
    ex.add_argument("--input-size", type=int, default=32)
    ex.set_defaults(func=cmd_explain)
    return parser


TRAIN_FIELDS = (("epochs", int), ("lr", float), ("momentum", float), ("weight_decay", float),
                ("schedule", str), ("warmup_epochs", int), ("label_smoothing", float),
                ("batch_size", int), ("num_workers", int))


# From a pretrained network: a tenth of the from-scratch learning rate (as FPGM/CHIP do).
FINETUNE_DEFAULTS = {"epochs": 0, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                     "schedule": "cosine", "batch_size": 128}


def _add_train_args(p, prefix: str) -> None:
    for name, kind in TRAIN_FIELDS:
        p.add_argument(f"--{prefix}{name.replace('_', '-')}", type=kind, default=None,
                       dest=f"train_{name}")
    p.add_argument(f"--{prefix}nesterov", action="store_true", default=None, dest="train_nesterov")
    p.add_argument(f"--{prefix}milestones", default=None, dest="train_milestones",
                   help="comma-separated epochs for the multistep schedule")
    p.add_argument(f"--{prefix}max-steps", type=int, default=None,
                   dest="train_max_steps_per_epoch", help="cap steps per epoch (smoke runs)")


def _add_common_run_args(p) -> None:
    p.add_argument("--data", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-splits", default="test,test-lossless")
    p.add_argument("--latency-batches", default="1,64")
    p.add_argument("--latency-runs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on a class-balanced subset of N images (smoke runs)")


def _train_overrides(args) -> dict:
    out = {}
    for name, _ in TRAIN_FIELDS + (("nesterov", bool), ("max_steps_per_epoch", int)):
        value = getattr(args, f"train_{name}", None)
        if value is not None:
            out[name] = value
    if getattr(args, "train_milestones", None):
        out["milestones"] = [int(m) for m in args.train_milestones.split(",")]
    if args.device != "auto":
        out["device"] = args.device
    out["seed"] = args.seed
    return out


def _run_options(args) -> dict:
    return {"data": args.data, "seed": args.seed,
            "eval_splits": [s for s in args.eval_splits.split(",") if s],
            "latency_batches": tuple(int(b) for b in args.latency_batches.split(",") if b),
            "latency_runs": args.latency_runs, "limit": args.limit}


def cmd_prune(args) -> int:
    from .pipeline import run_prune, summary_table
    from .plan import check_ratio
    from .recipes import load_recipe
    options = load_recipe(args.recipe) if args.recipe else {}
    recipe_name = options.get("name")
    if args.model:
        options["model"] = _model_spec(args)
    if "model" not in options:
        raise ValueError("give --model (and --weights) or --recipe")
    if args.criterion:
        options["criterion"] = {"name": args.criterion}
    if args.method:
        options["method"] = {} if args.method == "oneshot" else {"name": args.method}
    method = options.get("method") or {}
    if method.get("name") == "lfpc":
        if args.search_epochs is not None:
            method["search"] = {**(method.get("search") or {}), "epochs": args.search_epochs}
        if args.alpha_lr is not None:
            method["sampler"] = {**(method.get("sampler") or {}), "alpha_lr": args.alpha_lr}
        if args.frozen_search:
            method["train_weights"] = False
    elif args.search_epochs is not None or args.alpha_lr is not None or args.frozen_search:
        raise ValueError("--search-epochs, --alpha-lr and --frozen-search belong to --method lfpc")
    swp_flags = {"sr": args.sr, "threshold": args.threshold, "executor": args.stripe_executor,
                 "skeleton_lr_scale": args.skeleton_lr_scale,
                 "skeleton_weight_decay": args.skeleton_weight_decay,
                 "penalty_epochs": args.penalty_epochs,
                 "bn_recalibration_batches": args.bn_recalibration}
    if method.get("name") == "swp":
        method.update({k: v for k, v in swp_flags.items() if v is not None})
    elif any(v is not None for v in swp_flags.values()):
        raise ValueError("--sr, --threshold, --skeleton-*, --penalty-epochs, "
                         "--bn-recalibration and --stripe-executor belong to --method swp")
    plan = dict(options.get("plan") or {})
    for key, value in (("ratio", args.ratio), ("macs_reduction", args.macs_reduction),
                       ("chip_sparsity", args.chip_sparsity), ("global_ratio", args.global_ratio)):
        if value is not None:
            if key != "chip_sparsity":  # fail before loading data or measuring anything
                check_ratio(value, "--" + key.replace("_", "-"))
            for target in ("ratio", "ratios", "macs_reduction", "chip_sparsity", "conv_rates",
                           "global_ratio"):
                plan.pop(target, None)
            plan[key] = value
    if args.ignore:
        plan["ignore"] = [n for n in args.ignore.split(",") if n]
    if args.round_to:
        plan["round_to"] = args.round_to
    options["plan"] = plan
    options["finetune"] = {**FINETUNE_DEFAULTS, **(options.get("finetune") or {}),
                           **_train_overrides(args)}
    options.update(_run_options(args), out=args.out, recipe=recipe_name)
    report = run_prune(options)
    print(summary_table(report))
    print(f"wrote {args.out}/report.json and {args.out}/model.safetensors")
    return 0


def _saved_model_path(path: str) -> str:
    from pathlib import Path
    p = Path(path)
    return str(p / "model.safetensors") if p.is_dir() else str(p)


def cmd_finetune(args) -> int:
    from pathlib import Path
    from .pipeline import finetune_saved
    source = _saved_model_path(args.model)
    out = args.out or str(Path(source).parent / "finetune-more")
    options = {**_run_options(args),
               "finetune": {**FINETUNE_DEFAULTS, "epochs": 1, **_train_overrides(args)}}
    report = finetune_saved(source, out, options)
    print(json.dumps({k: report[k] for k in ("best_val_top1", "best_epoch", "status")}))
    return 0


def cmd_export(args) -> int:
    from pathlib import Path
    from . import io
    source = Path(_saved_model_path(args.model))
    model = io.load(source).eval()
    example = torch.randn(1, 3, args.input_size, args.input_size)
    stem = Path(args.out) if args.out else source.with_suffix("")
    if not (args.onnx or args.torchscript):
        raise ValueError("choose --onnx and/or --torchscript")
    if args.onnx:
        print(f"wrote {io.export_onnx(model, stem.with_suffix('.onnx'), example)} "
              "(onnxruntime output checked against PyTorch)")
    if args.torchscript:
        print(f"wrote {io.export_torchscript(model, stem.with_suffix('.pt'), example)}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    md, png = write_report(args.runs, args.out, split=args.split)
    print(open(md).read())
    print(f"wrote {md} and {png}")
    return 0


def cmd_eval(args) -> int:
    device = measure.resolve_device(args.device)
    model = _build_model(args).to(device).eval()
    root = data.resolve_data_root(args.data)
    dataset = data.CIFAR10(root, split=args.split, limit=args.limit)
    loader = data.build_loader(dataset, batch_size=args.batch_size, shuffle=False,
                               num_workers=args.workers)
    started = time.perf_counter()
    accuracy = measure.evaluate(model, loader, device=device, progress=not args.json)
    eval_seconds = time.perf_counter() - started
    example = torch.randn(*CIFAR_INPUT, device=device)
    sizes = measure.profile(model, example)
    batches = tuple(int(b) for b in args.latency_batches.split(",") if b.strip())
    latency = None
    if batches:
        latency = measure.measure_latency(model, example, batch_sizes=batches,
                                          runs=args.latency_runs, threads=args.threads)
    report = {
        "model": args.model, "weights": args.weights, "split": args.split,
        "split_description": dataset.description, "images": accuracy["n"],
        "top1": accuracy["top1"], "top5": accuracy["top5"], "loss": accuracy["loss"],
        "macs": sizes["macs"], "macs_thop": sizes["macs_thop"], "params": sizes["params"],
        "latency_ms": {str(b): ms for b, ms in latency.median_ms.items()} if latency else {},
        "latency": latency.as_dict() if latency else None,
        "device": str(device), "eval_seconds": eval_seconds,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(_table(report))
    return 0


def _table(r: dict) -> str:
    rows = [
        ("model", f"{r['model']} (weights: {r['weights'] or 'random init'})"),
        ("data", r["split_description"]),
        ("top-1 / top-5", f"{r['top1']:.2f}% / {r['top5']:.2f}%  on {r['images']:,} images "
                          f"[{r['split']}]"),
        ("MACs", f"{r['macs']:,} ({r['macs'] / 1e6:.2f}M; conv+linear; "
                 f"thop-style with BN: {r['macs_thop'] / 1e6:.2f}M)"),
        ("params", f"{r['params']:,} ({r['params'] / 1e6:.3f}M)"),
    ]
    if r["latency"]:
        lat = r["latency"]
        for bs, b in lat["batches"].items():
            rows.append((f"latency bs={bs}", f"{b['median_ms']:.2f} ms median "
                                             f"(p10 {b['p10_ms']:.2f}, p90 {b['p90_ms']:.2f}, "
                                             f"{b['runs']} runs)"))
        rows.append(("timed on", f"{lat['device_name']}, {lat['num_threads']} threads, "
                                 f"torch {lat['torch_version']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def cmd_explain(args) -> int:
    model = _build_model(args).eval()
    explain(model, torch.randn(1, 3, args.input_size, args.input_size))
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (data.DatasetNotFoundError, FileNotFoundError, ValueError, GraphError,
            models.WeightsLoadError) as exc:
        print(f"prunekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunekit {args.command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
