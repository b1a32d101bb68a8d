"""Shared command-line options: the model, fine-tuning (from TrainConfig's fields) and run
measurement; and turning parsed flags into the job's configuration mappings."""
from __future__ import annotations

import argparse
import json

from ..errors import ConfigError
from ..models.sources import parse_model_ref
from ..pipeline import DATASET_KINDS, run_default

__all__ = ["add_common_run_args", "add_data_args", "add_model_args", "add_train_args",
           "add_trust_arg", "count",
           "data_options", "int_list", "model_kwargs", "model_spec", "preprocessing_overrides",
           "run_options", "train_overrides"]

TRAIN_FIELDS = (("epochs", int), ("lr", float), ("momentum", float), ("weight_decay", float),
                ("schedule", str), ("warmup_epochs", int), ("label_smoothing", float),
                ("batch_size", int), ("num_workers", int))
# The flags' defaults are the run configuration's, written as the flags take them.
RUN_DEFAULTS = {"seed": run_default("seed"), "latency_runs": run_default("latency_runs"),
                "latency_batches": ",".join(map(str, run_default("latency_batches")))}


def count(minimum: int):
    """An argparse type: a whole number >= ``minimum`` (refused by argparse, naming the flag,
    before any work)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"whole number >= {minimum}"
    return parse


MODEL_HELP = ("a zoo name (see `prunekit models`), torchvision:NAME, timm:NAME, "
              "package.module:function (any callable returning an nn.Module), or a saved "
              ".safetensors")
WEIGHTS_HELP = ("a checkpoint file (.pth/.pt state dict, read without unpickling code; "
                ".safetensors), or a name the source knows: 'pretrained' (zoo, timm), "
                "IMAGENET1K_V2 / DEFAULT (torchvision)")


def add_model_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--model", required=required, help=MODEL_HELP)
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--model-kwargs", default=None,
                   help='constructor arguments as JSON, e.g. \'{"num_classes": 100}\'')
    p.add_argument("--shortcut", default=None, help="CIFAR ResNet shortcut: A, A_append or B")
    add_trust_arg(p)


def add_trust_arg(p) -> None:
    p.add_argument("--trust-module", action="append", default=None, metavar="PACKAGE",
                   help="allow a saved model of your own code (package.module:function) to "
                        "import PACKAGE when it is loaded (repeatable)")


def model_kwargs(text: str | None) -> dict:
    """--model-kwargs as a dict (ConfigError unless it is a JSON object)."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--model-kwargs must be a JSON object such as "
                          f'\'{{"num_classes": 100}}\'; got {text!r} ({exc})') from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object, got {text!r}")
    return kwargs


def model_spec(args) -> dict:
    """The model spec of ``--model`` / ``--weights`` / ``--model-kwargs`` / ``--shortcut``."""
    spec = parse_model_ref(args.model)
    kwargs = model_kwargs(getattr(args, "model_kwargs", None))
    if spec.get("path"):
        ignored = [flag for flag, value in (("--weights", args.weights),
                                            ("--shortcut", args.shortcut),
                                            ("--model-kwargs", kwargs)) if value]
        if ignored:
            raise ConfigError(f"{' and '.join(ignored)} cannot apply to a saved model "
                              f"({args.model} carries its own architecture and weights); "
                              "drop them")
        if getattr(args, "trust_module", None):
            spec["trusted_modules"] = list(args.trust_module)
        return spec
    if args.shortcut:
        if spec["source"] != "prunekit":
            raise ConfigError("--shortcut is an option of the zoo's CIFAR ResNets; for "
                              f"{args.model} pass constructor arguments with --model-kwargs")
        kwargs["shortcut"] = args.shortcut
    return {**spec, "weights": args.weights, "kwargs": kwargs}


def add_data_args(p) -> None:
    """--data, --dataset and the preprocessing overrides."""
    p.add_argument("--data", default=None,
                   help="CIFAR-10 location, or an image folder DIR (DIR/train/<class>/..., "
                        "DIR/val/<class>/... reported as 'test')")
    p.add_argument("--dataset", default=None, choices=DATASET_KINDS,
                   help="which kind of data --data holds (default auto: detected)")
    p.add_argument("--input-size", type=count(1), default=None,
                   help="image size in pixels (default: the model's, from its weights)")
    p.add_argument("--mean", type=_three_floats, default=None,
                   help="normalisation mean, e.g. 0.485,0.456,0.406 (default: the model's)")
    p.add_argument("--std", type=_three_floats, default=None,
                   help="normalisation std (default: the model's)")


def preprocessing_overrides(args) -> dict:
    """--input-size / --mean / --std as given (for Preprocessing.with_overrides)."""
    return {k: v for k, v in data_options(args).items() if k in ("input_size", "mean", "std")}


def _three_floats(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers, got {text!r}")
    return values


def data_options(args) -> dict:
    """The data flags the user gave (flags left out do not replace a recipe's values)."""
    given = {"data": args.data, "dataset": args.dataset, "input_size": args.input_size,
             "mean": args.mean, "std": args.std}
    return {k: v for k, v in given.items() if v is not None}


def add_train_args(p, prefix: str) -> None:
    for name, kind in TRAIN_FIELDS:
        p.add_argument(f"--{prefix}{name.replace('_', '-')}", type=kind, default=None,
                       dest=f"train_{name}")
    p.add_argument(f"--{prefix}nesterov", action="store_true", default=None, dest="train_nesterov")
    p.add_argument(f"--{prefix}amp", action="store_true", default=None, dest="train_amp",
                   help="float16 autocast + GradScaler (CUDA)")
    p.add_argument(f"--{prefix}channels-last", action="store_true", default=None,
                   dest="train_channels_last", help="NHWC memory format (faster on GPUs)")
    p.add_argument(f"--{prefix}milestones", default=None, dest="train_milestones",
                   help="comma-separated epochs for the multistep schedule")
    p.add_argument(f"--{prefix}max-steps", type=count(1), default=None,
                   dest="train_max_steps_per_epoch", help="cap steps per epoch (smoke runs)")


def add_common_run_args(p) -> None:
    add_data_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-splits", default=None,
                   help="comma-separated splits to report accuracy on (default: test and "
                        "test-lossless for CIFAR-10, test for an image folder)")
    p.add_argument("--latency-batches", default=RUN_DEFAULTS["latency_batches"],
                   help="batch sizes to time, comma-separated; empty to skip")
    p.add_argument("--latency-runs", type=count(1), default=RUN_DEFAULTS["latency_runs"])
    p.add_argument("--seed", type=count(0), default=RUN_DEFAULTS["seed"])
    p.add_argument("--limit", type=count(1), default=None,
                   help="evaluate on a class-balanced subset of N images (smoke runs)")


def train_overrides(args) -> dict:
    out = {}
    for name, _ in TRAIN_FIELDS + (("nesterov", bool), ("amp", bool), ("channels_last", bool),
                                   ("max_steps_per_epoch", int)):
        value = getattr(args, f"train_{name}", None)
        if value is not None:
            out[name] = value
    if getattr(args, "train_milestones", None):
        out["milestones"] = list(int_list(args.train_milestones, "--milestones", minimum=1))
    if args.device != "auto":
        out["device"] = args.device
    out["seed"] = args.seed
    return out


def int_list(text: str, flag: str, minimum: int = 1) -> tuple[int, ...]:
    """Comma-separated whole numbers >= ``minimum`` (empty text: none), or ConfigError."""
    try:
        values = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated whole numbers such as 1,64; "
                          f"got {text!r}") from None
    small = [v for v in values if v < minimum]
    if small:
        raise ConfigError(f"{flag} values must be >= {minimum}, got {small[0]} in {text!r}")
    return values


def run_options(args) -> dict:
    options = {**data_options(args), "seed": args.seed,
               "latency_batches": int_list(args.latency_batches, "--latency-batches"),
               "latency_runs": args.latency_runs, "limit": args.limit}
    if args.eval_splits is not None:
        options["eval_splits"] = [s for s in args.eval_splits.split(",") if s]
    return options
