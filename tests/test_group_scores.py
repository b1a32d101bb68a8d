"""Issue 17's parts: group-aware magnitude against a direct computation on a toy residual
net, residual streams pruned at their own ratio, and BN recalibration after one-shot pruning
reading only training images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from conftest import SHARED, needs_shared
from prunekit.criteria import get_criterion
from prunekit.plan import PlanError, PlanTarget
from prunekit.plan.streams import stream_groups


class ToyResidual(nn.Module):
    """stem -> [conv a -> bn a -> relu -> conv b -> bn b] + stem -> head: the stream (stem and
    conv b write it through the add) and one inner group (conv a)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.a, self.bna = nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.b, self.bnb = nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)
        for bn in (self.bn0, self.bna, self.bnb):
            nn.init.uniform_(bn.weight, 0.5, 2.0)
            nn.init.uniform_(bn.bias, -1.0, 1.0)

    def forward(self, x):
        s = torch.relu(self.bn0(self.stem(x)))
        y = self.bnb(self.b(torch.relu(self.bna(self.a(s)))))
        s = torch.relu(s + y)
        return self.head(s.mean((2, 3)))


X = torch.randn(1, 3, 8, 8)


def _direct_inner(model, p):
    """Channel j of conv a: its filter (and no bias), bn a's weight and bias, conv b's input
    column j; |w|^p summed per tensor, averaged over the four tensors, divided by the mean."""
    a = model.a.weight.detach().double().abs().pow(p).sum((1, 2, 3))
    gamma = model.bna.weight.detach().double().abs().pow(p)
    beta = model.bna.bias.detach().double().abs().pow(p)
    b_in = model.b.weight.detach().double().abs().pow(p).sum((0, 2, 3))
    score = ((a + gamma + beta + b_in) / 4).numpy()
    return score / score.mean()


def _direct_stream(model, p):
    """Stream channel j: stem filter + bias, bn0, conv b's filter j, bnb, conv a's input
    column j, the head's input column j: eight tensors, averaged, normalised by the mean."""
    def rows(w, dims):
        return w.detach().double().abs().pow(p).sum(dims) if dims else \
            w.detach().double().abs().pow(p)
    parts = [rows(model.stem.weight, (1, 2, 3)), rows(model.stem.bias, None),
             rows(model.bn0.weight, None), rows(model.bn0.bias, None),
             rows(model.b.weight, (1, 2, 3)), rows(model.bnb.weight, None),
             rows(model.bnb.bias, None), rows(model.a.weight, (0, 2, 3)),
             rows(model.head.weight, (0,))]
    score = (sum(parts) / len(parts)).numpy()
    return score / score.mean()


@pytest.mark.parametrize("name, p", [("group_l1", 1), ("group_l2", 2)])
def test_group_magnitude_matches_a_direct_computation(name, p):
    torch.manual_seed(0)
    model = ToyResidual().eval()
    graph = prunekit.build_graph(model, X, ignore=["head"])
    scores = get_criterion(name).score(graph, model)
    inner = graph.group("a").name
    stream = graph.group("stem").name
    np.testing.assert_allclose(scores[inner], _direct_inner(model, p), rtol=1e-10)
    np.testing.assert_allclose(scores[stream], _direct_stream(model, p), rtol=1e-10)


def test_group_magnitude_options_change_the_reduction():
    torch.manual_seed(0)
    model = ToyResidual().eval()
    graph = prunekit.build_graph(model, X, ignore=["head"])
    inner = graph.group("a").name
    first = get_criterion("group_l1", reduction="first", normalizer="none").score(graph, model)
    np.testing.assert_allclose(first[inner],
                               model.a.weight.detach().double().abs().sum((1, 2, 3)).numpy())
    only_out = get_criterion("group_l1", roles=["out"], normalizer="none",
                             reduction="sum").score(graph, model)
    l1 = get_criterion("l1").score(graph, model)
    np.testing.assert_allclose(only_out[inner], l1[inner])
    with pytest.raises(prunekit.errors.ConfigError, match="reduction must be one of"):
        get_criterion("group_l1", reduction="median")


def test_the_residual_stream_is_detected_and_pruned_at_its_own_ratio():
    torch.manual_seed(0)
    model = ToyResidual().eval()
    graph = prunekit.build_graph(model, X, ignore=["head"])
    assert stream_groups(graph) == [graph.group("stem").name]
    model_a, model_b = ToyResidual().eval(), ToyResidual().eval()
    whole = prunekit.prune(model_a, X, target=PlanTarget(ratio=0.5, stream_scale=0.0,
                                                         ignore=("head",)), ignore=["head"])
    assert model_a.stem.out_channels == 6 and model_a.a.out_channels == 3
    half = prunekit.prune(model_b, X, target=PlanTarget(ratio=0.5, stream_scale=0.5,
                                                        ignore=("head",)), ignore=["head"])
    assert model_b.stem.out_channels == 5 and model_b.a.out_channels == 3  # 6 * (1 - 0.25)
    assert whole.ratios[graph.group("stem").name] == 0.0
    assert half.ratios[graph.group("stem").name] == 0.25


def test_stream_scale_is_checked():
    with pytest.raises(PlanError, match=r"stream_scale must be a number in \[0, 1\]"):
        PlanTarget(ratio=0.3, stream_scale=1.5)
    with pytest.raises(PlanError, match="stream_scale applies to ratio and macs_reduction"):
        PlanTarget(global_ratio=0.3, stream_scale=0.5)


def test_a_macs_target_with_the_streams_kept_still_lands_within_one_percent():
    model = prunekit.models.create("cifar_resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    result = prunekit.prune(model, x, target=PlanTarget(macs_reduction=0.4, stream_scale=0.0))
    reduction = 1 - result.macs_after / result.macs_before
    assert 0.4 <= reduction <= 0.41
    assert model.conv1.out_channels == 16 and model.layer3[0].conv2.out_channels == 64


@pytest.mark.shared_data
@needs_shared
def test_bn_recalibration_after_one_shot_reads_only_training_images(tmp_path,
                                                                   opened_cifar_splits):
    from prunekit.cli import main
    opened = opened_cifar_splits
    out = tmp_path / "run"
    assert main(["prune", "--model", "cifar_resnet20", "--weights", "pretrained", "--ratio",
                 "0.3", "--data", str(SHARED), "--eval-splits", "test-lossless", "--limit", "20",
                 "--latency-batches", "", "--bn-recalibration", "2", "--out", str(out)]) == 0
    import json
    report = json.loads((out / "report.json").read_text())
    assert report["bn_recalibration"] == {"batches": 2, "batch_size": 64, "split": "train"}
    assert report["stage_seconds"]["bn_recalibration"] >= 0
    # measure before, recalibrate (train), measure after: the statistics came from train only
    assert opened == ["test-lossless", "train", "test-lossless"]
