"""Runs of consecutive C-kernel convs of a deployed graph executed as one native call.

Why: at batch 1 a conv of a pruned CIFAR ResNet-56 takes 20-60 us on the kernel, and each
call through Python adds 15-25 us of its own (the module call, the eligibility checks, the
output's allocation, ctypes). Measured (AMD EPYC, 1 thread, the deployed L1 50%-MACs
ResNet-56, 55 kernel convs): 3.7 ms a forward, of which 2.2 ms in the kernel. Both networks
of a comparison pay that per conv, which eats the pruned one's lead: the fixed cost does not
shrink with the channels.

:func:`group_native_convs` replaces every run of at least two consecutive graph nodes that
call a kernel conv (:class:`~.native_dense.NativeConv2d`, a StripeConv2d or
:class:`~.fused.FusedStripeConv2d`) by one :class:`NativeSequence` that owns those convs.
For an input shape (and thread count) it plans the run once: every conv's kernel plan, a
workspace in which intermediates that no node outside the run reads share memory once dead,
and a step table the C side walks (``prunekit_stripe_sequence``). The same kernel entry
point runs with the same operands as the convs' own calls, so the outputs are bitwise
those of the module-by-module path, which is also what runs whenever a conv could not take
the kernel on its own (autograd, tracing, ONNX export, a dispatch mode, another device or
dtype, ``use_native = False``, a wrong channel count: the conv's own error).

Above batch 1 the batch runs in chunks of images (``CHUNK_BYTES``; the threads take chunks
in turn, each with its own workspace): every step runs on a chunk before the next chunk, so a
chunk's activations stay in L2 between the convs instead of a whole batch's streaming
through memory between every pair. Measured (AMD EPYC, batch 64, one deployed copy each way
in one process): 9-14% faster on one thread (dense, L1-pruned and SWP ResNet-56), 4-10% on
two. Each chunk's results are then bitwise the convs' own on that chunk; against one call on
the whole batch they may differ in the last bit where the kernel's grouping of images
changes its tiling (seen: a stripe conv with 3 input channels, 6e-8).
"""
from __future__ import annotations

import ctypes
import math
import operator

import torch
from torch import fx, nn

from ..nn import native_call, stripe_native

__all__ = ["NativeSequence", "group_native_convs", "original_named_modules"]


class _Step(ctypes.Structure):
    """Mirror of ``stripe_step`` in stripe_kernel.c."""

    _fields_ = [("plan", ctypes.c_void_p), ("forward", ctypes.c_void_p)] + [
        (name, ctypes.c_int64) for name in ("x", "out", "res", "relu", "threads")]


def _sequence_entry(name: str):
    lib = stripe_native.library()
    entry = getattr(lib, name)
    if entry.restype is not ctypes.c_int64:
        if lib.prunekit_stripe_step_size() != ctypes.sizeof(_Step):
            raise RuntimeError("stripe_kernel.c does not match native_sequence.py (step "
                               "struct size): restart the process")
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        entry.argtypes = ([p, i64, p, p] if name == "prunekit_stripe_sequence" else
                          [p, i64, i64, p, p, i64, i64, p, i64, ctypes.c_int])
        entry.restype = ctypes.c_int64
    return entry


class _Program:
    """A run planned for one set of input shapes and thread count."""

    def __init__(self, plans, convs, wiring, outputs, n_inputs, shapes, threads):
        batches = {s[0] for s in shapes}
        batch = batches.pop() if len(batches) == 1 else None
        shape = [tuple(s) for s in shapes]  # value index -> shape (whole batch)
        for plan, (x, res) in zip(plans, wiring):
            n, c, h, w = shape[x]
            if c != plan.c or not plan.taps:
                raise _Unplannable
            out = (n, plan.f, *plan._out_hw(h, w))
            if res is not None and shape[res] != out:
                raise _Unplannable  # the conv adds it after the kernel (broadcasting)
            shape.append(out)
        # images per chunk: every step on a chunk before the next (stripe_kernel.c)
        self.chunk = m = _chunk_images(batch, shape) if batch else None
        steps, scratch, layouts = [], 0, []
        for plan, conv, (x, res) in zip(plans, convs, wiring):
            n, _, h, w = shape[x]
            lay = plan._layout(m or n, h, w)
            t, floats = plan.threads_and_scratch(lay, 1 if m else threads)
            scratch = max(scratch, floats)
            layouts.append(lay)  # holds the plan structs and their index tensors alive
            steps.append((lay, x, res, int(bool(getattr(conv, "relu", False))), t))
        self.layouts, self.scratch, self.shapes = layouts, scratch, shape
        self.outputs = tuple(outputs)
        per_chunk = [(m,) + s[1:] if m else s for s in shape]
        self.offsets, self.workspace = _share_memory(wiring, outputs, per_chunk, n_inputs)
        table = (_Step * len(steps))()
        for k, (lay, x, res, relu, t) in enumerate(steps):
            # each step runs on the build its plan was laid out for (vector width)
            table[k] = _Step(ctypes.addressof(lay["plan"]), lay["forward_address"], x,
                             n_inputs + k, -1 if res is None else res, relu, t)
        self.table = table
        self.value_array = ctypes.c_void_p * len(shape)
        # threads each running whole chunks, each with its own workspace (1: unchunked)
        self.copies = max(1, min(threads, batch // m)) if m else 1
        if m:
            self.strides = (ctypes.c_int64 * len(shape))(*[
                0 if self.offsets.get(k) is not None else math.prod(per_chunk[k])
                for k in range(len(shape))])
            self.entry = _sequence_entry("prunekit_stripe_sequence_chunked")
        else:
            self.entry = _sequence_entry("prunekit_stripe_sequence")

    def run(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        values = self.value_array()  # per call: two threads may run the same model
        for k, x in enumerate(inputs):
            values[k] = x.data_ptr()
        copies = self.copies
        work = torch.empty(self.workspace * copies) if self.workspace else None
        base = 0 if work is None else work.data_ptr()
        outs = {}
        for index, offset in self.offsets.items():
            if offset is None:
                out = outs[index] = torch.empty(self.shapes[index])
                values[index] = out.data_ptr()
            else:
                values[index] = base + 4 * offset
        if self.chunk:
            failed = self.entry(ctypes.addressof(self.table), len(self.table), len(values),
                                values, self.strides, self.shapes[0][0] // self.chunk,
                                self.workspace, stripe_native._scratch(self.scratch * copies),
                                self.scratch, copies)
        else:
            failed = self.entry(ctypes.addressof(self.table), len(self.table), values,
                                stripe_native._scratch(self.scratch))
        if failed:
            raise MemoryError("the native stripe kernel could not allocate its block buffer")
        return tuple(outs[index] if index in outs else inputs[index] for index in self.outputs)


# A chunk's largest value fits in this much (a share of one core's L2, next to the chunk's
# other live values and the packing buffer): see prunekit_stripe_sequence_chunked.
CHUNK_BYTES = 128 * 1024


def _chunk_images(batch: int, shapes) -> int | None:
    """Images per chunk: the largest divisor of the batch below it whose largest value fits
    CHUNK_BYTES (at least 1); None (no chunks) at batch 1 or when one chunk is the batch."""
    per_image = max(math.prod(s[1:]) for s in shapes) * 4
    fits = [m for m in range(1, batch) if batch % m == 0 and m * per_image <= CHUNK_BYTES]
    m = max(fits) if fits else 1
    return m if batch > 1 and m < batch else None


class _Unplannable(Exception):
    """The run cannot be one native call for these shapes: the convs run one by one."""


def _share_memory(wiring, outputs, shapes, n_inputs):
    """Value index -> float offset into one workspace (None: a fresh tensor, returned to the
    caller), and the workspace's size. An intermediate's memory is reused once its last
    reader has run; a step's output never shares memory with that step's operands."""
    last = {}
    for k, (x, res) in enumerate(wiring):
        for v in (x, res):
            if v is not None:
                last[v] = k
    escaping = set(outputs)
    free, offsets, size = [], {}, 0  # free: (floats, offset) blocks
    for k in range(len(wiring)):
        index = n_inputs + k
        floats = math.prod(shapes[index])
        if index in escaping:
            offsets[index] = None
        else:
            fit = next((b for b in free if b[0] == floats), None)
            if fit is not None:
                free.remove(fit)
                offsets[index] = fit[1]
            else:
                offsets[index] = size
                size += floats + 16  # a gap: a vector past a row end never reads a neighbour
        for v in {x for x in wiring[k] if x is not None}:
            if v >= n_inputs and last.get(v) == k and offsets.get(v) is not None:
                free.append((math.prod(shapes[v]), offsets[v]))
    return offsets, size


class NativeSequence(nn.Module):
    """``convs`` (name -> conv, in order) run as one native call. ``wiring[k] = (x,
    residual or None)``: value indices of conv k's operands (0 .. n_inputs - 1: this module's
    arguments; n_inputs + j: conv j's output); ``outputs``: the value indices returned, as a
    tuple. ``names``: the convs' qualified names in the model they came from."""

    def __init__(self, convs: dict[str, nn.Module], wiring, outputs, n_inputs: int, names=()):
        super().__init__()
        self.convs = nn.ModuleDict(convs)
        self.wiring = tuple((int(x), None if r is None else int(r)) for x, r in wiring)
        self.outputs = tuple(int(i) for i in outputs)
        self.n_inputs = int(n_inputs)
        self.names = tuple(names)  # the convs' names in the graph they came from

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        program = self._program(inputs)
        if program is not None:
            return program.run([x if x.is_contiguous() else x.contiguous() for x in inputs])
        values = list(inputs)
        for conv, (x, res) in zip(self.convs.values(), self.wiring):
            values.append(conv(values[x]) if res is None else conv(values[x], values[res]))
        return tuple(values[i] for i in self.outputs)

    def _program(self, inputs) -> "_Program | None":
        convs = self.convs._modules.values()
        for x in inputs:
            if not native_call.plain_cpu_inference(x):
                return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return None
        plans = []
        for conv in convs:
            if not conv.use_native or not conv._native_supported():
                return None
            plans.append(conv._native_plan())
        plans = tuple(plans)
        key = (tuple(tuple(x.shape) for x in inputs), torch.get_num_threads())
        # key -> (the plans it was made for, the program or None: these shapes run conv by
        # conv); new plans (weights changed) are planned again, unplannable or not
        cache = self.__dict__.setdefault("_programs", {})
        entry = cache.get(key)
        if entry is None or any(a is not b for a, b in zip(entry[0], plans)):
            try:
                program = _Program(plans, list(convs), self.wiring, self.outputs,
                                   self.n_inputs, key[0], key[1])
            except _Unplannable:
                program = None
            if len(cache) > 8:  # a few shapes at a time, not one per batch size ever seen
                cache.clear()
            entry = cache[key] = (plans, program)
        return entry[1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_programs", None)  # raw pointers into this instance's plans
        return state

    def extra_repr(self) -> str:
        return f"{len(self.convs)} convs, {self.n_inputs} inputs -> {len(self.outputs)} outputs"


def _kernel_conv(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module" or node.kwargs or not 1 <= len(node.args) <= 2:
        return None
    module = gm.get_submodule(node.target)
    if not isinstance(module, native_call.NativeCall) or not module.use_native \
            or len(node.args) == 2 and not getattr(module, "residual", False):
        return None
    if not all(isinstance(a, fx.Node) for a in node.args):
        return None
    try:
        if not module._native_supported() or not module._native_plan().taps:
            return None
    except (RuntimeError, ValueError):
        return None
    return module


def group_native_convs(gm: fx.GraphModule, min_length: int = 2) -> list[list[str]]:
    """Replace each run of ``min_length`` or more consecutive kernel-conv nodes of ``gm`` by
    one :class:`NativeSequence` (in place); returns the convs' names, run by run."""
    runs, current = [], []
    for node in gm.graph.nodes:
        conv = _kernel_conv(gm, node)
        if conv is not None:
            current.append((node, conv))
            continue
        if len(current) >= min_length:
            runs.append(current)
        current = []
    if len(current) >= min_length:
        runs.append(current)
    names = []
    for k, run in enumerate(runs):
        names.append(_replace_run(gm, run, f"native_sequence{k}"))
    if runs:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return names


def _replace_run(gm: fx.GraphModule, run, target: str) -> list[str]:
    nodes = [node for node, _ in run]
    inside = set(nodes)
    index: dict[fx.Node, int] = {}
    inputs = []
    for node in nodes:
        for arg in node.args:
            if arg not in inside and arg not in index:
                index[arg] = len(inputs)
                inputs.append(arg)
    for k, node in enumerate(nodes):
        index[node] = len(inputs) + k
    wiring = [(index[node.args[0]], index[node.args[1]] if len(node.args) > 1 else None)
              for node in nodes]
    outputs = [node for node in nodes if any(user not in inside for user in node.users)]
    # fx node names are identifiers; one that is a ModuleDict attribute gets a suffix
    keys = [n.name + "_" if hasattr(nn.ModuleDict, n.name) else n.name for n in nodes]
    module = NativeSequence(dict(zip(keys, (conv for _, conv in run))), wiring,
                            [index[n] for n in outputs],
                            len(inputs), names=[n.target for n in nodes])
    gm.add_submodule(target, module)
    with gm.graph.inserting_before(nodes[0]):
        call = gm.graph.call_module(target, tuple(inputs))
        items = [gm.graph.call_function(operator.getitem, (call, i))
                 for i in range(len(outputs))]
    for node, item in zip(outputs, items):
        node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    return [n.target for n in nodes]


def original_named_modules(model: nn.Module):
    """``model.named_modules()`` with every conv a :class:`NativeSequence` took over named as
    in the graph it came from (``layer1.0.conv1``, not ``native_sequence0.convs.layer1_0_conv1``)
    and the sequences themselves (and their ModuleDicts) left out."""
    renamed, skipped = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, NativeSequence):
            skipped.update((id(module), id(module.convs)))
            prefix = f"{name}.convs." if name else "convs."
            renamed.update({prefix + key: original
                            for key, original in zip(module.convs.keys(), module.names)})
    for name, module in model.named_modules():
        if id(module) not in skipped:
            yield renamed.get(name, name), module
