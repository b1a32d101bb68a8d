"""PFP (issue 18, item 4): input-channel sensitivities against a direct loop over patches,
the sample-count and unique-count formulas against direct computations, |S| = 186 for the
CIFAR ResNet-56, one global error level meeting a MACs target (physical pruning equal to the
masked model), and the options and the ``allocation: criterion`` target checked."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from prunekit.criteria import get_criterion
from prunekit.criteria.pfp import (PFP, input_sensitivity, pfp_sample_size, sample_count,
                                   sample_size_from_etas, unique_count)
from prunekit.errors import ConfigError
from prunekit.plan import PlanError, PlanTarget, ScoresWithLevels, counts_for_error_level

pytestmark = pytest.mark.usefixtures("single_thread")

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TARGET = PlanTarget(macs_reduction=0.35, allocation="criterion")
EPS32 = float(np.finfo(np.float32).eps)


def _direct_sensitivity(x, weight, stride=1, padding=0):
    """The definition written out: each image (a signed one as its positive part and its
    negated negative part), each patch p, each filter i: z± = sum W± a over the patch, |z| <=
    eps counted as inf, g = max(W+ a / z+, W- a / z-) per (c, u, v); s_c = the max of g."""
    x, w = x.double(), weight.double()
    points = [x[n] for n in range(len(x))]
    if (x < 0).any():
        points = [p.clamp(min=0) for p in points] + [(-p).clamp(min=0) for p in points]
    out, cin, kh, kw = w.shape
    s = np.zeros(cin)
    for a in points:
        a = torch.nn.functional.pad(a, (padding,) * 4)
        for top in range(0, a.shape[1] - kh + 1, stride):
            for left in range(0, a.shape[2] - kw + 1, stride):
                patch = a[:, top:top + kh, left:left + kw]
                for i in range(out):
                    zp = float((w[i].clamp(min=0) * patch).sum())
                    zm = float((w[i].clamp(max=0) * patch).sum())
                    zp = math.inf if abs(zp) <= EPS32 else zp
                    zm = math.inf if abs(zm) <= EPS32 else zm
                    for c, u, v in itertools.product(range(cin), range(kh), range(kw)):
                        wa = float(w[i, c, u, v] * patch[c, u, v])
                        g = max(max(wa, 0.0) / zp, min(wa, 0.0) / zm)
                        s[c] = max(s[c], g)
    return s


@pytest.mark.parametrize("signed, stride, padding, chunk", [
    (False, 1, 1, 2 ** 22), (True, 1, 0, 2 ** 22), (False, 2, 1, 7), (True, 2, 1, 50)])
def test_sensitivity_matches_the_direct_loop(signed, stride, padding, chunk):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 5, generator=g)
    x = x if signed else x.relu()
    weight = torch.randn(4, 3, 3, 3, generator=g)
    weight[0, 1] = 0  # a filter that ignores channel 1
    s, patches = input_sensitivity(x, weight, stride=stride, padding=padding,
                                   chunk_elements=chunk)
    assert patches == ((5 + 2 * padding - 3) // stride + 1) ** 2
    np.testing.assert_allclose(s.double().numpy(), _direct_sensitivity(x, weight, stride, padding),
                               rtol=1e-5, atol=1e-7)
    assert ((s >= 0) & (s <= 1 + 1e-6)).all()


def test_linear_sensitivity_and_an_all_zero_input():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 6, generator=g)
    weight = torch.randn(5, 6, generator=g)
    s, patches = input_sensitivity(x, weight)
    direct = _direct_sensitivity(x[:, :, None, None], weight[:, :, None, None])
    assert patches == 1
    np.testing.assert_allclose(s.double().numpy(), direct, rtol=1e-5, atol=1e-7)
    zero, _ = input_sensitivity(torch.zeros(2, 6), weight)  # every z counts as inf: g = 0
    assert torch.equal(zero, torch.zeros(6))


def test_unique_count_is_the_expected_number_of_distinct_draws():
    q = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    for m in (1, 2, 3, 4):
        expected = 0.0  # every sequence of m draws, weighted by its probability
        for seq in itertools.product(range(len(q)), repeat=m):
            expected += np.prod(q[list(seq)]) * len(set(seq))
        assert unique_count(q, m) == math.ceil(expected - 1e-12)
    assert unique_count(q, math.inf) == 4  # a zero-sensitivity channel is never drawn
    assert unique_count(np.array([1.0]), 5) == 1


def test_sample_count_formula():
    sens = np.array([0.2, 0.5, 0.3])
    alpha = 2 * 3 * math.log(8 * (64 + 1) * 9 / 1e-16)
    for eps in (0.5, 2.0, 40.0):
        assert sample_count(sens, eps, 64, 9) == math.ceil(3 * (6 + 2 * eps) * alpha / eps ** 2)
    assert sample_count(sens, 1e-300, 64, 9) == math.inf
    assert sample_count(np.zeros(3), 1.0, 64, 9) == 1  # the reference's floor of one sample
    assert sample_count(sens, 1.0, 64, 9, c_constant=1.0) < sample_count(sens, 1.0, 64, 9)


def test_sample_size_is_186_for_the_cifar_resnet56():
    model = prunekit.models.create("cifar_resnet56").eval()
    assert pfp_sample_size(model, torch.randn(1, 3, 32, 32)) == 186
    # eta = 19 * 16384 + 18 * 8192 + 18 * 4096 + 10, eta* = 16384 (the notes' numbers)
    etas = [16384] * 19 + [8192] * 18 + [4096] * 18 + [10]
    assert sum(etas) == 532490 and sample_size_from_etas(etas) == 186
    assert sample_size_from_etas(etas, available=100) == 50  # half the validation split


def _resnet():
    torch.manual_seed(0)
    return prunekit.models.create("cifar_resnet20").eval()


def test_one_error_level_meets_the_macs_target_and_equals_the_masked_model(
        prune_and_compare, assert_matches_zeroed):
    model = _resnet()
    # plan=None: prune_and_compare adds ratio=0.5 unless a target keyword is present
    check = prune_and_compare(model, X, criterion=PFP(progress=False), target=TARGET,
                              plan=None, calibration=[X[:4], X[4:]])
    assert_matches_zeroed(check, "pfp")
    assert TARGET.macs_reduction <= check.result.macs_reduction <= TARGET.macs_reduction + 0.01


def test_counts_follow_one_level_and_scores_are_the_max_over_consumers():
    model = _resnet()
    graph = prunekit.build_graph(model, X[:1])
    crit = PFP(progress=False)
    scores = crit.score(graph, model, [X])
    assert isinstance(scores, ScoresWithLevels)
    levels = [1e-3, 1.0, 30.0, 300.0, 3e3, 1e6]
    counts = [scores.counts_at(eps) for eps in levels]
    for small, large in zip(counts, counts[1:]):  # monotone in the error level
        assert all(large[g] <= small[g] for g in small)
    assert all(v == 1 for v in counts[-1].values())
    found = crit.sensitivities(graph, model, [X])
    group = graph.by_name["layer1.0.conv1"]  # read by layer1.0.conv2 alone
    np.testing.assert_allclose(scores[group.name], found["layer1.0.conv2"][0])
    stream = graph.by_name["conv1"]  # the stage-1 stream: max over every reader
    readers = [m.module for m, _ in stream.members if m.role == "in" and m.module in found]
    assert len(readers) > 2
    expected = np.max([found[r][0] for r in readers], axis=0)
    np.testing.assert_allclose(scores[stream.name][:len(expected)], expected)
    reached = counts_for_error_level(model, graph, scores, X[:1], 0.35)
    assert reached == {**scores.counts_at(scores.chosen_level), **scores.held}


def test_a_group_whose_next_step_overshoots_is_held_and_the_others_follow_the_level():
    model = _resnet()
    graph = prunekit.build_graph(model, X[:1])
    groups = graph.prunable_groups()

    def counts_at(level):  # every group by one fraction; the stem stream jumps 16 -> 1 at 0.3
        frac = level / (1 + level)
        return {g.name: (1 if frac >= 0.3 else g.size) if g.name == "conv1"
                else max(1, g.size - math.floor(frac * g.size)) for g in groups}

    scores = ScoresWithLevels({g.name: np.arange(g.size, dtype=float) for g in groups},
                              counts_at, (1e-6, 1e6), criterion="toy")
    counts = counts_for_error_level(model, graph, scores, X[:1], 0.4)
    assert scores.held == {"conv1": 16} and counts["conv1"] == 16
    at, below = counts_at(scores.chosen_level), counts_at(scores.chosen_level * 0.999)
    assert all(at[g] <= counts[g] <= below[g] for g in counts if g != "conv1")  # ties: in turn
    kept = prunekit.plan.make_plan(graph, scores, {}, counts=counts)
    result = prunekit.prune(_resnet(), X[:1], plan=kept)
    assert 0.4 <= result.macs_reduction <= 0.41


def test_residual_streams_keep_their_width_unless_streams_prune():
    model = _resnet()
    graph = prunekit.build_graph(model, X[:1])
    streams = set(prunekit.plan.streams.stream_groups(graph))
    assert streams == {"conv1", "layer2.0.conv2", "layer3.0.conv2"}
    pruned = PFP(progress=False, streams="prune").score(graph, model, [X])
    kept = PFP(progress=False).score(graph, model, [X])  # streams="keep", the default
    for name in pruned:
        np.testing.assert_array_equal(pruned[name], kept[name])  # the same scores
    assert streams <= set(pruned.counts_at(300.0)) and not streams & set(kept.counts_at(300.0))
    assert all(kept.counts_at(300.0)[g] == pruned.counts_at(300.0)[g] for g in kept.counts_at(1))


def test_the_same_scores_rank_channels_for_a_ratio_target():
    result = prunekit.prune(_resnet(), X[:1], criterion=PFP(progress=False), ratio=0.25,
                            calibration=[X])
    assert 0.2 < result.macs_reduction < 0.6


def test_errors_say_what_is_wrong():
    with pytest.raises(ConfigError, match="needs calibration data"):
        prunekit.prune(_resnet(), X[:1], criterion="pfp", target=TARGET)
    with pytest.raises(PlanError, match="family of kept counts"):
        prunekit.prune(_resnet(), X[:1], criterion="l1", target=TARGET)
    with pytest.raises(PlanError, match="allocation must be one of"):
        PlanTarget(macs_reduction=0.3, allocation="pfp")
    with pytest.raises(PlanError, match="allocation 'criterion' shares a macs_reduction"):
        PlanTarget(ratio=0.3, allocation="criterion")


@pytest.mark.parametrize("options, message", [
    ({"c_constant": 0}, "c_constant"), ({"delta": 1.0}, "delta"), ({"delta": -1}, "delta"),
    ({"chunk_elements": 1.5}, "chunk_elements"), ({"max_batches": 0}, "max_batches"),
    ({"streams": "spare"}, "streams")])
def test_bad_options_say_which(options, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        get_criterion("pfp", **options)


def test_the_target_round_trips_and_a_criterion_family_is_required_by_name():
    target = PlanTarget.from_dict({"macs_reduction": 0.47, "allocation": "criterion"})
    assert target.to_dict() == {"macs_reduction": 0.47, "allocation": "criterion"}
    assert get_criterion("pfp").needs_data and repr(get_criterion("pfp")) == \
        "PFP(c_constant=3.0, delta=1e-16)"


def test_a_layer_reading_nothing_keeps_its_group():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv2(torch.relu(self.conv1(x)) * 0)  # conv2 sees zeros only
            return self.fc(torch.relu(x).mean((2, 3)))

    model = Net().eval()
    graph = prunekit.build_graph(model, X[:1])
    scores = PFP(progress=False).score(graph, model, [X])
    assert scores.counts_at(1e6)["conv1"] == 6  # nothing to judge by: all kept
    with pytest.raises(PlanError, match="out of reach by criterion 'pfp'"):
        prunekit.prune(model, X[:1], criterion=PFP(progress=False), calibration=[X],
                       target=PlanTarget(macs_reduction=0.5, allocation="criterion"))
