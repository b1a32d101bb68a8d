"""Class separability (CS) of feature maps: the discriminant criterion of FSDP.

N. Gkalelis, V. Mezaris, "Fractional Step Discriminant Pruning: A Filter Pruning Framework for
Deep Convolutional Neural Networks", IEEE ICME Workshops (MMC) 2020,
doi 10.1109/icmew46912.2020.9105979; code bmezaris/fractional_step_discriminant_pruning_dcnn
(``notebook_cifar.py``, ``Mask.computeDiscrScores``), read for
../shared/research/related_methods_2.md section 2.1.

For filter f, x_f(n) = max_{h,w} ReLU(map_f(x_n)) is the global max of its feature map on image
n. With the C classes' means mu_c = (1 / n_c) sum_{n in c} x_f(n), gathered in the 1 x C matrix
M (the code: M = (R^T X)^T N^-1, R the one-hot label matrix, N = diag(n_c)), the score is the
unweighted between-class scatter of the class means

    S_f = tr(M P M^T),   P = C I - 1 1^T,   i.e.   S_f = sum_{i<j} (mu_i - mu_j)^2 = C^2 Var_c(mu_c)

(Var the population variance over classes). Filters whose maximal response does not tell the
classes apart score low and are pruned first. Computed in one streaming pass of labelled
calibration data (:class:`.activation.ActivationCriterion`'s pass, which hands the batch's
labels to the statistic for a criterion with ``needs_labels``), vectorised: per map and batch the class sums are
``one_hot(y)^T @ X`` ([C, B] @ [B, F]); the reference runs a Python loop over layers and
filters per batch. A batch without labels raises
:class:`~prunekit.criteria.calibration.CalibrationLabelsError`.

Where prunekit differs from the reference, and why
--------------------------------------------------
* Feature maps: prunekit's convention (``group.feature_maps()``: after BN and activation; for
  a residual stream the block outputs after the add, combined over the stream's maps with
  ``combine``, default ``"mean"``, as :mod:`.activation` does). FSDP hooks the BN right after
  each conv, so its conv_b map is taken *before* the residual add, and each conv_b keeps its
  own channel set; prunekit keeps one channel set per stream, which is what physical removal
  needs (methods.md 1.6, pitfall 2). For a block's inner conv (conv_a) both are ReLU(BN(conv)).
* The ReLU is applied again before the max (the code's "ensure ReLU is applied"): a no-op on
  post-ReLU maps, and it keeps the statistic FSDP's on maps without an activation.
* Classes: the classes present in the calibration labels (the code takes C from the last
  layer's ``out_features`` and divides by n_c, a NaN for an absent class).
* Data: whatever calibration batches are given; the prune job's are augmented training images
  (5 batches of 128 by default). The reference scores the whole augmented training set, in
  order, at batch 256.

Maps that are neither 4-D (``[B, C, H, W]``) nor 2-D (``[B, C]``, the value itself is the
"max") are skipped. As in :mod:`.activation`, a map that is a pooled / flattened view of a 4-D
map with the same channels (``relu -> mean -> linear`` before a classifier) is replaced by that
4-D map: the one FSDP hooks. A group with no usable map falls back to ``l1`` with a warning.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .activation import ActivationCriterion
from .base import ScoreError, register_criterion
from .calibration import CalibrationLabelsError

__all__ = ["ClassSeparability", "class_separability", "global_max"]


def class_separability(class_sums: np.ndarray, class_counts: np.ndarray) -> np.ndarray:
    """S_f = tr(M P M^T) = C sum_c mu_c^2 - (sum_c mu_c)^2 for every column f of
    ``class_sums`` ([classes, F], sum of x_f over each class's images), over the classes with
    ``class_counts > 0``."""
    class_sums = np.asarray(class_sums, dtype=np.float64)
    counts = np.asarray(class_counts, dtype=np.float64)
    present = counts > 0
    means = class_sums[present] / counts[present, None]
    c = means.shape[0]
    return c * (means ** 2).sum(axis=0) - means.sum(axis=0) ** 2


def global_max(x: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` per-image max over positions of ReLU(x): FSDP's x_f(n)."""
    per_image = x.amax(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
    return per_image.clamp_min(0)


class _ClassSums:
    """Per-class sums of a ``[B, F]`` statistic of one feature map, and the class counts."""

    __slots__ = ("sums", "counts", "ndim")

    def __init__(self, ndim: int):
        self.sums: torch.Tensor | None = None   # [classes, F], float64
        self.counts: torch.Tensor | None = None  # [classes], float64
        self.ndim = ndim

    def add(self, per_image: torch.Tensor, labels: torch.Tensor) -> None:
        classes = int(labels.max()) + 1
        if self.sums is not None and self.sums.shape[0] > classes:
            classes = self.sums.shape[0]
        indicator = F.one_hot(labels, classes).double()          # R, [B, classes]
        sums = indicator.T @ per_image.detach().double()         # R^T X, [classes, F]
        counts = indicator.sum(dim=0)
        if self.sums is not None:  # grow the running sums to the classes seen so far
            grow = classes - self.sums.shape[0]
            sums += F.pad(self.sums, (0, 0, 0, grow))
            counts += F.pad(self.counts, (0, grow))
        self.sums, self.counts = sums, counts

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(class sums [classes, F], class counts [classes]) for :func:`class_separability`."""
        return self.sums.cpu().numpy(), self.counts.cpu().numpy()


def _checked_labels(targets: torch.Tensor, batch_size: int, index: int, what: str
                    ) -> torch.Tensor:
    if targets.dim() != 1 or targets.shape[0] != batch_size or targets.is_floating_point() \
            or targets.is_complex() or targets.dtype == torch.bool:
        raise CalibrationLabelsError(
            f"{what}: calibration batch {index} (counting from 0) has targets of dtype "
            f"{targets.dtype} and shape {list(targets.shape)}; class separability needs one "
            f"integer class index per image ({batch_size})")
    if batch_size and int(targets.min()) < 0:
        raise CalibrationLabelsError(f"{what}: calibration batch {index} has negative class "
                                     "labels; give class indices 0 .. C-1")
    return targets.long()


@register_criterion
class ClassSeparability(ActivationCriterion):
    """FSDP's class-separability score (module docstring): tr(M P M^T) of the class means of
    each channel's per-image global max, on labelled calibration data.

    Options: ``combine`` (a residual stream's maps: ``"mean"``, ``"sum"``, ``"first"``,
    ``"last"``), ``max_batches`` (use at most that many batches; None: all), ``device`` (run
    there; default the model's), ``progress`` (tqdm bar).
    """

    name = "class_separability"
    needs_data = True
    needs_labels = True

    map_ndims = (2, 4)  # a 2-D map [B, C] is its own per-image "max"

    # combine / max_batches / device / progress, options() and the streaming pass over the
    # group's maps: ActivationCriterion's; what is class separability's:

    def per_image(self, x: torch.Tensor) -> torch.Tensor:
        return global_max(x)

    def statistics(self, ndim: int) -> "_ClassSums":
        return _ClassSums(ndim)

    def checked_labels(self, targets, batch_size: int, index: int) -> torch.Tensor:
        return _checked_labels(targets, batch_size, index, self.name)

    def finish(self, class_sums) -> np.ndarray:
        sums, counts = class_sums
        present = int((counts > 0).sum())
        if present < 2:
            raise ScoreError(f"{self.name}: the calibration labels hold {present} class; "
                             "class separability needs images of at least two classes")
        return class_separability(sums, counts)
