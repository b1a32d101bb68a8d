"""HBFP (prunekit.methods.hbfp): the norm recorder against direct norms and across a resume,
distances and greedy pairs against a direct O(n^2) implementation, the regulariser's value and
gradient against autograd of the direct formula, the pruned member, counts and MACs targets,
iterations composing into one plan, the stop rule, bad options and the prune job."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import prunekit
from prunekit.criteria import get_criterion
from prunekit.errors import ConfigError
from prunekit.graph import build_graph
from prunekit.methods import MethodContext, get_method, list_methods
from prunekit.methods import hbfp as hbfp_module
from prunekit.methods.hbfp import HBFP, HBFPStopWarning, most_removable, phase_steps
from prunekit.methods.hbfp_history import (IterationPairs, NormHistory, PairRegulariser,
                                           channel_norms, greedy_pairs, trajectory_distances)
from prunekit.plan import MacsTargetWarning, PlanTarget
from prunekit.train import TrainConfig, fit

from conftest import SHARED, TinyNet, TinyRunData as Data, needs_shared, tiny_data

pytestmark = pytest.mark.usefixtures("single_thread")

X8 = torch.randn(1, 3, 8, 8)
X16 = torch.randn(1, 3, 16, 16)


def direct_norms(model):
    return {"conv1": model.conv1.weight.detach().double().abs().sum((1, 2, 3)).numpy(),
            "conv2": model.conv2.weight.detach().double().abs().sum((1, 2, 3)).numpy()}


class Spy:
    """Records the directly computed norms at the same moments as the recorder."""

    def __init__(self):
        self.rows = []

    def on_train_start(self, model, optimizer):
        self.model = model

    def on_epoch_end(self, epoch):
        self.rows.append(direct_norms(self.model))


def train_config(epochs, **kw):
    return TrainConfig.from_dict({"epochs": epochs, "batch_size": 16, "lr": 0.05,
                                  "schedule": "constant", "device": "cpu", "progress": False,
                                  **kw})


def test_recorder_equals_direct_norms_every_epoch_and_survives_resume(tmp_path):
    torch.manual_seed(0)
    model, data = TinyNet(), tiny_data(48)
    start = copy.deepcopy(model.state_dict())
    graph = build_graph(model, (X8,))
    recorder, spy = NormHistory(graph, ["conv1", "conv2"]), Spy()
    fit(model, data, None, train_config(3), tmp_path / "a", hooks=[recorder, spy])
    records = recorder.records
    assert records["conv1"].shape == (3, 8) and len(recorder) == 3
    for name in ("conv1", "conv2"):
        np.testing.assert_allclose(records[name], np.stack([r[name] for r in spy.rows]),
                                   rtol=1e-12)
    assert not np.allclose(records["conv1"][0], records["conv1"][-1])  # training moved them
    # interrupted after 2 epochs, resumed with a fresh recorder: the same history
    model.load_state_dict(start)
    first = NormHistory(graph, ["conv1", "conv2"])
    fit(model, data, None, train_config(2), tmp_path / "b", hooks=[first])
    assert len(first) == 2
    model.load_state_dict(start)
    resumed = NormHistory(graph, ["conv1", "conv2"])
    with pytest.warns(UserWarning, match="different config"):  # 2 -> 3 epochs
        fit(model, data, None, train_config(3), tmp_path / "b", hooks=[resumed])
    for name in ("conv1", "conv2"):
        np.testing.assert_allclose(resumed.records[name], records[name], rtol=1e-6)


def test_recording_every_k_steps_also_closes_each_epoch(tmp_path):
    torch.manual_seed(1)
    model = TinyNet()
    graph = build_graph(model, (X8,))
    recorder = NormHistory(graph, ["conv1"], every=2)
    fit(model, tiny_data(48), None, train_config(2), tmp_path, hooks=[recorder])
    # 3 steps per epoch: after steps 1, 2 (epoch end), 3, 5 (also the epoch end)
    assert len(recorder) == 4
    np.testing.assert_allclose(recorder.records["conv1"][-1], direct_norms(model)["conv1"],
                               rtol=1e-12)


def direct_distances(h):
    n = h.shape[1]
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = sum(abs(h[t, i] - h[t, j]) for t in range(h.shape[0]))
    return d


def direct_pairs(d, eligible):
    """Repeatedly the unused eligible pair with the smallest (D, i, j)."""
    n, used, pairs = d.shape[0], set(), []
    while True:
        best = None
        for i in range(n):
            for j in range(i + 1, n):
                if i in used or j in used or not (eligible[i] and eligible[j]):
                    continue
                if best is None or (d[i, j], i, j) < best:
                    best = (d[i, j], i, j)
        if best is None:
            return pairs
        pairs.append((best[1], best[2]))
        used |= {best[1], best[2]}


@pytest.mark.parametrize("seed", range(6))
def test_distances_and_greedy_pairs_equal_a_direct_implementation(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 12))
    # integer histories: many exact ties between distances
    history = rng.integers(0, 3, size=(int(rng.integers(1, 5)), n)).astype(float)
    if seed % 2:
        history = rng.normal(size=history.shape)
    d = trajectory_distances(history)
    np.testing.assert_allclose(d, direct_distances(history), atol=1e-12)
    eligible = rng.random(n) > 0.2
    pairs = greedy_pairs(d, eligible)
    assert pairs == direct_pairs(d, eligible)
    flat = [c for p in pairs for c in p]
    assert len(flat) == len(set(flat)) and all(eligible[c] for c in flat)  # disjoint
    assert len(pairs) == int(eligible.sum()) // 2
    assert greedy_pairs(d, eligible, limit=2) == pairs[:2]


def test_tied_distances_pair_lower_indices_first():
    d = np.ones((4, 4)) - np.eye(4)
    assert greedy_pairs(d) == [(0, 1), (2, 3)]


def test_channel_norms_equal_the_l1_criterion_on_residual_streams():
    torch.manual_seed(0)
    model = prunekit.models.create("cifar_resnet20")
    graph = build_graph(model, (X16,))
    l1 = get_criterion("l1")
    for group in graph.prunable_groups():
        np.testing.assert_allclose(channel_norms(model, group).detach().double().numpy(),
                                   l1.score_group(group, model), rtol=1e-5)
    assert any(len({m.module for m, _ in g.producers()}) > 1 for g in graph.prunable_groups())


def test_regulariser_value_and_gradient_equal_the_direct_formula():
    torch.manual_seed(0)
    model = TinyNet().train()
    graph = build_graph(model, (X8,))
    pairs = {"conv1": [(0, 1), (2, 5)], "conv2": [(3, 4)]}
    regulariser = PairRegulariser(graph, pairs, weight=0.5)
    value = regulariser.extra_loss(model)
    value.backward()
    grads = [model.conv1.weight.grad.clone(), model.conv2.weight.grad.clone()]
    model.zero_grad()
    n1 = model.conv1.weight.abs().sum((1, 2, 3))
    n2 = model.conv2.weight.abs().sum((1, 2, 3))
    direct = 0.5 * ((n1[0] - n1[1]).abs() + (n1[2] - n1[5]).abs() + (n2[3] - n2[4]).abs())
    direct.backward()
    assert float(value.detach()) == pytest.approx(float(direct.detach()), rel=1e-6)
    torch.testing.assert_close(grads[0], model.conv1.weight.grad)
    torch.testing.assert_close(grads[1], model.conv2.weight.grad)
    assert grads[0][[0, 1, 2, 5]].abs().sum() > 0     # a real gradient (the code's has none)
    assert grads[0][[3, 4, 6, 7]].abs().sum() == 0    # unpaired filters are left alone
    # one step down the gradient brings the pairs closer
    with torch.no_grad():
        model.conv1.weight -= 0.01 * grads[0]
        model.conv2.weight -= 0.01 * grads[1]
    assert float(regulariser.extra_loss(model).detach()) < float(value.detach())
    assert regulariser.extra_loss(model.eval()) is None  # training steps only


def test_smaller_norm_member_goes_and_pruned_equals_zeroed(prune_and_compare,
                                                           assert_matches_zeroed):
    torch.manual_seed(0)
    model = TinyNet()
    graph = build_graph(model, (X8,))
    # channel histories: (0, 5) stay 0.1 apart, (2, 7) 0.2, the rest far apart
    base = np.array([1.0, 9.0, 3.0, 20.0, 30.0, 1.1, 40.0, 3.2])
    history = np.stack([base * (1 + 0.01 * t) for t in range(4)])
    pairing = IterationPairs(graph, {"conv1": history}, {"conv1": history.sum(0)})
    plan, pairs, removed = pairing.plan({"conv1": 2})
    assert pairs["conv1"] == [(0, 5), (2, 7)]
    assert removed["conv1"] == [0, 2]            # the smaller norm of each pair
    assert plan["conv1"] == [1, 3, 4, 5, 6, 7]
    current = {"conv1": np.array([5, 0, 0, 0, 0, 1, 0, 9.0])}  # importance decides, not D
    assert IterationPairs(graph, {"conv1": history}, current).plan({"conv1": 2})[2] == \
        {"conv1": [2, 5]}
    x = torch.randn(4, 3, 8, 8)
    check = prune_and_compare(model, x, plan=plan)
    assert_matches_zeroed(check, "hbfp plan")
    assert model.conv1.out_channels == 6


def test_schedules_and_budget():
    assert most_removable(8, 1) == 4 and most_removable(8, 2) == 6 and most_removable(8, 3) == 7
    assert hbfp_module.pairs_this_iteration(7, 8, 3) == 4   # 8 -> 4 -> 2 -> 1
    assert hbfp_module.pairs_this_iteration(3, 16, 3) == 1
    h, o, r = phase_steps(410, 1, 1)
    assert (h, o, r) == (200, 10, [200])      # the code's epochs with one iteration
    h, o, r = phase_steps(100, 10, 2, history_epochs=2, optimize_epochs=1)
    assert (h, o, r) == (20, 10, [30, 30])
    assert phase_steps(3, 3, 1) == (1, 1, [1])
    with pytest.raises(ConfigError, match="budget"):
        phase_steps(10, 10, 1, history_epochs=1)


def context(tmp_path, x, epochs=2, **target):
    finetune = TrainConfig(epochs=epochs, lr=0.01, batch_size=16, progress=False, seed=0,
                           device="cpu")
    return MethodContext(example_inputs=(x,), target=PlanTarget(**target), finetune=finetune,
                         out_dir=Path(tmp_path), data=Data(size=x.shape[-1]))


def test_counts_target_gives_exact_counts_over_iterations(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    result = HBFP().run(model, context(tmp_path, X8, counts={"conv1": 5, "conv2": 6}))
    assert {k: len(v) for k, v in result.plan.items()} == {"conv1": 5, "conv2": 6}
    assert model.conv1.out_channels == 5 and model.conv2.out_channels == 6 and result.trained
    info = result.extras["hbfp"]
    assert info["reached"] and len(info["iterations"]) == 1
    assert info["phase_steps"] == {"history": 3, "optimize": 1, "retrain": [2]}
    step = info["iterations"][0]
    assert step["removed"]["conv1"] == sorted(set(range(8)) - set(result.plan["conv1"]))
    assert all(len(p) == 2 for p in step["pairs"]["conv1"]) and len(step["pairs"]["conv1"]) == 3
    assert (tmp_path / "finetune" / "last.pt").exists()
    assert (tmp_path / "hbfp" / "iteration1" / "optimize" / "last.pt").exists()
    torch.manual_seed(0)
    twice = HBFP({"iterations": 2}).run(TinyNet(), context(tmp_path / "b", X8, epochs=3,
                                                           counts={"conv1": 2}))
    assert len(twice.plan["conv1"]) == 2      # 8 -> 4 -> 2: two iterations of pairs
    assert [len(s["pairs"]["conv1"]) for s in twice.extras["hbfp"]["iterations"]] == [4, 2]


def test_a_rerun_replays_the_finished_phases(tmp_path):
    torch.manual_seed(0)
    start = TinyNet()
    first, again = copy.deepcopy(start), copy.deepcopy(start)
    method = HBFP({"iterations": 2})
    done = method.run(first, context(tmp_path, X8, epochs=3, counts={"conv1": 3, "conv2": 5}))
    replay = method.run(again, context(tmp_path, X8, epochs=3, counts={"conv1": 3, "conv2": 5}))
    assert replay.plan == done.plan
    assert replay.extras["hbfp"]["iterations"][1]["pairs"] == \
        done.extras["hbfp"]["iterations"][1]["pairs"]
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def fake_fit(calls, vals=None):
    """fit without training: calls the hooks as fit does, returns the next val accuracy."""
    vals = iter(vals or [])

    def run(model, train_set, val_set, config, out, hooks=(), resume=True, distill=None):
        calls.append({"config": config, "out": out, "distill": distill, "hooks": list(hooks)})
        for hook in hooks:
            getattr(hook, "on_train_start", lambda *a: None)(model, None)
        step = 0
        model.train()
        for epoch in range(config.epochs):
            for _ in range(config.max_steps_per_epoch or 3):
                for hook in hooks:
                    getattr(hook, "extra_loss", lambda m: None)(model)
                    getattr(hook, "after_step", lambda s: None)(step)
                step += 1
            for hook in hooks:
                getattr(hook, "on_epoch_end", lambda e: None)(epoch)
        model.eval()
        return {"final_val_top1": next(vals, 50.0), "epochs_run": config.epochs}
    return run


def test_iterations_compose_into_one_plan_and_macs_land_on_target(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hbfp_module, "fit", fake_fit(calls))
    torch.manual_seed(0)
    model = prunekit.models.create("cifar_resnet20").eval()
    original = copy.deepcopy(model)
    macs0 = prunekit.count_macs(model, X16)
    ctx = context(tmp_path, X16, epochs=6, macs_reduction=0.45)
    ctx.distill = teacher = object()
    result = HBFP({"iterations": 3, "record_every": 1}).run(model, ctx)
    reduction = 1 - prunekit.count_macs(model, X16) / macs0
    info = result.extras["hbfp"]
    assert 0.45 <= reduction <= 0.46 and info["reached"] and len(info["iterations"]) == 3
    done = [s["macs_reduction"] for s in info["iterations"]]
    goals = [1 - 0.55 ** (i / 3) for i in (1, 2, 3)]   # the same share of the rest each time
    assert all(g <= d <= g + 0.02 for d, g in zip(done, goals))
    streams = set(prunekit.plan.streams.stream_groups(build_graph(original, (X16,))))
    assert set(result.plan) & streams                  # residual streams paired too
    # the weights did not move, so the composed plan on the original is the same network
    prunekit.prune(original, X16, plan=result.plan)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))
    assert all(c["distill"] is teacher for c in calls) and len(calls) == 1 + 3 * 2
    assert len({c["config"].seed for c in calls}) == len(calls)
    optimizers = [c for c in calls if any(isinstance(h, PairRegulariser) for h in c["hooks"])]
    assert len(optimizers) == 3 and all(h.values for c in optimizers for h in c["hooks"])


def test_stop_drop_stops_the_iterations_and_warns(tmp_path, monkeypatch):
    calls = []
    # history 90, iteration 1 retrain 89 (within 2), iteration 2 retrain 85: stop
    monkeypatch.setattr(hbfp_module, "fit", fake_fit(calls, [90.0, 0, 89.0, 0, 85.0]))
    torch.manual_seed(0)
    method = HBFP({"iterations": 3, "stop_drop": 2.0})
    with pytest.warns(MacsTargetWarning, match="fell more than 2.0"):
        result = method.run(TinyNet(), context(tmp_path, X8, epochs=4, macs_reduction=0.7))
    assert len(result.extras["hbfp"]["iterations"]) == 2 and not result.extras["hbfp"]["reached"]
    monkeypatch.setattr(hbfp_module, "fit", fake_fit([], [90.0, 0, 80.0]))
    with pytest.warns(HBFPStopWarning):
        HBFP({"iterations": 3, "stop_drop": 2.0}).run(
            TinyNet(), context(tmp_path / "b", X8, epochs=4, counts={"conv1": 1}))


@pytest.mark.parametrize("options, message", [
    ({"iterations": 0}, "iterations"), ({"record_every": "often"}, "record_every"),
    ({"record_every": 0}, "record_every"), ({"reg_weight": -1.0}, "reg_weight"),
    ({"stop_drop": float("nan")}, "stop_drop"), ({"history_epochs": 0}, "history_epochs"),
    ({"optimize_epochs": 1.5}, "optimize_epochs"), ({"prune_by": "size"}, "prune_by"),
    ({"iteration": 2}, "unknown"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        get_method("hbfp").Config.from_dict(options)


@pytest.mark.parametrize("target, options, message", [
    ({"ratio": 0.5}, {}, "macs_reduction or counts"),
    ({"counts": {"nope": 3}}, {}, "unknown group"),
    ({"counts": {"conv1": 1}}, {}, "needs 3 iterations"),
    ({"counts": {"conv1": 4}}, {"history_epochs": 2}, "budget"),
])
def test_bad_targets_are_refused_before_work(tmp_path, target, options, message):
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        HBFP(options).run(model, context(tmp_path, X8, **target))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "hbfp").exists()


def test_record_every_from_the_command_line_is_a_step_count():
    assert HBFP.Config.from_dict({"record_every": "20"}).record_every == 20
    assert "hbfp" in list_methods()


def test_recipe_is_the_papers_resnet56_setting():
    from prunekit.recipes import load_recipe
    recipe = load_recipe("hbfp_resnet56")
    config = HBFP.Config.from_dict({k: v for k, v in recipe["method"].items() if k != "name"})
    assert (config.iterations, config.history_epochs, config.optimize_epochs,
            config.stop_drop) == (4, 200, 10, 2.0)
    assert recipe["finetune"]["epochs"] == 200 + 4 * (10 + 200)
    assert recipe["finetune"]["batch_size"] == 32
    assert recipe["plan"] == {"macs_reduction": 0.7843}
    assert "reconstructed" in recipe["notes"].lower()
    assert "top1" not in recipe.get("expected", {})  # no accuracy presented as the paper's


@pytest.mark.shared_data
@needs_shared
def test_prune_job_runs_hbfp(tmp_path):
    from prunekit.cli import main

    run = tmp_path / "run"
    assert main(["prune", "--model", "cifar_resnet20", "--weights", "pretrained", "--data",
                 str(SHARED), "--method", "hbfp", "--macs-reduction", "0.2",
                 "--record-every", "1", "--finetune-epochs", "2", "--finetune-max-steps", "2",
                 "--finetune-batch-size", "16", "--eval-splits", "test-lossless", "--limit",
                 "40", "--latency-batches", "", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert 0.2 <= 1 - report["finetuned"]["macs"] / report["before"]["macs"] <= 0.21
    assert report["hbfp"]["reached"] and report["plan"]
    assert report["hbfp"]["iterations"][0]["records"] == 2   # every step of the history
    assert (run / "finetune" / "last.pt").exists()
