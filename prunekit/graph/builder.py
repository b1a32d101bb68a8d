"""Run the traced model once on example inputs and let each node's rule record channel facts."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch import nn

from ..utils import as_tuple
from .channels import channel_ids, no_channels
from .context import RuleContext, TraceState
from .errors import GraphError, UnsupportedOpError
from .registry import FUNCTION_RULES, LEAF_TYPES, METHOD_RULES, module_rule_for
from .tracer import trace

from . import rules_layers, rules_tensor  # noqa: F401  (registers the built-in rules)




def _tree_ids(value, make):
    if isinstance(value, torch.Tensor):
        return make(value)
    if isinstance(value, (list, tuple)):
        return [_tree_ids(v, make) for v in value]
    return None


class _ChannelInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, state: TraceState, fixed_modules: set[str]):
        super().__init__(gm, garbage_collect_values=False)
        self.state = state
        self.ids: dict[str, object] = {}
        self.values: dict[str, object] = {}
        self.fixed_modules = fixed_modules

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
        ctx = RuleContext(self.state, n, self.ids, self.values)
        if n.op == "placeholder":
            def make_input(t):
                if t.dim() < 2:
                    return no_channels(t.dim())
                ids = channel_ids(ctx.new_vars(t.shape[1]), t.dim(), 1)
                ctx.fix(ids, "model input")
                return ids
            return _tree_ids(value, make_input)
        if n.op == "output":
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
            return None
        if not _has_tensor_input(n, self.values):
            return _tree_ids(value, lambda t: no_channels(t.dim()))
        rule, module = self._rule_for(n)
        if rule is None:
            raise UnsupportedOpError(n)
        ids = rule(ctx, n, module)
        if n.op == "call_module" and n.target in self.fixed_modules:
            ctx.fix(ids, f"module '{n.target}' is ignored")
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

    def _parameter_ids(self, ctx, n, value):
        """A parameter used directly in forward (e.g. ConvNeXt's layer_scale)."""
        if not isinstance(value, torch.Tensor):
            return None
        dims = [d for d in range(value.dim()) if value.shape[d] > 1]
        if len(dims) != 1:
            # Weights of F.conv2d/F.linear: their rule records them; as plain operands they
            # would be constants with no channel identity.
            return no_channels(value.dim())
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
    gm = trace(model, leaf_types=tuple(LEAF_TYPES), leaf_names=leaf_modules)
    inputs = as_tuple(example_inputs)
    try:
        # Rules need shapes, not values: fake tensors give them without computing the
        # convolutions (ResNet-50 at 224x224: ~0.5 s instead of seconds).
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            return gm, _record(gm, fixed_modules, inputs)
    except GraphError:
        raise
    except Exception:  # an op fake tensors cannot run: compute for real
        with torch.no_grad():
            return gm, _record(gm, fixed_modules, inputs)


def _record(gm, fixed_modules, inputs) -> TraceState:
    state = TraceState()
    _ChannelInterpreter(gm, state, set(fixed_modules)).run(*inputs)
    return state
