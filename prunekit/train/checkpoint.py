"""The files :func:`~prunekit.train.fit` writes to ``out_dir``: ``last.pt`` (everything a resume
needs), ``best.pt`` (the best validated model) and ``log.jsonl`` (one record per epoch), all
written atomically, plus :class:`CheckpointError` for a ``last.pt`` that cannot be used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import PrunekitError
from ..files import atomic_write, atomic_write_bytes

__all__ = ["BEST_CHECKPOINT", "CHECKPOINT_FORMAT", "LAST_CHECKPOINT", "LOG_FILE", "CheckpointError"]

LAST_CHECKPOINT, BEST_CHECKPOINT, LOG_FILE = "last.pt", "best.pt", "log.jsonl"
CHECKPOINT_FORMAT = 1


class CheckpointError(PrunekitError, RuntimeError):
    """A checkpoint exists but cannot be used (corrupt, foreign, or for another model)."""


def _save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda stream: torch.save(obj, stream))


def _save_log(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    # Rewritten whole from the history stored in last.pt, so the log can never disagree with
    # the checkpoint (no duplicated or missing lines after a kill between the two writes).
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write_bytes(path, text.encode("utf-8"))


def _load_failure(error: Exception) -> str:
    """One line saying why torch.load refused a file."""
    text = str(error)
    if "weights_only" in text.lower() or "Unsupported global" in text:
        return ("it holds Python objects other than tensors and plain values, which were "
                "refused as unsafe to unpickle (loading them could run code)")
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"the file is corrupt or not a prunekit training checkpoint ({first[:200]})"


def _load_last_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    advice = (f"To start this training over, delete {path} (or give the run another --out; "
              f"from Python: fit(..., resume=False), which overwrites the files in "
              f"{path.parent}).")
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects could run code.
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot load the checkpoint {path}: {_load_failure(error)}. "
                              f"{advice}") from error
    required = {"format", "epoch", "model", "optimizer", "scheduler", "history"}
    if not isinstance(checkpoint, dict) or not required <= set(checkpoint):
        raise CheckpointError(f"{path} is not a prunekit training checkpoint (missing keys). {advice}")
    return checkpoint
