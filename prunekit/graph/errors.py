"""Errors raised while building a channel graph. Each says what went wrong and what to do."""
from __future__ import annotations

from ..errors import PrunekitError

HOW_TO_EXTEND = (
    "Register a channel rule with prunekit.graph.register_function_rule(target, rule) "
    "(or register_module_rule(ModuleClass, rule)), or pass leaf_modules=[...] so the module is "
    "treated as one opaque call with a registered rule."
)


class GraphError(PrunekitError, RuntimeError):
    """Base class of channel-graph errors."""


class TraceError(GraphError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


class UnsupportedOpError(GraphError):
    """An fx node has no channel rule; nothing is ever skipped silently."""

    def __init__(self, node, detail: str = ""):
        where = describe_node(node)
        msg = f"prunekit has no channel rule for {where}"
        if detail:
            msg += f": {detail}"
        super().__init__(f"{msg}. {HOW_TO_EXTEND}")
        self.node = node


def describe_node(node) -> str:
    """Readable name of an fx node: its op, target and the module it was traced in."""
    target = node.target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    stack = node.meta.get("nn_module_stack") or {}
    module_path = next(reversed(stack.values()))[0] if stack else ""
    if isinstance(module_path, tuple):
        module_path = module_path[0]
    inside = f" inside module '{module_path}'" if module_path else ""
    return f"node '{node.name}' ({node.op} {name}){inside}"
