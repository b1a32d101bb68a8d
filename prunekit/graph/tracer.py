"""torch.fx tracing with clear errors and user-chosen leaf modules.

A branch on a tensor's *shape* (timm's same-padding ``if pad_h > 0``, VGG's ``if x.shape[-2] <
self.kernel_size``) is taken as the example inputs take it: the graph describes the model for
inputs of that size anyway. A branch on tensor *values* still stops the trace.
"""
from __future__ import annotations

import builtins
import contextlib
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import _symbolic_trace

from .errors import TraceError
from .registry import is_leaf_type


class ChannelTracer(fx.Tracer):
    """fx tracer that keeps registered and user-named modules as leaves.

    It remembers the module being traced so a failure names the module whose ``forward`` could
    not be traced (fx's own message only names the Python construct).
    """

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: Iterable[str] = (),
                 example_inputs=None):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = set(leaf_names)
        self.prunekit_path: list[str] = []
        self.example_inputs = example_inputs
        self._env: dict[fx.Node, object] = {}
        self._fake: FakeTensorMode | None = None

    def to_bool(self, obj) -> bool:
        if self.example_inputs is None or not _shape_only(obj.node) or \
                not hasattr(_symbolic_trace, "_orig_module_call"):
            return super().to_bool(obj)
        return bool(self._concrete(obj.node))

    def iter(self, obj):
        """``for part in torch.split(...)``: as many parts as the example inputs give (the
        number of pieces of a split or of a shape depends on shapes only)."""
        if self.example_inputs is None or not hasattr(_symbolic_trace, "_orig_module_call") \
                or not _counted_by_shapes(obj.node):
            return super().iter(obj)
        count = len(self._concrete(obj.node))
        return iter([obj[i] for i in range(count)])

    def _concrete(self, target: fx.Node):
        """The example value of ``target``, running the graph traced so far (with fake
        tensors: only shapes are needed, and the model's buffers stay untouched)."""
        interpreter = fx.Interpreter(self.root, garbage_collect_values=False, graph=self.graph)
        interpreter.env = self._env
        inputs = list(self.example_inputs)
        with _modules_called_for_real(), torch.no_grad():
            if self._fake is not False:
                try:
                    self._fake = self._fake or FakeTensorMode(allow_non_fake_inputs=True)
                    with self._fake:
                        return self._run_until(interpreter, target, inputs)
                except Exception:  # an op fake tensors cannot run: compute for real
                    self._env.clear()
                    self._fake = False
            # Real layers in training mode update their statistics: put them back.
            saved = [(b, b.clone()) for b in self.root.buffers()]
            try:
                return self._run_until(interpreter, target, inputs)
            finally:
                for buffer, value in saved:
                    buffer.copy_(value)

    def _run_until(self, interpreter, target, inputs):
        placeholders = 0
        for node in self.graph.nodes:
            if node not in self._env:
                if node.op == "placeholder":
                    default = node.args[0] if node.args else None
                    value = inputs[placeholders] if placeholders < len(inputs) else default
                    self._env[node] = value
                else:
                    self._env[node] = interpreter.run_node(node)
            if node.op == "placeholder":
                placeholders += 1
            if node is target:
                return self._env[node]
        raise RuntimeError(f"node {target.name} is not in the traced graph")

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or is_leaf_type(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.prunekit_path.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        # Popped only on success: after a failure the innermost module stays on top, so the
        # error can name it.
        self.prunekit_path.pop()
        return result


@contextlib.contextmanager
def _modules_called_for_real():
    """While fx traces, calling a module records it instead of running it: undo that."""
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__ = _symbolic_trace._orig_module_call
    nn.Module.__getattr__ = _symbolic_trace._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched


_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}


_PIECES = {torch.split, torch.chunk, torch.unbind, torch.tensor_split, "split", "chunk",
           "unbind", "tensor_split", "size"}


def _counted_by_shapes(node: fx.Node) -> bool:
    """Whether the number of items of ``node``'s value follows from shapes alone."""
    if node.op in ("call_function", "call_method") and node.target in _PIECES:
        return True
    return node.op == "call_function" and node.target is builtins.getattr and \
        node.args[1] == "shape"


def _shape_only(node: fx.Node) -> bool:
    """Whether ``node`` depends on the model's inputs only through tensor shapes."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is builtins.getattr and n.args[1] in _SHAPE_ATTRS:
            continue
        if (n.op == "call_method" and n.target in _SHAPE_METHODS) or \
                (n.op == "call_function" and n.target is builtins.len):
            continue
        if n.op in ("placeholder", "get_attr", "call_module"):
            return False  # a tensor's values
        if n.op == "call_function" and getattr(n.target, "__module__", "") and \
                str(getattr(n.target, "__module__", "")).startswith("torch"):
            return False  # a tensor op: its result has values
        todo.extend(n.all_input_nodes)
    return True


def trace(model: nn.Module, leaf_types=(), leaf_names=(), example_inputs=None) -> fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`TraceError` with advice when fx cannot.

    With ``example_inputs``, branches on tensor shapes follow those inputs."""
    tracer = ChannelTracer(set(leaf_types), leaf_names, example_inputs)
    before = set(vars(model))
    try:
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
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
    finally:
        # fx stores tensors created in forward (torch.arange(16.) ...) on the traced root as
        # `_tensor_constant<i>`; the GraphModule has its own reference, the user's model must
        # not keep them.
        for name in set(vars(model)) - before:
            if name.startswith("_tensor_constant"):
                delattr(model, name)
