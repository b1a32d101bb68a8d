"""Literal sizes in a trace that are module attributes pruning can rewrite.

fx records ``torch.split(x, self.splits, 1)`` (timm's MixConv) or ``F.conv2d(x, w,
groups=self.channels)`` (timm's BlurPool) with the attribute's value baked in. The module's
forward reads the attribute again on every call, so a pruning that rewrites the attribute keeps
the op consistent; a literal that is no attribute must instead keep its channels.
"""
from __future__ import annotations


def owner_path(node) -> str:
    """Qualified name of the module whose forward created ``node`` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = next(reversed(stack.values()))
    return last[0] if isinstance(last, tuple) else str(last)


def attribute_holding(ctx, literal) -> tuple[str, str] | None:
    """``(module, attribute)`` of the single attribute of the module that created the current
    node whose value is ``literal`` (an int or a list of ints); None if there is none or
    several (then which one the code read is unknown)."""
    if ctx.root is None:
        return None
    path = owner_path(ctx.node)
    try:
        module = ctx.root.get_submodule(path) if path else ctx.root
    except AttributeError:
        return None
    hits = [name for name, value in vars(module).items()
            if not name.startswith("_") and _equal(value, literal)]
    return (path, hits[0]) if len(hits) == 1 else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _equal(value, literal) -> bool:
    if _is_int(literal):
        return _is_int(value) and value == literal
    if isinstance(literal, (list, tuple)) and literal:
        return isinstance(value, (list, tuple)) and len(value) == len(literal) and \
            all(_is_int(a) and _is_int(b) and a == b for a, b in zip(value, literal))
    return False
