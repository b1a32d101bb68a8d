"""LFPC: criteria sampler, criteria forward/backward, per-group criteria, end to end."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import prunekit
from prunekit import models
from prunekit.criteria import get_criterion
from prunekit.graph import build_graph
from prunekit.methods import (CriteriaSampler, CriteriaSearch, PerGroupCriterion, SoftPruning,
                              lfpc_prune, linear_temperature, plot_choices)
from prunekit.plan import make_plan
from prunekit.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)  # no norm: its own output is masked
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


def tiny(seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    with torch.no_grad():  # varied BN statistics so masking before/after BN would differ
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return model


def data(n=16, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g),
                         torch.randint(0, 4, (n,), generator=g))


X = torch.randn(1, 3, 8, 8)
KEEP = {"conv1": 4, "conv2": 5, "conv3": 3}


def search_for(model, **kw):
    graph = build_graph(model, (X,))
    kw = {"steps": 10, "batch_size": 8, **kw}
    return CriteriaSearch(model, graph, KEEP, data(seed=1), **kw), graph


def test_linear_temperature():
    assert linear_temperature(0) == 5.0 and linear_temperature(1) == pytest.approx(0.1)
    assert linear_temperature(0.5, 2.0, 1.0) == 1.5
    assert linear_temperature(2) == pytest.approx(0.1)  # clamped


def test_sampler_rejects_bad_spaces():
    with pytest.raises(ValueError, match="at least two"):
        CriteriaSampler(["a"], ["l1"])
    with pytest.raises(ValueError, match="at least one group"):
        CriteriaSampler([], ["l1", "l2"])
    with pytest.raises(ValueError, match="needs calibration data"):
        search_for(tiny(), criteria=("l1", "chip"))


def test_sampler_samples_and_hard_is_one_hot():
    soft = CriteriaSampler(["a", "b"], ["l1", "l2", "fpgm"])
    s = soft.sample()
    assert s.shape == (2, 3) and torch.allclose(s.sum(-1), torch.ones(2))
    hard = CriteriaSampler(["a", "b"], ["l1", "l2", "fpgm"], hard=True)
    h = hard.sample()
    assert set(h.detach().flatten().tolist()) <= {0.0, 1.0} and torch.all(h.sum(-1) == 1)
    h.sum().backward()  # straight-through: gradients reach the logits
    assert hard.alpha.grad is not None


def test_per_group_criterion_uses_each_groups_choice():
    model = tiny()
    graph = build_graph(model, (X,))
    per = PerGroupCriterion({"conv1": "fpgm", "conv2": "l1"}, default="l2").score(graph, model)
    ref = {name: get_criterion(name).score(graph, model) for name in ("fpgm", "l1", "l2")}
    np.testing.assert_allclose(per["conv1"], ref["fpgm"]["conv1"])
    np.testing.assert_allclose(per["conv2"], ref["l1"]["conv2"])
    np.testing.assert_allclose(per["conv3"], ref["l2"]["conv3"])
    with pytest.raises(ValueError, match="unknown groups"):
        PerGroupCriterion({"nope": "l1"}).score(graph, model)
    with pytest.raises(ValueError, match="calibration data"):
        PerGroupCriterion({"conv1": "hrank"})


def test_masks_follow_each_criterion_and_soft_weights_mix_them():
    model = tiny()
    search, graph = search_for(model)
    search.refresh_masks()
    sample = search.sampler.sample().detach()
    for out in search._outputs:
        assert out.keep.shape[1] == 3
        weights = search._channel_weights(sample, out)
        # each position: sum over criteria of (sample weight if that criterion keeps it)
        expected = torch.stack([sum(sample[out.group_index[p], k] * out.keep[p, k]
                                    for k in range(3)) for p in range(len(out.roots))])
        torch.testing.assert_close(weights, expected)
    # keep masks are the criteria's plans at the requested counts
    for k, name in enumerate(search.sampler.criteria):
        plan = make_plan(graph, get_criterion(name).score(graph, model), {}, counts=KEEP)
        bn1 = next(o for o in search._outputs if o.module == "bn1")
        assert np.flatnonzero(bn1.keep[:, k].numpy()).tolist() == sorted(plan["conv1"])
    assert {o.module for o in search._outputs} == {"bn1", "bn2", "conv3"}


@pytest.mark.parametrize("k", [0, 1, 2])
def test_choice_forward_equals_physically_pruned_network(k):
    """In eval mode every group uses its most likely criterion: the output equals the network
    pruned physically with that criterion's plan."""
    model = tiny().eval()
    search, graph = search_for(model)
    with torch.no_grad():
        search.sampler.alpha.zero_()
        search.sampler.alpha[:, k] = 5.0
    search.refresh_masks()
    x = torch.randn(4, 3, 8, 8)
    masked = model(x)
    search.remove()
    name = search.sampler.criteria[k]
    pruned = copy.deepcopy(model)
    plan = make_plan(graph, get_criterion(name).score(graph, model), {}, counts=KEEP)
    prunekit.prune(pruned, X, plan=plan)
    torch.testing.assert_close(pruned(x), masked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x), masked)  # hooks removed: unmasked again


def test_validation_loss_trains_the_logits_and_temperature_anneals(tmp_path):
    model = tiny()
    search, _ = search_for(model, alpha_lr=0.05, steps=8)
    before = search.sampler.alpha.detach().clone()
    config = TrainConfig(epochs=2, lr=0.05, batch_size=4, schedule="constant", progress=False)
    fit(model, data(), None, config, tmp_path, hooks=[search])
    assert search.step == 8  # one sampler step per training step
    taus = [h["tau"] for h in search.history if "epoch" in h]  # one entry per epoch
    assert taus == sorted(taus, reverse=True) and taus[0] > taus[-1]
    assert search.sampler.tau == pytest.approx(linear_temperature(7 / 8))
    assert not torch.allclose(search.sampler.alpha.detach(), before)


def test_logits_move_only_through_the_sampler_step(tmp_path):
    """With alpha_lr = 0 a whole search leaves the logits unchanged: the weight steps on the
    training split never update them (the sample fed to training forwards is detached)."""
    model = tiny()
    search, _ = search_for(model, alpha_lr=0.0, alpha_weight_decay=0.0)
    before = search.sampler.alpha.detach().clone()
    config = TrainConfig(epochs=1, lr=0.05, batch_size=4, schedule="constant", progress=False)
    fit(model, data(), None, config, tmp_path, hooks=[search])
    torch.testing.assert_close(search.sampler.alpha.detach(), before)


def test_sampler_gradient_is_the_validation_loss_gradient():
    model = tiny()
    search, _ = search_for(model)
    search.refresh_masks()
    model.train()
    captured = {}

    def fake_step(*a, **k):
        captured["grad"] = search.sampler.alpha.grad.clone()
    search.optimizer.step = fake_step
    torch.manual_seed(3)
    search.sampler_step()
    assert captured["grad"].abs().sum() > 0
    assert captured["grad"].shape == (3, 3)


def test_frozen_weights_search_changes_only_the_logits(tmp_path):
    from prunekit.methods.lfpc import _search_frozen

    model = tiny()
    weights = copy.deepcopy(model.state_dict())
    search, _ = search_for(model, alpha_lr=0.05, steps=4, batch_size=4)
    before = search.sampler.alpha.detach().clone()
    summary = _search_frozen(model, search, TrainConfig(epochs=2, lr=0.1, progress=False),
                             tmp_path, resume=True)
    assert summary["steps"] == 4 and (tmp_path / "sampler.pt").exists()
    assert not torch.allclose(search.sampler.alpha.detach(), before)
    for name, value in model.state_dict().items():  # eval mode: not even BN statistics move
        torch.testing.assert_close(value, weights[name], msg=name)
    # resuming a finished search restores the logits and runs nothing
    again, _ = search_for(tiny(), alpha_lr=0.05, steps=4, batch_size=4)
    summary = _search_frozen(again.model, again, TrainConfig(epochs=2, lr=0.1, progress=False),
                             tmp_path, resume=True)
    assert summary["epochs_run"] == 0
    torch.testing.assert_close(again.sampler.alpha, search.sampler.alpha)


def test_lfpc_with_frozen_search_runs_end_to_end(tmp_path):
    model, result, info = lfpc_prune(
        resnet(), data(16, 32), data(8, 32, seed=2),
        {"epochs": 1, "lr": 0.01, "batch_size": 8, "progress": False},
        {"epochs": 1, "batch_size": 8, "lr": 0.01, "progress": False},
        tmp_path, example_inputs=torch.randn(1, 3, 32, 32), ratio=0.5, train_weights=False,
        alpha_lr=0.05, batch_size=4)
    assert info["search"]["steps"] == 2
    assert {r["choice"] for r in info["choices"]} <= {"l1", "l2", "fpgm"}
    assert result.macs_after < result.macs_before


def resnet():
    torch.manual_seed(0)
    return models.create("cifar_resnet20")


def test_lfpc_end_to_end_hits_macs_target_and_equals_masked_model(tmp_path):
    model = resnet()
    x = torch.randn(1, 3, 32, 32)
    model, result, info = lfpc_prune(
        model, data(16, 32), data(8, 32, seed=2),
        {"epochs": 1, "batch_size": 8, "lr": 0.01, "progress": False},
        {"epochs": 1, "batch_size": 8, "lr": 0.01, "progress": False},
        tmp_path, example_inputs=x, macs_reduction=0.52, alpha_lr=0.05)
    assert 0.52 <= result.macs_reduction <= 0.53
    assert result.criterion == "lfpc"
    assert info["search"]["epochs_run"] == 1 and info["sfp"]["epochs_run"] == 1
    rows = info["choices"]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    assert all(r["kept"] < r["size"] for r in rows)
    # the compact model computes what the masked model of the last SFP epoch computes
    masked = resnet()
    masked.load_state_dict(torch.load(tmp_path / "sfp" / "last.pt", weights_only=True)["model"])
    x4 = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x4), masked.eval()(x4), rtol=1e-4, atol=1e-5)
    plot_choices(rows, tmp_path / "choices.png")
    assert (tmp_path / "choices.png").stat().st_size > 1000
    # both phases resume: a second call trains nothing and lands on the same choices
    again, result2, info2 = lfpc_prune(
        resnet(), data(16, 32), data(8, 32, seed=2),
        {"epochs": 1, "batch_size": 8, "lr": 0.01, "progress": False},
        {"epochs": 1, "batch_size": 8, "lr": 0.01, "progress": False},
        tmp_path, example_inputs=x, macs_reduction=0.52, alpha_lr=0.05)
    assert info2["search"]["epochs_run"] == 0 and info2["sfp"]["epochs_run"] == 0
    assert [r["choice"] for r in info2["choices"]] == [r["choice"] for r in rows]
    torch.testing.assert_close(again.eval()(x), model(x))


def test_soft_pruning_accepts_keep_counts_and_macs_target():
    model = resnet()
    x = torch.randn(1, 3, 32, 32)
    hook = SoftPruning(model=model, example_inputs=x, macs_reduction=0.4)
    assert hook.counts(0) == hook.target_keep
    keep = dict(hook.target_keep)
    again = SoftPruning(model=model, example_inputs=x, keep=keep)
    assert again.target_keep == keep
    with pytest.raises(ValueError, match="one target"):
        SoftPruning(model=model, example_inputs=x, ratio=0.3, keep=keep)
    with pytest.raises(ValueError, match="cannot keep"):
        SoftPruning(model=model, example_inputs=x, keep={"conv1": 0})


def test_a_diverging_criterion_search_stops_with_a_divergence_error():
    """The sampler's logits are not model parameters: fit's checks never see them, so the
    search checks its own gradient (issue 14, item 3)."""
    from prunekit.train import DivergenceError
    model = tiny()
    graph = build_graph(model, (X,))
    poisoned = data(seed=1)
    poisoned.tensors[0][:] = float("nan")
    search = CriteriaSearch(model, graph, KEEP, poisoned, steps=10, batch_size=8)
    search.refresh_masks()
    before = search.sampler.alpha.detach().clone()
    with pytest.raises(DivergenceError, match="criterion search diverged at sampler step 1"):
        search.sampler_step()
    assert torch.equal(search.sampler.alpha.detach(), before)
