"""``prunekit prune`` and ``prunekit finetune``: flags (and a recipe) to a job configuration."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..pipeline import FINETUNE_DEFAULTS, finetune_saved, run_prune, summary_table
from ..plan import ALLOCATIONS, TARGET_KINDS, check_ratio
from ..recipes import load_recipe
from .method_flags import add_method_arguments, method_overrides
from .options import (add_common_run_args, add_model_args, add_train_args, add_trust_arg, count,
                      model_kwargs, model_spec, run_options, train_overrides)

__all__ = ["add_finetune_parser", "add_prune_parser"]


def add_prune_parser(sub) -> None:
    pr = sub.add_parser("prune", help="prune, fine-tune, measure and save (report.json)")
    pr.add_argument("--recipe", default=None, help="a recipe name (recipes/) or YAML file")
    add_model_args(pr, required=False)
    pr.add_argument("--criterion", default=None, help="l1, l2, fpgm, bn_scale, hrank, chip, ...")
    add_method_arguments(pr)
    target = pr.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, default=None, help="uniform fraction removed")
    target.add_argument("--macs-reduction", type=float, default=None,
                        help="fraction of MACs to remove (reached within 1%%)")
    target.add_argument("--latency-reduction", type=float, default=None,
                        help="fraction of the latency to remove, measured on this device on "
                             "the deployed model (reached within --latency-tolerance)")
    target.add_argument("--chip-sparsity", default=None, help="e.g. '[0.]+[0.15]*2+[0.4]*27'")
    target.add_argument("--global-ratio", type=float, default=None,
                        help="fraction of all channels removed by one global ranking")
    target.add_argument("--counts-from-criterion", action="store_true", default=None,
                        help="each layer keeps as many channels as the criterion decides "
                             "(epruner: its exemplar filters)")
    pr.add_argument("--latency-target-batch", type=count(1), default=None,
                    help="batch size --latency-reduction is measured at (default 1)")
    pr.add_argument("--latency-tolerance", type=float, default=None,
                    help="--latency-reduction: relative tolerance of the measured reduction "
                         "(default 0.05)")
    pr.add_argument("--latency-kernel", choices=("onednn", "native"), default=None,
                    help="--latency-reduction: the conv kernel timed and deployed for the "
                         "measurement: onednn (PyTorch's, the default) or native (prunekit's C "
                         "kernel, as deploy(native_convs=True) runs it)")
    pr.add_argument("--calibration-batches", type=count(1), default=None,
                    help="batches of training images data-driven criteria score on (CHIP, "
                         "HRank, taylor, apoz; default 5)")
    pr.add_argument("--calibration-batch-size", type=count(1), default=None,
                    help="images per calibration batch (default 128)")
    pr.add_argument("--ignore", default="", help="comma-separated modules whose outputs stay")
    pr.add_argument("--round-to", type=int, default=None)
    pr.add_argument("--stream-scale", type=float, default=None,
                    help="residual streams lose this fraction of the ratio the other groups "
                         "lose (0: kept whole, 1: pruned alike; ratio and MACs targets)")
    pr.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                    help="how a --macs-reduction is shared among the groups: uniform (one "
                         "ratio), global (one ranking of all channels), sensitivity (each "
                         "group measured alone on held-out val batches; the default of "
                         "--macs-reduction with the oneshot method, measured best in "
                         "benchmarks/results/equal_macs.md) or criterion (one level of the "
                         "criterion's own family of counts: pfp's error level)")
    pr.add_argument("--distill", action="store_true", default=None,
                    help="fine-tune learning from the unpruned model too (Hinton et al. 2015: "
                         "(1 - w) CE + w T^2 KL of softened logits; one-shot methods)")
    pr.add_argument("--distill-temperature", type=float, default=None,
                    help="softmax temperature T of --distill (default 4)")
    pr.add_argument("--distill-weight", type=float, default=None,
                    help="weight w of the teacher's term, in [0, 1] (default 0.5)")
    pr.add_argument("--deploy", action="store_true", default=None,
                    help="the final before/after latency compares both models deployed "
                         "(prunekit.deploy: BatchNorm folded, epilogues fused)")
    pr.add_argument("--out", required=True, help="run directory (rerun to resume)")
    add_train_args(pr, prefix="finetune-")
    add_common_run_args(pr)
    pr.set_defaults(func=cmd_prune)


def add_finetune_parser(sub) -> None:
    ft = sub.add_parser("finetune", help="fine-tune a saved model (resumable)")
    ft.add_argument("model", help="a .safetensors file written by prunekit, or a run directory")
    ft.add_argument("--out", default=None, help="default: <run dir>/finetune-more")
    add_trust_arg(ft)
    add_train_args(ft, prefix="")
    add_common_run_args(ft)
    ft.set_defaults(func=cmd_finetune)


def _method_section(args, options: dict) -> dict:
    method = dict(options.get("method") or {})
    if args.method and args.method != (method.get("name") or "oneshot"):
        method = {"name": args.method}  # another method than the recipe's: its options go
    name = method.get("name") or "oneshot"
    for key, value in method_overrides(args, name).items():
        if isinstance(value, dict):
            value = {**(method.get(key) or {}), **value}
        method[key] = value
    method["name"] = name
    return method


# Measured on the pretrained ResNet-56 at 47% fewer MACs (benchmarks/results/equal_macs.md):
# each group's own sensitivity keeps more accuracy than one ratio for every group.
DEFAULT_MACS_ALLOCATION = "sensitivity"


def _plan_section(args, options: dict) -> dict:
    plan = dict(options.get("plan") or {})
    for key, value in (("ratio", args.ratio), ("macs_reduction", args.macs_reduction),
                       ("latency_reduction", args.latency_reduction),
                       ("chip_sparsity", args.chip_sparsity), ("global_ratio", args.global_ratio),
                       ("counts_from", "criterion" if args.counts_from_criterion else None)):
        if value is not None:
            if key not in ("chip_sparsity", "counts_from"):  # fail before loading any data
                check_ratio(value, "--" + key.replace("_", "-"))
            for kind in TARGET_KINDS:
                plan.pop(kind, None)
            plan[key] = value
    if args.ignore:
        plan["ignore"] = [n for n in args.ignore.split(",") if n]
    if args.round_to is not None:
        plan["round_to"] = args.round_to  # 0 is refused by PlanTarget, never read as 1
    if args.stream_scale is not None:
        plan["stream_scale"] = args.stream_scale
    for key in ("latency_target_batch", "latency_tolerance", "latency_kernel"):
        if getattr(args, key) is not None:
            plan[key.replace("_target", "")] = getattr(args, key)
    if args.allocation is not None:
        plan["allocation"] = args.allocation
    elif args.macs_reduction is not None and args.stream_scale is None and \
            "stream_scale" not in plan and options["method"].get("name") == "oneshot":
        plan.setdefault("allocation", DEFAULT_MACS_ALLOCATION)
    return plan


def _distill_section(args, options: dict) -> dict | None:
    """The recipe's ``distill`` section with the flags over it; the temperature and weight
    flags without --distill (and no recipe section) are an error, not silently ignored."""
    distill = options.get("distill")
    given = {k: v for k, v in (("temperature", args.distill_temperature),
                               ("weight", args.distill_weight)) if v is not None}
    if distill is None and not args.distill:
        if given:
            raise ConfigError("--distill-temperature / --distill-weight set how --distill "
                              "teaches; add --distill")
        return None
    return {**(distill or {}), **given}


def cmd_prune(args) -> int:
    options = load_recipe(args.recipe) if args.recipe else {}
    recipe_name = options.get("name")
    if args.model:
        options["model"] = model_spec(args)
    elif "model" in options:
        options["model"] = _recipe_model_with_flags(args, dict(options["model"]))
    if "model" not in options:
        raise ConfigError("give --model (and --weights) or --recipe")
    if args.criterion:
        options["criterion"] = {"name": args.criterion}
    calibration = dict(options.get("calibration") or {})
    for key, value in (("batches", args.calibration_batches),
                       ("batch_size", args.calibration_batch_size)):
        if value is not None:
            calibration[key] = value
    if calibration:
        options["calibration"] = calibration
    options["method"] = _method_section(args, options)
    options["plan"] = _plan_section(args, options)
    options["finetune"] = {**FINETUNE_DEFAULTS, **(options.get("finetune") or {}),
                           **train_overrides(args)}
    options.update(run_options(args), out=args.out, recipe=recipe_name)
    if args.deploy:
        options["deploy"] = True
    distill = _distill_section(args, options)
    if distill is not None:
        options["distill"] = distill
    report = run_prune(options)
    print(summary_table(report))
    print(f"wrote {args.out}/report.json and {args.out}/model.safetensors")
    return 0


def _recipe_model_with_flags(args, model: dict) -> dict:
    """The recipe's model with --weights / --model-kwargs / --shortcut applied over it (a flag
    the user gives always wins over the recipe)."""
    if args.weights is not None:
        model["weights"] = args.weights or None  # --weights '' : random initialisation
    kwargs = dict(model.get("kwargs") or {})
    kwargs.update(model_kwargs(args.model_kwargs))
    if args.shortcut:
        kwargs["shortcut"] = args.shortcut
    if kwargs:
        model["kwargs"] = kwargs
    return model


def saved_model_path(path: str) -> str:
    p = Path(path)
    return str(p / "model.safetensors") if p.is_dir() else str(p)


def cmd_finetune(args) -> int:
    source = saved_model_path(args.model)
    out = args.out or str(Path(source).parent / "finetune-more")
    options = {**run_options(args), "trusted_modules": args.trust_module or [],
               "finetune": {**FINETUNE_DEFAULTS, "epochs": 1, **train_overrides(args)}}
    report = finetune_saved(source, out, options)
    print(json.dumps({k: report[k] for k in ("best_val_top1", "best_epoch", "status")}))
    return 0
