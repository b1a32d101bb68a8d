"""What a saved file says about a model, and the refusal, at save time, of what it cannot say.

A file holds the model's tensors plus a spec relative to a freshly built base model: the
modules that replaced base modules and the structural attributes that differ. To compute
that spec, :func:`describe` compares the model with the base, then replays on the base what
:func:`prunekit.io.load` will do with the spec. Whatever still differs (an added, missing or
aliased module, a changed class, a tied tensor, an attribute prunekit does not record) would
make the file fail to load or load as another network, so it raises :class:`SaveError`
naming it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..models.weights import listing
from ..nn.registry import replacement_entry, structural_attribute_names
from .consistency import consistency_problems
from .errors import SaveError
from .jsonable import _jsonable
from .structure import (SpecProblem, build_replacement, checked_attributes, checked_init,
                        declared_shapes, own_tensors, restore_attributes)

__all__ = ["describe", "structural_attributes"]

_INSTEAD = ("or save only the weights (safetensors.torch.save_file(model.state_dict(), path)) "
            "and rebuild the architecture in code before loading them")
# nn.Module's own bookkeeping (hook tables, ...), and flags that change no output.
_INTERNAL = frozenset(vars(nn.Module()))
_NOT_BEHAVIOUR = frozenset({"training", "inplace"})


def structural_attributes(module: nn.Module) -> dict[str, Any]:
    """The structural attributes of ``module`` as JSON values (tuples become lists)."""
    return {
        name: _jsonable(getattr(module, name), f"{type(module).__name__}.{name}")
        for name in structural_attribute_names(module)
        if hasattr(module, name)
    }


def describe(model: nn.Module, reference: nn.Module,
             base: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(modules, replaced)`` of the spec of ``model``, whose base model ``base`` (a name,
    for messages) was freshly built as ``reference``; ``reference`` is changed into what
    loading the file will rebuild. Raises SaveError for what the spec cannot express."""
    def refuse(what: str) -> SaveError:
        return SaveError(f"cannot save this {base} model: {what}")

    _check_shared(_groups(model.named_modules(remove_duplicate=False)),
                  _groups(reference.named_modules(remove_duplicate=False)), "module", refuse)
    replaced = _replace(model, reference, refuse)
    _check_tree(model, reference, refuse)
    _check_tensors(model, reference, refuse)
    modules = _changed_modules(model, reference)
    for name, attrs in modules.items():
        module = reference.get_submodule(name)
        try:
            restore_attributes(name, module, checked_attributes(name, module, attrs))
        except SpecProblem as problem:
            raise refuse(f"{problem.where} is {problem.value!r}, which prunekit.io.load "
                         f"refuses ({problem.reason}); give it a valid value first") from None
    _check_attributes(model, reference, refuse)
    problems = consistency_problems(model)
    if problems:
        raise refuse("its attributes do not agree with its tensors: "
                     f"{listing([f'{key} {what}' for key, what, _, _ in problems], '; ')}. "
                     "Make them agree (e.g. after editing a layer by hand) before saving")
    return modules, replaced


def _changed_modules(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, Any]]:
    reference_modules = dict(reference.named_modules())
    changed = {}
    for name, module in model.named_modules():
        attrs = structural_attributes(module)
        if not attrs:
            continue
        ref = reference_modules.get(name)
        if ref is None or structural_attributes(ref) != attrs:
            changed[name] = attrs
    return changed


def _groups(named: Iterable[tuple[str, Any]]) -> list[tuple[str, ...]]:
    """The names under which one object is reachable, for every object reachable twice."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, obj in named:
        names[id(obj)].append(name)
    return [tuple(v) for v in names.values() if len(v) > 1]


def _check_shared(mine: list[tuple[str, ...]], theirs: list[tuple[str, ...]], what: str,
                  refuse) -> None:
    # A loaded model shares exactly what the rebuilt base shares: load_state_dict fills a
    # shared object once per name (the last wins) and never ties separate ones.
    base = {frozenset(g) for g in theirs}
    for group in mine:
        if frozenset(group) not in base:
            raise refuse(f"{what} '{group[1]}' is the same object as '{group[0]}' "
                         f"({'aliased' if what == 'module' else 'tied'}), "
                         f"which the base model does not share, so a loaded model would have "
                         f"separate ones. Give each name its own {what} (copy.deepcopy), "
                         + _INSTEAD)
    model = {frozenset(g) for g in mine}
    for group in theirs:
        if frozenset(group) not in model:
            raise refuse(f"the base model shares one {what} as '{group[0]}' and '{group[1]}' "
                         f"but this model has separate ones, which a loaded model would tie "
                         f"again. Share them as the base does, " + _INSTEAD)


def _replace(model: nn.Module, reference: nn.Module, refuse) -> dict[str, Any]:
    """Build every registered replacement of ``model`` into ``reference``, as load will
    (parents first, so a replacement may hold replacements of its own)."""
    replaced: dict[str, Any] = {}
    for name, module in model.named_modules():
        try:
            ref = reference.get_submodule(name) if name else None
        except AttributeError:
            continue  # an added module: _check_tree names it
        entry = replacement_entry(type(module).__name__)
        if ref is None or type(ref) is type(module) or entry is None \
                or entry.cls is not type(module):
            continue
        init = _jsonable(module.prunekit_init(), f"{name} init")
        try:
            checked = checked_init(name, entry, init)
            shapes = declared_shapes(name, entry, checked)
            built = build_replacement(reference, name, entry, checked)
        except SpecProblem as problem:
            raise refuse(f"module '{name}' ({entry.cls.__name__}) cannot be rebuilt from its "
                         f"prunekit_init() ({problem.reason})") from None
        have = {k: tuple(t.shape) for k, t in own_tensors(name, module).items()}
        rebuilt = {k: tuple(t.shape) for k, t in own_tensors(name, built).items()}
        if have != rebuilt or (shapes is not None and shapes != have):
            raise refuse(f"module '{name}' ({entry.cls.__name__}) holds tensors {have}, but "
                         f"rebuilding it from its prunekit_init() gives {rebuilt}; its "
                         "prunekit_init()/prunekit_build() do not describe it")
        replaced[name] = {"class": entry.cls.__name__, "init": init}
    return replaced


def _check_tree(model: nn.Module, reference: nn.Module, refuse) -> None:
    mine = dict(model.named_modules(remove_duplicate=False))
    theirs = dict(reference.named_modules(remove_duplicate=False))
    added = [n for n in mine if n not in theirs and n.rpartition(".")[0] in theirs]
    if added:
        raise refuse(f"module '{added[0]}' ({type(mine[added[0]]).__name__}) is not part of "
                     "the base model and not a registered replacement, so a loaded model "
                     "would lack it. Register its class with prunekit.io.register_replacement "
                     "(it then needs prunekit_init/prunekit_build), " + _INSTEAD)
    missing = [n for n in theirs if n not in mine and n.rpartition(".")[0] in mine]
    if missing:
        raise refuse(f"it lacks the base model's module '{missing[0]}' "
                     f"({type(theirs[missing[0]]).__name__}), which a loaded model would "
                     "have again. Keep the module (replace it by a registered replacement, "
                     "e.g. torch.nn.Identity is not one), " + _INSTEAD)
    if list(mine) != list(theirs):
        first = next(a for a, b in zip(mine, theirs) if a != b)
        raise refuse(f"its modules are in another order than the base model's (first "
                     f"difference at '{first}'), which changes what a Sequential computes; "
                     + _INSTEAD)
    for name, module in mine.items():
        ref = theirs[name]
        if type(module) is not type(ref):
            raise refuse(f"module '{name or '<model>'}' is a {type(module).__name__} where "
                         f"the base model has a {type(ref).__name__}, and "
                         f"{type(module).__name__} is not a registered replacement of it. "
                         "Register it with prunekit.io.register_replacement, " + _INSTEAD)


def _check_tensors(model: nn.Module, reference: nn.Module, refuse) -> None:
    mine = model.state_dict(keep_vars=True)
    theirs = reference.state_dict(keep_vars=True)
    extra = [k for k in mine if k not in theirs]
    if extra:
        raise refuse(f"it holds tensors the base model does not have: {listing(extra)} (a "
                     "parameter or buffer added to a module; torch.nn.utils.prune adds "
                     "weight_orig/weight_mask and a hook), which loading would drop. Remove "
                     "them (torch.nn.utils.prune.remove), " + _INSTEAD)
    missing = [k for k in theirs if k not in mine]
    if missing:
        raise refuse(f"it lacks tensors of the base model: {listing(missing)} (e.g. a bias "
                     "set to None), which loading would bring back. Keep them (zeros), "
                     + _INSTEAD)
    # Non-persistent buffers are in no state dict and cannot be stored at all.
    theirs_modules = dict(reference.named_modules())
    for name, module in model.named_modules():
        ref = theirs_modules[name]
        added = sorted(set(module._buffers) - set(ref._buffers)
                       | set(module._parameters) - set(ref._parameters))
        if added:
            raise refuse(f"module '{name or '<model>'}' has buffer or parameter "
                         f"{added[0]!r}, which the base model's {type(ref).__name__} lacks "
                         "and a file cannot store. Remove it, " + _INSTEAD)
    _check_shared(_groups((k, t) for k, t in mine.items() if isinstance(t, torch.Tensor)),
                  _groups((k, t) for k, t in theirs.items() if isinstance(t, torch.Tensor)),
                  "tensor", refuse)


def _check_attributes(model: nn.Module, reference: nn.Module, refuse) -> None:
    """Every plain attribute (numbers, strings, lists of them) must be what loading will
    rebuild, and no instance may override a method of its class (``module.forward = f``)."""
    theirs = dict(reference.named_modules())
    found = []
    for name, module in model.named_modules():
        ref_vars = vars(theirs[name])
        for attr, value in vars(module).items():
            if attr in _INTERNAL or attr in _NOT_BEHAVIOUR:
                continue
            if attr not in ref_vars:
                if callable(getattr(type(module), attr, None)):
                    found.append(f"{name or '<model>'}.{attr} is set on the module itself, "
                                 f"overriding {type(module).__name__}.{attr}")
                continue
            base = ref_vars[attr]
            if _plain(value) and _plain(base) and _canon(value) != _canon(base) \
                    and not _irrelevant(module, attr):
                recorded = attr in structural_attribute_names(module)
                found.append(f"{name or '<model>'}.{attr} is {value!r} but {base!r} in the "
                             "base model" + (" after restoring the recorded attributes"
                                             if recorded else
                                             f" ({type(module).__name__} does not record it)"))
    if found:
        raise refuse(f"{listing(found, '; ')}. A loaded model would not compute the same. "
                     "Record such attributes with prunekit.io.register_structural_attributes"
                     "(cls, names, restore=...), " + _INSTEAD)


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_plain(v) for v in value)


def _canon(value: Any) -> Any:
    # Tuples and lists compare alike (JSON keeps only lists); NaN equals NaN.
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _irrelevant(module: nn.Module, attr: str) -> bool:
    # Convolutions pad through F.pad with this derived copy of `padding` only in padding
    # modes other than zeros; with zeros it is dead state that hand edits leave stale.
    return (attr == "_reversed_padding_repeated_twice"
            and isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode == "zeros")
