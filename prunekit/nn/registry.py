"""What a saved file must know about module classes: their structural attributes and the
classes that pruning puts in place of a base model's modules.

Both registries are filled where each class is defined (``prunekit.nn.stripe``,
``prunekit.nn.shortcut``, ``prunekit.models.cifar_resnet``) and read by ``prunekit.io``.
This module imports only torch, so any module may register its classes without an import
cycle.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

__all__ = ["Restore", "register_replacement", "register_structural_attributes",
           "replacement_class", "structural_attribute_names", "structural_entries"]

# Module attributes that describe shape rather than behaviour: pruning rewrites them, and a
# rebuilt base model would otherwise keep the unpruned values. Matched with isinstance, so
# subclasses (Conv2d, BatchNorm1d, ...) are covered; classes may instead list theirs in a class
# attribute ``prunekit_structural``. An entry may carry a restore function for modules that
# derive more state from these attributes than setattr would update.
Restore = Callable[[nn.Module, dict[str, Any]], None]
StructuralEntry = tuple[tuple[str, ...], Restore | None]

_STRUCTURAL: dict[type, StructuralEntry] = {
    nn.modules.conv._ConvNd: (("in_channels", "out_channels", "groups"), None),
    nn.Linear: (("in_features", "out_features"), None),
    nn.modules.batchnorm._NormBase: (("num_features",), None),
    nn.GroupNorm: (("num_channels", "num_groups"), None),
    nn.LayerNorm: (("normalized_shape",), None),
    nn.PReLU: (("num_parameters",), None),
}


def register_structural_attributes(
    cls: type, names: Sequence[str], *, restore: Restore | None = None
) -> None:
    """Record attributes ``names`` of modules of class ``cls`` (and subclasses) in saved specs.

    Needed for custom modules whose attributes a pruning rule changes, so that
    :func:`prunekit.io.load` can restore them on the rebuilt base model.
    ``restore(module, attrs)`` replaces the default ``setattr`` for modules that must
    recompute derived state from them.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"expected an nn.Module subclass, got {cls!r}")
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a sequence of attribute names, got {names!r}")
    known, known_restore = _STRUCTURAL.get(cls, ((), None))
    _STRUCTURAL[cls] = (known + tuple(n for n in names if n not in known),
                        restore or known_restore)


def structural_entries(module: nn.Module) -> list[StructuralEntry]:
    """The registered ``(attribute names, restore)`` entries that apply to ``module`` (its
    class or a base class was registered), in registration order."""
    return [entry for cls, entry in _STRUCTURAL.items() if isinstance(module, cls)]


def structural_attribute_names(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s structural attributes, registered or declared by its class
    in ``prunekit_structural``, without repeats (the module need not have them all)."""
    names = [name for attrs, _ in structural_entries(module) for name in attrs]
    names.extend(getattr(type(module), "prunekit_structural", ()))
    return tuple(dict.fromkeys(names))


# Modules that pruning puts in place of others (SWP's StripeConv2d for a Conv2d, ShortcutBlock
# for an emptied residual block). Such a class defines ``prunekit_init(self) -> dict`` (JSON)
# and a classmethod ``prunekit_build(original, init)`` that rebuilds it on a fresh base model,
# given the module it replaced there. Keyed by class name, the name saved files record.
_REPLACEMENTS: dict[str, type] = {}


def register_replacement(cls: type) -> type:
    """Let :func:`prunekit.io.save` / :func:`prunekit.io.load` store modules of class ``cls``
    that replaced a module of the base model (class decorator; see ``_REPLACEMENTS``)."""
    if not (hasattr(cls, "prunekit_init") and hasattr(cls, "prunekit_build")):
        raise TypeError(f"{cls.__name__} needs prunekit_init() and a prunekit_build classmethod")
    _REPLACEMENTS[cls.__name__] = cls
    return cls


def replacement_class(name: str) -> type | None:
    """The registered replacement class called ``name``, or None."""
    return _REPLACEMENTS.get(name)
