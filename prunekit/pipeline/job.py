"""The ``prunekit prune`` job: measure -> prune (any registered method) -> measure -> fine-tune
-> measure -> save; and ``prunekit finetune`` for a saved model.

Every stage is timed; everything lands in ``OUT/report.json`` and ``OUT/model.safetensors``.
A rerun with the same OUT resumes: a one-shot run reloads its pruned model from
``OUT/pruned.safetensors`` and fine-tuning continues from its last finished epoch; training
methods resume from their own checkpoints under OUT.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .. import data, io, measure, models
from ..criteria import get_criterion
from ..errors import ConfigError
from ..files import atomic_write_json
from ..methods import MethodContext, MethodResult, get_method
from ..models.registry import SPEC_ATTR
from ..models.weights import WeightsLoadError
from ..plan import PlanError, PlanTarget
from ..train import TrainConfig, fit
from ..utils import first_output
from .config import RunConfig, run_default
from .measuring import StageTimer, measure_model
from .run_data import CifarRunData
from .run_dir import RunLock, check_out_dir, is_secondary_rank
from .run_record import check_and_record_run, run_identity

__all__ = ["check_outputs_fit_data", "finetune_saved", "load_model", "run_prune"]


def load_model(spec: Mapping[str, Any]) -> torch.nn.Module:
    """A zoo model (name, weights, kwargs) or a saved pruned model (``path``)."""
    if spec.get("path"):
        return io.load(spec["path"])
    return models.create(spec["name"], weights=spec.get("weights"), **(spec.get("kwargs") or {}))


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
        self.finetune = TrainConfig.from_dict({**config.finetune, "epochs": max(epochs, 1)})
        if self.method.trains and epochs < 1:
            raise ConfigError(f"method {self.method.name} trains while it prunes: give "
                              "--finetune-epochs >= 1")
        self.out = Path(config.out)
        self.timer = StageTimer()

    def measure(self, model, run_data, example) -> dict:
        c = self.config
        return measure_model(model, run_data, c.eval_splits, example=example,
                             latency_batches=c.latency_batches, latency_runs=c.latency_runs,
                             progress=c.progress)

    def identity(self, data_root) -> dict:
        c = self.config
        return run_identity(model=c.model, method=self.described_method(),
                            criterion=c.criterion, plan=self.target.to_dict(),
                            calibration=c.calibration, finetune=self.finetune.to_dict(),
                            seed=c.seed, limit=c.limit, input_shape=c.input_shape,
                            data=data_root)

    def described_method(self) -> dict:
        described = self.method.describe()
        if self.criterion is not None or self.method.default_criterion:
            described["criterion"] = (self.criterion.name if self.criterion is not None
                                      else self.method.default_criterion)
        return described


def check_outputs_fit_data(model: torch.nn.Module, example: torch.Tensor, classes: int,
                           data_name: str) -> None:
    """The model gives one score per class of the run's data (else accuracy and the loss
    would be computed over the wrong classes, or fail mid-run on a label)."""
    with torch.no_grad():
        output = model(example)
    output = first_output(output)
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(f"the model's output has shape {shape} for an input of shape "
                          f"{tuple(example.shape)}; prunekit expects (batch, classes) logits")
    if output.shape[1] != classes:
        raise ConfigError(f"the model has {output.shape[1]} outputs but {data_name} has "
                          f"{classes} classes; build "
                          f"the model with num_classes={classes}")


def _load_pruned(path: Path, unpruned: torch.nn.Module) -> torch.nn.Module:
    """The pruned model a previous attempt of this run saved, or a CLI-level refusal."""
    expected = (getattr(unpruned, SPEC_ATTR, None) or {}).get("name")
    try:
        return io.load(path, expect=expected)
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
    if target.round_to != 1 and not method.rounds_counts:
        raise ConfigError(f"method {method.name} does not round its channel counts; drop "
                          f"--round-to {target.round_to} (only the one-shot method honours it)")


def run_prune(options: RunConfig | Mapping[str, Any]) -> dict:
    """Run the whole job described by ``options`` (a :class:`RunConfig`, or a recipe merged
    with command-line flags as a mapping)."""
    config = options if isinstance(options, RunConfig) else RunConfig.from_dict(options)
    job = _Job(config)
    root = data.resolve_data_root(config.data)
    check_out_dir(job.out)
    with RunLock(job.out):
        check_and_record_run(job.out, job.identity(root), job.finetune_epochs,
                             record=not is_secondary_rank())
        return _run(job, root)


def _run(job: _Job, root: Path) -> dict:
    config, out, timer = job.config, job.out, job.timer
    torch.manual_seed(config.seed)
    run_data = CifarRunData(root, limit=config.limit, calibration=config.calibration,
                            seed=config.seed)
    example = torch.randn(*config.input_shape)
    report: dict = {"options": config.to_dict(), "recipe": config.recipe}
    report["options"]["method"] = job.method.describe()

    with timer("load"):
        model = load_model(config.model).eval()
        check_outputs_fit_data(model, example, run_data.num_classes, run_data.name)
    with timer("measure_before"):
        report["before"] = job.measure(model, run_data, example)

    context = MethodContext(example_inputs=(example,), target=job.target,
                            finetune=job.finetune, out_dir=out, data=run_data,
                            criterion=job.criterion, stage=timer)
    pruned_path = out / "pruned.safetensors"
    if not job.method.trains and pruned_path.exists():
        with timer("load_pruned"):
            model = _load_pruned(pruned_path, model).eval()
            result = MethodResult(plan=getattr(model, io.SAVED_SPEC_ATTR).get("plan"))
    else:
        result = job.method.run(model, context)
        if not result.trained:
            io.save(model, pruned_path, method=job.described_method(), plan=result.plan,
                    recipe=config.recipe)
    report["plan"] = result.plan
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
                                         job.finetune, out / "finetune")
            with timer("measure_finetuned"):
                report["finetuned"] = job.measure(model, run_data, example)

    final = report.get("finetuned", report["pruned"])
    io.save(model, out / "model.safetensors", method=job.described_method(), plan=result.plan,
            recipe=config.recipe,
            metrics={s: a["top1"] for s, a in final["accuracy"].items()})
    report["stage_seconds"] = timer.seconds
    report["speedup"] = measure.speedup(report["before"], final)
    atomic_write_json(out / "report.json", report, indent=1, default=str)
    return report


def finetune_saved(source, out, options: Mapping[str, Any]) -> dict:
    """``prunekit finetune``: resume-able fine-tuning of a saved model; writes OUT/report.json."""
    out = Path(out)
    if "finetune" not in options:
        raise ConfigError("finetune_saved needs options['finetune'] (TrainConfig keys)")
    config = TrainConfig.from_dict(options["finetune"])
    root = data.resolve_data_root(options.get("data"))
    check_out_dir(out)
    with RunLock(out):
        return _finetune(source, out, options, config, root)


def _finetune(source, out: Path, options: Mapping[str, Any], config: TrainConfig,
              root: Path) -> dict:
    run_data = CifarRunData(root, limit=options.get("limit"))
    model = io.load(source)
    spec = getattr(model, io.SAVED_SPEC_ATTR)
    summary = fit(model, run_data.train_set(), run_data.val_set(), config, out)
    measured = measure_model(model.eval(), run_data, options.get("eval_splits", ["test"]),
                             example=torch.randn(*run_default("input_shape")),
                             latency_batches=options.get("latency_batches",
                                                         run_default("latency_batches")),
                             latency_runs=options.get("latency_runs", run_default("latency_runs")))
    io.save(model, out / "model.safetensors", method=spec.get("method"), plan=spec.get("plan"),
            recipe=spec.get("recipe"),
            metrics={s: a["top1"] for s, a in measured["accuracy"].items()})
    report = {"source": str(source), "finetune": summary, "finetuned": measured, **summary}
    atomic_write_json(out / "report.json", report, indent=1, default=str)
    return report
