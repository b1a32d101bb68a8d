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
# Leaf classes whose subclasses are leaves too even when they override forward: a subclass of
# a convolution or linear layer (timm's Linear calling F.linear, Conv2dSame padding first,
# StdConv2d standardising its weight) still maps channels as its base does, and as one call
# it stays one module that ``ignore`` can name.
SUBCLASS_LEAF_TYPES: set[type] = set()


def register_module_rule(cls: type[nn.Module], rule: Callable | None = None, *, leaf: bool = True,
                         subclasses: bool = False):
    """Register ``rule`` for modules of class ``cls`` (subclasses too). Usable as a decorator.

    With ``leaf=True`` the class is traced as a single call even when it is not a torch.nn
    built-in, so its forward may contain anything fx cannot trace. Subclasses are leaves too
    when they keep the base class's forward, or with ``subclasses=True`` whatever their forward
    (only for classes whose channel mapping no subclass can change).
    """

    def add(fn):
        MODULE_RULES[cls] = fn
        if leaf:
            LEAF_TYPES.add(cls)
        if subclasses:
            SUBCLASS_LEAF_TYPES.add(cls)
        return fn

    return add(rule) if rule is not None else add


def is_leaf_type(module: nn.Module, leaf_types=None) -> bool:
    """Whether ``module`` is traced as one call by class (see :func:`register_module_rule`)."""
    leaf_types = LEAF_TYPES if leaf_types is None else leaf_types
    kind = type(module)
    if kind in leaf_types:
        return True
    for base in kind.__mro__[1:]:
        if base in leaf_types:
            if base in SUBCLASS_LEAF_TYPES:
                # Children with tensors would be hidden from the trace: trace through instead.
                return not any(True for c in module.children() for _ in c.state_dict())
            return kind.forward is base.forward
    return False


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
