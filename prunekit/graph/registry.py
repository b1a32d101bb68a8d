"""Where channel rules are registered: by module class, by function, by tensor-method name.

A rule is ``rule(ctx, node, module) -> ids`` (``module`` is None for functions and methods): it
reads its inputs' channel ids through ``ctx``, records members/constraints, and returns the ids
of the node's output (an array, or a list of arrays for tuple outputs).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

ModuleRule = Callable
MODULE_RULES: dict[type, ModuleRule] = {}
FUNCTION_RULES: dict[object, Callable] = {}
METHOD_RULES: dict[str, Callable] = {}
# Module classes traced as one opaque call (their rule describes them); user code adds more.
LEAF_TYPES: set[type] = set()


def register_module_rule(cls: type[nn.Module], rule: Callable | None = None, *, leaf: bool = True):
    """Register ``rule`` for modules of class ``cls`` (subclasses too). Usable as a decorator.

    With ``leaf=True`` the class is traced as a single call even when it is not a torch.nn
    built-in, so its forward may contain anything fx cannot trace.
    """

    def add(fn):
        MODULE_RULES[cls] = fn
        if leaf:
            LEAF_TYPES.add(cls)
        return fn

    return add(rule) if rule is not None else add


def register_function_rule(*targets, rule: Callable | None = None):
    """Register ``rule`` for call_function targets (e.g. ``torch.cat``). Usable as a decorator."""

    def add(fn):
        for target in targets:
            FUNCTION_RULES[target] = fn
        return fn

    return add(rule) if rule is not None else add


def register_method_rule(*names: str, rule: Callable | None = None):
    """Register ``rule`` for tensor methods called by name (``x.view(...)``)."""

    def add(fn):
        for name in names:
            METHOD_RULES[name] = fn
        return fn

    return add(rule) if rule is not None else add


def module_rule_for(module: nn.Module):
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return None
