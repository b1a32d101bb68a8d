"""Shared command-line options: the model, fine-tuning (from TrainConfig's fields) and run
measurement; and turning parsed flags into the job's configuration mappings."""
from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..pipeline import run_default

__all__ = ["add_common_run_args", "add_model_args", "add_train_args", "count", "int_list",
           "model_spec", "run_options", "train_overrides"]

TRAIN_FIELDS = (("epochs", int), ("lr", float), ("momentum", float), ("weight_decay", float),
                ("schedule", str), ("warmup_epochs", int), ("label_smoothing", float),
                ("batch_size", int), ("num_workers", int))
# The flags' defaults are the run configuration's, written as the flags take them.
RUN_DEFAULTS = {"seed": run_default("seed"), "latency_runs": run_default("latency_runs"),
                "latency_batches": ",".join(map(str, run_default("latency_batches"))),
                "eval_splits": ",".join(run_default("eval_splits"))}


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


def add_model_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="model name (see `prunekit models`) or a saved .safetensors")
    p.add_argument("--weights", default=None,
                   help="checkpoint path, or 'pretrained' for the shared CIFAR ResNet weights")
    p.add_argument("--shortcut", default=None, help="CIFAR ResNet shortcut: A, A_append or B")


def model_spec(args) -> dict:
    """A zoo model by name, or a saved (pruned) model given as a .safetensors path."""
    if args.model.endswith(".safetensors"):
        ignored = [flag for flag, value in (("--weights", args.weights),
                                            ("--shortcut", args.shortcut)) if value]
        if ignored:
            raise ConfigError(f"{' and '.join(ignored)} cannot apply to a saved model "
                              f"({args.model} carries its own architecture and weights); "
                              "drop them")
        return {"path": args.model}
    kwargs = {"shortcut": args.shortcut} if args.shortcut else {}
    return {"name": args.model, "weights": args.weights, "kwargs": kwargs}


def add_train_args(p, prefix: str) -> None:
    for name, kind in TRAIN_FIELDS:
        p.add_argument(f"--{prefix}{name.replace('_', '-')}", type=kind, default=None,
                       dest=f"train_{name}")
    p.add_argument(f"--{prefix}nesterov", action="store_true", default=None, dest="train_nesterov")
    p.add_argument(f"--{prefix}milestones", default=None, dest="train_milestones",
                   help="comma-separated epochs for the multistep schedule")
    p.add_argument(f"--{prefix}max-steps", type=count(1), default=None,
                   dest="train_max_steps_per_epoch", help="cap steps per epoch (smoke runs)")


def add_common_run_args(p) -> None:
    p.add_argument("--data", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-splits", default=RUN_DEFAULTS["eval_splits"],
                   help="comma-separated splits to report accuracy on")
    p.add_argument("--latency-batches", default=RUN_DEFAULTS["latency_batches"],
                   help="batch sizes to time, comma-separated; empty to skip")
    p.add_argument("--latency-runs", type=count(1), default=RUN_DEFAULTS["latency_runs"])
    p.add_argument("--seed", type=count(0), default=RUN_DEFAULTS["seed"])
    p.add_argument("--limit", type=count(1), default=None,
                   help="evaluate on a class-balanced subset of N images (smoke runs)")


def train_overrides(args) -> dict:
    out = {}
    for name, _ in TRAIN_FIELDS + (("nesterov", bool), ("max_steps_per_epoch", int)):
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
    return {"data": args.data, "seed": args.seed,
            "eval_splits": [s for s in args.eval_splits.split(",") if s],
            "latency_batches": int_list(args.latency_batches, "--latency-batches"),
            "latency_runs": args.latency_runs, "limit": args.limit}
