"""Issue 18 item 8: evaluating a model under a plan's mask (exactly the physically pruned model,
every tensor restored bit for bit) and the linear-filter-ensembles criterion ``lfe``, whose
fitted coefficients must recover the true per-channel effects of a model whose loss is exactly
additive in channel presence."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from conftest import TinyNet, tiny_data
from prunekit.criteria import get_criterion, list_criteria
from prunekit.criteria.ensembles import fit_additive, sample_masks
from prunekit.errors import ConfigError
from prunekit.criteria.masked_eval import (evaluate_batches, evaluate_masked, masked_channels,
                                  prepared_batches)
from prunekit.models import cifar_resnet20

pytestmark = pytest.mark.usefixtures("single_thread")


class AdditiveNet(nn.Module):
    """Two 1x1-conv branches, each pooled and read by a one-output linear head, summed: with
    ``loss = mean output`` the loss is b + sum_i w_i m_i c_i exactly (c_i: the mean of channel
    i over the data, w_i its head weight, m_i = 1 if the channel is kept)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 5, 1), nn.Conv2d(3, 4, 1)
        self.head_a, self.head_b = nn.Linear(5, 1), nn.Linear(4, 1)

    def forward(self, x):
        return self.head_a(self.a(x).mean((2, 3))) + self.head_b(self.b(x).mean((2, 3)))


def mean_output(output, targets):
    return output.mean()


class GroupedResidual(nn.Module):
    """A residual stream (stem and conv b write it), an inner group, and a grouped conv (its
    input columns are per-block slices), all with non-trivial BN."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.bna = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.b, self.bnb = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.g, self.bng = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        s = torch.relu(self.bn0(self.stem(x)))
        s = torch.relu(s + self.bnb(self.b(torch.relu(self.bna(self.a(s))))))
        return self.head(torch.relu(self.bng(self.g(s))).mean((2, 3)))


def labelled(n=32, size=8, batch=8, seed=0):
    data = tiny_data(n, size, seed)
    return [(data.tensors[0][i:i + batch], data.tensors[1][i:i + batch])
            for i in range(0, n, batch)]


def snapshot(model):
    """A clone of every parameter and buffer, for :func:`assert_bit_identical` (which compares
    raw bits: -0.0 and 0.0 differ, NaN equals itself)."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_bit_identical(model, before):
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, v in before.items():
        a = after[k].detach()
        assert a.dtype == v.dtype and a.shape == v.shape, k
        if v.is_floating_point():
            a, v = a.view(torch.int32 if v.element_size() == 4 else torch.int64), \
                v.view(torch.int32 if v.element_size() == 4 else torch.int64)
        assert torch.equal(a, v), f"{k} changed"


def pruned_copy(model, x, seed=0):
    """(physically pruned copy of ``model`` by a random 50% plan, the plan)."""
    pruned = copy.deepcopy(model)
    torch.manual_seed(seed)
    result = prunekit.prune(pruned, x[:1], criterion="random", ratio=0.5, ignore=["head"]
                            if hasattr(model, "head") else ())
    return pruned.eval(), result.plan


# ---------------------------------------------------------------- masked evaluation
@pytest.mark.parametrize("build", [GroupedResidual, lambda: cifar_resnet20(shortcut="A")],
                         ids=["grouped_residual", "cifar_resnet20_A"])
def test_masked_model_equals_the_pruned_model_and_is_restored(build, randomize_norms,
                                                              assert_outputs_close):
    torch.manual_seed(0)
    model = randomize_norms(build().eval())
    size = 8 if isinstance(model, GroupedResidual) else 32
    x = torch.randn(6, 3, size, size)
    pruned, plan = pruned_copy(model, x)
    graph = prunekit.build_graph(model, x[:1], ignore=["head"] if hasattr(model, "head") else ())
    reference = prunekit.zero_removed_channels(copy.deepcopy(model), graph, plan)
    before = snapshot(model)
    with torch.no_grad():
        dense = model(x)
        with masked_channels(model, graph, plan):
            masked = model(x)
            # exactly the entries zero_removed_channels zeroes, and nothing else
            assert_bit_identical(model, snapshot(reference))
        expected = pruned(x)
    assert_outputs_close(masked, expected, type(model).__name__)
    assert not torch.allclose(masked, dense, atol=1e-4)  # the mask changed the function
    assert_bit_identical(model, before)


def test_masked_channels_restores_on_exception(randomize_norms):
    model = randomize_norms(GroupedResidual().eval())
    x = torch.randn(2, 3, 8, 8)
    _, plan = pruned_copy(model, x)
    graph = prunekit.build_graph(model, x[:1], ignore=["head"])
    before = snapshot(model)
    with pytest.raises(KeyError, match="inside"):
        with masked_channels(model, graph, plan):
            assert not torch.equal(model.a.weight.detach(), before["a.weight"])
            raise KeyError("inside the mask")
    assert_bit_identical(model, before)
    with masked_channels(model, graph, {}):  # nothing removed: nothing touched
        assert_bit_identical(model, before)


def test_masked_evaluation_equals_the_pruned_models_loss_and_accuracy(randomize_norms):
    torch.manual_seed(1)
    model = randomize_norms(GroupedResidual().eval())
    batches = labelled()
    pruned, plan = pruned_copy(model, batches[0][0])
    graph = prunekit.build_graph(model, batches[0][0][:1], ignore=["head"])
    prepared = prepared_batches(batches)
    masked = evaluate_masked(model, graph, plan, prepared)
    direct = evaluate_batches(pruned, prepared)
    assert masked["samples"] == direct["samples"] == 32
    assert masked["accuracy"] == direct["accuracy"]
    assert masked["loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert masked["loss"] != pytest.approx(evaluate_batches(model, prepared)["loss"], rel=1e-3)


def test_prepared_batches_refuse_missing_labels():
    with pytest.raises(ConfigError, match="labelled"):
        prepared_batches([torch.randn(2, 3, 8, 8)])
    with pytest.raises(ValueError, match="no batch"):
        prepared_batches([])


# ---------------------------------------------------------------- the lfe criterion
def true_effects(model, batches):
    """The exact coefficients of perf = -loss in the masks: keeping channel i adds w_i c_i
    to the loss, so beta_i = -w_i c_i."""
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        ca = model.a(x).mean((0, 2, 3)).double()
        cb = model.b(x).mean((0, 2, 3)).double()
    return (-(model.head_a.weight[0].detach().double() * ca).numpy(),
            -(model.head_b.weight[0].detach().double() * cb).numpy())


def test_lfe_recovers_the_true_coefficients_of_an_additive_loss():
    torch.manual_seed(0)
    model = AdditiveNet().eval()
    batches = labelled()
    graph = prunekit.build_graph(model, batches[0][0][:1])
    assert [g.size for g in graph.prunable_groups()] == [5, 4]
    crit = get_criterion("lfe", samples=64, keep_probability=0.6, ridge=0.0,
                         loss_fn=mean_output, progress=False)
    scores = crit.score(graph, model, batches)
    want_a, want_b = true_effects(model, batches)
    np.testing.assert_allclose(scores[graph.group("a").name], want_a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores[graph.group("b").name], want_b, rtol=1e-4, atol=1e-6)
    assert crit.fit_info["r2_in_sample"] == pytest.approx(1.0, abs=1e-6)
    assert crit.fit_info["r2_heldout"] == pytest.approx(1.0, abs=1e-6)  # 51 masks fit 9 + 1
    assert crit.fit_info["coefficients"] == 9


def test_lfe_per_group_fit_is_each_groups_own_regression():
    torch.manual_seed(0)
    model = AdditiveNet().eval()
    batches = labelled()
    graph = prunekit.build_graph(model, batches[0][0][:1])
    kwargs = dict(samples=200, keep_probability=0.7, ridge=0.05, loss_fn=mean_output,
                  progress=False, seed=3)
    global_fit = get_criterion("lfe", **kwargs).score(graph, model, batches)
    per_group = get_criterion("lfe", fit="group", **kwargs).score(graph, model, batches)
    # the same samples, each group regressed on its own bits
    masks = sample_masks(9, 200, 0.7, 3)
    perf = np.array([-evaluate_masked(model, graph, {
        g.name: np.flatnonzero(m[lo:hi]).tolist()
        for g, lo, hi in ((graph.group("a"), 0, 5), (graph.group("b"), 5, 9))},
        prepared_batches(batches), loss_fn=mean_output)["loss"] for m in masks])
    for name, lo, hi in (("a", 0, 5), ("b", 5, 9)):
        _, beta = fit_additive(masks[:, lo:hi], perf, 0.05, 0.7 * 0.3)
        np.testing.assert_allclose(per_group[graph.group(name).name], beta, rtol=1e-9)
    # the other group's effects are noise there: close to the global fit, not equal
    for name, want in zip(("a", "b"), true_effects(model, batches)):
        got = per_group[graph.group(name).name]
        assert not np.allclose(got, global_fit[graph.group(name).name], rtol=1e-6)
        assert np.corrcoef(got, want)[0, 1] > 0.9


def test_fit_additive_matches_the_penalised_normal_equations():
    rng = np.random.default_rng(0)
    masks = sample_masks(12, 30, 0.8, 1)
    perf = rng.normal(size=30)
    ridge, variance = 0.3, 0.8 * 0.2
    b0, beta = fit_additive(masks, perf, ridge, variance)
    design = np.hstack([np.ones((30, 1)), masks])
    penalty = np.diag([0.0] + [ridge * variance] * 12)
    theta = np.linalg.solve(design.T @ design / 30 + penalty, design.T @ perf / 30)
    np.testing.assert_allclose(np.r_[b0, beta], theta, rtol=1e-9, atol=1e-12)
    # fewer samples than coefficients: ridge 0 is the minimum-norm least-squares solution
    b0, beta = fit_additive(masks[:8], perf[:8], 0.0, variance)
    np.testing.assert_allclose(b0 + masks[:8] @ beta, perf[:8], atol=1e-9)


def test_lfe_is_seeded_and_leaves_the_model_untouched(randomize_norms):
    torch.manual_seed(0)
    model = randomize_norms(TinyNet().eval())
    batches = labelled()
    graph = prunekit.build_graph(model, batches[0][0][:1], ignore=["fc"])
    before = snapshot(model)
    kwargs = dict(samples=24, progress=False)
    first = get_criterion("lfe", seed=5, **kwargs).score(graph, model, batches)
    again = get_criterion("lfe", seed=5, **kwargs).score(graph, model, batches)
    other = get_criterion("lfe", seed=6, **kwargs).score(graph, model, batches)
    assert_bit_identical(model, before)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert first[name].shape == (8,) and np.isfinite(first[name]).all()
    assert any(not np.array_equal(first[n], other[n]) for n in first)
    accuracy = get_criterion("lfe", target="accuracy", **kwargs)
    with warnings.catch_warnings():  # an untrained net may predict one class under every mask
        warnings.simplefilter("ignore")
        assert all(np.isfinite(v).all() for v in accuracy.score(graph, model, batches).values())
    assert 0 <= accuracy.fit_info["perf_min"] <= accuracy.fit_info["perf_max"] <= 1


def test_lfe_warns_when_every_mask_scores_the_same():
    model = AdditiveNet().eval()  # one output: top-1 is class 0 whatever the mask
    batches = labelled()
    graph = prunekit.build_graph(model, batches[0][0][:1])
    crit = get_criterion("lfe", samples=8, target="accuracy", loss_fn=mean_output,
                         progress=False)
    with pytest.warns(UserWarning, match="scored the same accuracy"):
        scores = crit.score(graph, model, batches)
    assert all((v == 0).all() for v in scores.values())


def test_lfe_prunes_through_the_public_api(randomize_norms):
    torch.manual_seed(0)
    model = randomize_norms(TinyNet().eval())
    batches = labelled()
    crit = get_criterion("lfe", samples=16, progress=False)
    result = prunekit.prune(model, batches[0][0][:1], criterion=crit, ratio=0.5,
                            ignore=["fc"], calibration=batches)
    assert result.macs_after < result.macs_before
    assert "lfe" in list_criteria() and crit.needs_data and crit.needs_labels


@pytest.mark.parametrize("options", [
    {"samples": 1}, {"samples": 2.5}, {"samples": True}, {"keep_probability": 0},
    {"keep_probability": 1}, {"keep_probability": "0.9"}, {"target": "top5"},
    {"fit": "layer"}, {"ridge": -0.1}, {"ridge": float("nan")}, {"seed": 1.5},
    {"loss_fn": "cross_entropy"}, {"max_batches": 0}])
def test_lfe_refuses_bad_options(options):
    with pytest.raises(ValueError):
        get_criterion("lfe", **options)


def test_lfe_needs_labelled_calibration_data():
    model = TinyNet().eval()
    x = torch.randn(4, 3, 8, 8)
    graph = prunekit.build_graph(model, x[:1], ignore=["fc"])
    crit = get_criterion("lfe", samples=4, progress=False)
    with pytest.raises(ConfigError, match="needs calibration data"):
        crit.score(graph, model)
    with pytest.raises(ConfigError, match="labelled"):
        crit.score(graph, model, [x])
