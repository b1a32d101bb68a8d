"""Knowledge distillation from a teacher during :func:`~prunekit.train.fit` (Hinton, Vinyals &
Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531, 2015).

The student's loss becomes

    L = (1 - w) * CE(z_s, y) + w * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )

with z_s / z_t the student's / teacher's logits, ``T`` the temperature (``temperature``) and
``w`` the distillation weight (``weight``); the T^2 factor keeps the soft term's gradients on
the scale of the hard term's as T changes (Hinton et al. §2). ``weight = 1`` trains on the
teacher alone. The KL term is the batch mean of the per-image KL (``reduction="batchmean"``).

The teacher (by default the unpruned network the student was cut from) runs in eval mode under
``no_grad`` on the same inputs and device, is never wrapped in DistributedDataParallel (every
rank holds its own copy) and is never part of the student: nothing of it enters the student's
checkpoints or saved files, only a fingerprint (shapes and a checksum of its weights) that a
resumed run must match, so a resume cannot silently continue with a different teacher.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..utils import first_output

__all__ = ["DISTILL_DEFAULTS", "Distillation", "check_distill_options", "distillation_loss",
           "teacher_fingerprint"]

#: The options of a run's ``distill`` section (``prunekit prune --distill``).
DISTILL_DEFAULTS = {"temperature": 4.0, "weight": 0.5}


def check_distill_options(options) -> dict:
    """A run's ``distill`` section over :data:`DISTILL_DEFAULTS`, checked before any work
    (unknown keys and bad values are a ConfigError)."""
    if not isinstance(options, dict):
        raise ConfigError(f"distill takes {{'temperature': ..., 'weight': ...}}, got {options!r}")
    unknown = sorted(set(options) - set(DISTILL_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown distill option(s) {unknown}; valid: {sorted(DISTILL_DEFAULTS)}")
    merged = {**DISTILL_DEFAULTS, **options}
    Distillation(nn.Identity(), **merged)  # the same checks as a real teacher gets
    return merged


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``, the batch mean."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * t * t


@torch.no_grad()
def teacher_fingerprint(teacher: nn.Module) -> str:
    """A short hash of the teacher's tensor names, shapes and values (float64 sums of each
    tensor and of its squares, rounded), stored in checkpoints to recognise the teacher."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        values = tensor.detach().double() if tensor.is_floating_point() else tensor.detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        if values.numel():
            digest.update(f"{float(values.sum()):.6e},{float((values * values).sum()):.6e};"
                          .encode())
    return digest.hexdigest()[:16]


class Distillation:
    """A teacher and how much the student learns from it; pass as ``fit(..., distill=...)``.

    ``teacher``: a module whose first output are logits of the student's classes;
    ``temperature`` > 0 (default 4, the value commonly used on CIFAR since Hinton et al.;
    prunekit's choice); ``weight`` in [0, 1] (default 0.5: half task loss, half teacher).
    """

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, weight: float = 0.5):
        if not isinstance(teacher, nn.Module):
            raise ConfigError(f"the distillation teacher must be an nn.Module, got "
                              f"{type(teacher).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ConfigError(f"distill temperature must be a finite number > 0, got "
                              f"{temperature!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not 0 <= weight <= 1:
            raise ConfigError(f"distill weight must be a number in [0, 1], got {weight!r}")
        self.teacher = teacher
        self.temperature, self.weight = float(temperature), float(weight)

    def prepare(self, device: torch.device) -> None:
        """Frozen, in eval mode, on ``device`` (after :meth:`check_student`)."""
        self.teacher.to(device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def check_student(self, student: nn.Module) -> None:
        """A ConfigError when the teacher *is* the student or shares its parameters (the
        teacher would drift with the student and its soft targets would mean nothing)."""
        own = {id(p) for p in student.parameters()}
        if self.teacher is student or any(id(p) in own for p in self.teacher.parameters()):
            raise ConfigError("the distillation teacher shares parameters with the model being "
                              "trained; pass a copy (copy.deepcopy(model) before pruning)")

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return first_output(self.teacher(inputs))

    def loss(self, student_logits: torch.Tensor, task_loss: torch.Tensor,
             teacher_logits: torch.Tensor) -> torch.Tensor:
        """The combined loss for one batch (see the module doc)."""
        if teacher_logits.shape != student_logits.shape:
            raise ConfigError(f"the teacher gives logits of shape {list(teacher_logits.shape)}, "
                              f"the student {list(student_logits.shape)}: distil only between "
                              "models of the same classes")
        soft = distillation_loss(student_logits, teacher_logits, self.temperature)
        return (1 - self.weight) * task_loss + self.weight * soft

    def state(self) -> dict:
        """What a checkpoint records of the distillation (never the teacher's weights)."""
        return {"temperature": self.temperature, "weight": self.weight,
                "teacher": teacher_fingerprint(self.teacher)}
