"""LFPC reproduction options (issue 20): per-conv sampler, mask before/after BN, the SFP-style
every-conv rate with the papers' FLOPs count, the 50/50 search split, and their errors."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import prunekit
from prunekit import models
from prunekit.errors import ConfigError
from prunekit.graph import build_graph
from prunekit.methods import CriteriaSearch, PerGroupCriterion, lfpc_prune
from prunekit.methods.lfpc_method import LFPC
from prunekit.methods.lfpc_rate import paper_flops, sfp_rate_counts
from prunekit.methods.lfpc_sampler import MaskSites, combine_conv_choices
from prunekit.methods.lfpc_split import search_sets
from prunekit.pipeline.job import _check_target
from prunekit.plan import PlanError, PlanTarget, make_plan

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def _vary_bn(model):
    with torch.no_grad():  # BN statistics far from (0, 1): masking before/after BN differs
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model


class Chain(nn.Module):
    """conv-bn-relu x 2, then a conv without norm, mean, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + y)


class Res(nn.Module):
    """A stem and two residual blocks on one 8-channel stream (stem + both conv2: one group)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def chain(seed=0):
    torch.manual_seed(seed)
    return _vary_bn(Chain()).eval()


def res(seed=0):
    torch.manual_seed(seed)
    return _vary_bn(Res()).eval()


def data(n=16, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g),
                         torch.randint(0, 4, (n,), generator=g))


X = torch.randn(1, 3, 8, 8)
RES_CONVS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]


def res_search(model, scope="conv", position="after_bn", keep=5):
    graph = build_graph(model, (X,))
    counts = {g.name: keep for g in graph.prunable_groups()}
    search = CriteriaSearch(model, graph, counts, data(seed=1), steps=4, batch_size=8,
                            sampler_scope=scope, mask_position=position)
    return search, graph, counts


# ------------------------------------------------------------------ per-conv sampler
def test_conv_scope_has_one_row_per_conv_and_group_scope_one_per_group():
    model = res()
    conv, graph, _ = res_search(model, "conv")
    group, _, _ = res_search(res(), "group")
    assert conv.sampler.alpha.shape == (5, 3) and conv.sampler.groups == RES_CONVS
    stream = graph.group("conv1").name
    assert graph.group("layer1.1.conv2").name == stream  # the stem and both conv2: one group
    assert group.sampler.alpha.shape == (3, 3)
    assert conv.sites.row_groups["layer1.0.conv2"] == [stream]
    assert {r["group"] for r in conv.report()} == {g.name for g in graph.prunable_groups()}


def test_each_conv_masks_with_its_own_filters_ranking():
    """A conv's keep mask for l1 is the top-`keep` of that conv's own filter norms, so the
    three producers of the residual stream mask different channel sets."""
    model = res()
    search, graph, counts = res_search(model, "conv")
    search.refresh_masks()
    k = search.sampler.criteria.index("l1")
    stream_sets = {}
    for site in search._outputs:  # after BN: the site is the norm reading each conv
        conv = site.producer
        norms = model.get_submodule(conv).weight.detach().abs().flatten(1).sum(1).numpy()
        expected = np.sort(np.argsort(-norms, kind="stable")[:5])
        assert np.flatnonzero(site.keep[:, k].numpy()).tolist() == expected.tolist(), conv
        if graph.group(conv).name == graph.group("conv1").name:
            stream_sets[conv] = tuple(expected)
    assert len(stream_sets) == 3 and len(set(stream_sets.values())) > 1
    # group scope: every producer of the stream masks the group plan's one set
    group, _, _ = res_search(model, "group")
    group.refresh_masks()
    sets = {tuple(np.flatnonzero(s.keep[:, k].numpy())) for s in group._outputs
            if s.module in ("bn1", "layer1.0.bn2", "layer1.1.bn2")}
    assert len(sets) == 1


def test_conv_weights_use_each_convs_own_row():
    search, _, _ = res_search(res(), "conv")
    search.refresh_masks()
    sample = search.sampler.sample().detach()
    for site in search._outputs:
        row = search.sampler.groups.index(site.producer)
        expected = (sample[row][None, :] * site.keep).sum(-1)
        torch.testing.assert_close(search._channel_weights(sample, site), expected)


def test_combination_rule_is_the_probability_averaged_argmax():
    rows = {"a": ["g"], "b": ["g"], "c": ["g"], "d": ["h"]}
    p = torch.tensor([[0.34, 0.33, 0.33], [0.34, 0.33, 0.33], [0.05, 0.05, 0.90],
                      [0.2, 0.4, 0.4]])
    out = combine_conv_choices(rows, p, ["l1", "l2", "fpgm"])
    # two weak votes for l1 lose to one confident fpgm (a majority of argmaxes would say l1)
    assert out["g"]["choice"] == "fpgm"
    assert out["g"]["convs"] == {"a": "l1", "b": "l1", "c": "fpgm"}
    assert out["g"]["probabilities"]["fpgm"] == pytest.approx((0.33 + 0.33 + 0.9) / 3)
    assert out["h"]["choice"] == "l2"  # a tie goes to the first criterion in the list
    assert out["h"]["convs"] == {"d": "l2"}


def test_conv_scope_gives_one_criterion_and_one_index_set_per_group():
    model = res()
    search, graph, counts = res_search(model, "conv")
    with torch.no_grad():
        search.sampler.alpha.zero_()
        search.sampler.alpha[RES_CONVS.index("conv1"), 0] = 3.0       # stem: l1
        search.sampler.alpha[RES_CONVS.index("layer1.0.conv2"), 2] = 1.0
        search.sampler.alpha[RES_CONVS.index("layer1.1.conv2"), 2] = 1.0  # two conv2: fpgm
    choices = search.group_choices()
    stream = graph.group("conv1").name
    rows = {r["group"]: r for r in search.report()}
    assert rows[stream]["convs"] == {"conv1": "l1", "layer1.0.conv2": "fpgm",
                                     "layer1.1.conv2": "fpgm"}
    probs = search.sampler.probabilities()[[0, 2, 4]].mean(0)
    assert choices[stream] == search.sampler.criteria[int(probs.argmax())]
    plan = make_plan(graph, PerGroupCriterion(choices).score(graph, model), {}, counts=counts)
    assert set(plan) == {g.name for g in graph.prunable_groups()} and len(plan[stream]) == 5


# ------------------------------------------------------------------ mask position
def _most_likely(search, k):
    with torch.no_grad():
        search.sampler.alpha.zero_()
        search.sampler.alpha[:, k] = 5.0
    search.refresh_masks()


@pytest.mark.parametrize("position", ["after_bn", "before_bn"])
def test_mask_position_values_vs_a_direct_computation(position):
    model = chain()
    graph = build_graph(model, (X,))
    keep = {"conv1": 4, "conv2": 5, "conv3": 3}
    search = CriteriaSearch(model, graph, keep, data(seed=1), steps=4, batch_size=8,
                            mask_position=position)
    sites = {s.module for s in search._outputs}
    assert sites == ({"bn1", "bn2", "conv3"} if position == "after_bn"
                     else {"conv1", "conv2", "conv3"})
    _most_likely(search, 1)  # l2 everywhere, eval mode
    x = torch.randn(3, 3, 8, 8)
    masked = model(x)
    plan = make_plan(graph, prunekit.criteria.get_criterion("l2").score(graph, model), {},
                     counts=keep)
    m = {name: torch.zeros(graph.by_name[name].size) for name in keep}
    for name, kept in plan.items():
        if name in m:
            m[name][kept] = 1.0
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    with torch.no_grad():
        if position == "after_bn":
            h = torch.relu(model.bn1(model.conv1(x)) * v(m["conv1"]))
            h = torch.relu(model.bn2(model.conv2(h)) * v(m["conv2"]))
        else:
            h = torch.relu(model.bn1(model.conv1(x) * v(m["conv1"])))
            h = torch.relu(model.bn2(model.conv2(h) * v(m["conv2"])))
        direct = model.fc(torch.relu(model.conv3(h) * v(m["conv3"])).mean((2, 3)))
    torch.testing.assert_close(masked, direct)
    search.remove()
    pruned = copy.deepcopy(model)
    prunekit.prune(pruned, X, plan=plan)
    if position == "after_bn":  # masking after BN is removal
        torch.testing.assert_close(pruned(x), masked, rtol=1e-5, atol=1e-5)
    else:  # before BN the shift keeps a masked channel alive: not the pruned network
        assert not torch.allclose(pruned(x), masked, atol=1e-3)
        bn = model.bn1
        gone = int(np.flatnonzero(m["conv1"].numpy() == 0)[0])
        const = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
        with torch.no_grad():
            out = bn(model.conv1(x) * v(m["conv1"]))[:, gone]
        torch.testing.assert_close(out, torch.full_like(out, float(const[gone].detach())))


def test_conv_scope_before_bn_masks_the_conv_outputs():
    search, _, _ = res_search(res(), "conv", "before_bn")
    assert {s.module for s in search._outputs} == set(RES_CONVS)
    assert all(s.producer == s.module for s in search._outputs)


# ------------------------------------------------------------------ conv rate and FLOPs
def test_conv_rate_gives_every_conv_the_same_kept_count():
    model = chain()
    graph = build_graph(model, (X,))
    assert sfp_rate_counts(graph, model, 0.4) == {"conv1": 5, "conv2": 5, "conv3": 4}
    assert sfp_rate_counts(graph, model, 0.4, "kept") == {"conv1": 4, "conv2": 4, "conv3": 3}
    r20 = models.create("cifar_resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    g20 = build_graph(r20, x)
    counts = sfp_rate_counts(g20, r20, 0.4)
    prunekit.prune(r20, x, criterion="l1", target=PlanTarget(counts=counts), graph=g20)
    widths = {m.out_channels for m in r20.modules() if isinstance(m, nn.Conv2d)}
    assert widths == {10, 20, 39}  # 16, 32, 64 less int(0.4 N) each


def test_paper_flops_equal_a_hand_count():
    model = chain()
    graph = build_graph(model, (X,))
    macs = {"conv1": 8 * 3 * 9 * 64, "conv2": 8 * 8 * 9 * 64, "conv3": 6 * 8 * 9 * 64}
    at = paper_flops(graph, model, X, rate=0.4)
    assert at["baseline"] == sum(macs.values())
    # conv1 reads the image; conv2 and conv3 read the previous conv through BN/ReLU
    hand = macs["conv1"] * 0.6 + (macs["conv2"] + macs["conv3"]) * 0.36
    assert at["pruned"] == pytest.approx(hand)
    counts = sfp_rate_counts(graph, model, 0.4)
    by_counts = paper_flops(graph, model, X, counts=counts)
    hand = macs["conv1"] * 5 / 8 + macs["conv2"] * 25 / 64 + macs["conv3"] * 4 / 6 * 5 / 8
    assert by_counts["pruned"] == pytest.approx(hand)
    linear = paper_flops(graph, model, X, counts=counts, include_linear=True)
    assert linear["baseline"] == sum(macs.values()) + 24  # fc reads a mean: full width


def test_paper_flops_follow_the_sfp_rule_on_a_residual_stream():
    model = res()
    graph = build_graph(model, (X,))
    conv = 8 * 8 * 9 * 64
    stem = 8 * 3 * 9 * 64
    got = paper_flops(graph, model, X, rate=0.5)["pruned"]
    # first block's conv1 reads the stem directly (keep^2); the second reads the sum (keep)
    hand = stem * 0.5 + conv * (0.25 + 0.25 + 0.5 + 0.25)
    assert got == pytest.approx(hand)


@pytest.mark.parametrize("name, baseline, at40, at30", [
    ("cifar_resnet56", 125_485_056, 52.63, 41.06),
    ("cifar_resnet110", 252_887_040, 52.31, 40.78),
])
def test_paper_flops_reproduce_the_sfp_flop_file(name, baseline, at40, at30):
    """methods.md 0.2: SFP/FPGM's cifar_resnet_flop.py gives these baselines and reductions at
    keep 0.6 / 0.7; the papers print 52.6% (5.94E7) and 52.3% (1.21E8) at 40%."""
    model = models.create(name).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = build_graph(model, x)
    flops = paper_flops(graph, model, x, rate=0.4)
    assert flops["baseline"] == baseline
    assert round(flops["reduction"] * 100, 2) == at40
    assert round(paper_flops(graph, model, x, rate=0.3)["reduction"] * 100, 2) == at30


# ------------------------------------------------------------------ 50/50 split
def test_half_split_is_two_disjoint_halves_of_the_train_set():
    train, val = data(10), data(4, seed=3)
    assert search_sets(train, val, "val") == (train, val)
    a, b = search_sets(train, val, "half", seed=1)
    assert len(a) == len(b) == 5 and not set(a.indices) & set(b.indices)
    again, _ = search_sets(train, val, "half", seed=1)
    assert again.indices == a.indices


# ------------------------------------------------------------------ end to end
def test_conv_scope_before_bn_conv_rate_half_split_end_to_end(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    cfg = {"epochs": 1, "batch_size": 8, "lr": 0.01, "progress": False}
    model, result, info = lfpc_prune(
        models.create("cifar_resnet20"), data(16, 32), data(8, 32, seed=2), cfg, cfg, tmp_path,
        example_inputs=x, conv_rate=0.4, sampler_scope="conv", mask_position="before_bn",
        search_split="half", alpha_lr=0.05)
    assert info["search"]["epochs_run"] == 1 and len(info["search_history"]) >= 1
    rows = info["choices"]
    stream = next(r for r in rows if "layer1.0.conv2" in r["convs"])
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} <= set(stream["convs"])
    assert all(r["choice"] in ("l1", "l2", "fpgm") for r in rows)
    widths = {m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert widths == {10, 20, 39}
    flops = info["flops"]
    assert flops["paper_at_rate"]["reduction"] > flops["paper"]["reduction"] > 0.4
    assert flops["physical_macs_reduction"] == pytest.approx(result.macs_reduction)
    assert result.macs_reduction > flops["paper"]["reduction"]  # streams physically pruned
    torch.manual_seed(0)
    masked = models.create("cifar_resnet20")
    masked.load_state_dict(torch.load(tmp_path / "sfp" / "last.pt", weights_only=True)["model"])
    x4 = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x4), masked.eval()(x4), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ errors
def test_bad_option_values_and_combinations_are_refused(tmp_path):
    model = res()
    graph = build_graph(model, (X,))
    with pytest.raises(ConfigError, match="sampler_scope must be one of group, conv"):
        MaskSites(graph, {"conv1": 4}, scope="layer")
    with pytest.raises(ConfigError, match="mask_position must be one of after_bn, before_bn"):
        MaskSites(graph, {"conv1": 4}, position="after_relu")
    with pytest.raises(ConfigError, match="search_split must be one of val, half"):
        search_sets(data(), data(), "third")
    with pytest.raises(ConfigError, match="conv_rate must be a number in"):
        sfp_rate_counts(graph, model, 1.5)
    with pytest.raises(ConfigError, match="conv_rate_rounding must be one of"):
        sfp_rate_counts(graph, model, 0.4, "nearest")
    with pytest.raises(ConfigError, match="needs counts .* or rate, not both"):
        paper_flops(graph, model, X, counts={"conv1": 4}, rate=0.4)
    with pytest.raises(ConfigError, match="drop the macs_reduction target or conv_rate"):
        lfpc_prune(model, data(), data(), {"epochs": 1}, {"epochs": 1}, tmp_path,
                   example_inputs=X, conv_rate=0.4, macs_reduction=0.5)
    for bad in ({"sampler_scope": "layer"}, {"mask_position": "nowhere"},
                {"conv_rate": 0.0}, {"search_split": "all"}):
        with pytest.raises(ConfigError):
            LFPC(bad)
    # the job: conv_rate is the target, so a run target is refused, and none is needed
    with pytest.raises(ConfigError, match="drop the macs_reduction target"):
        _check_target(LFPC({"conv_rate": 0.4}), PlanTarget(macs_reduction=0.5))
    _check_target(LFPC({"conv_rate": 0.4}), PlanTarget())
    with pytest.raises(PlanError, match="needs a target"):
        _check_target(LFPC(), PlanTarget())
