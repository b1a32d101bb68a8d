"""``prunekit eval | export | report | models | explain``."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import data, io, measure, models
from ..deployment import DEPLOY_ATTR, deploy
from ..errors import ConfigError
from ..graph import explain
from ..models.sources import model_preprocessing
from ..pipeline import (check_outputs_fit_data, load_model, open_run_data, resolve_dataset,
                        run_preprocessing)
from ..report import write_report
from .options import (RUN_DEFAULTS, add_data_args, add_model_args, add_trust_arg, count, int_list,
                      model_spec, preprocessing_overrides)
from .prune import saved_model_path

__all__ = ["add_inspect_parsers"]


def add_inspect_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="accuracy, MACs, params and measured latency of a model")
    add_model_args(ev)
    add_data_args(ev)
    ev.add_argument("--split", default="test",
                    help="which images to evaluate on: CIFAR-10 "
                         f"{', '.join(data.SPLITS)} (test-lossless: the 1,000 original-pixel "
                         "test images, comparable to published numbers); image folder "
                         f"{', '.join(data.FOLDER_SPLITS)}")
    ev.add_argument("--limit", type=count(1), default=None, help="evaluate a class-balanced subset")
    ev.add_argument("--batch-size", type=count(1), default=500)
    ev.add_argument("--workers", type=count(0), default=0)
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ev.add_argument("--latency-batches", default=RUN_DEFAULTS["latency_batches"],
                    help="batch sizes to time, comma-separated; empty to skip")
    ev.add_argument("--latency-runs", type=count(1), default=RUN_DEFAULTS["latency_runs"])
    ev.add_argument("--threads", type=count(1), default=None, help="CPU threads for timing")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ev.add_argument("--deploy", action="store_true",
                    help="evaluate and time the deployed model (prunekit.deploy)")
    ev.set_defaults(func=cmd_eval)

    exp = sub.add_parser("export", help="export a saved model to ONNX and/or TorchScript")
    exp.add_argument("model", help="a .safetensors file written by prunekit, or a run directory")
    exp.add_argument("--onnx", action="store_true")
    exp.add_argument("--torchscript", action="store_true")
    exp.add_argument("--out", default=None, help="output path stem (default: next to the model)")
    exp.add_argument("--input-size", type=count(1), default=None,
                     help="example input size (default: the model's)")
    exp.add_argument("--deploy", action="store_true",
                     help="export the deployed model (prunekit.deploy: BatchNorm folded)")
    add_trust_arg(exp)
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
    add_model_args(ex)
    ex.add_argument("--input-size", type=count(1), default=None,
                    help="example input size (default: the model's)")
    ex.set_defaults(func=cmd_explain)


def cmd_export(args) -> int:
    source = Path(saved_model_path(args.model))
    model = io.load(source, trusted_modules=args.trust_module or ()).eval()
    size = args.input_size or model_preprocessing({"path": str(source)}, model).input_size
    example = torch.randn(1, 3, size, size)
    stem = Path(args.out) if args.out else source.with_suffix("")
    if not (args.onnx or args.torchscript):
        raise ConfigError("choose --onnx and/or --torchscript")
    if args.deploy:
        # the exporters' layout is NCHW, and they see plain convs (native ones export as such)
        model = deploy(model, example, channels_last=False, native_convs=False)
    if args.onnx:
        print(f"wrote {io.export_onnx(model, stem.with_suffix('.onnx'), example)} "
              "(onnxruntime output checked against PyTorch)")
    if args.torchscript:
        print(f"wrote {io.export_torchscript(model, stem.with_suffix('.pt'), example)}")
    return 0


def cmd_report(args) -> int:
    md, png = write_report(args.runs, args.out, split=args.split)
    print(open(md).read())
    print(f"wrote {md} and {png}")
    return 0


def cmd_eval(args) -> int:
    device = measure.resolve_device(args.device)
    batches = int_list(args.latency_batches, "--latency-batches")
    spec = model_spec(args)
    kind, root = resolve_dataset(args.dataset, args.data)
    known = data.FOLDER_SPLITS if kind == "imagefolder" else data.SPLITS
    if args.split not in known:
        raise ConfigError(f"unknown split {args.split!r} for this data; valid: "
                          f"{', '.join(known)}")
    model = load_model(spec).to(device).eval()
    preprocessing = run_preprocessing(spec, model, kind, preprocessing_overrides(args))
    run_data = open_run_data(kind, root, preprocessing, limit=args.limit)
    example = torch.randn(*preprocessing.input_shape(), device=device)
    check_outputs_fit_data(model, example, run_data.num_classes, run_data.name)
    if args.deploy:
        model = deploy(model, example)
    dataset = run_data.eval_set(args.split)
    loader = data.build_loader(dataset, batch_size=args.batch_size, shuffle=False,
                               num_workers=args.workers)
    started = time.perf_counter()
    accuracy = measure.evaluate(model, loader, device=device, progress=not args.json)
    eval_seconds = time.perf_counter() - started
    sizes = measure.profile(model, example)
    latency = None
    if batches:
        latency = measure.measure_latency(model, example, batch_sizes=batches,
                                          runs=args.latency_runs, threads=args.threads)
    report = {
        "model": args.model, "weights": args.weights, "source": spec.get("source", "saved"),
        "preprocessing": preprocessing.to_dict(), "input_size": preprocessing.input_size,
        "split": args.split, "split_description": dataset.description, "images": accuracy["n"],
        "nonfinite_outputs": accuracy.get("nonfinite_outputs", 0),
        "top1": accuracy["top1"], "top5": accuracy["top5"], "loss": accuracy["loss"],
        "macs": sizes["macs"], "macs_thop": sizes["macs_thop"], "params": sizes["params"],
        "latency_ms": {str(b): ms for b, ms in latency.median_ms.items()} if latency else {},
        "latency": latency.as_dict() if latency else None,
        "device": str(device), "eval_seconds": eval_seconds,
        "deployed": getattr(model, DEPLOY_ATTR, None) if args.deploy else None,
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
        ("preprocessing", _preprocessing_text(r["preprocessing"])),
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
        if lat.get("warnings"):
            rows.append(("UNRELIABLE", "; ".join(lat["warnings"])))
    if r.get("deployed"):
        d = r["deployed"]
        relus = len(d.get('stripe_relu', [])) + len(d.get('dense_relu', []))
        adds = len(d.get('stripe_residual', [])) + len(d.get('dense_residual', []))
        rows.append(("deployed", f"{len(d['folded_bn'])} BatchNorms folded, {relus} ReLUs and "
                                 f"{adds} residual adds fused into their convs, "
                                 f"channels_last {d['channels_last']['channels_last']}, "
                                 f"{len(d.get('native_convs', []))} dense convs on prunekit's "
                                 "C kernel"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _preprocessing_text(values: dict) -> str:
    return data.Preprocessing.from_dict(values).describe()


def cmd_explain(args) -> int:
    spec = model_spec(args)
    model = load_model(spec).eval()
    size = args.input_size or model_preprocessing(spec, model).input_size
    explain(model, torch.randn(1, 3, size, size))
    return 0
