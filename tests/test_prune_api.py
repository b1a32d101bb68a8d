"""The ``prunekit.prune`` API: targets, validation, ignore, rounding, plans, criteria, and what
the pruned model can still do (save, trace, script, prune again)."""
from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.fx
from torch import nn

import prunekit
from prunekit import PlanError

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("single_thread")

def _resnet(depth=20, shortcut="A"):
    torch.manual_seed(0)
    return prunekit.models.create(f"cifar_resnet{depth}", shortcut=shortcut).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"


# ---- targets and their validation ------------------------------------------------------------
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5", True, float("nan")])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    model = _resnet()
    state = _state(model)
    with pytest.raises(PlanError, match=r"\[0, 1\)"):
        prunekit.prune(model, X[:1], ratio=ratio)
    _assert_untouched(model, state)


@pytest.mark.parametrize("kwargs", [
    dict(ratios={"layer1.0.conv1": 1.0}),
    dict(macs_reduction=1.0),
    dict(macs_reduction=-0.2),
])
def test_other_ratios_outside_unit_interval_are_rejected(kwargs):
    with pytest.raises(PlanError, match=r"\[0, 1\)"):
        prunekit.prune(_resnet(), X[:1], **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(ratio=0.5, macs_reduction=0.5),
    dict(ratios={"conv1": 0.5}, macs_reduction=0.5),
    dict(ratio=0.5, plan={}),
    dict(macs_reduction=0.3, plan={}),
])
def test_exactly_one_target_is_required(kwargs):
    model = _resnet()
    state = _state(model)
    with pytest.raises(PlanError, match="exactly one target"):
        prunekit.prune(model, X[:1], **kwargs)
    _assert_untouched(model, state)


def test_ratio_zero_prunes_nothing():
    model = _resnet()
    state = _state(model)
    result = prunekit.prune(model, X[:1], ratio=0.0)
    assert result.plan == {}
    assert result.macs_after == result.macs_before
    assert result.params_after == result.params_before
    _assert_untouched(model, state)


def test_unknown_criterion_is_rejected():
    with pytest.raises(ValueError, match="unknown criterion"):
        prunekit.prune(_resnet(), X[:1], criterion="no-such-criterion", ratio=0.5)


# ---- ignore ------------------------------------------------------------------------------------
def test_ignore_by_name_keeps_the_classifier(prune_and_compare):
    model = _resnet()
    head = model.linear.weight.detach().clone()
    check = prune_and_compare(model, X, ignore=["linear"], ratio=0.5)
    assert model.linear.out_features == 10
    # its outputs are untouched; only the input columns of removed channels are gone
    kept = check.result.plan[check.graph.group("layer3.0.conv2").name]
    torch.testing.assert_close(model.linear.weight, head[:, kept], rtol=0, atol=0)


def test_ignore_by_module_object_keeps_its_output_channels(prune_and_compare):
    model = _resnet()
    target = model.layer1[1].conv1
    rows = target.weight.detach().clone()
    check = prune_and_compare(model, X, ignore=[target], ratio=0.5)
    plan = check.result.plan
    assert "layer1.1.conv1" not in plan
    assert target.out_channels == 16 and model.layer1[1].bn1.num_features == 16
    assert model.layer1[1].conv2.in_channels == 16
    # input columns still follow the pruned residual stream
    kept_in = plan["conv1"]
    torch.testing.assert_close(target.weight, rows[:, kept_in], rtol=0, atol=0)
    # every other block's conv1 was pruned
    assert model.layer1[0].conv1.out_channels == 8
    assert model.layer1[2].conv1.out_channels == 8


def test_ignore_unknown_module_is_rejected():
    with pytest.raises(ValueError, match="unknown module"):
        prunekit.prune(_resnet(), X[:1], ratio=0.5, ignore=["no.such.layer"])
    with pytest.raises(ValueError):
        prunekit.prune(_resnet(), X[:1], ratio=0.5, ignore=[nn.Linear(2, 2)])


# ---- round_to, ratios, macs_reduction ----------------------------------------------------------
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_round_to_keeps_multiples(shortcut, prune_and_compare):
    model = _resnet(56, shortcut)
    check = prune_and_compare(model, X, ignore=["linear"], ratio=0.3, round_to=8)
    result = check.result
    assert result.plan
    for name, kept in result.plan.items():
        size = result.group_sizes[name]
        assert len(kept) % 8 == 0 and len(kept) < size, (name, len(kept), size)
    # 16-channel groups: 16 - floor(4.8) = 12 rounds up to 16, so they are not pruned
    for name, size in result.group_sizes.items():
        if size == 16:
            assert name not in result.plan
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels != 3:
            assert mod.out_channels % 8 == 0 and mod.in_channels % 8 == 0


def test_round_to_must_be_positive_int():
    with pytest.raises(PlanError, match="round_to"):
        prunekit.prune(_resnet(), X[:1], ratio=0.5, round_to=0)


def test_ratios_prunes_only_the_named_group(prune_and_compare):
    model = _resnet()
    before = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    check = prune_and_compare(model, X, ratios={"layer1.0.conv1": 0.5})
    assert list(check.result.plan) == ["layer1.0.conv1"]
    assert len(check.result.plan["layer1.0.conv1"]) == 8
    after = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"layer1.0.conv1", "layer1.0.conv2"}
    assert after["layer1.0.conv1"][0] == 8 and after["layer1.0.conv2"][1] == 8
    assert model.layer1[0].bn1.num_features == 8


def test_ratios_patterns_and_default_ratio():
    model = _resnet()
    result = prunekit.prune(model, X[:1], ratios={"layer1.*.conv1": 0.25})
    assert sorted(result.plan) == ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"]
    assert all(len(k) == 12 for k in result.plan.values())
    model = _resnet()
    result = prunekit.prune(model, X[:1], ratio=0.5, ratios={"layer1.0.conv1": 0.25})
    assert len(result.plan["layer1.0.conv1"]) == 12
    assert len(result.plan["layer1.1.conv1"]) == 8


def test_ratios_unknown_key_lists_the_groups():
    model = _resnet()
    state = _state(model)
    with pytest.raises(PlanError) as err:
        prunekit.prune(model, X[:1], ratios={"layer9.conv": 0.5})
    msg = str(err.value)
    assert "layer9.conv" in msg
    for name in ("conv1", "layer1.0.conv1", "layer3.2.conv1"):
        assert name in msg
    _assert_untouched(model, state)


@pytest.mark.parametrize("depth, shortcut, round_to", [(20, "A", 1), (56, "A", 8), (56, "B", 8)])
def test_macs_reduction_reaches_the_target(depth, shortcut, round_to, prune_and_compare):
    model = _resnet(depth, shortcut)
    check = prune_and_compare(model, X, macs_reduction=0.5, round_to=round_to,
                              ignore=["linear"])
    result = check.result
    achieved = result.macs_reduction
    assert achieved == pytest.approx(1 - result.macs_after / result.macs_before)
    assert 0.5 - 0.005 <= achieved <= 0.5 + 0.02, achieved
    assert result.macs_after == prunekit.count_macs(model, X[:1])
    assert result.plan
    for name, kept in result.plan.items():
        assert len(kept) >= 1
        assert len(kept) % round_to == 0 or len(kept) == result.group_sizes[name]


def test_example_inputs_may_be_a_tuple():
    model = _resnet()
    result = prunekit.prune(model, (X[:1],), ratio=0.5, ignore=["linear"])
    assert result.macs_after < result.macs_before
    assert model(X).shape == (2, 10)


def test_macs_reduction_out_of_reach_is_rejected():
    # only one small group may be pruned: removing 90% of all MACs is impossible
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 64, 3), nn.Conv2d(64, 8, 3))
    with pytest.raises(PlanError, match="out of reach"):
        prunekit.prune(model, X[:1], macs_reduction=0.9, ignore=["2"])


# ---- explicit plans ------------------------------------------------------------------------------
def test_plan_keeping_no_channel_is_rejected():
    model = _resnet()
    state = _state(model)
    with pytest.raises(PlanError, match="empty|keeps no channel"):
        prunekit.prune(model, X[:1], plan={"layer1.0.conv1": []})
    _assert_untouched(model, state)


def test_plan_removing_a_fixed_channel_is_rejected():
    model = _resnet()
    state = _state(model)
    with pytest.raises(PlanError, match="fixed"):
        prunekit.prune(model, X[:1], plan={"linear": list(range(9))})
    _assert_untouched(model, state)
    with pytest.raises(PlanError, match="fixed"):
        prunekit.prune(model, X[:1], ignore=["layer1.0.conv1"],
                       plan={"layer1.0.conv1": list(range(8))})
    _assert_untouched(model, state)


@pytest.mark.parametrize("plan", [{"no.such.group": [0]}, {"layer1.0.conv1": [0, 0, 1]},
                                  {"layer1.0.conv1": [0, 16]}, {"layer1.0.conv1": [-1, 3]}])
def test_invalid_plan_is_rejected(plan):
    model = _resnet()
    state = _state(model)
    with pytest.raises(PlanError):
        prunekit.prune(model, X[:1], plan=plan)
    _assert_untouched(model, state)


def test_explicit_plan_keeps_exactly_those_channels(prune_and_compare):
    model = _resnet()
    w = model.layer2[1].conv1.weight.detach().clone()
    check = prune_and_compare(model, X, plan={"layer2.1.conv1": [1, 5, 30]})
    assert check.result.plan == {"layer2.1.conv1": [1, 5, 30]}
    torch.testing.assert_close(model.layer2[1].conv1.weight, w[[1, 5, 30]], rtol=0, atol=0)


# ---- result object -------------------------------------------------------------------------------
def test_result_to_json_round_trips_and_replays():
    original = _resnet()
    model = copy.deepcopy(original)
    result = prunekit.prune(model, X[:1], criterion="l1", ratio=0.4, ignore=["linear"])
    data = json.loads(result.to_json())
    assert data["plan"] == result.plan
    assert data["macs_before"] == result.macs_before and data["macs_after"] == result.macs_after
    assert data["params_before"] == result.params_before
    assert data["params_after"] == result.params_after
    assert data["criterion"] == "l1"
    assert data["macs_reduction"] == pytest.approx(result.macs_reduction)
    assert data["unreached_modules"] == []
    assert isinstance(result.summary(), str) and "l1" in result.summary()
    # the JSON plan, applied to a fresh copy, reproduces the same pruned model
    replay = copy.deepcopy(original)
    again = prunekit.prune(replay, X[:1], plan=data["plan"])
    assert again.macs_after == result.macs_after
    for (k, a), (k2, b) in zip(model.state_dict().items(), replay.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # and so does apply_plan with a graph of the original
    third = copy.deepcopy(original)
    graph = prunekit.build_graph(third, X[:1])
    prunekit.apply_plan(third, graph, data["plan"])
    for (k, a), b in zip(model.state_dict().items(), third.state_dict().values()):
        assert torch.equal(a, b), k


# ---- criteria ------------------------------------------------------------------------------------
def test_l1_keeps_the_largest_norm_filters():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.Conv2d(6, 2, 1))
    # filter j is constant v_j: its L1 norm is 27 * |v_j|
    values = torch.tensor([0.3, -0.1, -0.5, 0.2, 0.05, 0.4])
    with torch.no_grad():
        model[0].weight.copy_(values.view(6, 1, 1, 1).expand(6, 3, 3, 3))
    cols = model[2].weight.detach().clone()
    result = prunekit.prune(model, X[:1], criterion="l1", ratio=0.5)
    assert result.plan == {"0": [0, 2, 5]}   # |v| = 0.3, 0.5, 0.4 are the three largest
    assert model[0].weight.shape == (3, 3, 3, 3)
    torch.testing.assert_close(model[0].weight[:, 0, 0, 0], values[[0, 2, 5]])
    torch.testing.assert_close(model[2].weight, cols[:, [0, 2, 5]], rtol=0, atol=0)


def test_random_criterion_is_seeded():
    from prunekit.criteria import RandomCriterion
    plans = [prunekit.prune(_resnet(), X[:1], criterion=RandomCriterion(seed), ratio=0.5).plan
             for seed in (1, 1, 2)]
    assert plans[0] == plans[1]
    assert plans[0] != plans[2]


# ---- the pruned model is an ordinary nn.Module ---------------------------------------------------
@pytest.fixture(scope="module")
def pruned_resnet():
    """ResNet-20, option A, pruned at 0.5 with random scores (shortcuts scatter channels)."""
    model = _resnet(20, "A")
    prunekit.prune(model, X[:1], criterion="random", ratio=0.5, ignore=["linear"])
    return model.eval()


def test_pruned_state_dict_saves_and_loads(pruned_resnet):
    model = pruned_resnet
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(other(X), model(X))
    # the whole module pickles too
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(whole(X), model(X))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")
def test_pruned_model_fx_traces_and_jit_traces(pruned_resnet):
    model = pruned_resnet
    with torch.no_grad():
        expected = model(X)
        gm = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(gm(X), expected)
        jitted = torch.jit.trace(model, X[:1])
        torch.testing.assert_close(jitted(X), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shortcut", ["A", "A_append", "B"])
def test_prune_twice(shortcut, prune_and_compare, assert_module_metadata):
    model = _resnet(20, shortcut)
    first = prune_and_compare(model, X, ignore=["linear"], ratio=0.5, seed=1)
    second = prune_and_compare(model, X, ignore=["linear"], ratio=0.5, seed=2,
                               criterion="l1")
    assert second.result.macs_before == first.result.macs_after
    assert second.result.macs_after < second.result.macs_before
    assert model.layer1[0].conv1.out_channels == 4
    assert model.layer3[2].conv1.out_channels == 16
    assert_module_metadata(model)
    # and the twice-pruned model still trains
    model.train()
    model(X).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_a_bad_macs_target_says_it_is_a_fraction_of_macs():
    from prunekit.plan import PlanError, check_ratio
    with pytest.raises(PlanError, match=r"fraction of MACs removed"):
        check_ratio(1.5, "--macs-reduction")
    with pytest.raises(PlanError, match=r"fraction of channels removed"):
        check_ratio(-0.1, "ratio")
