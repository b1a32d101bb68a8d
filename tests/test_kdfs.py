"""KDFS (prunekit.methods.kdfs): gates, the MACs model, the loss terms, search and removal."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import prunekit
import prunekit.io as pio
from prunekit.cli import main
from prunekit.errors import ConfigError
from prunekit.graph import build_graph
from prunekit.methods import get_method
from prunekit.methods.kdfs import KDFSSearch, _split_epochs, gated_groups, kdfs_plan
from prunekit.methods.kdfs_gates import (ChannelGates, MaskedMacs, attention_map,
                                         gate_temperature, kd_term, rc_term)
from prunekit.train import TrainConfig, fit

from conftest import SHARED, TinyNet, needs_shared, tiny_data

pytestmark = pytest.mark.usefixtures("single_thread")


def resnet(seed=0, **kw):
    torch.manual_seed(seed)
    return prunekit.models.create("cifar_resnet20", **kw)


def search(model, x, tmp_path, *, target=0.6, epochs=6, steps=4, streams=False, **kw):
    graph = build_graph(model, (x,))
    hook = KDFSSearch(model, graph, (x,), copy.deepcopy(model), target=target, epochs=epochs,
                      streams=streams, **kw)
    config = TrainConfig.from_dict({"epochs": epochs, "batch_size": 16, "lr": 0.01,
                                    "device": "cpu", "progress": False})
    fit(model, tiny_data(16 * steps, size=x.shape[-1]), None, config, tmp_path, hooks=[hook],
        resume=False)
    hook.detach()
    return graph, hook


def test_gate_mask_is_hard_with_the_soft_samples_gradient():
    graph = build_graph(TinyNet(), (torch.randn(1, 3, 8, 8),))
    gates = ChannelGates(graph, gated_groups(graph))
    gates.tau = 0.5
    name = gates.names[0]
    torch.manual_seed(3)
    mask = gates.sample()[name]
    assert set(mask.tolist()) <= {0.0, 1.0}
    (mask * torch.arange(mask.numel())).sum().backward()
    hard_grad = gates.logits[name].grad.clone()
    gates.logits[name].grad = None
    torch.manual_seed(3)  # the same Gumbel noise, soft sample
    soft = F.gumbel_softmax(gates.logits[name], tau=0.5, hard=False)[:, 1]
    assert torch.equal(mask, (soft > 0.5).float())
    (soft * torch.arange(mask.numel())).sum().backward()
    assert torch.allclose(hard_grad, gates.logits[name].grad)
    theta = gates.logits[name].detach()
    assert torch.equal(gates.eval_masks()[name], (theta[:, 1] > theta[:, 0]).float())


def test_tau_decays_exponentially_from_tau_start_to_tau_end():
    taus = [gate_temperature(e, 10, 1.0, 0.1) for e in range(11)]
    assert taus[0] == 1.0 and taus[10] == pytest.approx(0.1)
    ratios = [b / a for a, b in zip(taus, taus[1:])]
    assert ratios == pytest.approx([0.1 ** 0.1] * 10)


@pytest.mark.parametrize("streams", [False, True])
def test_masked_macs_equals_count_macs_of_the_pruned_model(streams):
    model = resnet(**({"shortcut": "B"} if streams else {})).eval()  # B: no padded channels
    x = torch.randn(1, 3, 16, 16)
    graph = build_graph(model, (x,))
    names = gated_groups(graph, streams)
    assert len(names) == (12 if streams else 9)  # 9 inner groups + 3 stage streams
    macs = MaskedMacs(model, graph, (x,), names)
    assert macs.base_total == prunekit.count_macs(model, x)
    g = torch.Generator().manual_seed(0)
    for keep in (0.2, 0.5, 0.9):
        masks = {n: (torch.rand(graph.by_name[n].size, generator=g) < keep).float()
                 for n in names}
        for m in masks.values():
            m[0] = 1.0
        plan = {n: [int(i) for i in torch.nonzero(m).flatten()] for n, m in masks.items()}
        pruned = copy.deepcopy(model)
        prunekit.prune(pruned, x, plan=plan)
        assert float(macs(masks)) == pytest.approx(prunekit.count_macs(pruned, x), rel=1e-6)


def test_masked_macs_is_differentiable_in_the_masks():
    model = TinyNet()
    x = torch.randn(1, 3, 8, 8)
    graph = build_graph(model, (x,))
    names = gated_groups(graph)
    macs = MaskedMacs(model, graph, (x,), names)
    masks = {n: torch.ones(graph.by_name[n].size, requires_grad=True) for n in names}
    macs(masks).backward()
    assert all((masks[n].grad > 0).all() for n in names)


def test_search_reaches_the_macs_target_within_one_percent(tmp_path):
    model = resnet()
    x = torch.randn(1, 3, 16, 16)
    graph, hook = search(model, x, tmp_path, target=0.6, epochs=8)
    base = prunekit.count_macs(model, x)
    for fit_, tolerance in (("argmax", 0.1), ("threshold", 0.01)):
        pruned = copy.deepcopy(model)
        prunekit.prune(pruned, x, plan=kdfs_plan(hook, macs_fit=fit_), graph=graph)
        kept = prunekit.count_macs(pruned, x) / base
        assert abs(kept / 0.6 - 1) <= tolerance, fit_
        if fit_ == "argmax":  # what the search reports is what removal gives
            assert hook.history[-1]["kept_macs"] == pytest.approx(kept, rel=1e-6)


def test_compact_model_equals_the_masked_one_and_counts_are_honoured(tmp_path):
    model = resnet(shortcut="B")
    x = torch.randn(4, 3, 16, 16)
    graph, hook = search(model, x[:1], tmp_path, epochs=2, steps=2, streams=True)
    model.eval()
    hook.on_train_start(model, None)  # gates back on: eval mode -> argmax masks
    with torch.no_grad():
        masked = model(x)
    hook.detach()
    plan = kdfs_plan(hook)
    assert all(len(v) >= 1 for v in plan.values())
    prunekit.prune(model, x[:1], plan=plan, graph=graph)
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-5, rtol=1e-4)
    counts = {n: 3 for n in hook.names}
    top = kdfs_plan(hook, counts)
    for n, kept in top.items():
        margin = hook.gates.logits[n].detach() @ torch.tensor([-1.0, 1.0])
        assert len(kept) == 3 and set(kept) == set(margin.topk(3).indices.tolist())


def test_rc_and_kd_terms_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    t = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    direct = []
    for a, b in zip(s, t):
        maps = []
        for f in (a, b):
            m = (f ** 2).mean(1).reshape(2, -1)
            maps.append(m / m.norm(dim=1, keepdim=True))
        direct.append(((maps[0] - maps[1]) ** 2).mean())
    assert float(rc_term(s, t)) == pytest.approx(float(sum(direct) / 2), rel=1e-5)
    assert attention_map(s[0]).norm(dim=1) == pytest.approx(torch.ones(2))
    zs, zt = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    ps, pt = torch.softmax(zs / 3, 1), torch.softmax(zt / 3, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean() * 9
    assert float(kd_term(zs, zt, 3.0)) == pytest.approx(float(kl), rel=1e-5)


def test_resume_restores_the_gates(tmp_path):
    model = resnet()
    x = torch.randn(1, 3, 16, 16)
    _, hook = search(model, x, tmp_path, epochs=2, steps=2)
    fresh = KDFSSearch(model, hook.graph, (x,), copy.deepcopy(model), target=0.6, epochs=2)
    fresh.load_state_dict(hook.state_dict())
    assert kdfs_plan(fresh) == kdfs_plan(hook) and fresh.history == hook.history


def test_bad_options_are_refused_before_work():
    method = get_method("kdfs")
    assert method.trains and set(method.target_kinds) == {"macs_reduction", "counts"}
    c = method().config
    assert (c.macs_weight, c.kd_weight, c.kd_temperature, c.rc_weight, c.gate_lr) == \
        (1e4, 0.05, 3.0, 1000.0, 1e-2)
    for bad, match in (({"tau_end": 2.0}, "tau_end"), ({"student_init": "x"}, "student_init"),
                       ({"search_epochs": 0}, "search_epochs"), ({"kd_temperature": 0},
                                                                  "kd_temperature"),
                       ({"feature_points": "layer1"}, "feature_points"),
                       ({"search": {"lrr": 1}}, "lrr")):
        with pytest.raises(ConfigError, match=match):
            method.Config.from_dict(bad)
    with pytest.raises(ConfigError, match="search_epochs must be in"):
        _split_epochs(3, 4)
    assert _split_epochs(400, None) == (350, 50) and _split_epochs(2, None) == (1, 1)
    model = TinyNet()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="not a module"):
        KDFSSearch(model, build_graph(model, (x,)), (x,), copy.deepcopy(model), target=0.5,
                   epochs=1, feature_points=("layer9",))


@pytest.mark.shared_data
@needs_shared
def test_cli_kdfs(tmp_path):
    run = tmp_path / "kdfs"
    assert main(["prune", "--model", "cifar_resnet20", "--weights", "pretrained", "--data",
                 str(SHARED), "--method", "kdfs", "--macs-reduction", "0.3",
                 "--finetune-epochs", "2", "--finetune-max-steps", "2",
                 "--finetune-batch-size", "16", "--eval-splits", "test-lossless", "--limit",
                 "50", "--latency-batches", "1", "--latency-runs", "2", "--out",
                 str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    info = report["kdfs"]
    assert (info["search_epochs"], info["finetune_epochs"]) == (1, 1)
    assert report["finetuned"]["macs"] < report["before"]["macs"]
    assert (run / "kdfs_search" / "last.pt").exists() and (run / "finetune" / "last.pt").exists()
    loaded = pio.load(run / "model.safetensors")
    assert prunekit.count_macs(loaded, torch.randn(1, 3, 32, 32)) == report["finetuned"]["macs"]


class _Data:
    def __init__(self, fail=False):
        self.fail = fail

    def train_set(self):
        if self.fail:
            raise RuntimeError("no data today")
        return tiny_data(32, size=16)

    def val_set(self):
        return None


def _context(tmp_path, target, epochs=2, fail=False):
    from prunekit.methods import MethodContext
    from prunekit.plan import PlanTarget
    config = TrainConfig.from_dict({"epochs": epochs, "batch_size": 16, "lr": 0.01,
                                    "device": "cpu", "progress": False})
    return MethodContext(example_inputs=(torch.randn(1, 3, 16, 16),),
                         target=PlanTarget(**target), finetune=config, out_dir=tmp_path,
                         data=_Data(fail))


def test_method_keeps_the_given_counts_and_fine_tunes_the_compact_model(tmp_path):
    model = resnet()
    x = torch.randn(2, 3, 16, 16)
    graph = build_graph(model, (x[:1],))
    counts = {n: 5 for n in gated_groups(graph)}
    stem = graph.by_name["conv1"].size  # an ungated stream named at its full size is accepted
    result = get_method("kdfs")().run(model, _context(tmp_path, {"counts": {**counts,
                                                                           "conv1": stem}}))
    assert {n: len(v) for n, v in result.plan.items()} == counts and result.trained
    assert model.layer1[0].conv1.out_channels == 5 and model(x).shape == (2, 10)
    info = result.extras["kdfs"]
    assert (info["search_epochs"], info["finetune_epochs"]) == (1, 1)
    assert info["achieved_kept_macs"] == pytest.approx(info["target_kept_macs"], rel=1e-6)
    assert result.summary["epochs_run"] == 1


def test_counts_for_ungated_groups_are_refused(tmp_path):
    model = resnet()
    with pytest.raises(ConfigError, match="counts name other groups"):
        get_method("kdfs")().run(model, _context(tmp_path, {"counts": {"conv1": 8}}))


def test_a_failed_run_leaves_the_model_as_it_was(tmp_path):
    model = resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = get_method("kdfs")({"student_init": "random"})
    with pytest.raises(RuntimeError, match="no data today"):
        method.run(model, _context(tmp_path, {"macs_reduction": 0.3}, fail=True))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model._forward_hooks and not model._forward_pre_hooks
