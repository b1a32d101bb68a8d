"""The ``prunekit prune`` job: measure -> score -> prune -> measure -> fine-tune -> measure -> save.

Every stage is timed; everything lands in ``OUT/report.json`` and ``OUT/model.safetensors``.
A rerun with the same OUT resumes: the pruned model is reloaded from ``OUT/pruned.safetensors``
and fine-tuning continues from its last finished epoch.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import data, io, measure, models
from .criteria import get_criterion
from .graph import build_graph
from .paper_ratios import chip_resnet_counts, conv_rate_counts
from .plan import PlanError, global_counts, make_plan, ratios_for_groups
from .pruning import prune
from .train import TrainConfig, fit

CIFAR_INPUT = (1, 3, 32, 32)


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def load_model(spec: dict) -> torch.nn.Module:
    """A zoo model (name, weights, kwargs) or a saved pruned model (``path``)."""
    if spec.get("path"):
        return io.load(spec["path"])
    return models.create(spec["name"], weights=spec.get("weights"), **(spec.get("kwargs") or {}))


def measure_model(model, root, splits, *, latency_batches=(1, 64), latency_runs=30,
                  batch_size=500, device=None, progress=True, limit=None) -> dict:
    """Accuracy on each split (labelled), MACs, params and measured latency."""
    example = torch.randn(*CIFAR_INPUT)
    result = {"accuracy": {}, **measure.profile(model, example)}
    for split in splits:
        ds = data.CIFAR10(root, split=split, limit=limit)
        loader = data.build_loader(ds, batch_size=batch_size, shuffle=False)
        acc = measure.evaluate(model, loader, device=device, progress=progress, desc=split)
        result["accuracy"][split] = {**acc, "description": ds.description}
    if latency_batches:
        lat = measure.measure_latency(model, example, batch_sizes=tuple(latency_batches),
                                      runs=latency_runs)
        result["latency"] = lat.as_dict()
        result["latency_ms"] = {str(k): v for k, v in lat.median_ms.items()}
    return result


def calibration_batches(root, cfg: dict, seed: int) -> list:
    """CHIP/HRank's calibration data: a few batches of augmented training images."""
    ds = data.CIFAR10(root, split=cfg.get("split", "train"),
                      train_augment=cfg.get("augment", True))
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.get("batch_size", 128),
                                         shuffle=True, generator=generator)
    batches = []
    # The augmentation draws from the global RNG: seed it too (without disturbing the
    # caller's stream), so the same seed gives the same images and the same scores.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, batch in enumerate(loader):
            if i >= cfg.get("batches", 5):
                break
            batches.append(batch)
    return batches


def make_pruning_plan(model, criterion, plan_cfg: dict, calibration) -> dict:
    """Kept channel indices for the recipe's plan (ratios, paper strings, global ranking)."""
    example = torch.randn(*CIFAR_INPUT)
    ignore = plan_cfg.get("ignore", ())
    graph = build_graph(model, example, ignore=ignore)
    crit = get_criterion(criterion["name"], **(criterion.get("options") or {}))
    if getattr(crit, "needs_data", False):
        scores = crit.score(graph, model, calibration)
    else:
        scores = crit.score(graph, model)
    round_to = plan_cfg.get("round_to", 1)
    if "chip_sparsity" in plan_cfg:
        counts = chip_resnet_counts(graph, model, plan_cfg["chip_sparsity"])
        return make_plan(graph, scores, {}, round_to, counts=counts)
    if "conv_rates" in plan_cfg:
        counts = conv_rate_counts(graph, model, plan_cfg["conv_rates"])
        return make_plan(graph, scores, {}, round_to, counts=counts)
    if "global_ratio" in plan_cfg:
        counts = global_counts(graph, scores, plan_cfg["global_ratio"],
                               normalize=plan_cfg.get("normalize", "mean"),
                               max_ratio=plan_cfg.get("max_ratio", 0.9))
        return make_plan(graph, scores, {}, round_to, counts=counts)
    if "ratio" in plan_cfg or "ratios" in plan_cfg:
        ratios = ratios_for_groups(graph, plan_cfg.get("ratio"), plan_cfg.get("ratios"))
        return make_plan(graph, scores, ratios, round_to)
    if "macs_reduction" in plan_cfg:
        trial = prune_copy(model, crit, plan_cfg, calibration)
        return trial
    raise PlanError("the plan needs one of ratio, ratios, macs_reduction, chip_sparsity, "
                    "conv_rates, global_ratio")


def prune_copy(model, crit, plan_cfg, calibration) -> dict:
    import copy
    trial = copy.deepcopy(model)
    result = prune(trial, torch.randn(*CIFAR_INPUT), criterion=crit,
                   macs_reduction=plan_cfg["macs_reduction"], ignore=plan_cfg.get("ignore", ()),
                   round_to=plan_cfg.get("round_to", 1), calibration=calibration)
    return result.plan


def run_prune(options: dict) -> dict:
    """Run the whole job described by ``options`` (a recipe merged with command-line flags)."""
    out = Path(options["out"])
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    seed = options.get("seed", 0)
    torch.manual_seed(seed)
    root = data.resolve_data_root(options.get("data"))
    splits = options.get("eval_splits", ["test", "test-lossless"])
    measure_kw = dict(latency_batches=options.get("latency_batches", (1, 64)),
                      latency_runs=options.get("latency_runs", 30),
                      progress=options.get("progress", True), limit=options.get("limit"))
    report: dict = {"options": {k: v for k, v in options.items() if k != "progress"},
                    "recipe": options.get("recipe")}

    with timer("load"):
        model = load_model(options["model"]).eval()
    with timer("measure_before"):
        report["before"] = measure_model(model, root, splits, **measure_kw)

    method = options.get("method") or {}
    if method.get("name") in SOFT_METHODS or method.get("name") == "lfpc":
        return _run_soft(model, options, method, root, splits, measure_kw, report, timer, out)
    if method.get("name") == "swp":
        return _run_swp(model, options, method, root, splits, measure_kw, report, timer, out)

    pruned_path = out / "pruned.safetensors"
    if pruned_path.exists():
        with timer("load_pruned"):
            model = io.load(pruned_path).eval()
            report["plan"] = io.read_spec(pruned_path).get("plan")
    else:
        criterion = options.get("criterion") or {"name": "l1"}
        calibration = None
        if getattr(get_criterion(criterion["name"]), "needs_data", False):
            with timer("calibration_data"):
                calibration = calibration_batches(root, options.get("calibration") or {}, seed)
        with timer("score_and_plan"):
            plan = make_pruning_plan(model, criterion, options.get("plan") or {}, calibration)
        with timer("prune"):
            result = prune(model, torch.randn(*CIFAR_INPUT), criterion=criterion["name"],
                           plan=plan, ignore=(options.get("plan") or {}).get("ignore", ()))
        report["plan"] = result.plan
        report["group_sizes"] = result.group_sizes
        io.save(model, pruned_path, method=criterion, plan=result.plan,
                recipe=options.get("recipe"))
    with timer("measure_pruned"):
        report["pruned"] = measure_model(model, root, splits, **measure_kw)

    finetune = options.get("finetune") or {}
    if finetune.get("epochs", 0) > 0:
        config = TrainConfig.from_dict(finetune)
        with timer("finetune"):
            train_set = data.CIFAR10(root, split="train", train_augment=True)
            val_set = data.CIFAR10(root, split="val", limit=options.get("limit"))
            report["finetune"] = fit(model, train_set, val_set, config, out / "finetune")
        with timer("measure_finetuned"):
            report["finetuned"] = measure_model(model, root, splits, **measure_kw)

    final = report.get("finetuned", report["pruned"])
    io.save(model, out / "model.safetensors", method=options.get("criterion"),
            plan=report.get("plan"), recipe=options.get("recipe"),
            metrics={s: a["top1"] for s, a in final["accuracy"].items()})
    report["stage_seconds"] = timer.seconds
    report["speedup"] = measure.speedup(report["before"], final)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


# Training-time methods: (criterion, rate schedule, zero gradients of masked filters).
SOFT_METHODS = {"sfp": ("l2", "constant", False), "asfp": ("l2", "asymptotic", False),
                "fpgm-soft": ("fpgm", "constant", True)}


def _run_soft(model, options, method, root, splits, measure_kw, report, timer, out) -> dict:
    """SFP / ASFP / FPGM-soft / LFPC: masks during training, physical removal at the end."""
    from .methods import lfpc_prune, plot_choices, soft_prune

    name = method["name"]
    plan_cfg = options.get("plan") or {}
    targets = {k: plan_cfg[k] for k in ("ratio", "ratios", "macs_reduction") if k in plan_cfg}
    if not targets:
        raise PlanError(f"method {name} needs a ratio, ratios or macs_reduction in the plan")
    config = TrainConfig.from_dict(options.get("finetune") or {})
    if config.epochs < 1:
        raise ValueError(f"method {name} trains while it prunes: give --finetune-epochs >= 1")
    train_set = data.CIFAR10(root, split="train", train_augment=True)
    val_set = data.CIFAR10(root, split="val", limit=options.get("limit"))
    common = dict(example_inputs=torch.randn(*CIFAR_INPUT), ignore=plan_cfg.get("ignore", ()),
                  **targets)
    with timer("soft_prune"):
        if name == "lfpc":
            search = {**config.to_dict(), "epochs": 1, **(method.get("search") or {})}
            model, result, info = lfpc_prune(
                model, train_set, val_set, search, config, out / "lfpc",
                criteria=method.get("criteria", ("l1", "l2", "fpgm")),
                train_weights=method.get("train_weights", True),
                mask_grads=method.get("mask_grads", False), **(method.get("sampler") or {}),
                **common)
            report["lfpc"] = {k: info[k] for k in ("choices", "criteria", "search_history")}
            summary = info["sfp"]
            plot_choices(info["choices"], out / "lfpc_choices.png")
        else:
            criterion, schedule, mask_grads = SOFT_METHODS[name]
            model, result, summary = soft_prune(
                model, train_set, val_set, config, out / "finetune",
                criterion=(options.get("criterion") or {}).get("name", criterion),
                schedule=method.get("schedule", schedule),
                mask_grads=method.get("mask_grads", mask_grads),
                zero_norm_weight=method.get("zero_norm_weight", False),
                reset_momentum=method.get("reset_momentum", False), **common)
    report.update(plan=result.plan, finetune=summary)
    return _measure_and_save(model, method, result.plan, report, timer, out, options,
                             (root, splits, measure_kw))


def _measure_and_save(model, method, plan, report, timer, out, options, measuring) -> dict:
    """Training-time methods end here: measure the final compact model, save it and the report
    (they have no separate one-shot stage, so "pruned" is the final model)."""
    root, splits, measure_kw = measuring
    with timer("measure_finetuned"):
        report["finetuned"] = measure_model(model.eval(), root, splits, **measure_kw)
    report["pruned"] = report["finetuned"]
    io.save(model, out / "model.safetensors", method=method, plan=plan,
            recipe=options.get("recipe"),
            metrics={s: a["top1"] for s, a in report["finetuned"]["accuracy"].items()})
    report["stage_seconds"] = timer.seconds
    report["speedup"] = measure.speedup(report["before"], report["finetuned"])
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _run_swp(model, options, method, root, splits, measure_kw, report, timer, out) -> dict:
    """SWP: train the filter skeleton (resumable), then stripe-prune and measure."""
    from .methods.swp import FilterSkeleton, swp_prune

    config = TrainConfig.from_dict(options.get("finetune") or {})
    if config.epochs < 1:
        raise ValueError("method swp trains the filter skeleton: give --finetune-epochs >= 1")
    example = torch.randn(*CIFAR_INPUT)
    skeleton = FilterSkeleton(model, example, sr=method.get("sr", 1e-5),
                              threshold=method.get("threshold", 0.01),
                              lr_scale=method.get("skeleton_lr_scale", 1.0),
                              weight_decay=method.get("skeleton_weight_decay"),
                              penalty_epochs=method.get("penalty_epochs"),
                              ignore=(options.get("plan") or {}).get("ignore", ()))
    with timer("skeleton_training"):
        report["finetune"] = fit(model, data.CIFAR10(root, split="train", train_augment=True),
                                 data.CIFAR10(root, split="val", limit=options.get("limit")),
                                 config, out / "skeleton", hooks=[skeleton])
    report["stripes_alive"] = skeleton.stripe_fraction()
    report["stripes_alive_history"] = skeleton.history
    with timer("stripe_prune"):
        result = swp_prune(model, skeleton, example, executor=method.get("executor", "stripe"))
    report["swp"] = result.to_dict()
    report["plan"] = result.plan
    batches = int(method.get("bn_recalibration_batches", 0))
    if batches:
        with timer("bn_recalibration"):
            report["bn_recalibration"] = _recalibrate(model, root, batches, config)
    return _measure_and_save(model, method, result.plan, report, timer, out, options,
                             (root, splits, measure_kw))


def _recalibrate(model, root, batches: int, config: TrainConfig) -> dict:
    """Re-estimate the BN statistics on augmented training batches; report the lossless-1k
    accuracy before and after, so the effect is visible."""
    lossless = data.build_loader(data.CIFAR10(root, split="test-lossless"), batch_size=500,
                                 shuffle=False)
    before = measure.evaluate(model, lossless, desc="test-lossless")["top1"]
    torch.manual_seed(config.seed)
    train = data.build_loader(data.CIFAR10(root, split="train", train_augment=True),
                              batch_size=config.batch_size, shuffle=True)
    used = measure.recalibrate_bn(model, train, batches)
    after = measure.evaluate(model, lossless, desc="test-lossless")["top1"]
    return {"batches": used, "batch_size": config.batch_size,
            "test-lossless_before": before, "test-lossless_after": after}


def summary_table(report: dict) -> str:
    """A readable before / pruned / fine-tuned table."""
    columns = [("before", report["before"]), ("pruned", report["pruned"])]
    if "finetuned" in report:
        columns.append(("fine-tuned", report["finetuned"]))
    rows = [("", [c for c, _ in columns])]
    for split in report["before"]["accuracy"]:
        rows.append((f"top-1 [{split}]", [f"{m['accuracy'][split]['top1']:.2f}%"
                                          for _, m in columns]))
    rows.append(("MACs", [f"{m['macs'] / 1e6:.2f}M" for _, m in columns]))
    rows.append(("params", [f"{m['params'] / 1e6:.3f}M" for _, m in columns]))
    for bs in report["before"].get("latency_ms", {}):
        rows.append((f"latency bs={bs}", [f"{m['latency_ms'][bs]:.2f} ms" for _, m in columns]))
    sp = report["speedup"]
    widths = [max(len(r[0]) for r in rows)] + [12] * len(columns)
    lines = ["  ".join([r[0].ljust(widths[0])] + [v.rjust(12) for v in r[1]]) for r in rows]
    lat = ", ".join(f"bs={k}: {v:.2f}x" for k, v in (sp.get("latency_x") or {}).items())
    lines.append(f"MACs speed-up {sp['macs_x']:.2f}x; measured latency speed-up {lat}")
    lines.append("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["stage_seconds"].items()))
    return "\n".join(lines)


def finetune_saved(source, out, options: dict) -> dict:
    """``prunekit finetune``: resume-able fine-tuning of a saved model; writes OUT/report.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = data.resolve_data_root(options.get("data"))
    model = io.load(source)
    spec = io.read_spec(source)
    config = TrainConfig.from_dict(options["finetune"])
    summary = fit(model, data.CIFAR10(root, split="train", train_augment=True),
                  data.CIFAR10(root, split="val", limit=options.get("limit")), config, out)
    measured = measure_model(model.eval(), root, options.get("eval_splits", ["test"]),
                             latency_batches=options.get("latency_batches", (1, 64)),
                             latency_runs=options.get("latency_runs", 30),
                             limit=options.get("limit"))
    io.save(model, out / "model.safetensors", method=spec.get("method"), plan=spec.get("plan"),
            recipe=spec.get("recipe"),
            metrics={s: a["top1"] for s, a in measured["accuracy"].items()})
    report = {"source": str(source), "finetune": summary, "finetuned": measured, **summary}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report
