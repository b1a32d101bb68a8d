"""Paper settings: ratio strings, CHIP/HRank layouts, global ranking, MACs targets."""
import numpy as np
import pytest
import torch

import prunekit
from prunekit.paper_ratios import chip_resnet_counts, conv_rate_counts, parse_ratio_list
from prunekit.plan import PlanError, global_counts, make_plan

X = torch.randn(1, 3, 32, 32)


def test_parse_ratio_list():
    assert parse_ratio_list("[0.]+[0.15]*2+[0.4]*27") == [0.0, 0.15, 0.15] + [0.4] * 27
    assert parse_ratio_list("[0.1, 0.2]*2") == [0.1, 0.2, 0.1, 0.2]
    for bad in ("", "[0.5", "0.5*2", "[1.0]", "[-0.1]", "__import__('os')"):
        with pytest.raises(PlanError):
            parse_ratio_list(bad)


def _chip(crop, sparsity):
    model = prunekit.models.create("cifar_resnet56", chip_stem_crop=crop).eval()
    graph = prunekit.build_graph(model, X)
    counts = chip_resnet_counts(graph, model, sparsity)
    scores = prunekit.criteria.get_criterion("l1").score(graph, model)
    prunekit.prune(model, X, plan=make_plan(graph, scores, {}, counts=counts))
    return model


@pytest.mark.parametrize("sparsity, macs, thop, params, widths", [
    ("[0.]+[0.15]*2+[0.4]*27", 65_168_128, 65_935_872, 485_413, (16, 13, 27, 9, 19, 38)),
    ("[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9", 34_197_184, 34_781_760, 240_793, (16, 9, 19, 8, 12, 19)),
])
def test_chip_resnet56_reproduces_the_paper_architecture(sparsity, macs, thop, params, widths):
    # CHIP README: 65.94M / 0.48M and 34.78M / 0.24M "FLOPs" (thop, BN included; methods.md 0.2)
    model = _chip(True, sparsity)
    assert prunekit.count_macs(model, X) == macs
    assert prunekit.count_macs(model, X, include="thop") == thop
    assert round(thop / 1e6, 2) in (65.94, 34.78)
    assert prunekit.count_params(model) == params
    got = (model.conv1.out_channels, model.layer1[0].conv2.out_channels,
           model.layer2[0].conv2.out_channels, model.layer1[0].conv1.out_channels,
           model.layer2[0].conv1.out_channels, model.layer3[0].conv1.out_channels)
    assert got == widths
    assert model.layer3[0].conv2.out_channels == 64  # stage 3's stream is never pruned
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_chip_without_stem_crop_ties_stem_to_stage1():
    model = _chip(False, "[0.]+[0.15]*2+[0.4]*27")
    assert model.conv1.out_channels == model.layer1[0].conv2.out_channels == 13
    assert prunekit.count_macs(model, X) < 65_168_128


def test_chip_string_of_wrong_length_is_refused():
    model = prunekit.models.create("cifar_resnet20").eval()
    graph = prunekit.build_graph(model, X)
    with pytest.raises(PlanError, match="3 \\+ 9"):
        chip_resnet_counts(graph, model, "[0.]+[0.15]*2+[0.4]*27")


def test_hrank_conv_rates_one_per_convolution():
    model = prunekit.models.create("cifar_resnet56").eval()
    graph = prunekit.build_graph(model, X)
    rates = "[0.1]+[0.60]*35+[0.0]*2+[0.6]*6+[0.4]*3+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]"
    with pytest.warns(UserWarning):  # conv2 rates inside one residual stream conflict
        counts = conv_rate_counts(graph, model, rates)
    assert counts[graph.group("layer1.0.conv1").name] == int(16 * 0.4)
    assert counts[graph.group("conv1").name] == int(16 * 0.9)
    with pytest.raises(PlanError, match="one ratio per convolution"):
        conv_rate_counts(graph, model, "[0.5]*10")


def test_global_ranking_respects_max_ratio_and_budget():
    model = prunekit.models.create("cifar_resnet20").eval()
    graph = prunekit.build_graph(model, X)
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.size) for g in graph.prunable_groups()}
    scores[graph.group("layer1.0.conv1").name] *= 1e-3  # this layer ranks lowest everywhere
    counts = global_counts(graph, scores, 0.3, normalize=None, max_ratio=0.5)
    total = sum(g.size for g in graph.prunable_groups())
    removed = sum(graph.by_name[n].size - k for n, k in counts.items())
    assert removed == int(0.3 * (total - sum(int(g.fixed.sum()) for g in graph.prunable_groups())))
    assert counts[graph.group("layer1.0.conv1").name] == 8  # capped at max_ratio 0.5 of 16
    assert all(k >= graph.by_name[n].size * 0.5 for n, k in counts.items())


@pytest.mark.parametrize("target", [0.3, 0.47, 0.6])
def test_macs_reduction_within_one_percent(target):
    model = prunekit.models.create("cifar_resnet20").eval()
    result = prunekit.prune(model, X, criterion="l1", macs_reduction=target)
    assert target <= result.macs_reduction <= target + 0.01
