"""The ``prunekit prune`` / ``prunekit finetune`` jobs.

* :mod:`.config`: :class:`RunConfig`, the job's configuration (recipe + flags), defaults once;
* :mod:`.run_data`: the data a run reads (CIFAR-10 splits, calibration batches);
* :mod:`.measuring`: accuracy / MACs / params / latency of a model, the stage timer, the table;
* :mod:`.run_record` / :mod:`.run_dir`: what a run directory holds (``run.json``), checked
  writable and locked (``.prunekit.lock``) before any work;
* :mod:`.job`: :func:`run_prune` (measure -> method -> measure -> fine-tune -> save) and
  :func:`finetune_saved`.
"""
from .config import CALIBRATION_DEFAULTS, FINETUNE_DEFAULTS, RunConfig, run_default
from .run_data import CifarRunData, calibration_batches
from .measuring import StageTimer, measure_model, summary_table
from .run_dir import RunLock, RunLockedError, StaleLockWarning, check_out_dir
from .job import check_outputs_fit_data, finetune_saved, load_model, run_prune

__all__ = ["CALIBRATION_DEFAULTS", "FINETUNE_DEFAULTS", "CifarRunData", "RunConfig",
           "RunLock", "RunLockedError", "StageTimer", "StaleLockWarning", "calibration_batches",
           "check_out_dir", "check_outputs_fit_data", "finetune_saved", "load_model",
           "measure_model", "run_default", "run_prune", "summary_table"]
