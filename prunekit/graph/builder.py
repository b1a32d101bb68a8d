"""Run the traced model once on example inputs and let each node's rule record channel facts."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch import nn

from ..utils import as_tuple
from .channels import channel_ids, constant_ids, no_channels
from .context import RuleContext, TraceState
from .errors import GraphError, UnsupportedOpError, describe_node
from .numbers import accepts_counts, argument_counts, count_taint, flat
from .registry import FUNCTION_RULES, LEAF_TYPES, METHOD_RULES, module_rule_for
from .tracer import trace

from . import rules_attention, rules_layers, rules_reshape, rules_split, rules_tensor  # noqa: F401

# An assert on a channel count would fail once channels go: the counted channels are kept.
_ASSERTS = tuple(f for f in (getattr(torch, "_assert", None), getattr(torch, "_assert_async", None))
                 if f is not None)


def _tree_ids(value, make):
    if isinstance(value, torch.Tensor):
        return make(value)
    if isinstance(value, (list, tuple)):
        return [_tree_ids(v, make) for v in value]
    return None


class _ChannelInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, state: TraceState, fixed_modules: set[str],
                 root: nn.Module):
        super().__init__(gm, garbage_collect_values=False)
        self.state = state
        self.ids: dict[str, object] = {}
        self.values: dict[str, object] = {}
        self.counts: dict[str, object] = {}  # non-tensor values: the channels they count
        self.fixed_modules = fixed_modules
        self.user_model = root
        self.is_model_tensor = _tensor_names(root)

    def call_module(self, target, args, kwargs):
        # Rules need shapes only: layers that keep their input's shape need not run (under
        # fake tensors BatchNorm alone would cost more than every convolution).
        if isinstance(self.module.get_submodule(target), SHAPE_PRESERVING) and args and \
                isinstance(args[0], torch.Tensor):
            return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        self.values[n.name] = value
        self.ids[n.name] = self._ids_for(n, value)
        return value

    def _ids_for(self, n: fx.Node, value):
        ctx = RuleContext(self.state, n, self.ids, self.values, self.user_model, self.counts)
        if n.op == "placeholder":
            def make_input(t):
                if t.dim() < 2:
                    return no_channels(t.dim())
                ids = channel_ids(ctx.new_vars(t.shape[1]), t.dim(), 1)
                ctx.fix(ids, "model input")
                return ids
            return _tree_ids(value, make_input)
        if n.op == "output":
            ctx.fix(self._counted(n), "channel count returned by the model as a number")

            def fix_output(ids):
                if isinstance(ids, list):
                    for i in ids:
                        fix_output(i)
                else:
                    ctx.fix(ids, "model output")
            for arg in fx.node.map_arg(n.args, lambda a: a):
                for leaf in _flatten_args(arg):
                    fix_output(self.ids.get(leaf.name))
            return None
        if n.op == "get_attr":
            return self._parameter_ids(ctx, n, value)
        if not _contains_tensor(value):
            taint = count_taint(n, ctx.value, ctx.ids, self._taint)
            if taint is not None and flat(taint).size:
                self.counts[n.name] = taint
                if n.target in _ASSERTS:
                    ctx.fix(flat(taint), f"channel count asserted on by {describe_node(n)}")
            return None
        if not _has_tensor_input(n, self.values):
            # A tensor the forward makes itself: its values sit at fixed positions.
            ctx.fix(self._counted(n), f"channel count sizes a tensor made in forward by "
                                      f"{describe_node(n)}; fewer channels would change its values")
            return _tree_ids(value, lambda t: constant_ids(t.dim()))
        rule, module = self._rule_for(n)
        if rule is None:
            raise UnsupportedOpError(n)
        if not accepts_counts(rule):
            ctx.fix(self._counted(n), f"channel count used as a number by {describe_node(n)}; "
                                      "fewer channels would change the result")
        try:
            ids = rule(ctx, n, module)
        except GraphError:
            raise
        except Exception as exc:  # a rule that meets a case it does not handle
            raise UnsupportedOpError(n, f"its channel rule failed ({type(exc).__name__}: "
                                        f"{exc})") from exc
        if n.op == "call_module" and n.target in self.fixed_modules:
            _fix_tree(ctx, ids, f"module '{n.target}' is ignored")
        return ids

    def _rule_for(self, n: fx.Node):
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            return module_rule_for(module), module
        if n.op == "call_function":
            if isinstance(n.target, type) and issubclass(n.target, tuple):
                return _pack_tuple, None  # a namedtuple of outputs (GoogLeNetOutputs, ...)
            return FUNCTION_RULES.get(n.target), None
        if n.op == "call_method":
            return METHOD_RULES.get(n.target), None
        return None, None

    def _taint(self, arg):
        return self.counts.get(arg.name) if isinstance(arg, fx.Node) else None

    def _counted(self, n):
        """Channels whose number a non-tensor argument of ``n`` was computed from."""
        return argument_counts(n, self._taint)

    def _parameter_ids(self, ctx, n, value):
        """A parameter used directly in forward (e.g. ConvNeXt's layer_scale)."""
        if not isinstance(value, torch.Tensor):
            return None
        if not self.is_model_tensor(n.target):
            return constant_ids(value.dim())  # fx's _tensor_constant: made inside forward
        self.state.touched_tensors.add(n.target)  # reached, even if it maps to no channel
        dims = [d for d in range(value.dim()) if value.shape[d] > 1]
        if len(dims) != 1:
            # Weights of F.conv2d/F.linear: their rule records them by name; as plain operands
            # they would be values at fixed positions.
            return no_channels(value.dim()) if not dims else constant_ids(value.dim())
        vec = ctx.new_vars(value.shape[dims[0]])
        ctx.member(n.target, dims[0], vec, "param", n.target.rsplit(".", 1)[0])
        return channel_ids(vec, value.dim(), dims[0])


def _pack_tuple(ctx, node, module=None):
    return [ctx.ids(a) for a in list(node.args) + list(node.kwargs.values())]


SHAPE_PRESERVING = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Identity,
                    nn.Dropout, nn.Dropout2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
                    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.PReLU)


def _flatten_args(arg):
    if isinstance(arg, fx.Node):
        return [arg]
    if isinstance(arg, (list, tuple)):
        return [x for a in arg for x in _flatten_args(a)]
    if isinstance(arg, dict):
        return [x for a in arg.values() for x in _flatten_args(a)]
    return []


def _contains_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains_tensor(v) for v in value)
    return False


def _has_tensor_input(n: fx.Node, values) -> bool:
    return any(_contains_tensor(values[a.name]) or a.op == "get_attr"
               for a in _flatten_args((n.args, dict(n.kwargs))))


def record_channels(model: nn.Module, example_inputs, *, leaf_modules=(), fixed_modules=()):
    """Trace ``model`` and run it once, returning the traced module and the recorded state."""
    inputs = as_tuple(example_inputs)
    gm = trace(model, leaf_types=tuple(LEAF_TYPES), leaf_names=leaf_modules,
               example_inputs=inputs)
    try:
        # Rules need shapes, not values: fake tensors give them without computing the
        # convolutions (ResNet-50 at 224x224: ~0.5 s instead of seconds).
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            return gm, _record(gm, fixed_modules, inputs, model)
    except GraphError:
        raise
    except Exception:  # an op fake tensors cannot run: compute for real
        with torch.no_grad():
            return gm, _record(gm, fixed_modules, inputs, model)


def _tensor_names(model: nn.Module):
    def is_model_tensor(target: str) -> bool:
        owner, _, attr = target.rpartition(".")
        try:
            module = model.get_submodule(owner) if owner else model
        except AttributeError:
            return False
        return isinstance(getattr(module, attr, None), torch.Tensor)
    return is_model_tensor


def _record(gm, fixed_modules, inputs, model) -> TraceState:
    state = TraceState()
    interpreter = _ChannelInterpreter(gm, state, set(fixed_modules), model)
    interpreter.run(*inputs)
    _fix_traced_through(gm, state, interpreter, set(fixed_modules))
    _check_counted_sizes(state)
    return state


def _check_counted_sizes(state) -> None:
    """A reshape sized by the count of other channels than those it holds (EdgeNeXt's XCA:
    ``attn_out.reshape(B, N, C)`` with C the block input's count) would break once either
    side loses channels alone: keep both."""
    uf = state.uf
    for counted, held, node in state.count_checks:
        a, b = uf.roots(counted), uf.roots(held)
        if set(a[a >= 0].tolist()) != set(b[b >= 0].tolist()):
            reason = f"a reshape in '{node}' is sized by the count of other channels"
            for v in np.concatenate([counted, held]).tolist():
                if v >= 0:
                    state.fixed.setdefault(int(v), reason)


def _fix_traced_through(gm, state, interpreter, fixed_modules) -> None:
    """Ignored modules that were traced through (no single call_module node): keep the
    channels of every value leaving them."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name in fixed_modules - called:
        inside = {n for n in gm.graph.nodes if name in _scope_paths(n)}
        for n in inside:
            if any(user not in inside for user in n.users):
                ctx = RuleContext(state, n, interpreter.ids, interpreter.values)
                _fix_tree(ctx, interpreter.ids.get(n.name), f"module '{name}' is ignored")


def _scope_paths(node) -> set[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return {v[0] if isinstance(v, tuple) else str(v) for v in stack.values()}


def _fix_tree(ctx, ids, reason) -> None:
    if isinstance(ids, list):
        for i in ids:
            _fix_tree(ctx, i, reason)
    else:
        ctx.fix(ids, reason)
