"""Applying what a spec describes to a freshly built base model: the structural attributes of
its modules and the modules that replaced some of them.

The spec inside a file is untrusted input, so nothing is set that the module kind does not
declare in :mod:`prunekit.nn.registry`, and every value passes the declared check first; a
replacement's ``init`` payload is checked the same way before its class builds anything.
The same steps run on the reference model when :func:`prunekit.io.save` checks that the
file it writes will load back, so both sides agree on what a file may say. Problems are
raised as :class:`SpecProblem`, which each side turns into its own error.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import PrunekitError
from ..nn.registry import Replacement, json_value, structural_checks, structural_entries
from ..utils import set_submodule

__all__ = ["SpecProblem", "build_replacement", "checked_attributes", "checked_init",
           "declared_shapes", "own_tensors", "restore_attributes"]

# What a restore function or a replacement's builder raises for values it cannot use.
_BAD_VALUE = (ValueError, TypeError, KeyError, IndexError)


class SpecProblem(PrunekitError):
    """One unusable entry of a spec: module ``module``'s attribute ``attr`` (None: the whole
    entry) with ``value``; ``reason`` says what is wrong, ``declared`` whether the module
    kind declares the attribute at all. Save and load catch it and raise their own error
    (SaveError, WeightsLoadError) naming the file."""

    def __init__(self, module: str, attr: str | None, value: Any, reason: str, *,
                 declared: bool = True):
        super().__init__(reason)
        self.module, self.attr, self.value = module, attr, value
        self.reason, self.declared = reason, declared

    @property
    def where(self) -> str:
        """``module.attr`` as a reader would look it up (``<model>`` for the root)."""
        module = self.module or "<model>"
        return f"{module}.{self.attr}" if self.attr is not None else module


def checked_attributes(name: str, module: nn.Module, attrs: Any) -> dict[str, Any]:
    """``attrs`` (a spec's entry for module ``name``) as the values to set, after checking
    that ``module``'s kind declares each attribute and that each value passes its check."""
    if not isinstance(attrs, Mapping):
        raise SpecProblem(name, None, attrs, "the entry must be an object of attribute values")
    checks = structural_checks(module)
    values = {}
    for attr, value in attrs.items():
        check = checks.get(attr)
        if check is None:
            raise SpecProblem(name, attr, value, f"{type(module).__name__} declares no "
                              f"structural attribute {attr!r}", declared=False)
        try:
            value = check(value)
        except ValueError as err:
            raise SpecProblem(name, attr, value, f"{attr} {err}") from None
        # JSON turned tuples (LayerNorm.normalized_shape) into lists; restore the type.
        if isinstance(value, list) and isinstance(getattr(module, attr, None), tuple):
            value = tuple(value)
        values[attr] = value
    return values


def restore_attributes(name: str, module: nn.Module, values: dict[str, Any]) -> None:
    """Set checked ``values`` on ``module``: through the registered restore functions for
    the names they cover, with ``setattr`` for the rest."""
    handled: set[str] = set()
    for names, restore in structural_entries(module):
        if restore is not None:
            try:
                restore(module, dict(values))
            except _BAD_VALUE as err:
                why = f"{err.args[0]!r} is missing" if isinstance(err, KeyError) else err
                raise SpecProblem(name, None, values, f"the attributes do not fit together "
                                  f"({why})") from None
            handled.update(names)
    for attr, value in values.items():
        if attr not in handled:
            setattr(module, attr, value)


def checked_init(name: str, entry: Replacement, init: Any) -> dict[str, Any]:
    """A replacement's ``init`` payload, checked against what its class declares (or, if it
    declares nothing, limited to JSON scalars and lists)."""
    if not isinstance(init, Mapping):
        raise SpecProblem(name, "init", init, "the init payload must be an object")
    checks = entry.init
    if checks is not None:
        unknown = sorted(set(init) - set(checks))
        missing = sorted(set(checks) - set(init))
        if unknown or missing:
            raise SpecProblem(name, "init", sorted(init), f"{entry.cls.__name__} takes init "
                              f"keys {sorted(checks)} (unknown: {unknown}, missing: {missing})")
    values = {}
    for key, value in init.items():
        try:
            values[key] = (checks[key] if checks is not None else json_value)(value)
        except ValueError as err:
            raise SpecProblem(name, f"init.{key}", value, f"{key} {err}") from None
    return values


def declared_shapes(name: str, entry: Replacement,
                    init: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """The shapes (keyed by full state dict name) of the tensors the replacement class says
    it will hold for ``init``, or None if it says nothing."""
    if entry.shapes is None:
        return None
    try:
        shapes = entry.shapes(init)
    except _BAD_VALUE as err:
        raise SpecProblem(name, "init", init, f"the init payload is inconsistent ({err})") \
            from None
    return {f"{name}.{key}": tuple(shape) for key, shape in shapes.items()}


def build_replacement(model: nn.Module, name: str, entry: Replacement,
                      init: dict[str, Any]) -> nn.Module:
    """Build ``entry``'s class from the module it replaced in ``model`` and put it there."""
    original = model.get_submodule(name)  # AttributeError: the caller names the file
    try:
        built = entry.cls.prunekit_build(original, dict(init))
    except _BAD_VALUE as err:
        raise SpecProblem(name, "init", init, f"{entry.cls.__name__} cannot be built from "
                          f"this init payload ({err})") from None
    if type(built) is not entry.cls:
        raise SpecProblem(name, None, None, f"{entry.cls.__name__}.prunekit_build returned a "
                          f"{type(built).__name__}")
    set_submodule(model, name, built)
    return built


def own_tensors(name: str, module: nn.Module) -> dict[str, Any]:
    """The parameters and persistent buffers ``module`` itself holds (not its children's),
    keyed by full state dict name."""
    prefix = f"{name}." if name else ""
    found = {f"{prefix}{k}": v for k, v in module._parameters.items() if v is not None}
    found.update({f"{prefix}{k}": v for k, v in module._buffers.items()
                  if v is not None and k not in module._non_persistent_buffers_set})
    return found
