"""Issue 17: one-shot sensitivity of each group (measured by zeroing, checked against physical
pruning), the sensitivity allocation meeting a MACs target within 1%, the global allocation of a
MACs target, and their errors."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from conftest import SHARED, needs_shared, tiny_data
from prunekit.criteria import get_criterion
from prunekit.errors import ConfigError
from prunekit.plan import PlanError, PlanTarget, counts_for_curves, make_plan
from prunekit.sensitivity import measure_sensitivity


class _Block(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.a, self.bna = nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden)
        self.b, self.bnb = nn.Conv2d(hidden, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, s):
        return torch.relu(s + self.bnb(self.b(torch.relu(self.bna(self.a(s))))))


class ResidualNet(nn.Module):
    """A stem, two residual blocks on one stream, a wider stage after a strided conv, a head:
    groups of several sizes and costs, one stream."""

    def __init__(self, hidden=(24, 12), wide=32):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(*(_Block(16, h) for h in hidden))
        self.down, self.bnd = nn.Conv2d(16, wide, 3, stride=2, padding=1), nn.BatchNorm2d(wide)
        self.head = nn.Linear(wide, 5)
        g = torch.Generator().manual_seed(3)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
                m.bias.data = torch.rand(m.num_features, generator=g) - 0.5
                m.running_var.data = torch.rand(m.num_features, generator=g) + 0.5

    def forward(self, x):
        s = self.blocks(torch.relu(self.bn0(self.stem(x))))
        return self.head(torch.relu(self.bnd(self.down(s))).mean((2, 3)))


X = torch.randn(1, 3, 12, 12)


def _batches(n=2, labels=True):
    ds = tiny_data(n=16 * n, size=12, seed=5, classes=5)
    xs, ys = ds.tensors
    return [(xs[i:i + 16], ys[i:i + 16]) if labels else xs[i:i + 16]
            for i in range(0, len(xs), 16)]


def _setup():
    model = ResidualNet().eval()
    graph = prunekit.build_graph(model, X)
    return model, graph, get_criterion("l1").score(graph, model)


@pytest.mark.parametrize("metric", ["loss", "kl"])
def test_a_groups_cost_is_what_pruning_that_group_alone_costs(metric):
    model, graph, scores = _setup()
    before = copy.deepcopy(model.state_dict())
    batches = _batches(labels=True)
    curves = measure_sensitivity(model, graph, scores, batches, ratios=(0.5,), metric=metric,
                                 progress=False)
    for k, v in model.state_dict().items():  # measuring never changes the model
        assert torch.equal(v, before[k]), k
    assert set(curves) == {g.name for g in graph.prunable_groups()}
    name = "blocks.0.a"
    [(kept, cost)] = curves[name]
    assert kept == 12
    pruned = copy.deepcopy(model)
    plan = make_plan(graph, scores, {}, counts={name: kept})
    prunekit.prune(pruned, X, plan=plan)
    with torch.no_grad():
        def direct(m):
            if metric == "loss":
                return sum(F.cross_entropy(m(x), y, reduction="sum") for x, y in batches) / 32
            return sum(F.kl_div(F.log_softmax(pruned(x), 1), F.log_softmax(model(x), 1),
                                log_target=True, reduction="sum") for x, _ in batches) / 32
        expected = direct(pruned) - (direct(model) if metric == "loss" else 0)
    assert cost == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert cost > 0 if metric == "kl" else cost != 0  # random labels: loss may even fall


def test_auto_metric_uses_kl_without_labels_and_loss_needs_labels():
    model, graph, scores = _setup()
    unlabelled = _batches(labels=False)
    kl = measure_sensitivity(model, graph, scores, unlabelled, ratios=(0.5,), progress=False)
    explicit = measure_sensitivity(model, graph, scores, unlabelled, ratios=(0.5,),
                                   metric="kl", progress=False)
    assert kl == explicit
    with pytest.raises(ConfigError, match="needs batches of .inputs, class labels"):
        measure_sensitivity(model, graph, scores, unlabelled, metric="loss", progress=False)
    with pytest.raises(ConfigError, match="fractions in"):
        measure_sensitivity(model, graph, scores, unlabelled, ratios=(0.5, 1.0), progress=False)
    with pytest.raises(ConfigError, match="at least one batch"):
        measure_sensitivity(model, graph, scores, [], progress=False)


@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("target", [0.2, 0.35, 0.5])
def test_the_sensitivity_allocation_meets_the_macs_target_within_one_percent(target, labels):
    torch.manual_seed(0)
    model = ResidualNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missed tolerance would warn
        result = prunekit.prune(model, X, ignore=["stem"], target=PlanTarget(
            macs_reduction=target, allocation="sensitivity", sensitivity_ratios=(0.25, 0.5, 0.75)),
            sensitivity_data=_batches(labels=labels))
    assert target <= result.macs_reduction <= target + 0.01
    assert result.macs_after == prunekit.count_macs(model, X)
    assert "stem" not in result.plan
    # no group went further than the most-pruned measured ratio
    for name, kept in result.plan.items():
        size = result.group_sizes[name]
        assert len(kept) >= size - int(0.75 * size)


def test_the_allocation_spares_the_groups_that_cost_more():
    model, graph, scores = _setup()
    macs = prunekit.count_macs(model, X)
    names = [g.name for g in graph.prunable_groups()]
    costly, cheap = "blocks.0.a", [n for n in names if n != "blocks.0.a"]
    sizes = {g.name: g.size for g in graph.prunable_groups()}
    curves = {n: [(sizes[n] // 4, 100.0 if n == costly else 1.0)] for n in names}
    counts = counts_for_curves(model, graph, scores, X, 0.3, curves, macs_before=macs)
    assert costly not in counts  # kept whole: any cut of it costs 100x more
    assert counts and all(n in cheap for n in counts)


def test_a_target_the_last_channel_overshoots_warns():
    model, graph, scores = _setup()
    macs = prunekit.count_macs(model, X)
    curves = {"stem": [(4, 1.0)]}  # only the stream: ~6% of the MACs per channel
    with pytest.warns(prunekit.plan.MacsTargetWarning, match="cannot be reached within"):
        counts = counts_for_curves(model, graph, scores, X, 0.2, curves, macs_before=macs)
    assert list(counts) == ["stem"]


def test_an_unreachable_target_with_the_measured_ratios_is_refused():
    model, graph, scores = _setup()
    macs = prunekit.count_macs(model, X)
    curves = {g.name: [(g.size - 1, 0.1)] for g in graph.prunable_groups()}
    with pytest.raises(PlanError, match="out of reach with the measured ratios"):
        counts_for_curves(model, graph, scores, X, 0.6, curves, macs_before=macs)


def test_sensitivity_needs_data_before_anything_happens():
    model = ResidualNet().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="sensitivity_data"):
        prunekit.prune(model, X, target=PlanTarget(macs_reduction=0.3, allocation="sensitivity"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 0.5, "allocation": "sensitivity"}, "shares a macs_reduction target"),
    ({"macs_reduction": 0.3, "allocation": "best"}, "allocation must be one of"),
    ({"macs_reduction": 0.3, "allocation": "global", "stream_scale": 0.5}, "stream_scale"),
    ({"macs_reduction": 0.3, "sensitivity_ratios": (0.5, 1.2)}, "fractions in"),
    ({"macs_reduction": 0.3, "sensitivity_ratios": 0.5}, "fractions in"),
    ({"macs_reduction": 0.3, "sensitivity_metric": "acc"}, "sensitivity_metric"),
])
def test_allocation_options_are_checked(kwargs, match):
    with pytest.raises(PlanError, match=match):
        PlanTarget(**kwargs)


def test_allocation_round_trips_through_a_recipe_dict():
    t = PlanTarget(macs_reduction=0.4, allocation="sensitivity", sensitivity_ratios=[0.3, 0.6])
    assert t.to_dict() == {"macs_reduction": 0.4, "allocation": "sensitivity",
                           "sensitivity_ratios": [0.3, 0.6]}
    assert PlanTarget.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("target", [0.25, 0.45])
def test_the_global_allocation_meets_the_macs_target_by_one_channel(target):
    torch.manual_seed(0)
    model = ResidualNet(hidden=(96, 64, 80), wide=128).eval()  # fine enough for 1%
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = prunekit.prune(model, X, ignore=["stem"], target=PlanTarget(
            macs_reduction=target, allocation="global"))
    assert target <= result.macs_reduction <= target + 0.01
    # its counts are those of one global ranking: some group pruned more than another
    ratios = [1 - len(k) / result.group_sizes[n] for n, k in result.plan.items()]
    assert np.ptp(ratios) > 0


@pytest.mark.shared_data
@needs_shared
def test_the_prune_job_measures_sensitivity_on_val_only(tmp_path, opened_cifar_splits):
    import json

    from prunekit.cli import main
    opened = opened_cifar_splits
    out = tmp_path / "run"
    assert main(["prune", "--model", "cifar_resnet20", "--weights", "pretrained",
                 "--macs-reduction", "0.4", "--allocation", "sensitivity",
                 "--sensitivity-batches", "1", "--sensitivity-batch-size", "16",
                 "--bn-recalibration", "0", "--data", str(SHARED), "--eval-splits",
                 "test-lossless", "--limit", "20", "--latency-batches", "", "--out",
                 str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sensitivity"] == {"batches": 1, "batch_size": 16, "split": "val"}
    assert 0.4 <= 1 - report["pruned"]["macs"] / report["before"]["macs"] <= 0.41
    # measured before, sensitivity on val, measured after: no evaluation split was used
    assert opened == ["test-lossless", "val", "test-lossless"]


def test_methods_that_share_targets_uniformly_refuse_another_allocation(tmp_path, capsys):
    from prunekit.cli import main
    assert main(["prune", "--model", "cifar_resnet20", "--method", "sfp", "--macs-reduction",
                 "0.3", "--allocation", "sensitivity", "--out", str(tmp_path / "run"),
                 "--finetune-epochs", "1", "--data", str(tmp_path / "nodata")]) == 2
    assert "not by allocation 'sensitivity'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "report.json").exists()
