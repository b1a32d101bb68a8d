"""torch.fx tracing with clear errors and user-chosen leaf modules."""
from __future__ import annotations

from typing import Iterable

import torch.fx as fx
from torch import nn

from .errors import TraceError


class ChannelTracer(fx.Tracer):
    """fx tracer that keeps registered and user-named modules as leaves.

    It remembers the module being traced so a failure names the module whose ``forward`` could
    not be traced (fx's own message only names the Python construct).
    """

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: Iterable[str] = ()):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = set(leaf_names)
        self.prunekit_path: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and type(m) in self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.prunekit_path.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        # Popped only on success: after a failure the innermost module stays on top, so the
        # error can name it.
        self.prunekit_path.pop()
        return result


def trace(model: nn.Module, leaf_types=(), leaf_names=()) -> fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`TraceError` with advice when fx cannot."""
    tracer = ChannelTracer(tuple(leaf_types), leaf_names)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, AttributeError, ...
        where = tracer.prunekit_path[-1] if tracer.prunekit_path else ""
        if where:
            advice = (f"Make that control flow static, or pass leaf_modules=['{where}'] and "
                      "register a channel rule for its class with "
                      "prunekit.graph.register_module_rule.")
        else:  # the model's own forward: it cannot be a leaf of itself
            advice = (f"The branch is in {type(model).__name__}.forward itself: make it static "
                      "(no Python `if` on tensor values), or move it into a submodule and pass "
                      "that submodule as leaf_modules=[...] with a registered channel rule.")
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__} (failed inside module "
            f"'{where or type(model).__name__}'): {type(exc).__name__}: {exc}. prunekit needs a "
            f"model whose forward has no data-dependent control flow. {advice}"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
