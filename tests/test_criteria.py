"""Pruning criteria against direct (loop) implementations of their definitions.

Every criterion is checked on tiny models against a small implementation of the paper's
formula written here, independent of prunekit's code paths (feature maps come from forward
hooks, not from the fx runner; gradients from ``loss.backward()`` on a copy). CHIP uses
``prunekit.criteria.nuclear.channel_independence``; until that module exists the ``nuclear``
fixture installs a stand-in built from plain SVDs.
"""
from __future__ import annotations

import copy
import importlib
import sys
import types
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.criteria import (APoZ, BNScale, CHIP, CRITERIA, FPGM, HRank, L1Norm, L2Norm,
                               Taylor, combine_scores, get_criterion, run_calibration)
from prunekit.plan import make_plan, ratios_for_groups

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


# ---------------------------------------------------------------------------------------------
# tiny models and data
# ---------------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    """conv-BN-ReLU x3, global pooling, linear: conv3's channels reach the classifier as a
    pooled [B, C] map, whose 4-D source (relu3) the activation criteria use. With
    ``pool=False`` the classifier reads the flattened 8x8 maps: no 4-D map for conv3."""

    def __init__(self, widths=(6, 8, 5), bn=True, classes=3, pool=True, mid_pool=False):
        super().__init__()
        self.use_pool = pool
        self.mid_pool = nn.MaxPool2d(2) if mid_pool else nn.Identity()
        c0, c1, c2 = widths
        self.conv1 = nn.Conv2d(3, c0, 3, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(c0) if bn else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c0, c1, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(c1) if bn else nn.Identity()
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(c1, c2, 3, padding=1, bias=not bn)
        self.bn3 = nn.BatchNorm2d(c2) if bn else nn.Identity()
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2 if pool else c2 * (16 if mid_pool else 64), classes)

    def forward(self, x):
        x = self.mid_pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        if self.use_pool:
            x = self.pool(x)
        return self.fc(torch.flatten(x, 1))


class TwoMapNet(nn.Module):
    """One group seen in two feature maps: all 8 channels after ReLU (read by conv2) and the
    same channels after a sigmoid (read by conv3)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.conv2(x) + self.conv3(torch.sigmoid(x))

    def maps(self, x):
        a = self.relu(self.bn1(self.conv1(x)))
        return a, torch.sigmoid(a)


class SliceNet(TwoMapNet):
    """Reads channels 2..5 by a literal slice: positions that pruning would shift."""

    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.conv2(x) + self.conv3(torch.sigmoid(x[:, 2:6]))


def tiny(seed=0, randomize_norms=None, **kwargs):
    torch.manual_seed(seed)
    model = TinyCNN(**kwargs).eval()
    if randomize_norms is not None:
        randomize_norms(model, seed)
    return model


def graph_of(model, size=8):
    return prunekit.build_graph(model, torch.randn(1, 3, size, size))


def batches(n=2, b=3, size=8, seed=1, labels=False, classes=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(b, 3, size, size, generator=gen)
        out.append((x, torch.randint(0, classes, (b,), generator=gen)) if labels else x)
    return out


def hooked_maps(model, names, data):
    """{module name: [map per batch]} via forward hooks (independent of the fx runner)."""
    maps = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: maps[n].append(out.detach().clone())) for n in names]
    try:
        with torch.no_grad():
            for x in data:
                model(x if isinstance(x, torch.Tensor) else x[0])
    finally:
        for h in handles:
            h.remove()
    return maps


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# direct reference implementations
# ---------------------------------------------------------------------------------------------
def ref_rank(maps):
    """mean over images of matrix_rank of each channel's H x W map, one matrix at a time."""
    ranks, images = None, 0
    for m in maps:
        b, c = m.shape[:2]
        r = np.array([[int(torch.linalg.matrix_rank(m[i, j])) for j in range(c)]
                      for i in range(b)], dtype=float)
        ranks = r.sum(0) if ranks is None else ranks + r.sum(0)
        images += b
    return ranks / images


def ref_ci(maps, decimals=None):
    """CHIP Eq. 3 per image: ||A||_* - ||A without row i||_*, averaged over images."""
    total, images = None, 0
    for m in maps:
        b, c = m.shape[:2]
        ci = np.zeros((b, c))
        for i in range(b):
            a = m[i].reshape(c, -1)
            if decimals is not None:                 # in the maps' precision, as CHIP's code
                a = torch.from_numpy(np.round(a.numpy(), decimals))
            a = a.double()
            full = torch.linalg.matrix_norm(a, ord="nuc")
            for j in range(c):
                rest = torch.cat([a[:j], a[j + 1:]])
                ci[i, j] = float(full - torch.linalg.matrix_norm(rest, ord="nuc"))
        total = ci.sum(0) if total is None else total + ci.sum(0)
        images += b
    return total / images


def ref_apoz(maps):
    zeros, count = None, 0
    for m in maps:
        b, c = m.shape[:2]
        z = np.array([[float((m[i, j] == 0).sum()) / m[i, j].numel() for j in range(c)]
                      for i in range(b)])
        zeros = z.sum(0) if zeros is None else zeros + z.sum(0)
        count += b
    return zeros / count


def ref_distance_sums(w):
    rows = w.detach().double().reshape(w.shape[0], -1)
    return np.array([sum(float(torch.norm(rows[j] - rows[k])) for k in range(len(rows)))
                     for j in range(len(rows))])


def _standin_channel_independence(features, method=None, dtype=torch.float64):
    """Stand-in for prunekit.criteria.nuclear until it exists: batched plain SVDs."""
    features = features.to(dtype)
    b, c, n = features.shape
    full = torch.linalg.svdvals(features).sum(-1)
    others = torch.tensor([[k for k in range(c) if k != i] for i in range(c)])
    reduced = features[:, others]  # [B, C, C-1, N]
    return full[:, None] - torch.linalg.svdvals(reduced).sum(-1)


@pytest.fixture
def nuclear(monkeypatch):
    """The real prunekit.criteria.nuclear if it exists, else a stand-in module."""
    try:
        return importlib.import_module("prunekit.criteria.nuclear")
    except ModuleNotFoundError as exc:
        if exc.name != "prunekit.criteria.nuclear":
            raise
    mod = types.ModuleType("prunekit.criteria.nuclear")
    mod.channel_independence = _standin_channel_independence
    mod.channel_independence_reference = _standin_channel_independence
    monkeypatch.setitem(sys.modules, "prunekit.criteria.nuclear", mod)
    monkeypatch.setattr(prunekit.criteria, "nuclear", mod, raising=False)
    return mod


def zero_channel(model, conv, bn, j):
    """Make channel j of conv+bn output exactly zero after ReLU (and its weights zero)."""
    with torch.no_grad():
        model.get_submodule(conv).weight[j].zero_()
        if model.get_submodule(conv).bias is not None:
            model.get_submodule(conv).bias[j].zero_()
        if bn:
            model.get_submodule(bn).weight[j] = 0.0
            model.get_submodule(bn).bias[j] = 0.0


# ---------------------------------------------------------------------------------------------
# weight criteria
# ---------------------------------------------------------------------------------------------
def test_l2_matches_filter_norms(randomize_norms):
    model = tiny(randomize_norms=randomize_norms)
    scores = L2Norm().score(graph_of(model), model)
    for group, conv in (("conv1", "conv1"), ("conv2", "conv2"), ("conv3", "conv3")):
        w = model.get_submodule(conv).weight.detach()
        ref = [float(torch.sqrt((w[j] ** 2).sum())) for j in range(w.shape[0])]
        np.testing.assert_allclose(scores[group], ref, rtol=1e-6)


def test_fpgm_matches_distance_sums(randomize_norms):
    model = tiny(randomize_norms=randomize_norms)
    scores = FPGM().score(graph_of(model), model)
    for conv in ("conv1", "conv2", "conv3"):
        np.testing.assert_allclose(scores[conv], ref_distance_sums(model.get_submodule(conv).weight),
                                   rtol=1e-6)


def test_fpgm_prunes_the_geometric_median_duplicate():
    model = tiny(widths=(6, 8, 5))
    with torch.no_grad():
        w = model.conv2.weight
        w.add_(3.0)                       # all filters far from the origin: norms say little
        center = w[2:].mean(0)
        w[0] = center                     # a duplicated pair at the centre of the others:
        w[1] = center                     # the geometric median, the most replaceable filter
        w[5] *= 0.2                       # the smallest norm is elsewhere
    graph = graph_of(model)
    fpgm = FPGM().score(graph, model)["conv2"]
    ref = ref_distance_sums(model.conv2.weight)
    np.testing.assert_allclose(fpgm, ref, rtol=1e-6)
    assert set(np.argsort(fpgm)[:2]) == {0, 1}
    assert fpgm[0] == pytest.approx(fpgm[1])
    plan = make_plan(graph, {"conv2": fpgm, **{k: np.ones(graph.by_name[k].size)
                                                for k in ("conv1", "conv3")}},
                     {"conv2": 1 / 8})
    removed = set(range(8)) - set(plan["conv2"])
    assert len(removed) == 1 and removed <= {0, 1}
    l2 = L2Norm().score(graph, model)["conv2"]
    assert int(np.argmin(l2)) == 5          # the norm criterion would have removed another one


def _fpgm_mix_reference(w, n_remove, mix):
    """The reference code's get_filter_similar: norm pre-filter, then cdist among the rest."""
    rows = w.detach().double().reshape(w.shape[0], -1)
    norms = rows.norm(dim=1).numpy()
    n_norm = int(mix * n_remove + 1e-9)
    by_norm = list(np.argsort(norms, kind="stable")[:n_norm])
    rest = [j for j in range(len(rows)) if j not in by_norm]
    sums = {j: sum(float(torch.norm(rows[j] - rows[k])) for k in rest) for j in rest}
    by_dist = sorted(rest, key=lambda j: sums[j])[:n_remove - n_norm]
    return set(by_norm) | set(by_dist)


@pytest.mark.parametrize("mix", [0.25, 0.5])
def test_fpgm_mix_removes_the_reference_set(mix):
    model = tiny(widths=(6, 12, 5), seed=3)
    with torch.no_grad():
        model.conv2.weight[4] *= 0.05      # a tiny filter: the norm stage takes it first
    graph = graph_of(model)
    crit = FPGM(mix_norm_ratio=mix, ratio=0.4)
    scores = crit.score(graph, model)
    plan = make_plan(graph, scores, ratios_for_groups(graph, 0.4))
    removed = set(range(12)) - set(plan["conv2"])
    n_remove = 12 - len(plan["conv2"])
    assert removed == _fpgm_mix_reference(model.conv2.weight, n_remove, mix)
    assert 4 in removed
    by_count = FPGM(mix_norm_ratio=mix, counts={"conv2": len(plan["conv2"])}).score(graph, model)
    np.testing.assert_allclose(by_count["conv2"], scores["conv2"])
    only = FPGM().score(graph, model)["conv2"]
    np.testing.assert_allclose(FPGM(mix_norm_ratio=mix, ratio=0.0).score(graph, model)["conv2"],
                               only)


def test_bn_scale_is_abs_gamma(randomize_norms):
    model = tiny(randomize_norms=randomize_norms)
    with torch.no_grad():
        model.bn2.weight[3] = -2.5         # negative gamma: |gamma| counts
        model.bn2.weight[6] = 0.0
    scores = BNScale().score(graph_of(model), model)
    for group, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
        np.testing.assert_allclose(scores[group], model.get_submodule(bn).weight.abs().detach())
    assert int(np.argmin(scores["conv2"])) == 6 and int(np.argmax(scores["conv2"])) == 3


def test_bn_scale_without_bn_falls_back_to_l1():
    model = tiny(bn=False)
    graph = graph_of(model)
    with pytest.warns(UserWarning, match="no affine normalisation"):
        scores = BNScale().score(graph, model)
    np.testing.assert_allclose(scores["conv2"], L1Norm().score(graph, model)["conv2"])


def ref_combine(size, parts, mode):
    """Loop version of combining per-layer scores: per channel, over the layers covering it."""
    values = [[] for _ in range(size)]
    for pos, vals in parts:
        for p, v in zip(pos, vals):
            if p >= 0:
                values[p].append(v)
    reduce = {"sum": sum, "mean": np.mean, "max": max, "first": lambda v: v[0],
              "last": lambda v: v[-1]}[mode]
    return np.array([reduce(v) if v else np.nan for v in values])


def test_weight_criteria_combine_residual_producers(randomize_norms):
    model = prunekit.models.create("cifar_resnet20").eval()
    randomize_norms(model)
    graph = prunekit.build_graph(model, torch.randn(1, 3, 32, 32))
    group = graph.group("layer1.0.conv2")            # the stage-1 residual stream
    producers = [(model.get_parameter(m.tensor).detach(), p) for m, p in group.producers()
                 if m.tensor.endswith("weight")]
    assert len(producers) >= 2
    norms = [(p, [float(torch.norm(w[j])) for j in range(w.shape[0])]) for w, p in producers]
    dists = [(p, ref_distance_sums(w)) for w, p in producers]
    gammas = [(p, model.get_parameter(m.tensor).detach().abs().numpy())
              for m, p in group.members if m.role == "norm" and m.tensor.endswith(".weight")]
    assert len(gammas) == len(producers)
    for crit, parts, mode in ((L2Norm(), norms, "sum"), (L2Norm(combine="max"), norms, "max"),
                              (FPGM(), dists, "mean"), (FPGM(combine="sum"), dists, "sum"),
                              (BNScale(), gammas, "mean"), (BNScale(combine="max"), gammas, "max")):
        np.testing.assert_allclose(crit.score_group(group, model),
                                   ref_combine(group.size, parts, mode), rtol=1e-6,
                                   err_msg=repr(crit))


def test_combine_scores_maps_of_different_widths():
    parts = [(np.array([0, 1, 2, 3]), np.array([1.0, 2.0, 3.0, 4.0])),
             (np.array([2, -1, 0]), np.array([10.0, 99.0, 20.0]))]
    np.testing.assert_allclose(combine_scores(5, parts, "sum", uncovered=0.0), [21, 2, 13, 4, 0])
    np.testing.assert_allclose(combine_scores(5, parts, "mean", uncovered=0.0),
                               [10.5, 2, 6.5, 4, 0])
    np.testing.assert_allclose(combine_scores(5, parts, "first", uncovered=0.0), [1, 2, 3, 4, 0])
    np.testing.assert_allclose(combine_scores(5, parts, "last", uncovered=0.0), [20, 2, 10, 4, 0])
    with pytest.warns(UserWarning, match="1 of 5 channels"):
        out = combine_scores(5, parts, "max", where="test")
    np.testing.assert_allclose(out, [20, 2, 10, 4, 20])
    assert combine_scores(3, [], "mean") is None


# ---------------------------------------------------------------------------------------------
# activation criteria
# ---------------------------------------------------------------------------------------------
def test_hrank_matches_per_map_ranks(randomize_norms):
    model = tiny(randomize_norms=randomize_norms)
    zero_channel(model, "conv2", "bn2", 5)
    with torch.no_grad():                   # a rank-1 channel: constant map
        model.conv1.weight[2].zero_()
        model.bn1.bias[2] = 0.7
    data = batches()
    maps = hooked_maps(model, ["relu1", "relu2", "relu3"], data)
    graph = graph_of(model)
    scores = HRank(progress=False).score(graph, model, data)
    np.testing.assert_allclose(scores["conv1"], ref_rank(maps["relu1"]))
    np.testing.assert_allclose(scores["conv2"], ref_rank(maps["relu2"]))
    # conv3 is consumed as pool -> flatten: the 4-D map before the pooling counts
    np.testing.assert_allclose(scores["conv3"], ref_rank(maps["relu3"]))
    assert scores["conv1"][2] == 1.0
    assert int(np.argmin(scores["conv2"])) == 5 and scores["conv2"][5] == 0.0


def test_maps_before_pooling_are_used(randomize_norms, nuclear):
    """relu1 -> maxpool -> conv2: the papers hook the ReLU, not the pooled map."""
    model = tiny(randomize_norms=randomize_norms, mid_pool=True)
    graph = graph_of(model)
    assert [n for n, _ in graph.group("conv1").feature_maps()] != ["relu1"]  # the pooled map
    data = batches()
    relu1 = hooked_maps(model, ["relu1"], data)["relu1"]
    for crit, ref in ((HRank, ref_rank), (CHIP, ref_ci), (APoZ, lambda m: -ref_apoz(m))):
        np.testing.assert_allclose(crit(progress=False).score(graph, model, data)["conv1"],
                                   ref(relu1), rtol=1e-4, atol=1e-4, err_msg=crit.name)


def test_groups_without_a_4d_map(randomize_norms, nuclear):
    model = tiny(randomize_norms=randomize_norms, pool=False)   # fc reads flattened 8x8 maps
    graph = graph_of(model)
    data = batches()
    for crit in (HRank(progress=False), CHIP(progress=False)):
        with pytest.warns(UserWarning, match="group 'conv3' has no usable feature map"):
            scores = crit.score(graph, model, data)
        np.testing.assert_allclose(scores["conv3"], L1Norm().score(graph, model)["conv3"])
    # apoz reads the flattened map position by position: the same zeros as relu3's
    relu3 = hooked_maps(model, ["relu3"], data)["relu3"]
    np.testing.assert_allclose(APoZ(progress=False).score(graph, model, data)["conv3"],
                               -ref_apoz(relu3))


def test_chip_matches_direct_svds(randomize_norms, nuclear):
    model = tiny(randomize_norms=randomize_norms)
    zero_channel(model, "conv1", "bn1", 1)
    data = batches()
    maps = hooked_maps(model, ["relu1", "relu2"], data)
    graph = graph_of(model)
    scores = quiet(CHIP(progress=False).score, graph, model, data)
    np.testing.assert_allclose(scores["conv1"], ref_ci(maps["relu1"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores["conv2"], ref_ci(maps["relu2"]), rtol=1e-4, atol=1e-4)
    assert int(np.argmin(scores["conv1"])) == 1 and abs(scores["conv1"][1]) < 1e-4
    rounded = quiet(CHIP(round_decimals=1, progress=False).score, graph, model, data)
    np.testing.assert_allclose(rounded["conv2"], ref_ci(maps["relu2"], decimals=1),
                               rtol=1e-6, atol=1e-6)


def test_chip_passes_method_and_imports_nuclear_lazily(nuclear, monkeypatch):
    seen = []

    def spy(features, **kwargs):
        seen.append((tuple(features.shape), kwargs))
        return torch.zeros(features.shape[:2])

    monkeypatch.setattr(nuclear, "channel_independence", spy)
    model = tiny()
    crit = CHIP(method="secular", dtype="float32", ci_options={"chunk_elements": 4096},
                progress=False)
    quiet(crit.score, graph_of(model), model, batches(n=1, b=2))
    assert seen and all(kw == {"method": "secular", "dtype": torch.float32,
                               "chunk_elements": 4096} for _, kw in seen)
    assert {shape for shape, _ in seen} == {(2, 6, 64), (2, 8, 64), (2, 5, 64)}  # [B, C, H*W]


def test_apoz_counts_zeros(randomize_norms):
    model = tiny(randomize_norms=randomize_norms)
    zero_channel(model, "conv2", "bn2", 0)
    data = batches()
    maps = hooked_maps(model, ["relu1", "relu2", "relu3"], data)
    scores = APoZ(progress=False).score(graph_of(model), model, data)
    np.testing.assert_allclose(scores["conv1"], -ref_apoz(maps["relu1"]))
    np.testing.assert_allclose(scores["conv2"], -ref_apoz(maps["relu2"]))
    np.testing.assert_allclose(scores["conv3"], -ref_apoz(maps["relu3"]))
    assert scores["conv2"][0] == -1.0 and int(np.argmin(scores["conv2"])) == 0


def test_maps_of_one_group_combine_per_channel(nuclear):
    torch.manual_seed(0)
    model = TwoMapNet().eval()
    graph = graph_of(model)
    group = graph.group("conv1")
    assert sorted(len(p) for _, p in group.feature_maps()) == [8, 8]
    data = batches(n=2, b=2)
    with torch.no_grad():
        first = [model.maps(x)[0] for x in data]
        second = [model.maps(x)[1] for x in data]
    for crit, ref in ((HRank, ref_rank), (CHIP, ref_ci), (APoZ, lambda m: -ref_apoz(m))):
        a, b = ref(first), ref(second)
        expected = {"mean": (a + b) / 2, "sum": a + b, "first": a, "last": b}
        for mode, want in expected.items():
            got = quiet(crit(combine=mode, progress=False).score, graph, model, data)["conv1"]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4,
                                       err_msg=f"{crit.name} combine={mode}")


def test_literal_channel_slice_keeps_the_group_unscored():
    # x[:, 2:6] would read other channels once some are removed, so the group is fixed and
    # criteria have nothing to score there.
    model = SliceNet().eval()
    graph = graph_of(model)
    assert not graph.group("conv1").prunable
    scores = quiet(HRank(progress=False).score, graph, model, batches(n=1, b=2))
    assert "conv1" not in scores


def test_residual_streams_get_finite_scores(nuclear):
    model = prunekit.models.create("cifar_resnet20").eval()
    graph = prunekit.build_graph(model, torch.randn(1, 3, 32, 32))
    group = graph.group("layer3.0.conv2")        # the 64-channel residual stream
    assert group.size == 64
    widths = {len(p) for _, p in group.feature_maps()}
    assert 64 in widths and len(group.feature_maps()) >= 2
    data = batches(n=1, b=2, size=32)
    for crit in (HRank(progress=False), CHIP(progress=False)):
        scores = quiet(crit.score, graph, model, data)
        assert set(scores) == {g.name for g in graph.prunable_groups()}
        for g in graph.prunable_groups():
            assert scores[g.name].shape == (g.size,)
            assert np.isfinite(scores[g.name]).all(), (crit.name, g.name)
        # the stream's score: the mean over the block outputs (the last one through the
        # classifier's pooled input), each a post-ReLU map found here by forward hooks
        fx_nodes = {n.name: n for n in graph.traced.graph.nodes}
        sources, pos = [], []
        for name, p in group.feature_maps():
            node = fx_nodes[name]
            while node.op != "call_module" or not isinstance(model.get_submodule(node.target),
                                                              nn.ReLU):
                node = node.args[0]
            sources.append(node.target)
            pos.append(p)
        assert len(set(sources)) == len(sources) >= 2
        hooked = hooked_maps(model, sources, data)
        ref = ref_rank if crit.name == "hrank" else ref_ci
        expected = combine_scores(64, [(p, ref(hooked[m])) for m, p in zip(sources, pos)], "mean")
        np.testing.assert_allclose(scores[group.name], expected, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# the calibration runner
# ---------------------------------------------------------------------------------------------
def test_runner_visits_requested_nodes_once_per_batch_and_frees_maps():
    model = tiny()
    graph = graph_of(model)
    model.train()
    model.bn2.eval()                       # a mixed state, restored exactly
    calls = {"conv1": 0, "fc": 0}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda *a, n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls]
    refs: list[weakref.ref] = []
    seen: list[str] = []
    modes = []
    yielded = {"n": 0}

    def data():
        for x in batches(n=3):
            # between batches no captured feature map may still be alive
            assert all(r() is None for r in refs), "a feature map outlived its batch"
            yielded["n"] += 1
            yield x

    def consume(node, x):
        seen.append(node)
        refs.append(weakref.ref(x))
        modes.append(model.training or model.bn1.training)

    try:
        done = run_calibration(graph, model, data(), ["relu2", "relu1"], consume,
                               progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert done == 3 and yielded["n"] == 3
    assert seen == ["relu1", "relu2"] * 3
    assert calls == {"conv1": 3, "fc": 0}    # one forward per batch, stopped after relu2
    assert not any(modes)                    # eval mode while capturing
    assert all(r() is None for r in refs)
    assert model.training and model.conv1.training and not model.bn2.training

    assert run_calibration(graph, model, batches(n=5), ["relu1"], lambda n, x: None,
                           max_batches=2, progress=False) == 2
    # a graph traced on a copy runs the live model's weights
    other = copy.deepcopy(model)
    zero_channel(model, "conv1", "bn1", 0)
    maxima = []
    run_calibration(graph_of(other), model, batches(n=1), ["relu1"],
                    lambda n, x: maxima.append(float(x[:, 0].abs().max())), progress=False)
    assert maxima == [0.0]
    with pytest.raises(ValueError, match="not in the traced graph"):
        run_calibration(graph, model, batches(n=1), ["nope"], lambda n, x: None, progress=False)


def test_runner_accepts_labelled_batches_and_rejects_bad_ones():
    model = tiny()
    graph = graph_of(model)
    seen = []
    run_calibration(graph, model, batches(n=2, labels=True), ["relu1"],
                    lambda n, x: seen.append(x.shape[0]), progress=False)
    run_calibration(graph, model, [[torch.randn(2, 3, 8, 8), torch.zeros(2)]], ["relu1"],
                    lambda n, x: seen.append(x.shape[0]), progress=False)
    assert seen == [3, 3, 2]
    with pytest.raises(ValueError, match="calibration batch"):
        run_calibration(graph, model, [(1, 2, 3)], ["relu1"], lambda n, x: None,
                        progress=False)
    with pytest.raises(ValueError, match="no batch"):
        run_calibration(graph, model, [], ["relu1"], lambda n, x: None, progress=False)


# ---------------------------------------------------------------------------------------------
# taylor
# ---------------------------------------------------------------------------------------------
def _taylor_by_hand(model, data, layers):
    """{bn or conv: mean over batches of (sum_s g_s w_s)^2 per channel}, via loss.backward()."""
    out = {name: 0.0 for name in layers}
    for x, y in data:
        clone = copy.deepcopy(model).eval()
        F.cross_entropy(clone(x), y).backward()
        for name in layers:
            mod = clone.get_submodule(name)
            c = (mod.weight.grad * mod.weight).reshape(mod.weight.shape[0], -1).sum(1)
            if mod.bias is not None:
                c = c + mod.bias.grad * mod.bias
            out[name] = out[name] + c.detach().double().numpy() ** 2
    return {k: v / len(data) for k, v in out.items()}


def test_taylor_fo_bn_matches_autograd(randomize_norms):
    model = tiny(randomize_norms=randomize_norms)
    data = batches(labels=True)
    ref = _taylor_by_hand(model, data, ["bn1", "bn2", "bn3"])
    scores = Taylor(progress=False).score(graph_of(model), model, data)
    for group, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
        np.testing.assert_allclose(scores[group], ref[bn], rtol=1e-5, atol=1e-12)


def test_taylor_without_bn_uses_the_filters():
    model = tiny(bn=False)
    data = batches(labels=True)
    ref = _taylor_by_hand(model, data, ["conv1", "conv2", "conv3"])
    scores = Taylor(progress=False).score(graph_of(model), model, data)
    for conv in ("conv1", "conv2", "conv3"):
        np.testing.assert_allclose(scores[conv], ref[conv], rtol=1e-5, atol=1e-12)


def test_taylor_momentum_and_gate_combination(randomize_norms):
    model = prunekit.models.create("cifar_resnet20").eval()
    randomize_norms(model)
    graph = prunekit.build_graph(model, torch.randn(1, 3, 32, 32))
    group = graph.group("layer1.0.conv2")
    bns = sorted({m.module for m, _ in group.members if m.role == "norm"})
    assert len(bns) >= 2
    data = batches(n=2, b=2, size=32, labels=True, classes=10)
    per_batch, per_layer = [], []
    for x, y in data:
        clone = copy.deepcopy(model)
        F.cross_entropy(clone(x), y).backward()
        total = np.zeros(group.size)
        layers = []
        for name in bns:
            bn = clone.get_submodule(name)
            pos = next(p for m, p in group.members if m.module == name and m.role == "norm")
            c = (bn.weight.grad * bn.weight + bn.bias.grad * bn.bias).detach().double().numpy()
            total[pos] += c
            layers.append((pos, c ** 2))
        per_batch.append(total ** 2 / len(bns))
        per_layer.append(layers)
    scores = Taylor(progress=False).score(graph, model, data)
    np.testing.assert_allclose(scores[group.name], np.mean(per_batch, 0), rtol=1e-5, atol=1e-14)
    for mode in ("mean", "sum", "max"):
        want = np.mean([ref_combine(group.size, layers, mode) for layers in per_layer], 0)
        got = Taylor(combine=mode, progress=False).score(graph, model, data)[group.name]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-14, err_msg=mode)
    ema = Taylor(momentum=0.9, progress=False).score(graph, model, data)
    np.testing.assert_allclose(ema[group.name], 0.9 * per_batch[0] + 0.1 * per_batch[1],
                               rtol=1e-5, atol=1e-14)


def test_taylor_restores_model_state(randomize_norms):
    model = tiny(randomize_norms=randomize_norms)
    model.conv2.weight.requires_grad_(False)
    model.bn1.weight.requires_grad_(False)
    marker = torch.full_like(model.fc.weight, 7.0)
    model.fc.weight.grad = marker
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    graph = graph_of(model)
    data = batches(labels=True)
    train_scores = Taylor(mode="train", progress=False).score(graph, model, data)
    assert all(np.isfinite(v).all() for v in train_scores.values())
    Taylor(progress=False).score(graph, model, data)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.fc.weight.grad is marker and bool((marker == 7).all())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    assert not model.training and not model.bn1.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k          # BN running stats untouched (train mode)
    with pytest.raises(ValueError, match="targets"):
        Taylor(progress=False).score(graph, model, batches())


# ---------------------------------------------------------------------------------------------
# all criteria: shape, direction, plumbing
# ---------------------------------------------------------------------------------------------
def _score(name, graph, model, data, labelled):
    crit = get_criterion(name, **({"progress": False} if CRITERIA[name].needs_data else {}))
    if not crit.needs_data:
        return crit.score(graph, model)
    needs_labels = name == "taylor" or getattr(CRITERIA[name], "needs_labels", False)
    return quiet(crit.score, graph, model, labelled if needs_labels else data)


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_scores_every_prunable_channel(name, randomize_norms, nuclear):
    model = tiny(randomize_norms=randomize_norms)
    graph = graph_of(model)
    scores = _score(name, graph, model, batches(), batches(labels=True))
    assert set(scores) == {g.name for g in graph.prunable_groups()}
    for g in graph.prunable_groups():
        assert np.asarray(scores[g.name]).shape == (g.size,)
        assert np.isfinite(scores[g.name]).all()


@pytest.mark.parametrize("name", ["l1", "l2", "bn_scale", "hrank", "chip", "apoz"])
def test_a_dead_channel_scores_lowest(name, randomize_norms, nuclear):
    model = tiny(randomize_norms=randomize_norms)
    zero_channel(model, "conv2", "bn2", 3)
    graph = graph_of(model)
    scores = _score(name, graph, model, batches(), batches(labels=True))["conv2"]
    assert int(np.argmin(scores)) == 3, scores
    assert (np.delete(scores, 3) > scores[3]).all()


def test_prune_with_chip_matches_masked_reference(randomize_norms, nuclear,
                                                  assert_outputs_close):
    model = prunekit.models.create("cifar_resnet20").eval()
    randomize_norms(model)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 3, 32, 32)
    calibration = batches(n=2, b=2, size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prunekit.prune(model, x[:1], criterion="chip", ratio=0.3,
                                calibration=calibration)
    assert result.criterion == "chip" and result.plan
    assert result.macs_after < result.macs_before
    graph = prunekit.build_graph(reference, x[:1])
    prunekit.zero_removed_channels(reference, graph, result.plan)
    with torch.no_grad():
        assert_outputs_close(model(x), reference(x), "chip-pruned resnet20")


def test_unknown_names_and_missing_data_are_clear_errors():
    with pytest.raises(ValueError, match="available: .*apoz.*bn_scale.*chip.*fpgm.*hrank.*l1.*"
                                         "l2.*random.*taylor"):
        get_criterion("chp")
    model = tiny()
    x = torch.randn(1, 3, 8, 8)
    for name in ("chip", "hrank", "apoz", "taylor"):
        with pytest.raises(ValueError, match=f"'{name}' needs calibration data"):
            prunekit.prune(copy.deepcopy(model), x, criterion=name, ratio=0.3)
        with pytest.raises(ValueError, match="needs calibration data"):
            get_criterion(name).score(graph_of(model), model)


def test_options_are_validated_and_shown():
    for bad in (lambda: L2Norm(combine="avg"), lambda: FPGM(mix_norm_ratio=1.5),
                lambda: FPGM(mix_norm_ratio=0.25), lambda: BNScale(combine="first"),
                lambda: HRank(combine="max"), lambda: HRank(max_batches=0),
                lambda: CHIP(round_decimals=2.5), lambda: CHIP(dtype=torch.int32),
                lambda: CHIP(dtype="float17"),
                lambda: Taylor(momentum=1.0), lambda: Taylor(mode="test"),
                lambda: Taylor(combine="first")):
        with pytest.raises(ValueError):
            bad()
    assert repr(L2Norm()) == "L2Norm(combine='sum')"
    assert repr(FPGM(mix_norm_ratio=0.25, ratio=0.4)) == \
        "FPGM(combine='mean', mix_norm_ratio=0.25, ratio=0.4)"
    assert repr(CHIP(round_decimals=4)) == "CHIP(combine='mean', round_decimals=4)"
    assert CHIP(dtype="float64").dtype is torch.float64
    assert repr(Taylor(momentum=0.9)) == "Taylor(combine='gate', mode='eval', momentum=0.9)"
    assert repr(get_criterion("apoz", max_batches=5)) == "APoZ(combine='mean', max_batches=5)"
    for name, cls in CRITERIA.items():
        assert cls.name == name and (cls.__doc__ or "").strip()
        assert cls.needs_data == (name in {"hrank", "chip", "apoz", "taylor", "pfp",
                                           "central_filter", "lfe", "class_separability"})
