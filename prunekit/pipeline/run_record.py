"""The run record: what a run directory holds, so a rerun resumes only the same run.

``OUT/run.json`` records everything that decides a run's result: the model, the resolved
method and criterion, the target, the calibration, the fine-tuning settings, the seed, the
evaluation subset, the preprocessing overrides and the data (kind and location). A rerun into the same OUT is a
resume only when all of them match; the fine-tuning epochs may grow (never shrink: that would
replace a finished, fine-tuned model by a less trained one). Anything else is refused, naming
the settings that differ and how to start afresh, before any work starts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ..files import atomic_write_json

__all__ = ["RESULT_FILES", "RUN_FILE", "check_and_record_run", "run_identity"]

RUN_FILE = "run.json"
#: Files that show a directory already holds a prune run's results.
RESULT_FILES = ("report.json", "model.safetensors", "pruned.safetensors")
# Training settings a resume may change without changing what the run computes.
_RESUMABLE_TRAIN_KEYS = ("epochs", "device", "num_workers", "progress")


def run_identity(*, model, method, criterion, plan, calibration, finetune: Mapping[str, Any],
                 seed, limit, preprocessing, data, dataset, distill=None) -> dict[str, Any]:
    """The settings that make two runs the same run (as plain JSON); ``preprocessing`` is the
    user's overrides (the rest follows from the model)."""
    train = {k: v for k, v in finetune.items() if k not in _RESUMABLE_TRAIN_KEYS}
    identity = {"model": model, "method": method, "criterion": criterion, "plan": plan,
                "calibration": calibration, "finetune": train, "seed": seed, "limit": limit,
                "preprocessing": preprocessing, "dataset": dataset,
                "data": str(Path(data).resolve())}
    if distill:  # only when set: runs without a teacher keep the identity they always had
        identity["distill"] = distill
    return json.loads(json.dumps(identity, default=str))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def check_and_record_run(out: Path, identity: Mapping[str, Any], epochs: int, *,
                         record: bool = True) -> None:
    """Refuse a rerun into ``out`` that is not the recorded run (or asks for fewer fine-tuning
    epochs than it already has); record the run when it is new or resumed (``record=False``:
    check only, as the torchrun ranks other than 0 do)."""
    path = Path(out) / RUN_FILE
    recorded_epochs = 0
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
            recorded_epochs = int(recorded.pop("finetune_epochs"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path} is corrupt ({exc}); prunekit cannot tell which run {out} "
                              f"holds. Start afresh with a new --out (or delete {out}).") from None
        differing = [key for key in sorted(set(recorded) | set(identity))
                     if recorded.get(key) != identity.get(key)]
        if differing:
            lines = "; ".join(f"{key}: {_short(recorded.get(key))} there, "
                              f"{_short(identity.get(key))} now" for key in differing)
            raise ConfigError(f"{out} holds another run ({lines}). Rerun with its settings to "
                              f"resume it, or start afresh with a new --out (or delete {out}).")
        if epochs < recorded_epochs:
            raise ConfigError(f"{out} was fine-tuned for {recorded_epochs} epochs; a rerun with "
                              f"{epochs} would replace its fine-tuned model and report by a less "
                              f"trained one. Give --finetune-epochs {recorded_epochs} or more to "
                              "resume, or a new --out.")
    else:
        found = [name for name in RESULT_FILES if (Path(out) / name).exists()]
        if found:
            raise ConfigError(f"{out} already holds {', '.join(found)} but no {RUN_FILE} (written "
                              "by an older prunekit?), so this rerun cannot be checked against "
                              f"it. Start afresh with a new --out (or delete {out}).")
    if not record:
        return
    atomic_write_json(path, {**identity, "finetune_epochs": max(epochs, recorded_epochs)},
                      indent=1, sort_keys=True)
