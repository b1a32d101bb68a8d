"""A latency target measured on the deployed model (issue 21 item 2): the closed loop.

:func:`latency_counts` builds the model's :class:`~prunekit.plan.latency_table.LatencyTable`
(cached per device, threads, dtype, batch and layer), measures the deployed unpruned model and
a uniform half-width probe (interleaved) to split the table's non-conv time into a constant and
a volume-proportional part (:meth:`~prunekit.plan.latency_table.LatencyTable.calibrate`), and
hands :func:`~prunekit.plan.latency_plan.counts_for_latency`
a measurer that prunes a *copy* of the model with the candidate counts, deploys it
(:func:`prunekit.deploy`: BatchNorm folded, as a user ships it) and times it interleaved with
the deployed unpruned model (:func:`prunekit.measure.interleaved_latency` with single runs
alternating, ``ROUNDS`` of them): the measured reduction is the median over the pairs of
adjacent runs of ``1 - pruned / unpruned`` at ``latency_batch``. Pairing adjacent runs
cancels load that comes and goes far better than pooled medians do (measured, see
``ROUNDS``); ``1 - median(pruned) / median(unpruned)`` over all runs is reported beside it.

Both models are deployed NCHW (``channels_last=False``) on one conv kernel, the one the table
times (``latency_kernel``): ``"onednn"`` (the default; ``native_convs=False``) or
``"native"`` (prunekit's C kernel for every conv it takes, ``native_convs=True``; what
``deploy``'s ``"auto"`` picks for a pruned CIFAR ResNet at batch 1 here). One layout and kernel
for both keep the comparison about the channels removed (a documented deviation from
``deploy``'s default ``"auto"``, which may choose a different layout or kernel per model). The
model's own device, dtype and torch's current thread count are used throughout; a
measurement on a busy machine is reported (``reliable: false``) and warned about with a
:class:`~prunekit.measure.LatencyWarning`.

This module sits above :mod:`prunekit.surgery` and :mod:`prunekit.deployment` (it prunes and
deploys copies), so the plan package itself never imports them.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from .deployment import deploy
from .measure import interleaved_latency
from .measure.context import model_device_and_dtype
from .measure.latency import warn_unreliable
from .nn import stripe_native
from .plan.latency_plan import LatencyPlan, PlanShapes, counts_for_latency
from .plan.checks import PlanError
from .plan.latency_table import LatencyTable
from .plan.select import keep_count, make_plan
from .surgery import apply_plan
from .utils import as_tuple

__all__ = ["LatencySearch", "latency_counts"]

# The loop's interleaved measurement of one candidate against the unpruned model: single runs
# alternating, the reduction the median of the paired ratios. Measured on this 2-core machine
# under load (other processes using ~1.4 cores), the same pair of ResNet-56s measured 6 times:
# sd of the reduction 0.013 this way, 0.024 for the ratio of pooled medians of the same runs,
# 0.066 for 20 rounds x 5 runs pooled, 0.097 for those rounds' median ratio.
ROUNDS, RUNS, WARMUP = 100, 1, 0
# The calibration probe: every group at this uniform ratio (LatencyTable.calibrate).
PROBE_RATIO = 0.5


def _batch_input(model: nn.Module, example_inputs, batch: int) -> torch.Tensor:
    first = as_tuple(example_inputs)[0]
    device, dtype = model_device_and_dtype(model)
    shape = list(first.shape[1:]) if isinstance(first, torch.Tensor) else list(example_inputs)[1:]
    return torch.randn(batch, *shape, device=device, dtype=dtype)


@dataclass
class LatencySearch:
    """What :func:`prunekit.prune` hands :func:`prunekit.plan.resolve_counts` for a
    ``latency_reduction`` target; after the call, ``report`` says what was reached."""

    model: nn.Module
    example_inputs: tuple
    target: object   # PlanTarget
    timer: object = None       # injected layer timer (tests)
    measurer: object = None    # injected measure(counts) -> {"reduction": ...} (tests)
    report: dict | None = field(default=None)

    def __call__(self, graph, model, scores, example_inputs) -> dict[str, int]:
        plan = latency_counts(self.model, graph, scores, self.example_inputs, self.target,
                              timer=self.timer, measurer=self.measurer)
        self.report = plan.report
        return plan.counts


def latency_counts(model: nn.Module, graph, scores, example_inputs, target, *, timer=None,
                   measurer=None) -> LatencyPlan:
    """Counts for ``target.latency_reduction`` measured on the deployed model (module doc)."""
    if target.latency_kernel == "native" and stripe_native.library() is None:
        raise PlanError(f"latency_kernel='native' times prunekit's C kernel, which cannot run "
                        f"here ({stripe_native.unavailable_reason()}); use latency_kernel="
                        f"'onednn'")
    batch = target.latency_batch
    x = _batch_input(model, example_inputs, batch)
    table = LatencyTable.measure(model, graph, example_inputs, batch=batch,
                                 samples=target.latency_samples, timer=timer,
                                 kernel=target.latency_kernel)
    warn_unreliable("the latency table's measurement", table.warnings)
    shapes = PlanShapes(graph, table, scores, target.round_to)
    if measurer is None:
        measurer = DeployedMeasurer(model, graph, scores, x, target.round_to,
                                    kernel=target.latency_kernel)
    # Calibration: the deployed model measured unpruned and at one uniform probe plan.
    probe = {g.name: keep_count(g, PROBE_RATIO, target.round_to)
             for g in graph.prunable_groups()}
    measured = measurer(probe)
    if "unpruned_ms" in measured:
        table.calibrate(measured["unpruned_ms"]["median"], measured["pruned_ms"]["median"],
                        shapes.shapes(probe))
    else:  # an injected measurer (tests): the table's own sum is the full model
        table.calibrate(table.layers_ms(table.full_shapes()))
    return counts_for_latency(shapes, target.latency_reduction, measure=measurer,
                              tolerance=target.latency_tolerance, steps=target.latency_steps,
                              allocation=target.latency_allocation,
                              rounding=target.latency_rounding, max_ratio=target.max_ratio,
                              thinning=target.latency_thinning)


class DeployedMeasurer:
    """``measure(counts)``: prune a copy, deploy it, time it interleaved with the deployed
    unpruned model; ``{"reduction", "unpruned_ms", "pruned_ms", ...}``."""

    def __init__(self, model, graph, scores, x, round_to, kernel: str = "onednn"):
        self.model, self.graph, self.scores, self.x, self.round_to = model, graph, scores, x, round_to
        # NCHW convs on the kernel the lookup tables time (plan.latency_table): the loop
        # measures the deployment its predictions describe
        self.native = kernel == "native"
        self.unpruned = deploy(model, x, channels_last=False, native_convs=self.native)

    def __call__(self, counts: dict[str, int]) -> dict:
        plan = make_plan(self.graph, self.scores, {}, self.round_to, counts=counts)
        pruned = apply_plan(copy.deepcopy(self.model), self.graph, plan)
        deployed = deploy(pruned, self.x, channels_last=False, native_convs=self.native)
        bs = self.x.shape[0]
        measured = interleaved_latency({"unpruned": self.unpruned, "pruned": deployed}, self.x,
                                       batch_sizes=(bs,), rounds=ROUNDS, runs=RUNS,
                                       warmup=WARMUP, warn=False)
        before = measured.results["unpruned"].batches[bs]
        after = measured.results["pruned"].batches[bs]
        warn_unreliable("the latency target's measurement", measured.warnings)
        per_round = [1 - a / b for a, b in zip(measured.round_medians_ms["pruned"][bs],
                                               measured.round_medians_ms["unpruned"][bs])]
        return {"reduction": statistics.median(per_round),
                "reduction_of_medians": 1 - after.median_ms / before.median_ms,
                "reduction_round_range": [min(per_round), max(per_round)],
                "unpruned_ms": {"median": before.median_ms, "p10": before.p10_ms,
                                "p90": before.p90_ms},
                "pruned_ms": {"median": after.median_ms, "p10": after.p10_ms,
                              "p90": after.p90_ms},
                "batch": bs, "threads": measured.results["pruned"].num_threads,
                "rounds": measured.rounds, "runs_per_round": measured.runs_per_round,
                "deployed": True, "kernel": "native" if self.native else "onednn",
                "native_convs": len(deployed.prunekit_deploy.get("native_convs", [])),
                "machine": measured.machine,
                "warnings": list(measured.warnings), "reliable": not measured.warnings}
