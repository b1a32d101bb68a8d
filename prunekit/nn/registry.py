"""What a saved file must know about module classes: their structural attributes, with the
check a value read back from a file must pass, and the classes that pruning puts in place of
a base model's modules.

Both registries are filled where each class is defined (``prunekit.nn.stripe``,
``prunekit.nn.shortcut``, ``prunekit.models.cifar_resnet``; torch's own layers below) and
read by ``prunekit.io``. A spec inside a file is untrusted input, so every attribute a file
may set is declared here with a check, and loading sets nothing else. This module imports
only torch, so any module may register its classes without an import cycle.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["Check", "Replacement", "Restore", "register_replacement",
           "register_structural_attributes", "replacement_class", "replacement_entry",
           "structural_attribute_names", "structural_checks", "structural_entries"]

# A check returns the value to set (normalised: JSON lists become tuples where torch keeps
# tuples) or raises ValueError saying what the value must be.
Check = Callable[[Any], Any]
Restore = Callable[[nn.Module, dict[str, Any]], None]
StructuralEntry = tuple[tuple[str, ...], Restore | None]

# Bounds on what an untrusted file may ask for: far above any real layer, far below sizes
# whose allocation would exhaust memory.
MAX_SIZE = 1 << 24      # channels, features, groups
MAX_EXTENT = 1 << 16    # kernel size, stride, padding, dilation, pooled output size
MAX_INT = (1 << 31) - 1  # any other integer


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(lo: int = 0, hi: int = MAX_SIZE) -> Check:
    """An int (not a bool) in ``[lo, hi]``."""
    def check(value: Any) -> int:
        if not _is_int(value) or not lo <= value <= hi:
            raise ValueError(f"must be an integer in [{lo}, {hi}]")
        return value
    return check


def integers(lo: int = 0, hi: int = MAX_EXTENT, *, scalar: bool = False,
             max_len: int = 3) -> Check:
    """A list of 1..``max_len`` ints in ``[lo, hi]`` (set as a tuple); also a single int if
    ``scalar`` (pooling layers keep ``kernel_size=2`` as given)."""
    item = integer(lo, hi)

    def check(value: Any) -> int | tuple[int, ...]:
        if scalar and _is_int(value):
            return item(value)
        if isinstance(value, (list, tuple)) and 1 <= len(value) <= max_len \
                and all(_is_int(v) and lo <= v <= hi for v in value):
            return tuple(value)
        raise ValueError("must be " + ("an integer or " if scalar else "") +
                         f"a list of 1 to {max_len} integers in [{lo}, {hi}]")
    return check


def real(lo: float = -math.inf, hi: float = math.inf, *, above: bool = False) -> Check:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` if ``above``), set as a float."""
    def check(value: Any) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                math.isfinite(value) and (value > lo if above else value >= lo) and value <= hi:
            return float(value)
        low = f"> {lo}" if above else f">= {lo}"
        raise ValueError(f"must be a finite number {low}" + (f" and <= {hi}" if hi < math.inf
                                                             else ""))
    return check


def flag(value: Any) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def one_of(*choices: str) -> Check:
    """One of the given strings."""
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}")
        return value
    return check


def optional(inner: Check) -> Check:
    """``None`` or a value ``inner`` accepts."""
    def check(value: Any) -> Any:
        if value is None:
            return None
        try:
            return inner(value)
        except ValueError as err:
            raise ValueError(f"must be null or {str(err).removeprefix('must be ')}") from None
    return check


def either(first: Check, second: Check) -> Check:
    """A value ``first`` or ``second`` accepts."""
    def check(value: Any) -> Any:
        try:
            return first(value)
        except ValueError as err:
            reason = str(err)
        try:
            return second(value)
        except ValueError as err:
            raise ValueError(f"{reason}, or {str(err).removeprefix('must be ')}") from None
    return check


def json_value(value: Any, _depth: int = 0) -> Any:
    """The check of attributes registered without one: JSON scalars (ints within
    ``MAX_INT``, finite floats) and lists of them, nested at most 8 deep; never objects."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if _is_int(value) and abs(value) <= MAX_INT:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, (list, tuple)) and _depth < 8:
        return [json_value(v, _depth + 1) for v in value]
    raise ValueError(f"must be null, a boolean, a string, an integer within +-{MAX_INT}, a "
                     "finite number or a list of those")


def _output_size(value: Any) -> Any:
    if value is None or _is_int(value) and 1 <= value <= MAX_EXTENT:
        return value
    if isinstance(value, (list, tuple)) and 1 <= len(value) <= 3 and \
            all(v is None or _is_int(v) and 1 <= v <= MAX_EXTENT for v in value):
        return tuple(value)
    raise ValueError(f"must be an integer in [1, {MAX_EXTENT}], null, or a list of 1 to 3 "
                     "of those")


@dataclass
class _Entry:
    checks: dict[str, Check]
    restore: Restore | None = None
    generic: set[str] = field(default_factory=set)  # names checked by json_value only


def _reversed_padding(conv: nn.Module) -> Any:
    # What torch's _ConvNd.__init__ derives from padding (F.pad order: last dim first), used
    # by padding modes other than zeros. Same types as torch, so a save compares equal.
    if isinstance(conv.padding, str):
        pads = [0, 0] * len(conv.kernel_size)
        if conv.padding == "same":
            dims = len(conv.kernel_size)
            for i, (d, k) in enumerate(zip(conv.dilation, conv.kernel_size)):
                total = d * (k - 1)
                pads[2 * (dims - 1 - i)] = total // 2
                pads[2 * (dims - 1 - i) + 1] = total - total // 2
        return pads
    return tuple(p for p in reversed(conv.padding) for _ in range(2))


def _restore_conv(module: nn.Module, attrs: dict[str, Any]) -> None:
    for name in _CONV:
        if name in attrs:
            setattr(module, name, attrs[name])
    module._reversed_padding_repeated_twice = _reversed_padding(module)


_EPS = real(0.0, above=True)
_CONV = {"in_channels": integer(), "out_channels": integer(), "groups": integer(1),
         "kernel_size": integers(1), "stride": integers(1),
         "padding": either(one_of("same", "valid"), integers(0)), "dilation": integers(1),
         "output_padding": integers(0),
         "padding_mode": one_of("zeros", "reflect", "replicate", "circular")}
_POOL = {"kernel_size": integers(1, scalar=True), "stride": optional(integers(1, scalar=True)),
         "padding": integers(0, scalar=True), "ceil_mode": flag}

# Module attributes that describe shape or behaviour but live outside the state dict:
# pruning rewrites the shape ones, and a rebuilt base model would otherwise keep the base
# values. Matched with isinstance, so subclasses (Conv2d, BatchNorm1d, ...) are covered;
# classes may instead list theirs in a class attribute ``prunekit_structural``. An entry may
# carry a restore function for modules that derive more state from these attributes than
# setattr would update. In-place flags of activations change no output and are not recorded.
_STRUCTURAL: dict[type, _Entry] = {
    nn.modules.conv._ConvNd: _Entry(dict(_CONV), _restore_conv),
    nn.Linear: _Entry({"in_features": integer(), "out_features": integer()}),
    nn.modules.batchnorm._NormBase: _Entry({
        "num_features": integer(), "eps": _EPS, "momentum": optional(real(0.0, 1.0)),
        "affine": flag, "track_running_stats": flag}),
    nn.GroupNorm: _Entry({"num_channels": integer(), "num_groups": integer(1), "eps": _EPS,
                          "affine": flag}),
    nn.LayerNorm: _Entry({"normalized_shape": integers(0, MAX_SIZE, max_len=8), "eps": _EPS,
                          "elementwise_affine": flag}),
    nn.PReLU: _Entry({"num_parameters": integer(1)}),
    nn.modules.pooling._MaxPoolNd: _Entry({**_POOL, "dilation": integers(1, scalar=True),
                                           "return_indices": flag}),
    nn.modules.pooling._AvgPoolNd: _Entry({**_POOL, "count_include_pad": flag,
                                           "divisor_override": optional(integer(1))}),
    nn.modules.pooling._AdaptiveAvgPoolNd: _Entry({"output_size": _output_size}),
    nn.modules.pooling._AdaptiveMaxPoolNd: _Entry({"output_size": _output_size,
                                                   "return_indices": flag}),
    nn.modules.dropout._DropoutNd: _Entry({"p": real(0.0, 1.0)}),
}
if hasattr(nn, "RMSNorm"):
    _STRUCTURAL[nn.RMSNorm] = _Entry({"normalized_shape": integers(0, MAX_SIZE, max_len=8),
                                      "eps": optional(_EPS), "elementwise_affine": flag})


def register_structural_attributes(
    cls: type, names: Sequence[str] | Mapping[str, Check], *, restore: Restore | None = None
) -> None:
    """Record attributes ``names`` of modules of class ``cls`` (and subclasses) in saved specs.

    Needed for custom modules whose attributes a pruning rule changes, so that
    :func:`prunekit.io.load` can restore them on the rebuilt base model. ``names`` may map
    each name to a check (a function returning the value to set, or raising ValueError);
    names without one accept only JSON scalars and lists of them (:func:`json_value`).
    ``restore(module, attrs)`` replaces the default ``setattr`` for modules that must
    recompute derived state from them.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"expected an nn.Module subclass, got {cls!r}")
    checks = dict(names) if isinstance(names, Mapping) else None
    listed = list(checks or ()) if checks is not None else names
    if isinstance(listed, str) or not all(isinstance(n, str) for n in listed):
        raise TypeError(f"names must be a sequence of attribute names, got {names!r}")
    if checks is not None and not all(callable(c) for c in checks.values()):
        raise TypeError("each check must be a function of the value")
    entry = _STRUCTURAL.setdefault(cls, _Entry({}))
    for name in listed:
        if checks is not None:
            entry.checks[name] = checks[name]
            entry.generic.discard(name)
        elif name not in entry.checks:
            entry.checks[name] = json_value
            entry.generic.add(name)
    entry.restore = restore or entry.restore


def structural_entries(module: nn.Module) -> list[StructuralEntry]:
    """The registered ``(attribute names, restore)`` entries that apply to ``module`` (its
    class or a base class was registered), in registration order."""
    return [(tuple(entry.checks), entry.restore) for cls, entry in _STRUCTURAL.items()
            if isinstance(module, cls)]


def structural_checks(module: nn.Module) -> dict[str, Check]:
    """Every structural attribute ``module`` declares, with the check its value must pass.
    A real check of a base class wins over the generic one of a registration without."""
    checks: dict[str, Check] = {}
    for cls, entry in _STRUCTURAL.items():
        if isinstance(module, cls):
            for name, check in entry.checks.items():
                if name not in checks or name not in entry.generic:
                    checks[name] = check
    for name in getattr(type(module), "prunekit_structural", ()):
        checks.setdefault(name, json_value)
    return checks


def structural_attribute_names(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s structural attributes, registered or declared by its class
    in ``prunekit_structural``, without repeats (the module need not have them all)."""
    return tuple(structural_checks(module))


# Modules that pruning puts in place of others (SWP's StripeConv2d for a Conv2d, ShortcutBlock
# for an emptied residual block). Such a class defines ``prunekit_init(self) -> dict`` (JSON)
# and a classmethod ``prunekit_build(original, init)`` that rebuilds it on a fresh base model,
# given the module it replaced there. Keyed by class name, the name saved files record.
@dataclass
class Replacement:
    """A registered replacement class. ``init`` maps each key of its ``prunekit_init()``
    payload to a check (None: JSON scalars and lists only); ``shapes(init)`` gives the shapes
    of the tensors the class itself holds, checked against a file before anything is built."""

    cls: type
    init: dict[str, Check] | None = None
    shapes: Callable[[dict[str, Any]], Mapping[str, Sequence[int]]] | None = None


_REPLACEMENTS: dict[str, Replacement] = {}


def register_replacement(cls: type | None = None, *, init: Mapping[str, Check] | None = None,
                         shapes: Callable[[dict[str, Any]], Mapping[str, Sequence[int]]]
                         | None = None) -> Any:
    """Let :func:`prunekit.io.save` / :func:`prunekit.io.load` store modules of class ``cls``
    that replaced a module of the base model (class decorator, bare or with ``init=`` checks
    and a ``shapes`` function, see :class:`Replacement`; registering again adds them)."""
    def decorate(klass: type) -> type:
        if not (hasattr(klass, "prunekit_init") and hasattr(klass, "prunekit_build")):
            raise TypeError(f"{klass.__name__} needs prunekit_init() and a prunekit_build "
                            "classmethod")
        entry = _REPLACEMENTS.get(klass.__name__)
        if entry is None or entry.cls is not klass:
            entry = _REPLACEMENTS[klass.__name__] = Replacement(klass)
        entry.init = dict(init) if init is not None else entry.init
        entry.shapes = shapes or entry.shapes
        return klass
    return decorate(cls) if cls is not None else decorate


def replacement_entry(name: str) -> Replacement | None:
    """The registration of the replacement class called ``name``, or None."""
    return _REPLACEMENTS.get(name)


def replacement_class(name: str) -> type | None:
    """The registered replacement class called ``name``, or None."""
    entry = _REPLACEMENTS.get(name)
    return entry.cls if entry else None
