"""One streaming pass of calibration data through a model, for data-driven criteria.

:func:`run_calibration` runs the graph's traced code (``graph.traced``) on the model's own
modules once per batch with an :class:`torch.fx.Interpreter` that

* executes the graph only up to the last requested node (the classifier of a model whose
  feature maps are all inside the backbone is never run),
* hands each requested node's output to ``consume(node_name, tensor)`` as soon as it is
  computed and keeps it only as long as later nodes of the same forward need it,
* clears its environment after every batch,

so no feature map outlives its batch, nothing is written to disk and memory stays at one
forward's working set plus the accumulators' per-channel sums. The model runs in ``eval()``
mode under ``torch.no_grad()``; the training flag of every module is restored afterwards.

Calibration data is an iterable of batches (a list, a ``DataLoader``); a batch is a tensor of
inputs, an ``(inputs, targets)`` pair (tuple or list, what a ``DataLoader`` of a labelled
dataset yields) or a one-element ``(inputs,)``; ``inputs`` may itself be a tuple of tensors for
a model with several inputs. A single tensor is taken as one batch. A batch holding NaN/inf
(inputs, or floating-point targets) is refused with :class:`CalibrationDataError` naming it.

Targets are dropped unless a consumer asks for them (``run_calibration(...,
with_targets=True)``: ``consume(node, tensor, targets)``, for criteria that need labels, such
as the class separability of FSDP); a batch without targets is then refused with
:class:`CalibrationLabelsError` naming it.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError, PrunekitError
from ..graph import ChannelGraph
from .base import ScoreError


class CalibrationDataError(ScoreError, DataError):
    """A calibration batch holds NaN/inf values: no criterion can score channels from it."""


class CalibrationLabelsError(ScoreError, DataError):
    """A criterion that needs labels got a calibration batch without targets."""


def require_targets(targets, index: int, what: str = "calibration") -> torch.Tensor:
    """``targets`` of batch ``index``, or CalibrationLabelsError saying what is needed."""
    if not isinstance(targets, torch.Tensor):
        found = "no targets" if targets is None else f"{type(targets).__name__} targets"
        raise CalibrationLabelsError(
            f"{what} needs labelled calibration data, but calibration batch {index} (counting "
            f"from 0) has {found}: give (inputs, targets) batches, e.g. a DataLoader of a "
            "labelled dataset")
    return targets


def check_finite_batch(inputs: tuple, targets, index: int, what: str = "calibration") -> None:
    """CalibrationDataError when a floating-point tensor of batch ``index`` is not finite."""
    named = [(f"input {k}", t) for k, t in enumerate(inputs)]
    if isinstance(targets, torch.Tensor):
        named.append(("targets", targets))
    for label, tensor in named:
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CalibrationDataError(
                    f"{what}: calibration batch {index} (counting from 0) holds {bad} NaN/inf "
                    f"value(s) in its {label} (shape {list(tensor.shape)}); channel scores "
                    "computed from it would be NaN or meaningless. Check the calibration data "
                    "and its preprocessing (normalisation, decoding) for NaN/inf")


def split_batch(batch) -> tuple[tuple, torch.Tensor | None]:
    """``(inputs tuple, targets or None)`` of one calibration batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        inputs = batch[0]
        targets = batch[1] if len(batch) == 2 else None
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        if inputs and all(isinstance(t, torch.Tensor) for t in inputs):
            return inputs, targets
    raise ValueError(f"a calibration batch must be a tensor of inputs, an (inputs, targets) "
                     f"pair or (inputs,); got {type(batch).__name__}"
                     + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def iter_batches(calibration, max_batches: int | None = None, device=None,
                 what: str = "calibration") -> Iterator[tuple[tuple, torch.Tensor | None]]:
    """``(inputs, targets)`` of at most ``max_batches`` batches, moved to ``device``; a batch
    with NaN/inf raises :class:`CalibrationDataError` (``what`` starts its message)."""
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    for i, batch in enumerate(calibration):
        if max_batches is not None and i >= max_batches:
            break
        inputs, targets = split_batch(batch)
        check_finite_batch(inputs, targets, i, what)
        if device is not None:
            inputs = tuple(t.to(device, non_blocking=True) for t in inputs)
            if isinstance(targets, torch.Tensor):
                targets = targets.to(device, non_blocking=True)
        yield inputs, targets


def check_max_batches(max_batches):
    if max_batches is not None and (isinstance(max_batches, bool)
                                    or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    return max_batches


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def batch_count(calibration, max_batches: int | None) -> int | None:
    if isinstance(calibration, torch.Tensor):
        return 1
    try:
        n = len(calibration)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


class training_flags:
    """Context manager: remember every module's ``training`` flag and restore it on exit."""

    def __init__(self, *modules: nn.Module):
        self.flags = [(m, m.training) for root in modules for m in root.modules()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


class moved_to:
    """Context manager: run ``model`` on ``device`` (if given) and move it back on exit."""

    def __init__(self, model: nn.Module, device):
        self.model = model
        self.device = torch.device(device) if device is not None else None
        self.original = model_device(model)

    def __enter__(self) -> torch.device:
        if self.device is not None and self.device != self.original:
            self.model.to(self.device)
            return self.device
        return self.original

    def __exit__(self, *exc):
        if self.device is not None and self.device != self.original:
            self.model.to(self.original)
        return False


def truncated_graph(gm: fx.GraphModule, wanted: Iterable[str]
                    ) -> tuple[fx.Graph, dict[fx.Node, str]]:
    """A copy of ``gm.graph`` that stops after the last wanted node and returns nothing, and
    {copied wanted node: its name in ``gm.graph``}."""
    wanted = set(wanted)
    nodes = list(gm.graph.nodes)
    names = {n.name for n in nodes}
    missing = wanted - names
    if missing:
        raise ValueError(f"feature-map nodes {sorted(missing)[:5]} are not in the traced graph")
    last = max((i for i, n in enumerate(nodes) if n.name in wanted), default=-1)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    copied: dict[fx.Node, str] = {}
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if i > last and node.op != "placeholder":
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
        if node.name in wanted:
            copied[env[node]] = node.name
    graph.output(None)
    return graph, copied


def _resolves(root: nn.Module, target: str) -> bool:
    try:
        obj = root
        for part in target.split("."):
            obj = getattr(obj, part)
        return True
    except AttributeError:
        return False


def live_root(gm: fx.GraphModule, model: nn.Module | None, graph: fx.Graph) -> nn.Module:
    """``model`` itself when every module/attribute the graph uses resolves in it (so the pass
    always runs the live model, even if the graph was traced on a copy), else ``gm``."""
    if model is None or model is gm:
        return gm
    targets = [n.target for n in graph.nodes if n.op in ("call_module", "get_attr")]
    return model if all(_resolves(model, t) for t in targets) else gm


class FeatureTap(fx.Interpreter):
    """Runs a truncated copy of a traced model, passing wanted node outputs to ``consume``.

    A wanted value that no later node uses is dropped right after ``consume`` returns; the
    others are freed by the interpreter after their last use. ``consume`` must not keep them.
    """

    def __init__(self, gm: fx.GraphModule, wanted: Iterable[str],
                 consume: Callable[[str, object], None], model: nn.Module | None = None):
        graph, self.wanted = truncated_graph(gm, wanted)  # {node: original name}
        super().__init__(live_root(gm, model, graph), garbage_collect_values=True, graph=graph)
        self.consume = consume
        self.visited: list[str] = []  # wanted nodes seen in the last batch, in order
        self._refusal: tuple[PrunekitError, tuple] | None = None

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        name = self.wanted.get(n)
        if name is not None:
            self.visited.append(name)
            try:
                self.consume(name, result)
            except PrunekitError as error:
                # fx.Interpreter.run appends the graph and a traceback to any error's message;
                # a refusal of ours must stay the one line the CLI prints.
                self._refusal = (error, error.args)
                raise
            if not n.users:
                return None
        return result

    def run_batch(self, *inputs):
        self.visited = []
        self._refusal = None
        try:
            return self.run(*inputs)
        except PrunekitError as error:
            if self._refusal is not None and self._refusal[0] is error:
                error.args = self._refusal[1]
            raise
        finally:
            self.env = {}
            self.args_iter = iter(())


def run_calibration(graph: ChannelGraph, model: nn.Module, calibration, nodes: Iterable[str],
                    consume: Callable[[str, torch.Tensor], None], *,
                    max_batches: int | None = None, device=None, progress: bool = True,
                    desc: str = "calibration",
                    on_batch: Callable[[int], None] | None = None,
                    with_targets: bool = False) -> int:
    """Run ``calibration`` through ``graph.traced`` once, calling ``consume(node, output)`` for
    each requested node of each batch; returns the number of batches processed.

    ``with_targets``: call ``consume(node, output, targets)`` instead, with the batch's targets
    (on the run's device); a batch without targets raises :class:`CalibrationLabelsError`.

    ``device``: where to run (the model is moved there and back); default the model's device,
    to which the batches are moved. ``max_batches``: stop after that many batches (None: all).
    ``on_batch(index)`` is called before each batch runs (so ``consume`` can name it).
    """
    check_max_batches(max_batches)
    gm = getattr(graph, "traced", None)
    if gm is None:
        raise ValueError("the channel graph has no traced module (graph.traced); build it with "
                         "prunekit.build_graph")
    nodes = list(dict.fromkeys(nodes))
    labels: list = [None]  # the running batch's targets, for a consumer that asks for them
    sink = (lambda node, output: consume(node, output, labels[0])) if with_targets else consume
    tap = FeatureTap(gm, nodes, sink, model)
    done = 0
    with training_flags(model, gm), moved_to(model, device) as dev, torch.no_grad():
        model.eval()
        gm.eval()
        batches = tqdm(iter_batches(calibration, max_batches, dev, what=desc), desc=desc,
                       unit="batch", total=batch_count(calibration, max_batches),
                       disable=not progress, leave=False)
        for inputs, targets in batches:
            if with_targets:
                labels[0] = require_targets(targets, done, desc)
            if on_batch is not None:
                on_batch(done)
            tap.run_batch(*inputs)
            done += 1
    if done == 0:
        raise ValueError("the calibration data yielded no batch")
    return done
