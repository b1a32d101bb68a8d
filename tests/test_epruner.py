"""EPruner (issue 18, item 1): affinity propagation against a direct loop implementation of
Frey & Dueck's messages (and scikit-learn when installed), the exemplars kept under the target
``counts_from: criterion`` (physical pruning equal to the masked reference), and the options
and target checked."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import prunekit
from conftest import needs_shared
from prunekit.criteria import get_criterion
from prunekit.criteria.epruner import (EPruner, affinity_propagation, exemplar_filters,
                                       negative_squared_distances)
from prunekit.errors import ConfigError
from prunekit.plan import PlanError, PlanTarget

pytestmark = pytest.mark.usefixtures("single_thread")

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TARGET = PlanTarget(counts_from="criterion")


def _direct_ap(S, preference, damping=0.5, max_iter=200, convergence_iter=15, seed=0):
    """Frey & Dueck (Science 2007) written out element by element: r(i,k), a(i,k) damped,
    exemplars {k: r(k,k) + a(k,k) > 0}; stop once the exemplar set has stayed the same for
    ``convergence_iter`` iterations; then sklearn's refinement (each cluster's member with the
    largest summed similarity becomes its exemplar). The same tie-breaking noise as sklearn."""
    n = len(S)
    S = S.astype(np.float64).copy()
    for k in range(n):
        S[k, k] = preference[k]
    S = S + (np.finfo(float).eps * S + np.finfo(float).tiny * 100) * \
        np.random.RandomState(seed).randn(n, n)
    R, A = np.zeros((n, n)), np.zeros((n, n))
    sets = []
    for it in range(max_iter):
        R_new = np.empty((n, n))
        for i in range(n):
            for k in range(n):
                R_new[i, k] = S[i, k] - max(A[i, j] + S[i, j] for j in range(n) if j != k)
        R = damping * R + (1 - damping) * R_new
        A_new = np.empty((n, n))
        for i in range(n):
            for k in range(n):
                others = sum(max(0.0, R[j, k]) for j in range(n) if j not in (i, k))
                A_new[i, k] = others if i == k else min(0.0, R[k, k] + others)
        A = damping * A + (1 - damping) * A_new
        sets.append(tuple(k for k in range(n) if A[k, k] + R[k, k] > 0))
        if it >= convergence_iter and sets[-1] and len(set(sets[-convergence_iter:])) == 1:
            break
    exemplars = list(sets[-1])
    for step in ("refine", "assign"):
        label = [exemplars.index(i) if i in exemplars else
                 int(np.argmax([S[i, e] for e in exemplars])) for i in range(n)]
        if step == "refine":
            for c in range(len(exemplars)):
                members = [i for i in range(n) if label[i] == c]
                exemplars[c] = max(members, key=lambda j: sum(S[i, j] for i in members))
    return sorted(exemplars), [exemplars[c] for c in label]


def _blobs(seed=0, per=4, dim=6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (3, dim))
    return np.concatenate([c + rng.normal(0, 0.3, (per, dim)) for c in centres])


@pytest.mark.parametrize("data, beta, damping", [
    ("blobs", 1.0, 0.5), ("blobs", 0.2, 0.7), ("random", 0.5, 0.5), ("random", 1.0, 0.9),
    ("random", 2.0, 0.5)])
def test_affinity_propagation_matches_the_direct_definition(data, beta, damping):
    rows = _blobs() if data == "blobs" else np.random.default_rng(1).normal(size=(11, 9))
    S = negative_squared_distances(rows)
    pref = beta * np.median(S, axis=0)
    exemplars, labels, converged = affinity_propagation(S, pref, damping=damping)
    direct, direct_centres = _direct_ap(S, pref, damping=damping)
    assert converged
    assert exemplars.tolist() == direct
    assert exemplars[labels].tolist() == direct_centres


def test_three_blobs_give_three_exemplars_one_per_blob():
    exemplars, labels, _ = exemplar_filters(_blobs(), beta=1.0)
    assert len(exemplars) == 3
    assert sorted(exemplars // 4) == [0, 1, 2]
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_similarities_are_negative_squared_distances():
    rows = np.random.default_rng(2).normal(size=(5, 7))
    direct = -((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(negative_squared_distances(rows), direct, atol=1e-12)
    assert (np.diag(negative_squared_distances(rows)) == 0).all()


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.76, 1.0])
def test_affinity_propagation_matches_scikit_learn(beta):
    """The reference calls sklearn's AffinityPropagation(preference=beta * median(S, 0))."""
    cluster = pytest.importorskip("sklearn.cluster")
    rows = np.random.default_rng(3).normal(size=(40, 18)) * np.linspace(0.1, 2, 40)[:, None]
    S = negative_squared_distances(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cluster.AffinityPropagation(preference=beta * np.median(S, axis=0),
                                          random_state=0).fit(rows)
        exemplars, labels, _ = exemplar_filters(rows, beta)  # 0.76: neither converges
    assert exemplars.tolist() == ref.cluster_centers_indices_.tolist()
    assert labels.tolist() == ref.labels_.tolist()


def test_degenerate_inputs_follow_scikit_learn():
    assert affinity_propagation(np.zeros((1, 1)), 0.0)[0].tolist() == [0]
    equal = -np.ones((4, 4)) + np.eye(4)
    assert affinity_propagation(equal, -2.0)[0].tolist() == [0]       # preference below S
    assert affinity_propagation(equal, 0.0)[0].tolist() == [0, 1, 2, 3]


def test_not_converging_warns_and_keeps_the_last_exemplars():
    rows = np.random.default_rng(4).normal(size=(20, 5))
    S = negative_squared_distances(rows)
    with pytest.warns(UserWarning, match="did not converge in 2 iterations"):
        exemplars, _, converged = affinity_propagation(S, np.median(S, 0), max_iter=2)
    assert not converged


def _resnet():
    torch.manual_seed(0)
    return prunekit.models.create("cifar_resnet20").eval()


def test_pruning_keeps_the_exemplars_and_equals_the_masked_model(prune_and_compare,
                                                                 assert_matches_zeroed):
    model = _resnet()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    # plan=None: prune_and_compare adds ratio=0.5 unless a target keyword is present
    check = prune_and_compare(model, X, criterion=EPruner(beta=0.85), target=TARGET, plan=None)
    assert_matches_zeroed(check, "epruner")
    graph = check.graph
    for name in ("layer1.0", "layer2.1", "layer3.2"):
        group = graph.group(f"{name}.conv1").name
        rows = original[f"{name}.conv1.weight"].double().flatten(1).numpy()
        exemplars, _, _ = exemplar_filters(rows, 0.85)
        kept = check.result.plan.get(group, list(range(rows.shape[0])))
        assert kept == exemplars.tolist()
        assert check.pruned.get_submodule(f"{name}.conv1").out_channels == len(exemplars)
    assert check.pruned.conv1.out_channels == 16  # the streams keep their width (spare)
    assert check.pruned.layer3[2].conv2.out_channels == 64
    assert len(check.result.plan) == 9  # one conv1 per block, nothing else


def test_scores_rank_exemplars_first_and_carry_their_counts():
    model = _resnet()
    graph = prunekit.build_graph(model, X[:1])
    scores = EPruner(beta=0.85).score(graph, model)
    group = graph.group("layer2.0.conv1").name
    rows = model.layer2[0].conv1.weight.detach().double().flatten(1).numpy()
    exemplars, labels, _ = exemplar_filters(rows, 0.85)
    assert scores.keep_counts[group] == len(exemplars)
    s = scores[group]
    assert set(np.flatnonzero(s >= 1)) == set(exemplars.tolist())
    np.testing.assert_allclose(s[exemplars], 1 + np.bincount(labels) / len(rows))
    assert s[s < 1].max() <= 0.5
    assert graph.group("conv1").name not in scores.keep_counts   # a stream: not clustered
    # Another target still works: a ratio keeps the exemplars first.
    result = prunekit.prune(_resnet(), X[:1], criterion=EPruner(beta=0.85), ratio=0.25)
    kept, ex = set(result.plan[group]), set(exemplars.tolist())
    assert len(kept) == 24 and (ex <= kept if len(ex) <= 24 else kept <= ex)


def test_round_to_and_betas_change_the_counts():
    model = _resnet()
    graph = prunekit.build_graph(model, X[:1])
    group = graph.group("layer1.0.conv1").name
    scores = EPruner(beta=0.85).score(graph, model)
    rounded = prunekit.plan.resolve_counts(graph, model, PlanTarget(counts_from="criterion",
                                                                    round_to=4), scores)
    assert rounded[group] == min(16, -(-scores.keep_counts[group] // 4) * 4)
    per_layer = EPruner(beta=0.85, betas={"layer1.0.conv1": 0.01}).score(graph, model)
    assert per_layer.keep_counts[group] == 16  # a tiny beta: every filter its own exemplar
    assert all(per_layer.keep_counts[g] == scores.keep_counts[g]
               for g in scores.keep_counts if g != group)
    with pytest.raises(ConfigError, match="'nothing.*' names no prunable group"):
        EPruner(betas={"nothing.*": 0.5}).score(graph, model)


def test_streams_concat_clusters_the_residual_stream():
    model = _resnet()
    graph = prunekit.build_graph(model, X[:1])
    scores = EPruner(beta=0.85, streams="concat").score(graph, model)
    stream = graph.group("layer1.0.conv2").name
    assert stream in scores.keep_counts  # stage 1's stream: stem and three conv2 write it all
    rows = np.concatenate([w.double().flatten(1).numpy() for w in (
        model.conv1.weight.detach(), model.layer1[0].conv2.weight.detach(),
        model.layer1[1].conv2.weight.detach(), model.layer1[2].conv2.weight.detach())], axis=1)
    assert scores.keep_counts[stream] == len(exemplar_filters(rows, 0.85)[0])


def test_a_criterion_that_keeps_everything_or_only_ranks_is_refused():
    with pytest.raises(PlanError, match="keeps every channel of every group"):
        prunekit.prune(_resnet(), X[:1], criterion=EPruner(beta=1e-6), target=TARGET)
    with pytest.raises(PlanError, match="needs a criterion that decides how many"):
        prunekit.prune(_resnet(), X[:1], criterion="l1", target=TARGET)


@pytest.mark.parametrize("options, message", [
    ({"beta": 0}, "beta"), ({"beta": -0.5}, "beta"), ({"beta": float("nan")}, "beta"),
    ({"beta": "0.7"}, "beta"), ({"damping": 1.0}, "damping"), ({"damping": 0.4}, "damping"),
    ({"max_iter": 0}, "max_iter"), ({"max_iter": 2.5}, "max_iter"),
    ({"convergence_iter": 0}, "convergence_iter"), ({"seed": -1}, "seed"),
    ({"streams": "merge"}, "streams"), ({"betas": [0.5]}, "betas"),
    ({"betas": {"layer1.*": 0}}, "beta for 'layer1")])
def test_bad_options_say_which(options, message):
    with pytest.raises(ConfigError, match=message):
        get_criterion("epruner", **options)


def test_the_target_round_trips_and_is_checked():
    target = PlanTarget(counts_from="criterion", round_to=2, ignore=("fc",))
    assert target.to_dict() == {"counts_from": "criterion", "round_to": 2, "ignore": ["fc"]}
    assert PlanTarget.from_dict(target.to_dict()) == target
    assert target.kind == "counts_from" and target.needs_scores and target.asks_for_removal
    with pytest.raises(PlanError, match="counts_from must be one of"):
        PlanTarget(counts_from="paper")
    with pytest.raises(PlanError, match="several targets"):
        PlanTarget(counts_from="criterion", ratio=0.5)
    with pytest.raises(PlanError, match="stream_scale applies"):
        PlanTarget(counts_from="criterion", stream_scale=0.5)
    with pytest.raises(PlanError, match="allocation"):
        PlanTarget(counts_from="criterion", allocation="global")


def test_the_cli_flag_sets_the_target():
    import argparse
    from prunekit.cli.prune import _plan_section, add_prune_parser
    parser = argparse.ArgumentParser()
    add_prune_parser(parser.add_subparsers())
    args = parser.parse_args(["prune", "--model", "cifar_resnet20", "--criterion", "epruner",
                              "--counts-from-criterion", "--out", "x"])
    plan = _plan_section(args, {"plan": {"ratio": 0.3}, "method": {"name": "oneshot"}})
    assert plan == {"counts_from": "criterion"}


@pytest.mark.shared_data
@needs_shared
def test_pretrained_resnet56_at_the_papers_beta():
    """The exemplar counts of the 27 conv1 at beta 0.76 on prunekit's pretrained ResNet-56,
    equal to scikit-learn 1.9.1's AffinityPropagation(preference=0.76 * median, random_state=0)
    on the same weights (float64 and float32 alike; measured once, not in CI)."""
    model = prunekit.models.create("cifar_resnet56", weights="pretrained").eval()
    result = prunekit.prune(model, X[:1], criterion=EPruner(beta=0.76), target=TARGET)
    assert [len(v) for v in result.plan.values()] == [
        2, 2, 2, 5, 2, 2, 5, 2, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 4, 1, 5, 3, 3, 1, 3, 1, 5]
    assert result.macs_after == 10_801_792
    # The beta that lands at the equal-MACs comparison's 47% on these weights.
    model = prunekit.models.create("cifar_resnet56", weights="pretrained").eval()
    result = prunekit.prune(model, X[:1], criterion=EPruner(beta=0.52), target=TARGET)
    assert 0.46 <= result.macs_reduction <= 0.48
