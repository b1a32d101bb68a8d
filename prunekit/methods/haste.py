"""HASTE as a registered method: swap a trained network's convolutions for hashing
convolutions that merge colliding input channels per patch; no data, no training.

L. Meiner, J. Mehnert, A. P. Condurache, "HASTE: Instant Complexity Reduction in CNNs using
Locality-Sensitive Hashing", arXiv:2309.17211 (v2, VISAPP 2025: "Data-Free Dynamic Compression
of CNNs for Tractable Efficiency"). The module and every reconstructed detail (patch, halo,
centring, sparsity, L, which convs; notes ``related_methods_1.md`` §1 (a)-(f)) are in
:mod:`prunekit.nn.hashconv` and :mod:`prunekit.nn.haste`; the defaults here are the same.

Cost is input-dependent: the bucket counts change per image and patch. The job's ``macs`` in
``before`` / ``pruned`` come from torch's FLOP counter on one random example input, which for
a HashConv2d counts the reference path's dense hashing matmul and padded batched matmul on
noise, not what HASTE spends on images. The method therefore adds ``report["haste"]``: the
swap, ``macs_input_dependent: true``, and, when the run has data, the measured mean MACs per
image (``mean_macs``: hashed layers, with the hashing and merging overhead counted as
:mod:`prunekit.nn.hashconv` documents, and the whole model) over the first ``macs_images``
images of the ``val`` split. Use those, not ``pruned.macs``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..data import build_loader
from ..errors import ConfigError
from ..measure import count_macs
from ..nn.haste import hash_convolutions, haste_macs
from ..nn.hashconv import CENTRINGS, HALOS, check_options
from .context import MethodContext
from .registry import MethodConfig, MethodResult, PruningMethod, option, register_method

__all__ = ["Haste", "HasteMacsWarning"]


class HasteMacsWarning(UserWarning):
    """The job's static MACs figure is not HASTE's (input-dependent) cost."""

_NOTE = ("HashConv2d's MACs depend on the input; 'before'/'pruned' macs are torch's FLOP "
         "counter on one random example and are not HASTE's cost. mean_macs is measured on "
         "data (hashing and merging overhead included, counted as prunekit.nn.hashconv says)")


@register_method
class Haste(PruningMethod):
    """HASTE (arXiv:2309.17211): data-free, training-free LSH channel merging per patch. It
    decides nothing in the channel graph (no target); ``--finetune-epochs 0`` is its setting."""

    name = "haste"
    summary = ("HASTE: swap convolutions for hashing convolutions that merge colliding input "
               "channels per patch (data-free, training-free; MACs are input-dependent)")
    target_kinds = ()

    @dataclass
    class Config(MethodConfig):
        hyperplanes: int = option(16, "L, hash hyperplanes per layer (fewer: more merging, "
                                  "less accurate; reconstructed, notes §1 (d))",
                                  flag="--haste-hyperplanes")
        layer_hyperplanes: dict = option({}, "L per conv name (recipe only; listed convs are "
                                         "hashed with their L, others stay dense)", cli=False)
        sparsity: float = option(2 / 3, "zero fraction of the ternary hyperplanes "
                                 "(reconstructed, Achlioptas; notes §1 (c))",
                                 flag="--haste-sparsity")
        patch: int = option(4, "tile side in output positions (reconstructed, notes §1 (a))",
                            flag="--haste-patch")
        halo: str = option("include", "hash the tile's whole receptive field or only the "
                           "pixels under its kernel centres (notes §1 (a))",
                           flag="--haste-halo", choices=HALOS)
        centring: str = option("patch_mean", "centring before hashing (notes §1 (b))",
                               flag="--haste-centring", choices=CENTRINGS)
        seed: int = option(0, "seed of the hyperplanes", flag="--haste-seed")
        include_stem: bool = option(False, "also hash the first convolution (notes §1 (e))",
                                    flag="--haste-stem")
        include_pointwise: bool = option(True, "hash 1x1 convolutions too (notes §1 (e))",
                                         flag="--haste-no-pointwise", invert=True)
        macs_images: int = option(256, "measure the mean MACs on this many val images "
                                  "(0: do not measure)", flag="--haste-macs-images")

        def validate(self) -> None:
            for value in [self.hyperplanes, *self.layer_hyperplanes.values()]:
                check_options(value, self.sparsity, self.patch, self.centring, self.halo)
            if not all(isinstance(k, str) for k in self.layer_hyperplanes):
                raise ConfigError("layer_hyperplanes maps conv names to L")
            for name, value in (("seed", self.seed), ("macs_images", self.macs_images)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(f"{name} must be a whole number >= 0, got {value!r}")

    def run(self, model: nn.Module, context: MethodContext) -> MethodResult:
        c = self.config
        example = context.example_inputs
        dense_total = count_macs(model, example) // example[0].shape[0]
        with context.stage("haste_swap"):
            swap = hash_convolutions(
                model, hyperplanes=c.layer_hyperplanes or c.hyperplanes, sparsity=c.sparsity,
                patch=c.patch, seed=c.seed, centring=c.centring, halo=c.halo,
                include_stem=c.include_stem, include_pointwise=c.include_pointwise,
                ignore=context.target.ignore)
        extras = {"swap": swap.to_dict(), "macs_input_dependent": True, "note": _NOTE,
                  "dense_model_macs": dense_total}
        if not swap.swapped:
            raise ConfigError("method haste found no convolution to hash (only the stem, "
                              "grouped convolutions or ignored ones); see --haste-stem")
        if c.macs_images and context.data is not None:
            with context.stage("haste_macs"):
                extras["mean_macs"] = measured_macs(model, context.data.val_set(),
                                                    c.macs_images, dense_total)
        measured = extras.get("mean_macs")
        warnings.warn("HASTE's MACs depend on the input: the run's MACs figures are torch's "
                      "FLOP counter on one random input, not HASTE's cost. " + (
                          f"Measured on {measured['images']} val images: "
                          f"{measured['model_macs'] / 1e6:.2f}M MACs per image, "
                          f"{measured['model_reduction']:.1%} fewer than dense (report.json "
                          "haste.mean_macs)" if measured else
                          "Not measured here (no data or --haste-macs-images 0): use "
                          "prunekit.nn.haste_macs on data"), HasteMacsWarning, stacklevel=2)
        return MethodResult(plan={}, extras={"haste": extras})


def measured_macs(model: nn.Module, dataset, images: int, dense_total: int) -> dict:
    """:func:`haste_macs` over the first ``images`` items of ``dataset``, with the whole
    model's mean MACs (``dense_total`` minus the dense cost of the hashed layers plus what
    they spent)."""
    subset = torch.utils.data.Subset(dataset, range(min(images, len(dataset))))
    result = haste_macs(model, build_loader(subset, batch_size=64, shuffle=False))
    whole = dense_total - result["dense_macs"] + result["hashed_macs"]
    return {**result, "model_macs": whole, "model_dense_macs": dense_total,
            "model_reduction": 1 - whole / dense_total if dense_total else 0.0}
