"""Weights rewritten after surgery (prunekit.rewrite) and scores that choose their kept set
(prunekit.plan.select.chosen), through prunekit.prune."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import prunekit
from prunekit.criteria import Criterion, get_criterion
from prunekit.errors import ConfigError
from prunekit.plan import PlanError
from prunekit.rewrite import Rewrite, RewriteError, apply_rewrites, heldout_top1, surviving

from conftest import TinyNet, tiny_data

X = torch.randn(2, 3, 8, 8)


class Choosing(dict):
    """Scores whose kept set is given per group (ignoring the ranking)."""

    criterion = "choosing"

    def __init__(self, scores, kept):
        super().__init__(scores)
        self.kept = kept

    def choose(self, group, keep):
        return self.kept(group, keep)


class ChoosingCriterion(Criterion):
    name = "choosing-test"

    def __init__(self, kept):
        self.kept = kept

    def score(self, graph, model, calibration=None):
        # ascending scores: ranking alone would keep the *last* channels
        return Choosing({g.name: np.arange(g.size, dtype=float)
                         for g in graph.prunable_groups()}, self.kept)


class DoubleConsumer(Criterion):
    """Ranks by L1; its rewrite doubles the consumer conv2's weight (gated or not)."""

    name = "double-test"

    def __init__(self, gated=False, factor=2.0):
        self.gated, self.factor = gated, factor
        self.needs_heldout = gated

    def score(self, graph, model, calibration=None):
        return get_criterion("l1").score(graph, model)

    def rewrites(self, graph, model, plan):
        w = model.conv2.weight.detach()
        cols = surviving(graph, plan, "conv2.weight", 1, w.shape[1])
        rows = surviving(graph, plan, "conv2.weight", 0, w.shape[0])
        new = w[rows][:, cols] * self.factor
        return [Rewrite(group=graph.group("conv1").name, values={"conv2.weight": new},
                        what="scale", gated=self.gated)]


def test_chooser_decides_the_kept_set():
    model = TinyNet().eval()
    first = lambda group, keep: list(range(keep))  # noqa: E731
    result = prunekit.prune(model, X, criterion=ChoosingCriterion(first), ratio=0.5,
                            ignore=["fc"])
    for name, kept in result.plan.items():
        assert kept == list(range(len(kept)))
    assert model.conv1.out_channels == 4


def test_chooser_declining_falls_back_to_the_scores():
    model = TinyNet().eval()
    result = prunekit.prune(model, X, criterion=ChoosingCriterion(lambda g, k: None),
                            ratio=0.5, ignore=["fc"])
    assert all(kept == list(range(4, 8)) for kept in result.plan.values())


@pytest.mark.parametrize("bad, message", [
    (lambda g, k: list(range(k + 1)), "instead of"),
    (lambda g, k: [0] * k, "distinct"),
    (lambda g, k: list(range(g.size - k, g.size + 1))[:k] + [g.size], "instead of"),
])
def test_a_bad_choice_is_refused_and_the_model_kept(bad, message):
    model = TinyNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=message):
        prunekit.prune(model, X, criterion=ChoosingCriterion(bad), ratio=0.5, ignore=["fc"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_surviving_maps_pruned_positions_to_original_indices():
    model = TinyNet().eval()
    graph = prunekit.build_graph(model, X, ignore=["fc"])
    group = graph.group("conv1").name
    plan = {group: [1, 4, 6]}
    assert surviving(graph, plan, "conv2.weight", 1, 8).tolist() == [1, 4, 6]
    assert surviving(graph, plan, "conv1.weight", 0, 8).tolist() == [1, 4, 6]
    assert surviving(graph, plan, "conv2.weight", 0, 8).tolist() == list(range(8))


def test_rewrite_is_applied_after_surgery_and_logged():
    model = TinyNet().eval()
    reference = TinyNet().eval()
    reference.load_state_dict(model.state_dict())
    result = prunekit.prune(model, X, criterion=DoubleConsumer(), ratio=0.5, ignore=["fc"])
    kept = result.plan[next(iter(result.plan))]
    expected = reference.conv2.weight.detach()[:, kept] * 2
    conv2_rows = result.plan.get(prunekit.build_graph(reference, X, ignore=["fc"])
                                 .group("conv2").name, list(range(8)))
    assert torch.equal(model.conv2.weight.detach(), expected[conv2_rows])
    assert result.rewrites == [{"group": result.rewrites[0]["group"], "what": "scale",
                                "applied": True}]


def test_gated_rewrite_needs_heldout_data_before_any_work():
    model = TinyNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="heldout_data"):
        prunekit.prune(model, X, criterion=DoubleConsumer(gated=True), ratio=0.5,
                       ignore=["fc"])
    assert model.conv1.out_channels == 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _labelled_batches(model, n=64):
    """Batches labelled by ``model`` itself: it scores 100% on them."""
    data = tiny_data(n, size=8)
    x = data.tensors[0]
    with torch.no_grad():
        y = model(x).argmax(1)
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def test_gate_undoes_a_rewrite_that_lowers_heldout_accuracy():
    torch.manual_seed(0)
    model = TinyNet().eval()
    pruned = TinyNet().eval()
    pruned.load_state_dict(model.state_dict())
    prunekit.prune(pruned, X, criterion="l1", ratio=0.5, ignore=["fc"])
    heldout = _labelled_batches(pruned)  # the plainly pruned model is perfect on these
    wrecked = TinyNet().eval()
    wrecked.load_state_dict(model.state_dict())

    class NegateLogits(DoubleConsumer):  # argmax becomes argmin: top-1 falls to 0
        def rewrites(self, graph, model, plan):
            w = model.fc.weight.detach()
            cols = surviving(graph, plan, "fc.weight", 1, w.shape[1])
            values = {"fc.weight": -w[:, cols], "fc.bias": -model.fc.bias.detach()}
            return [Rewrite("g", values, gated=True)]

    result = prunekit.prune(wrecked, X, criterion=NegateLogits(gated=True), ratio=0.5,
                            ignore=["fc"], heldout_data=heldout)
    entry = result.rewrites[0]
    assert entry["heldout_top1_before"] == 1.0
    assert entry["heldout_top1_after"] < 1.0 and entry["applied"] is False
    assert entry["heldout_top1_after"] == 0.0
    assert torch.equal(wrecked.fc.weight, pruned.fc.weight)  # undone exactly
    assert torch.equal(wrecked.fc.bias, pruned.fc.bias)


def test_gate_keeps_a_rewrite_that_does_not_lower_accuracy():
    torch.manual_seed(0)
    model = TinyNet().eval()
    heldout = _labelled_batches(model)
    # conv2 feeds BN in eval mode: scaling it by 1 changes nothing, so accuracy is equal
    result = prunekit.prune(model, X, criterion=DoubleConsumer(gated=True, factor=1.0),
                            ratio=0.5, ignore=["fc"], heldout_data=heldout)
    assert result.rewrites[0]["applied"] is True


def test_bad_rewrites_leave_the_model_unpruned():
    class WrongShape(DoubleConsumer):
        def rewrites(self, graph, model, plan):
            return [Rewrite("g", {"conv2.weight": torch.zeros(3, 3, 3, 3)})]

    class Unknown(DoubleConsumer):
        def rewrites(self, graph, model, plan):
            return [Rewrite("g", {"nope.weight": torch.zeros(1)})]

    class NonFinite(DoubleConsumer):
        def rewrites(self, graph, model, plan):
            values = super().rewrites(graph, model, plan)[0].values
            return [Rewrite("g", {k: v * float("nan") for k, v in values.items()})]

    for crit, message in ((WrongShape(), "shape"), (Unknown(), "does not have"),
                          (NonFinite(), "NaN")):
        model = TinyNet().eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(RewriteError, match=message):
            prunekit.prune(model, X, criterion=crit, ratio=0.5, ignore=["fc"])
        assert model.conv1.out_channels == 8 and model.conv2.in_channels == 8
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_heldout_top1_needs_labels():
    model = TinyNet().eval()
    with pytest.raises(RewriteError, match="labelled"):
        heldout_top1(model, [torch.randn(4, 3, 8, 8)])
    with pytest.raises(RewriteError, match="no batch"):
        heldout_top1(model, [])
    with pytest.raises(RewriteError, match="pass heldout_data"):
        apply_rewrites(model, [Rewrite("g", {"conv1.weight": model.conv1.weight.detach()},
                                       gated=True)])
