"""``prunekit finetune``: more (resumable) fine-tuning of a saved model, on the data and with
the preprocessing the model was pruned with unless told otherwise; writes ``OUT/report.json``
and ``OUT/model.safetensors``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .. import io
from ..errors import ConfigError
from ..files import atomic_write_json
from ..train import TrainConfig, fit
from .config import run_default
from .measuring import measure_model
from .model_setup import check_outputs_fit_data, run_preprocessing
from .run_data import open_run_data, resolve_dataset
from .run_dir import RunLock, check_out_dir

__all__ = ["finetune_saved"]


def finetune_saved(source, out, options: Mapping[str, Any]) -> dict:
    """Fine-tune the model saved at ``source`` into ``out``. ``options``: ``finetune``
    (TrainConfig keys, required), ``data``, ``dataset``, ``limit``, ``eval_splits``,
    ``latency_batches``, ``latency_runs``, ``input_size``/``mean``/``std``, ``trusted_modules``
    (packages a saved model of the user's own code may import)."""
    out = Path(out)
    if "finetune" not in options:
        raise ConfigError("finetune_saved needs options['finetune'] (TrainConfig keys)")
    config = TrainConfig.from_dict(options["finetune"])
    kind, root = resolve_dataset(options.get("dataset"), options.get("data"))
    check_out_dir(out)
    with RunLock(out):
        return _finetune(source, out, options, config, kind, root)


def _finetune(source, out: Path, options: Mapping[str, Any], config: TrainConfig, kind: str,
              root: Path) -> dict:
    model = io.load(source, trusted_modules=options.get("trusted_modules") or ())
    spec = getattr(model, io.SAVED_SPEC_ATTR)
    overrides = {k: options[k] for k in ("input_size", "mean", "std")
                 if options.get(k) is not None}
    preprocessing = run_preprocessing({"path": str(source)}, model, kind, overrides)
    run_data = open_run_data(kind, root, preprocessing, limit=options.get("limit"))
    example = torch.randn(*preprocessing.input_shape())
    check_outputs_fit_data(model.eval(), example, run_data.num_classes, run_data.name)
    splits = options.get("eval_splits") or list(run_data.default_eval_splits)
    unknown = [s for s in splits if s not in run_data.splits]
    if unknown:
        raise ConfigError(f"unknown evaluation split(s) {unknown}; valid: "
                          f"{', '.join(run_data.splits)}")
    summary = fit(model, run_data.train_set(), run_data.val_set(), config, out)
    measured = measure_model(model.eval(), run_data, splits, example=example,
                             latency_batches=options.get("latency_batches",
                                                         run_default("latency_batches")),
                             latency_runs=options.get("latency_runs", run_default("latency_runs")))
    io.save(model, out / "model.safetensors", method=spec.get("method"), plan=spec.get("plan"),
            recipe=spec.get("recipe"), preprocessing=preprocessing,
            metrics={s: a["top1"] for s, a in measured["accuracy"].items()})
    report = {"source": str(source), "finetune": summary, "finetuned": measured,
              "data": {"dataset": kind, "root": str(root),
                       "preprocessing": preprocessing.to_dict()}, **summary}
    atomic_write_json(out / "report.json", report, indent=1, default=str)
    return report
