"""Central Filter (issue 18, item 3): the similarity matrix against a double loop with the
reference's special cases, the threshold bisection and the greedy central selection against
loop transcriptions of the reference (rank.py) and a hand-worked graph, the chooser through
prune(), the merge's exactness on duplicated channels, the held-out gate, and the options."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import prunekit
from conftest import TinyNet, tiny_data
from prunekit.criteria import get_criterion
from prunekit.criteria.central_filter import (CentralFilter, central_filters, central_selection,
                                              closeness, map_similarity, merge_delegates,
                                              similarity_threshold)
from prunekit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = tiny_data(32)
X = DATA.tensors[0]
CALIBRATION = [X[:16], X[16:]]


def _direct_similarity(maps: np.ndarray) -> np.ndarray:
    """rank.py's hook written out: per image and pair, both constant (or both zero) +1, one
    zero -1, else np.corrcoef; summed over images, divided by their count; diagonal 1. A
    constant non-zero map against a varying one is NaN in the reference: 0 here, as in
    prunekit."""
    b, c = maps.shape[:2]
    D = np.zeros((c, c))
    for i in range(c):
        for j in range(c):
            if i == j:
                D[i, j] = b
                continue
            for k in range(b):
                x, y = maps[k, i].reshape(-1), maps[k, j].reshape(-1)
                if (len(set(x.tolist())) == 1 and len(set(y.tolist())) == 1) or (
                        x.sum() == 0 and y.sum() == 0):
                    D[i, j] += 1
                elif x.sum() == 0 or y.sum() == 0:
                    D[i, j] += -1
                elif len(set(x.tolist())) == 1 or len(set(y.tolist())) == 1:
                    D[i, j] += 0
                else:
                    D[i, j] += np.corrcoef(np.vstack([x, y]))[0][1]
    return D / b


def _special_maps() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    maps = torch.relu(torch.randn(5, 7, 4, 4, generator=g))
    maps[:, 2] = 0                     # always zero
    maps[:, 3] = 0.5                   # constant non-zero
    maps[1, 4] = 0                     # zero on one image
    maps[:, 5] = maps[:, 0] * 3 + 1    # a scaled copy: correlation 1
    maps[2, 6] = 0.25                  # constant on one image
    return maps


def test_similarity_matches_the_double_loop_and_its_special_cases():
    maps = _special_maps()
    D = map_similarity(maps).mean(0).numpy()
    np.fill_diagonal(D, 1.0)
    expected = _direct_similarity(maps.numpy())
    np.testing.assert_allclose(D, expected, atol=1e-12)
    assert D[2, 3] == 1 and D[2, 0] == -1 and D[0, 3] == 0   # const/const, zero, const/varying
    assert D[0, 5] == pytest.approx(1.0)
    np.testing.assert_array_equal(D, D.T)


def test_score_averages_the_post_relu_maps_of_every_calibration_image():
    model = TinyNet().eval()
    scores = CentralFilter(progress=False).score(prunekit.build_graph(model, X[:1]), model,
                                                  CALIBRATION)
    with torch.no_grad():
        first = torch.relu(model.bn1(model.conv1(X)))
        second = torch.relu(model.bn2(model.conv2(first)))
    np.testing.assert_allclose(scores.similarity["conv1"], _direct_similarity(first.numpy()),
                               atol=1e-10)
    np.testing.assert_allclose(scores.similarity["conv2"], _direct_similarity(second.numpy()),
                               atol=1e-10)


# -- rank.py transcribed (union-find, the bisection, closeness, del_filter) --------------------
def _find(F, x):
    while F[x] != x:
        x = F[x]
    return x


def _get_dels(G, N, m):
    dels, F = set(), list(range(N + 1))
    for i in range(N):
        for j, w in enumerate(G[i]):
            if w > m and i != j:
                dels.add(i), dels.add(j)
                if _find(F, i) != _find(F, j):
                    F[_find(F, j)] = _find(F, i)
    return len(dels), len({_find(F, i) for i in dels}), F


def _get_threshold(G, ratio_count, N):
    X, eps = ratio_count, 1e-7
    l, r = np.array(G).min() - eps, np.array(G).max() + eps
    rst = r
    while l < r:
        m = (l + r) / 2
        d, s, F = _get_dels(G, N, m)
        if d - s < X:
            r = m - eps
        elif d - s > X:
            rst, l = l, m + eps
        else:
            return m, d, s, F
    d, s, F = _get_dels(G, N, rst)
    return rst, d, s, F


def _del_filter(D, threshold, F, cdel):
    N = len(D)
    G = [[(j, w) for j, w in enumerate(D[i]) if w > threshold and i != j] for i in range(N)]
    close = []
    for i in range(N):
        total = sum(1024 - w for _, w in G[i])
        close.append(len(G[i]) / total if total > 0 else 0)
    savs, dels, rots, cnt = set(), set(), set(), 0
    delegate = [[] for _ in range(N)]
    ind = np.argsort(close)  # as the code: numpy's default sort orders the ties
    for i in range(N - 1, -1, -1):
        node = ind[i]
        if close[node] > 0:
            if node not in dels and node not in savs and _find(F, node) not in rots:
                savs.add(node), rots.add(_find(F, node))
            for j, _ in G[node]:
                if j not in dels and j not in savs:
                    cnt += 1
                    if cdel > 0 and cnt > cdel:
                        return sorted(set(range(N)) - dels), delegate
                    dels.add(j)
                    delegate[node].append(j)
    return sorted(set(range(N)) - dels), delegate


def _random_similarity(n, seed, levels=None):
    rng = np.random.default_rng(seed)
    D = rng.uniform(-0.4, 1.0, (n, n))
    if levels:
        D = np.round(D * levels) / levels   # ties between pairs
    D = np.triu(D, 1)
    D = D + D.T
    np.fill_diagonal(D, 1.0)
    return D


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 5), (3, 3)])
def test_bisection_and_selection_match_the_reference_loops(seed, levels):
    n = 12
    D = _random_similarity(n, seed, levels)
    for deletable in range(1, n):
        t, count, adjacency, labels = similarity_threshold(D, deletable)
        rt, d, s, F = _get_threshold(D.tolist(), deletable, n)
        assert t == rt and count == d - s
        assert count >= deletable  # the bisection never ends below the wanted count
        kept, delegates = central_selection(adjacency, closeness(D, adjacency), labels,
                                            deletable)
        ref_kept, ref_delegates = _del_filter(D, rt, F, deletable)
        assert kept == ref_kept and delegates == ref_delegates
        assert len(kept) == n - deletable   # exactly the plan's count
        assert sorted(sum(delegates, [])) == sorted(set(range(n)) - set(kept))


def test_bisection_reaches_the_exact_deletable_count():
    D = _random_similarity(16, 7)
    for deletable in range(1, 16):
        t, count, adjacency, _ = similarity_threshold(D, deletable)
        assert count == deletable   # distinct similarities: every count is reachable
        assert ((D > t) & ~np.eye(16, dtype=bool) == adjacency).all()


HAND = np.full((6, 6), 0.1)
for (a, b), w in {(0, 1): 0.9, (0, 2): 0.8, (1, 2): 0.7, (3, 4): 0.95}.items():
    HAND[a, b] = HAND[b, a] = w
np.fill_diagonal(HAND, 1.0)


def test_greedy_selection_on_a_hand_worked_graph():
    # 3 deletable: the first midpoint 0.55 (of 0.1 - eps .. 1 + eps) gives edges 0-1, 0-2,
    # 1-2, 3-4 and exactly 3 deletable. cc: 3 = 4 = 1/1023.05 > 0 = 2/2046.3 > 1 > 2; node 4
    # (a tie with 3; ties="stable": the higher index first) is saved and deletes 3, node 0 is
    # saved and deletes 1 and 2; the isolated 5 is kept.
    t, count, _, _ = similarity_threshold(HAND, 3)
    assert t == pytest.approx(0.55) and count == 3
    kept, delegates = central_filters(HAND, 3, ties="stable")
    assert kept == [0, 4, 5] and delegates == [[1, 2], [], [], [], [3], []]
    # 2 deletable: 0.55 and 0.775 give 3; 0.8875 leaves 0-1 and 3-4: 4 saves and deletes 3,
    # then 1 (tied with 0) saves and deletes 0.
    kept, delegates = central_filters(HAND, 4, ties="stable")
    assert kept == [1, 2, 4, 5] and delegates == [[], [0], [], [], [3], []]


def test_stable_ties_visit_the_higher_index_first():
    pair = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]])
    assert central_filters(pair, 2, ties="stable") == ([1, 2], [[], [0], []])
    big = np.full((40, 40), 0.1)   # 20 isolated pairs, all tied: more than insertion sort's 16
    for i in range(0, 40, 2):
        big[i, i + 1] = big[i + 1, i] = 0.9
    np.fill_diagonal(big, 1.0)
    kept, _ = central_filters(big, 20, ties="stable")
    assert kept == list(range(1, 40, 2))
    kept, _ = central_filters(big, 20)   # numpy's order: one of each pair, whichever
    assert sorted(k // 2 for k in kept) == list(range(20))


def test_merge_follows_the_reference_in_place_channel_order():
    w = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    delegates = [[], [0, 3], [], [4], []]   # 3 is a delegate of 1 and has its own delegate 4
    merged = merge_delegates(w, 1, np.arange(5), delegates)
    expected = w.clone()
    for row in expected:            # main_win.py's adjust_filter
        for j in range(5):
            total = 0.
            for k in delegates[j]:
                total += row[k]
            row[j] += total
    torch.testing.assert_close(merged, expected)


# -- through prune() ---------------------------------------------------------------------------
def test_prune_keeps_exactly_the_central_selection():
    model = TinyNet().eval()
    with torch.no_grad():
        first = torch.relu(model.bn1(model.conv1(X)))
        second = torch.relu(model.bn2(model.conv2(first)))
    direct = {"conv1": _direct_similarity(first.numpy()),
              "conv2": _direct_similarity(second.numpy())}
    result = prunekit.prune(model, X[:1], criterion=CentralFilter("never", progress=False),
                            ratio=0.5, calibration=CALIBRATION)
    for name, D in direct.items():
        assert result.plan[name] == central_filters(D, 4)[0]
    assert result.rewrites == []


def _duplicated() -> TinyNet:
    """conv1's filters 4..7 (and their BN) copy 0..3: channels i and i+4 carry one map."""
    torch.manual_seed(3)
    model = TinyNet().eval()
    with torch.no_grad():
        for p in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias,
                  model.bn1.running_mean, model.bn1.running_var):
            p[4:] = p[:4]
    return model


def _prune_conv1(model, compensate, **kwargs):
    graph = prunekit.build_graph(model, X[:1])
    criterion = CentralFilter(compensate, ties="stable", progress=False)
    return prunekit.prune(model, X[:1], criterion=criterion,
                          ratios={graph.group("conv1").name: 0.5}, calibration=CALIBRATION,
                          **kwargs)


def test_merging_duplicated_channels_is_exact():
    model = _duplicated()
    with torch.no_grad():
        before = model(X)
    result = _prune_conv1(model, "always")
    assert result.plan == {"conv1": [4, 5, 6, 7]}   # each pair's higher index is the centre
    assert result.rewrites[0]["applied"] and result.rewrites[0]["merged_channels"] == 4
    with torch.no_grad():
        torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-5)
    plain = _duplicated()
    _prune_conv1(plain, "never")
    with torch.no_grad():
        assert not torch.allclose(plain(X), before, atol=1e-3)


def test_heldout_gate_keeps_a_merge_that_does_not_lower_accuracy():
    model = _duplicated()
    with torch.no_grad():
        heldout = [(X, model(X).argmax(1))]   # the unpruned model is right on every image
    result = _prune_conv1(model, "heldout", heldout_data=heldout)
    entry = result.rewrites[0]
    assert entry["applied"] and entry["heldout_top1_after"] == 1.0
    assert entry["heldout_top1_after"] >= entry["heldout_top1_before"]


def test_heldout_gate_undoes_a_merge_that_lowers_accuracy():
    model = _duplicated()
    with torch.no_grad():
        model.conv2.weight[:, :4] *= -40   # the removed channels' columns: merged, they dominate
    plain = copy.deepcopy(model)
    _prune_conv1(plain, "never")
    with torch.no_grad():
        heldout = [(X, plain(X).argmax(1))]   # the uncompensated pruned model is always right
    result = _prune_conv1(model, "heldout", heldout_data=heldout)
    entry = result.rewrites[0]
    assert not entry["applied"]
    assert entry["heldout_top1_after"] < entry["heldout_top1_before"] == 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(X), plain(X))


def test_heldout_compensation_refuses_before_any_change_without_heldout_data():
    model = _duplicated()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="heldout_data"):
        _prune_conv1(model, "heldout")
    assert model.conv1.out_channels == 8
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_physical_pruning_equals_the_masked_and_compensated_reference():
    torch.manual_seed(5)
    model = TinyNet().eval()
    reference = copy.deepcopy(model)
    criterion = CentralFilter("always", progress=False)
    result = prunekit.prune(model, X[:1], criterion=criterion, ratio=0.5,
                            calibration=CALIBRATION)
    assert [e["group"] for e in result.rewrites] == ["conv2", "conv1"]  # deepest first
    graph = prunekit.build_graph(reference, X[:1])
    with torch.no_grad():
        for name, consumer in (("conv1", reference.conv2), ("conv2", reference.fc)):
            _, delegates = central_filters(criterion.last_scores.similarity[name], 4)
            consumer.weight.copy_(merge_delegates(consumer.weight, 1, np.arange(8), delegates))
        prunekit.zero_removed_channels(reference, graph, result.plan)
        torch.testing.assert_close(model(X), reference(X), rtol=1e-5, atol=1e-5)


def test_resnet_streams_are_spared_and_inner_groups_clustered():
    from prunekit.models import cifar_resnet20
    model = cifar_resnet20().eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = prunekit.build_graph(model, x[:1])
    scores = CentralFilter(progress=False).score(graph, model, [x])
    inner = {graph.group(f"layer{s}.{b}.conv1").name for s in (1, 2, 3) for b in range(3)}
    assert set(scores.similarity) == inner


def test_registered_and_options_checked():
    assert isinstance(get_criterion("central_filter"), CentralFilter)
    assert get_criterion("central_filter").needs_heldout
    assert not get_criterion("central_filter", compensate="always").needs_heldout
    for bad, match in (({"compensate": "sometimes"}, "compensate"),
                       ({"streams": "concat"}, "streams"), ({"ties": "random"}, "ties")):
        with pytest.raises(ConfigError, match=match):
            CentralFilter(**bad)
    with pytest.raises(ValueError, match="max_batches"):
        CentralFilter(max_batches=0)
    model = TinyNet().eval()
    with pytest.raises(ConfigError, match="calibration"):
        CentralFilter().score(prunekit.build_graph(model, X[:1]), model)


def test_ranking_scores_follow_how_often_a_channel_is_kept():
    scores = CentralFilter.ranking(HAND)
    kept = np.zeros(6)
    for deletable in (1, 2, 2, 3, 3, 4, 5, 5, 5):   # ceil(6 r), r = 0.1 .. 0.9, keeping one
        kept[central_filters(HAND, 6 - deletable)[0]] += 1
    off = HAND - 2 * np.eye(6)
    np.testing.assert_allclose(scores, kept / 9 + (1 - off.max(1)) / 1000)
    assert np.argmax(scores) == 0   # the big cluster's centre at every count


class CatNet(torch.nn.Module):
    """Two conv-BN-ReLU branches concatenated into one conv: a consumer of two groups."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.bn_a(self.conv_a(x)))
        b = torch.relu(self.bn_b(self.conv_b(x)))
        return self.conv3(torch.cat([a, b], 1)).mean((2, 3))


def test_groups_sharing_a_consumer_merge_in_one_rewrite():
    torch.manual_seed(2)
    model = CatNet().eval()
    with torch.no_grad():
        for conv, bn in ((model.conv_a, model.bn_a), (model.conv_b, model.bn_b)):
            for p in (conv.weight, conv.bias, bn.weight, bn.bias):
                p[2:] = p[:2]
        before = model(X)
    graph = prunekit.build_graph(model, X[:1])
    names = [graph.group(m).name for m in ("conv_a", "conv_b")]
    result = prunekit.prune(model, X[:1], criterion=CentralFilter("always", progress=False),
                            ratios={n: 0.5 for n in names}, calibration=CALIBRATION)
    assert [e["group"] for e in result.rewrites] == ["+".join(reversed(names))]
    assert model.conv3.in_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-5)
