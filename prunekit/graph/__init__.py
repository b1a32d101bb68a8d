"""Channel dependency graph: which channels of which tensors must be removed together.

``build_graph(model, example_inputs)`` traces the model with torch.fx, runs it once on the
example inputs, and applies a channel rule to every node. Ops without a rule stop the trace
with a message naming the node; register rules for your own ops with the functions below.
What the graph cannot let follow a pruning keeps its channels (listed by ``explain``): a
channel count used as a number (``x / x.shape[1]``), a constant made inside forward, literal
sizes that are no module attribute. Nothing is changed silently.
"""
from .errors import GraphError, TraceError, UnsupportedOpError
from .groups import ChannelGraph, ChannelGroup, build_graph, explain, kept_positions
from .registry import register_function_rule, register_method_rule, register_module_rule

__all__ = [
    "ChannelGraph", "ChannelGroup", "GraphError", "TraceError", "UnsupportedOpError",
    "build_graph", "explain", "kept_positions", "register_function_rule", "register_method_rule",
    "register_module_rule",
]
