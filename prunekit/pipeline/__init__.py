"""The ``prunekit prune`` / ``prunekit finetune`` jobs.

* :mod:`.config`: :class:`RunConfig`, the job's configuration (recipe + flags), defaults once;
* :mod:`.run_data`: the data a run reads (CIFAR-10 or an image folder: splits, calibration);
* :mod:`.model_setup`: the model from its spec, its preprocessing, its outputs vs the classes;
* :mod:`.measuring`: accuracy / MACs / params / latency of a model, the stage timer, the table;
* :mod:`.run_record` / :mod:`.run_dir`: what a run directory holds (``run.json``), checked
  writable and locked (``.prunekit.lock``) before any work;
* :mod:`.job`: :func:`run_prune` (measure -> method -> measure -> fine-tune -> save);
* :mod:`.finetune_job`: :func:`finetune_saved`.
"""
from .config import (CALIBRATION_DEFAULTS, DATASET_KINDS, FINETUNE_DEFAULTS, RunConfig,
                     run_default)
from .run_data import (CifarRunData, FolderRunData, calibration_batches, open_run_data,
                       resolve_dataset)
from .measuring import StageTimer, measure_model, summary_table
from .run_dir import RunLock, RunLockedError, StaleLockWarning, check_out_dir
from .model_setup import check_outputs_fit_data, load_model, run_preprocessing
from .job import run_prune
from .finetune_job import finetune_saved

__all__ = ["CALIBRATION_DEFAULTS", "DATASET_KINDS", "FINETUNE_DEFAULTS", "CifarRunData",
           "FolderRunData", "RunConfig", "RunLock", "RunLockedError", "StageTimer",
           "StaleLockWarning", "calibration_batches", "check_out_dir", "check_outputs_fit_data",
           "finetune_saved", "load_model", "measure_model", "open_run_data", "resolve_dataset",
           "run_default", "run_preprocessing", "run_prune", "summary_table"]
