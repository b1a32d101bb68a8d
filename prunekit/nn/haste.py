"""Swapping a model's convolutions for HASTE's :class:`~prunekit.nn.hashconv.HashConv2d`
(Meiner, Mehnert, Condurache, arXiv:2309.17211: "by just swapping the convolution modules"),
swapping them back, and measuring the mean MACs they spend over a data set.

Which convolutions are swapped is reconstructed (notes §1 (e)): by default every ``nn.Conv2d``
with ``groups == 1`` except the stem (the first convolution in module order, which sees the
image's 3 colour channels) and including 1x1 convolutions (``include_stem``,
``include_pointwise``). Grouped/depthwise convolutions and other padding modes stay dense and
are listed as skipped. ``hyperplanes`` is one L for every layer or a mapping from module name
to L (notes §1 (d): a global L is the default guess).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import set_submodule
from .hashconv import MAC_PARTS, HashConv2d, check_options

__all__ = ["HasteReport", "dense_convolutions", "hash_convolutions", "haste_macs",
           "hashed_modules", "macs_summary"]


@dataclass
class HasteReport:
    """What :func:`hash_convolutions` did: the swapped convs with their L, and the skipped
    ones with the reason."""

    swapped: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"swapped": dict(self.swapped), "skipped": dict(self.skipped),
                "options": dict(self.options)}


def _skip_reason(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped or depthwise)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    return None


def hash_convolutions(model: nn.Module, *, hyperplanes: int | Mapping[str, int] = 16,
                      sparsity: float = 2 / 3, patch: int = 4, seed: int = 0,
                      centring: str = "patch_mean", halo: str = "include",
                      include_stem: bool = False, include_pointwise: bool = True,
                      ignore: Iterable[str] = ()) -> HasteReport:
    """Replace ``model``'s convolutions by :class:`HashConv2d` in place; return a report.

    All options are checked before the model is touched, so a ConfigError leaves it as it
    was. ``hyperplanes`` may map module names to L (names it does not list are left dense);
    ``ignore`` names convolutions to leave dense.
    """
    per_layer = isinstance(hyperplanes, Mapping)
    for value in (hyperplanes.values() if per_layer else [hyperplanes]):
        check_options(value, sparsity, patch, centring, halo)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a whole number >= 0, got {seed!r}")
    convs = [(name, m) for name, m in model.named_modules() if type(m) is nn.Conv2d]
    if per_layer:
        unknown = sorted(set(hyperplanes) - {name for name, _ in convs})
        if unknown:
            raise ConfigError(f"hyperplanes names {unknown}, which are not nn.Conv2d modules of "
                              f"the model; valid: {[name for name, _ in convs]}")
    ignore = set(ignore)
    report = HasteReport(options={"sparsity": sparsity, "patch": patch, "seed": seed,
                                  "centring": centring, "halo": halo,
                                  "include_stem": include_stem,
                                  "include_pointwise": include_pointwise})
    chosen = []
    for index, (name, conv) in enumerate(convs):
        reason = _skip_reason(conv)
        if reason is None and index == 0 and not include_stem:
            reason = "the stem (include_stem=False)"
        elif reason is None and conv.kernel_size == (1, 1) and not include_pointwise:
            reason = "1x1 (include_pointwise=False)"
        elif reason is None and name in ignore:
            reason = "ignored"
        elif reason is None and per_layer and name not in hyperplanes:
            reason = "no L given for it"
        if reason is not None:
            report.skipped[name] = reason
            continue
        chosen.append((name, conv, hyperplanes[name] if per_layer else hyperplanes))
    built = [(name, HashConv2d(conv, hyperplanes=L, sparsity=sparsity, patch=patch, seed=seed,
                               centring=centring, halo=halo)) for name, conv, L in chosen]
    for (name, module), (_, _, L) in zip(built, chosen):
        module.train(model.training)
        set_submodule(model, name, module)
        report.swapped[name] = L
    return report


def hashed_modules(model: nn.Module) -> dict[str, HashConv2d]:
    """Every :class:`HashConv2d` of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HashConv2d)}


def dense_convolutions(model: nn.Module) -> list[str]:
    """Put the dense ``nn.Conv2d`` back in place of every HashConv2d (in place); the names."""
    names = list(hashed_modules(model))
    for name in names:
        module = model.get_submodule(name)
        dense = module.dense()
        dense.train(module.training)
        set_submodule(model, name, dense)
    return names


def _inputs(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError("batches must be tensors or (inputs, labels) pairs")


def haste_macs(model: nn.Module, batches: Iterable, *, device=None) -> dict:
    """Mean MACs per image of ``model``'s HashConv2d layers over ``batches`` (tensors or
    ``(inputs, labels)``), with the dense MACs of the same layers for comparison.

    Returns ``{"images", "layers": {name: {"macs", "dense_macs", parts..., "channel_ratio"}},
    "hashed_macs", "dense_macs", "reduction"}``: per image, ``macs`` = the sum of the parts
    (:data:`~prunekit.nn.hashconv.MAC_PARTS`, counted as the HashConv2d docstring says),
    ``channel_ratio`` the mean K/C (buckets per channel), ``reduction`` ``1 - hashed/dense``.
    Other layers (the stem, the classifier) are not included: add the dense model's count of
    them for a whole-model figure. The model runs in eval mode under no_grad; its mode is
    restored. The counters of the layers are reset before and left holding this run's sums.
    """
    layers = hashed_modules(model)
    if not layers:
        raise ConfigError("the model has no HashConv2d; swap its convolutions first "
                          "(prunekit.nn.hash_convolutions)")
    for m in layers.values():
        m.reset_macs()
    was_training = model.training
    model.eval()
    if device is None:
        device = next(iter(layers.values())).weight.device
    try:
        with torch.no_grad():
            for batch in batches:
                model(_inputs(batch).to(device))
    finally:
        model.train(was_training)
    return macs_summary(model)


def macs_summary(model: nn.Module) -> dict:
    """:func:`haste_macs`'s result from what ``model``'s HashConv2d layers counted since their
    ``reset_macs()`` (for callers that run the data themselves, e.g. while evaluating)."""
    layers = hashed_modules(model)
    images = next(iter(layers.values())).macs["images"] if layers else 0
    if images == 0:
        raise ConfigError("no HashConv2d of the model has seen an image since reset_macs()")
    out = {}
    for name, m in layers.items():
        count = m.macs
        parts = {part: count[part] / count["images"] for part in MAC_PARTS}
        out[name] = {"macs": sum(parts.values()), "dense_macs": count["dense"] / count["images"],
                     **parts, "channel_ratio": count["buckets"] / max(count["channels"], 1)}
    hashed = sum(v["macs"] for v in out.values())
    dense = sum(v["dense_macs"] for v in out.values())
    return {"images": images, "layers": out, "hashed_macs": hashed, "dense_macs": dense,
            "conv_macs": sum(v["conv"] for v in out.values()),
            "overhead_macs": hashed - sum(v["conv"] for v in out.values()),
            "reduction": 1 - hashed / dense if dense else 0.0}
