"""The ``prunekit prune`` job: measure -> prune (any registered method) -> measure -> fine-tune
-> measure -> save; and ``prunekit finetune`` for a saved model.

Every stage is timed; everything lands in ``OUT/report.json`` and ``OUT/model.safetensors``.
A rerun with the same OUT resumes: a one-shot run reloads its pruned model from
``OUT/pruned.safetensors`` and fine-tuning continues from its last finished epoch; training
methods resume from their own checkpoints under OUT.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import data, io, measure
from ..criteria import get_criterion
from ..errors import ConfigError
from ..files import atomic_write_json
from ..methods import MethodContext, MethodResult, get_method
from ..models.registry import SPEC_ATTR
from ..models.weights import WeightsLoadError
from ..plan import PlanError, PlanTarget
from ..train import Distillation, TrainConfig, fit
from .config import RunConfig
from .measuring import StageTimer, measure_model, paired_speedup
from .model_setup import check_outputs_fit_data, load_model, run_preprocessing
from .run_data import open_run_data, resolve_dataset
from .run_dir import RunLock, check_out_dir, is_secondary_rank
from .run_record import check_and_record_run, run_identity

__all__ = ["run_prune"]


class _Job:
    """One prune run: the checked configuration and the objects built from it."""

    def __init__(self, config: RunConfig):
        self.config = config
        # Everything that can be checked without data or a model is checked here, before work.
        self.method = get_method(config.method_name)(config.method_options)
        self.criterion = None
        if config.criterion:
            self.criterion = get_criterion(config.criterion["name"],
                                           **(config.criterion.get("options") or {}))
        self.target = PlanTarget.from_dict(config.plan)
        _check_target(self.method, self.target)
        epochs = config.finetune.get("epochs", 0)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
            raise ConfigError(f"--finetune-epochs must be a whole number >= 0, got {epochs!r}")
        # A run without fine-tuning still validates the other settings (TrainConfig needs
        # epochs >= 1); ``finetune_epochs`` is what the run does.
        self.finetune_epochs = epochs
        # A run without fine-tuning has no warm-up to fit into its epochs either.
        warmup = config.finetune.get("warmup_epochs") or 0
        floor = math.ceil(warmup) if isinstance(warmup, (int, float)) and epochs == 0 else 1
        self.finetune = TrainConfig.from_dict({**config.finetune,
                                               "epochs": max(epochs, 1, floor)})
        if self.method.trains and epochs < 1:
            raise ConfigError(f"method {self.method.name} trains while it prunes: give "
                              "--finetune-epochs >= 1")
        if config.distill and not (config.model.get("weights") or config.model.get("path")):
            raise ConfigError("--distill learns from the model the run starts from, which has "
                              "no trained weights here (no --weights): give trained weights "
                              "or drop --distill")
        if config.distill and epochs < 1:
            raise ConfigError("--distill teaches the fine-tuning: give --finetune-epochs >= 1")
        self.out = Path(config.out)
        self.timer = StageTimer()

    def eval_splits(self, splits_known, defaults) -> list[str]:
        """The splits to report accuracy on: the run's, checked against the data's."""
        splits = self.config.eval_splits
        splits = list(defaults) if splits is None else splits
        unknown = [s for s in splits if s not in splits_known]
        if unknown:
            raise ConfigError(f"unknown evaluation split(s) {unknown} for this data; valid: "
                              f"{', '.join(splits_known)}")
        return splits

    def measure(self, model, run_data, example) -> dict:
        c = self.config
        splits = self.eval_splits(run_data.splits, run_data.default_eval_splits)
        return measure_model(model, run_data, splits, example=example,
                             latency_batches=c.latency_batches, latency_runs=c.latency_runs,
                             progress=c.progress, num_workers=self.finetune.num_workers,
                             device=self.finetune.device if self.finetune.device != "auto"
                             else None)

    def identity(self, data_kind: str, data_root) -> dict:
        c = self.config
        return run_identity(model=c.model, method=self.described_method(),
                            criterion=c.criterion, plan=self.target.to_dict(),
                            calibration=c.calibration, finetune=self.finetune.to_dict(),
                            seed=c.seed, limit=c.limit,
                            preprocessing=c.preprocessing_overrides(), data=data_root,
                            dataset=data_kind, **({"distill": c.distill} if c.distill else {}))

    def described_method(self) -> dict:
        described = self.method.describe()
        if self.criterion is not None or self.method.default_criterion:
            described["criterion"] = (self.criterion.name if self.criterion is not None
                                      else self.method.default_criterion)
        return described


def _model_summary(spec: Mapping[str, Any], model: torch.nn.Module) -> dict:
    """Where the model came from, for the report."""
    if spec.get("path"):
        base = getattr(model, io.SAVED_SPEC_ATTR, {}).get("base", {})
        return {"path": spec["path"], "source": base.get("source"), "name": base.get("name")}
    return {"source": spec.get("source", "prunekit"), "name": spec["name"],
            "weights": spec.get("weights"), "kwargs": spec.get("kwargs") or {}}


def _load_pruned(path: Path, unpruned: torch.nn.Module) -> torch.nn.Module:
    """The pruned model a previous attempt of this run saved, or a CLI-level refusal."""
    base = getattr(unpruned, SPEC_ATTR, None) or {}
    expected = base.get("name")
    # This run built the unpruned model from that code already: its package is trusted.
    trusted = [io.module_package(expected)] if base.get("source") == "module" else []
    try:
        return io.load(path, expect=expected, trusted_modules=trusted)
    except WeightsLoadError as exc:
        # Its first sentence says what is wrong; the rest is advice for Python callers.
        reason = str(exc).splitlines()[0].split(". ")[0].rstrip(".")
        raise ConfigError(f"{path} cannot be used to resume this run: {reason}. Delete {path} "
                          "and rerun the same command to prune again (fine-tuning then resumes "
                          "from its checkpoint).") from exc


def _check_target(method, target: PlanTarget) -> None:
    """The run's target is one the method accepts (before any work)."""
    kinds, kind = method.target_kinds, target.kind
    if not kinds and kind is not None:
        raise ConfigError(f"method {method.name} decides what it removes; drop the {kind} "
                          "target")
    if kinds and kind is None:
        raise PlanError(f"method {method.name} needs a target: {', '.join(kinds)}")
    if kinds and kind not in kinds:
        raise PlanError(f"method {method.name} needs a {', '.join(kinds)} target, not {kind}")
    if target.allocation not in method.allocations:
        raise ConfigError(f"method {method.name} shares a MACs target "
                          f"{' or '.join(method.allocations)}, not by allocation "
                          f"'{target.allocation}' (the oneshot method offers "
                          f"{', '.join(get_method('oneshot').allocations)})")
    if target.round_to != 1 and not method.rounds_counts:
        raise ConfigError(f"method {method.name} does not round its channel counts; drop "
                          f"--round-to {target.round_to} (only the one-shot method honours it)")


def run_prune(options: RunConfig | Mapping[str, Any]) -> dict:
    """Run the whole job described by ``options`` (a :class:`RunConfig`, or a recipe merged
    with command-line flags as a mapping)."""
    config = options if isinstance(options, RunConfig) else RunConfig.from_dict(options)
    job = _Job(config)
    kind, root = resolve_dataset(config.dataset, config.data)
    job.eval_splits(data.FOLDER_SPLITS if kind == "imagefolder" else data.SPLITS, ())
    check_out_dir(job.out)
    with RunLock(job.out):
        check_and_record_run(job.out, job.identity(kind, root), job.finetune_epochs,
                             record=not is_secondary_rank())
        return _run(job, kind, root)


def _run(job: _Job, kind: str, root: Path) -> dict:
    config, out, timer = job.config, job.out, job.timer
    torch.manual_seed(config.seed)
    with timer("load"):
        model = load_model(config.model).eval()
    # The unpruned network teaches the fine-tuning; a rerun loads it again, the same weights
    distill = (Distillation(copy.deepcopy(model), **config.distill) if config.distill
               else None)
    preprocessing = run_preprocessing(config.model, model, kind,
                                      config.preprocessing_overrides())
    run_data = open_run_data(kind, root, preprocessing, limit=config.limit,
                             calibration=config.calibration, seed=config.seed)
    example = torch.randn(*preprocessing.input_shape())
    check_outputs_fit_data(model, example, run_data.num_classes, run_data.name)
    report: dict = {"options": config.to_dict(), "recipe": config.recipe,
                    "model": _model_summary(config.model, model),
                    "data": {"dataset": kind, "root": str(root), "classes": run_data.num_classes,
                             "preprocessing": preprocessing.to_dict(),
                             "preprocessing_text": preprocessing.describe()}}
    report["options"]["method"] = job.method.describe()
    with timer("measure_before"):
        report["before"] = job.measure(model, run_data, example)
    # kept for the final interleaved before/after latency measurement
    unpruned = copy.deepcopy(model) if config.latency_batches else None

    context = MethodContext(example_inputs=(example,), target=job.target,
                            finetune=job.finetune, out_dir=out, data=run_data,
                            criterion=job.criterion, stage=timer, distill=distill)
    pruned_path = out / "pruned.safetensors"
    if not job.method.trains and pruned_path.exists():
        with timer("load_pruned"):
            model = _load_pruned(pruned_path, model).eval()
            result = MethodResult(plan=getattr(model, io.SAVED_SPEC_ATTR).get("plan"))
    else:
        result = job.method.run(model, context)
        if not result.trained:
            io.save(model, pruned_path, method=job.described_method(), plan=result.plan,
                    recipe=config.recipe, preprocessing=preprocessing)
    report["plan"] = result.plan
    if distill is not None:
        report["distill"] = {**distill.state(), "teacher_model": "the unpruned model of this run"}
    if result.group_sizes is not None:
        report["group_sizes"] = result.group_sizes
    report.update(result.extras)

    if result.trained:
        report["finetune"] = result.summary
        with timer("measure_finetuned"):
            report["finetuned"] = job.measure(model.eval(), run_data, example)
        report["pruned"] = report["finetuned"]  # no separate one-shot stage
    else:
        with timer("measure_pruned"):
            report["pruned"] = job.measure(model, run_data, example)
        if job.finetune_epochs > 0:
            with timer("finetune"):
                report["finetune"] = fit(model, run_data.train_set(), run_data.val_set(),
                                         job.finetune, out / "finetune", distill=distill)
            with timer("measure_finetuned"):
                report["finetuned"] = job.measure(model, run_data, example)

    final = report.get("finetuned", report["pruned"])
    io.save(model, out / "model.safetensors", method=job.described_method(), plan=result.plan,
            recipe=config.recipe, preprocessing=preprocessing,
            metrics={s: a["top1"] for s, a in final["accuracy"].items()})
    report["stage_seconds"] = timer.seconds
    report["speedup"] = measure.speedup(report["before"], final)
    if unpruned is not None:
        with timer("measure_speedup"):
            paired = paired_speedup(unpruned, model.eval(), example,
                                    latency_batches=config.latency_batches,
                                    latency_runs=config.latency_runs, deploy=config.deploy)
        report["speedup"]["latency_x_separate"] = report["speedup"]["latency_x"]
        report["speedup"]["latency_x"] = paired["latency_x"]
        report["speedup"]["latency_measurement"] = paired
    atomic_write_json(out / "report.json", report, indent=1, default=str)
    return report
