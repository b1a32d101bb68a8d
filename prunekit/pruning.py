"""``prunekit.prune``: graph -> scores -> plan -> surgery, with MACs/params before and after."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .criteria import get_criterion
from .errors import ConfigError, PrunekitError
from .graph import ChannelGraph, GraphError, build_graph
from .measure import count_macs, count_params
from .measure.context import eval_mode, prepare_inputs
from .plan import PlanError, PlanTarget, group_ratios, resolve_plan, validate_plan
from .plan.macs import MacsEstimator, counts_for_macs  # noqa: F401  (importable from here too)
from .rewrite import apply_rewrites
from .latency_target import LatencySearch
from .sensitivity import measure_sensitivity
from .surgery import ModelSnapshot, apply_plan
from .utils import as_tuple


def reduction(before: int, after: int) -> float:
    """Fraction removed: ``1 - after / before``."""
    return 1 - after / before


@dataclass
class PruningResult:
    """What a pruning did: the plan (JSON-serialisable) and the model's size before and after."""

    plan: dict[str, list[int]]
    group_sizes: dict[str, int]
    criterion: str
    ratios: dict[str, float]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    unreached_modules: list[str] = field(default_factory=list)
    rewrites: list[dict] = field(default_factory=list)  # weights rewritten after surgery
    latency: dict | None = None  # latency_reduction: target, predicted, measured (latency_target)

    macs_reduction = property(lambda self: reduction(self.macs_before, self.macs_after))
    params_reduction = property(lambda self: reduction(self.params_before, self.params_after))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["macs_reduction"] = self.macs_reduction
        d["params_reduction"] = self.params_reduction
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        return (f"{self.criterion}: MACs {self.macs_before:,} -> {self.macs_after:,} "
                f"(-{100 * self.macs_reduction:.1f}%), params {self.params_before:,} -> "
                f"{self.params_after:,} (-{100 * self.params_reduction:.1f}%), "
                f"{len(self.plan)} groups pruned")


def _module_names(model: nn.Module, ignore) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for item in ignore:
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ConfigError("an ignored module is not part of the model")
            out.append(names[id(item)])
        else:
            if item not in dict(model.named_modules()):
                raise ConfigError(f"ignore names unknown module '{item}'")
            out.append(item)
    return out


def prune(model: nn.Module, example_inputs, *, criterion="l1", ratio: float | None = None,
          ratios: dict[str, float] | None = None, macs_reduction: float | None = None,
          ignore=(), round_to: int = 1, calibration=None, leaf_modules=(),
          plan: dict[str, list[int]] | None = None, target: PlanTarget | None = None,
          graph: ChannelGraph | None = None, sensitivity_data=None,
          heldout_data=None, latency_reduction: float | None = None) -> PruningResult:
    """Physically remove channels from ``model`` (in place) and report what changed.

    Exactly one target: ``ratio`` (uniform fraction removed from every prunable group, in
    [0, 1)), ``ratios`` (per group or module name, fnmatch patterns allowed; may be combined
    with ``ratio`` as the default), ``macs_reduction`` (per-group counts that remove this
    fraction of MACs, within 1%), ``latency_reduction`` (that fraction of the latency removed,
    measured on this device on the deployed model; :mod:`prunekit.latency_target`, what was
    reached in ``PruningResult.latency``), an explicit ``plan``, or a :class:`prunekit.plan.PlanTarget`
    (any target kind, e.g. ``PlanTarget(global_ratio=0.5)`` or CHIP's strings).
    ``ignore``: modules (or names) whose output channels are kept, e.g. the classifier.
    ``calibration``: data for activation-based criteria (an iterable of input batches).
    ``graph``: a ChannelGraph already built for this model and these inputs (with the same
    ``ignore``), so the model is not traced again.
    ``sensitivity_data``: batches (``(inputs, labels)`` or inputs) on which each group's
    sensitivity is measured, for ``PlanTarget(macs_reduction=..., allocation="sensitivity")``;
    use held-out data, never the split you report accuracy on.
    ``heldout_data``: labelled held-out batches on which a criterion's gated weight rewrites
    are accepted or undone (:mod:`prunekit.rewrite`; e.g. Central Filter's merges).

    A criterion with ``rewrites(graph, model, plan)`` (FilterSketch, Central Filter) changes
    the kept weights after surgery; what it did is in ``PruningResult.rewrites``.
    """
    target = _single_target(ratio, ratios, macs_reduction, plan, target, round_to,
                            latency_reduction)
    if target.needs_sensitivity and sensitivity_data is None:
        raise ConfigError("allocation 'sensitivity' measures each group on data: pass "
                          "sensitivity_data=batches (a few held-out batches, e.g. of 'val')")
    criterion = get_criterion(criterion)
    if getattr(criterion, "needs_heldout", False) and heldout_data is None:
        raise ConfigError(f"criterion '{criterion.name}' "
                          "accepts its weight rewrites only if held-out accuracy does not drop: "
                          "pass heldout_data=batches (labelled held-out batches, e.g. of 'val'), "
                          "or turn the check off in the criterion's options")
    example_inputs = as_tuple(example_inputs)
    ignore = _module_names(model, ignore)
    snapshot = ModelSnapshot(model)
    progress = {"surgery": False}
    try:
        return _prune(model, example_inputs, criterion, target, ignore, calibration,
                      leaf_modules, graph, progress, sensitivity_data, heldout_data)
    except BaseException as exc:  # Ctrl-C during surgery must not leave a half-pruned model
        error = _after_restore(exc, snapshot.restore(), progress["surgery"])
        if error is exc:
            raise
        raise error from exc


def _prune(model, example_inputs, crit, target, ignore, calibration, leaf_modules,
           graph, progress, sensitivity_data, heldout_data) -> PruningResult:
    if graph is None:
        graph = build_graph(model, example_inputs, leaf_modules=leaf_modules, ignore=ignore)
    macs_before, params_before = count_macs(model, example_inputs), count_params(model)
    latency = None
    if target.kind == "plan":
        kept = resolve_plan(graph, model, target)
    else:
        scores = crit.score(graph, model, calibration)
        curves = None
        if target.needs_sensitivity:
            curves = measure_sensitivity(model, graph, scores, sensitivity_data,
                                         ratios=target.sensitivity_ratios,
                                         metric=target.sensitivity_metric,
                                         round_to=target.round_to)
        latency = (LatencySearch(model, example_inputs, target)
                   if target.kind == "latency_reduction" else None)
        kept = resolve_plan(graph, model, target, scores, example_inputs,
                            macs_before=macs_before, curves=curves, latency=latency)
    validate_plan(graph, kept)
    _check_something_removed(graph, target, kept)
    rewrites = crit.rewrites(graph, model, kept) if hasattr(crit, "rewrites") else []
    shapes_before = _output_shapes(model, example_inputs)
    progress["surgery"] = True
    apply_plan(model, graph, kept)
    rewrite_log = apply_rewrites(model, rewrites, heldout_data) if rewrites else []
    shapes_after = _output_shapes(model, example_inputs)
    if shapes_after != shapes_before:
        raise GraphError(f"the pruned model's outputs have shapes {shapes_after} instead of "
                         f"{shapes_before}: the channel graph mis-maps an op of this model. "
                         "Run prunekit.explain(model, inputs) to see its groups, and ignore the "
                         "module or register a channel rule for it")
    return PruningResult(
        plan={k: [int(i) for i in v] for k, v in kept.items()},
        group_sizes={g.name: g.size for g in graph.groups},
        criterion=getattr(crit, "name", str(crit)), ratios=group_ratios(graph, target),
        macs_before=macs_before, macs_after=count_macs(model, example_inputs),
        params_before=params_before, params_after=count_params(model),
        unreached_modules=graph.unreached, rewrites=rewrite_log,
        latency=latency.report if latency is not None else None)


UNCHANGED = "prunekit.prune failed, so the model was left unchanged"


def _after_restore(exc: BaseException, changed: list[str], after_surgery: bool) -> BaseException:
    """The error to raise once the model is restored: the same PrunekitError with the
    restoration said; a GraphError for an unexpected failure after surgery (a pruned model
    that no longer runs means the graph mis-mapped something); anything else as it was."""
    if changed:
        note = (f"prunekit.prune restored the model, except parameters changed in place during "
                f"the call ({', '.join(changed[:4])}), whose old values were not kept")
    else:
        note = UNCHANGED
    if not isinstance(exc, Exception) or not (after_surgery or isinstance(exc, PrunekitError)):
        return exc  # KeyboardInterrupt; a criterion's or the model's own error before surgery
    if isinstance(exc, PrunekitError):
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]} ({note})",) + exc.args[1:]
        return exc
    return GraphError(f"pruning failed after the channel graph was built: {type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; {note}. "
                      "The graph likely mis-maps an op of this model: run prunekit.explain(model, "
                      "inputs), then ignore the module or register a channel rule for it")


@torch.no_grad()
def _output_shapes(model: nn.Module, example_inputs) -> list[tuple[int, ...]]:
    with eval_mode(model):
        out = model(*prepare_inputs(model, example_inputs))
    return [tuple(t.shape) for t in _tensors(out)]


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _check_something_removed(graph: ChannelGraph, target: PlanTarget,
                             kept: dict[str, list[int]]) -> None:
    """A target that asks for channels to go but removes none is refused: the run would
    otherwise report an unpruned model as pruned (e.g. ``round_to`` above every layer's size)."""
    if target.kind == "plan" or not target.asks_for_removal:
        return
    sizes = {g.name: g.size for g in graph.groups}
    if any(len(indices) < sizes.get(name, len(indices)) for name, indices in kept.items()):
        return
    prunable = graph.prunable_groups()
    largest = max((g.size for g in prunable), default=0)
    if not prunable:
        reason = "the model has no prunable channel group (see prunekit explain)"
    elif target.round_to >= largest:
        reason = (f"round_to={target.round_to} is at least the largest prunable group "
                  f"({largest} channels), so every layer keeps all its channels; use a smaller "
                  "round_to")
    else:
        reason = ("every layer's kept count rounds up to all its channels (the target is too "
                  f"small for groups of {min(g.size for g in prunable)}-{largest} channels"
                  f"{f' with round_to={target.round_to}' if target.round_to > 1 else ''})")
    raise PlanError(f"the {target.kind} target removes no channel: {reason}")


def _single_target(ratio, ratios, macs_reduction, plan, target, round_to,
                   latency_reduction=None) -> PlanTarget:
    given = [ratio is not None or ratios is not None, macs_reduction is not None,
             plan is not None, target is not None, latency_reduction is not None]
    if sum(given) != 1:
        raise PlanError("give exactly one target: ratio/ratios, macs_reduction, "
                        "latency_reduction, plan or target")
    if latency_reduction is not None:
        return PlanTarget(latency_reduction=latency_reduction, round_to=round_to)
    if target is not None:
        return target
    if plan is not None:
        return PlanTarget(plan=plan)
    return PlanTarget(ratio=ratio, ratios=ratios, macs_reduction=macs_reduction,
                      round_to=round_to)
