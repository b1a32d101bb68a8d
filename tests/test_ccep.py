"""CCEP (Shang et al., IJCAI 2022): the bounded and swap mutations, (mu + lambda) selection,
the search improving val accuracy, masked == pruned fitness, exact counts, MACs targets,
bad options and the method through the prune job."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import prunekit
from prunekit.criteria.masked_eval import evaluate_batches, evaluate_masked
from prunekit.errors import ConfigError
from prunekit.methods import MethodContext, get_method
from prunekit.methods.ccep import CCEP, fitness_batches, search_round
from prunekit.methods.ccep_search import (choose, evolve, initial_population, lower_bound,
                                          mutate, select, swap_mutate)
from prunekit.plan import PlanTarget
from prunekit.train import TrainConfig

from conftest import SHARED, TinyNet, TinyRunData as Data, needs_shared, tiny_data

pytestmark = pytest.mark.usefixtures("single_thread")

X1 = torch.randn(1, 3, 8, 8)


def test_mutation_respects_the_bound_and_always_restores():
    rng = np.random.default_rng(0)
    n, lower = 20, lower_bound(20, 0.83)
    assert lower == 17  # ceil(16.6)
    for trial in range(300):
        bits = np.ones(n, dtype=bool)
        bits[rng.choice(n, size=int(rng.integers(0, 4)), replace=False)] = False
        child = mutate(bits, 0.5, lower, rng)
        assert child.sum() >= min(lower, bits.sum())
        assert child.sum() >= lower or child.sum() >= bits.sum()
    # restoring is always allowed, even far below the bound
    low = np.zeros(n, dtype=bool)
    low[:3] = True
    assert mutate(low, 1.0, lower, rng).all()
    # a fixed channel is never pruned
    fixed = np.zeros(n, dtype=bool)
    fixed[5] = True
    assert all(mutate(np.ones(n, dtype=bool), 1.0, 1, rng, fixed)[5] for _ in range(20))


def test_swap_mutation_keeps_the_size_and_initial_population():
    rng = np.random.default_rng(1)
    bits = np.zeros(12, dtype=bool)
    bits[:5] = True
    changed = False
    for _ in range(50):
        child = swap_mutate(bits, 0.3, rng)
        assert child.sum() == 5
        changed |= not np.array_equal(child, bits)
    assert changed
    pop = initial_population(12, 6, 0.5, lower_bound(12, 0.9), rng)
    assert pop[0].all() and len(pop) == 6 and all(p.sum() >= 11 for p in pop)
    exact = initial_population(12, 6, 0.9, 1, rng, exact=4)
    assert all(p.sum() == 4 for p in exact)


def test_mu_plus_lambda_selection_order():
    pop = [np.array(b, dtype=bool) for b in
           ([1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 0], [1, 0, 0])]
    fitness = [0.5, 0.7, 0.7, 0.9, 0.5]
    survivors, values = select(pop, fitness, 4)
    # fitness desc, then fewer kept first: 0.9, 0.7 (1 kept), 0.7 (2 kept), 0.5 (1 kept)
    assert [p.tolist() for p in survivors] == [[1, 1, 0], [0, 0, 1], [1, 0, 1], [1, 0, 0]]
    assert values == [0.9, 0.7, 0.7, 0.5]
    full = [np.ones(3, dtype=bool), np.array([1, 0, 1], dtype=bool)]
    assert choose(full, [0.9, 0.8])[0].tolist() == [1, 0, 1]  # runner-up for the unpruned
    assert choose(full, [0.9, 0.8], keep_unpruned=True)[0].all()


def toy_problem(seed=0, harmful=(0, 1), n=128):
    """A TinyNet and val batches labelled by the net itself with conv1's ``harmful``
    channels masked (their weight into conv2 scaled up): that mask scores 1.0."""
    torch.manual_seed(seed)
    model = TinyNet().eval()
    with torch.no_grad():
        model.conv2.weight[:, list(harmful)] *= 4
    graph = prunekit.build_graph(model, X1)
    images = tiny_data(n, seed=seed).tensors[0]
    good = {"conv1": [i for i in range(8) if i not in harmful]}
    with torch.no_grad(), prunekit.criteria.masked_eval.masked_channels(model, graph, good):
        logits = model(images)  # centre and spread the logits: every class is predicted
        model.fc.weight *= 10 / logits.std(0).clamp_min(1e-6)[:, None]
        model.fc.bias.sub_(model(images).mean(0))
        labels = model(images).argmax(1)
    assert len(set(labels.tolist())) == 4
    return model, graph, fitness_batches(torch.utils.data.TensorDataset(images, labels),
                                         n, 64, 0), good


def test_search_improves_val_accuracy_over_its_random_start():
    model, graph, batches, good = toy_problem()
    before = copy.deepcopy(model.state_dict())
    config = CCEP.Config(pop_size=6, generations=8, pop_init_rate=0.8, prune_limitation=0.75)
    result = search_round(model, graph, ["conv1"], batches, config, 0)["conv1"]
    assert result["fitness"] > result["initial_mean"]   # better than the random start
    assert result["fitness"] >= result["initial_best"]
    assert result["history"] == sorted(result["history"])  # elitist: never worse
    assert result["bits"].sum() >= lower_bound(8, 0.75) and not result["bits"].all()
    for key, value in model.state_dict().items():  # the model is left as it was
        assert torch.equal(value, before[key])
    full = evaluate_batches(model, batches)["accuracy"]
    assert result["fitness"] > full   # removing the harmful channels helps


def test_fitness_under_the_mask_equals_the_pruned_models_accuracy():
    model, graph, batches, _ = toy_problem(seed=3)
    config = CCEP.Config(pop_size=4, generations=2, prune_limitation=0.6)
    result = search_round(model, graph, ["conv1"], batches, config, 0)["conv1"]
    plan = {"conv1": np.flatnonzero(result["bits"]).tolist()}
    masked = evaluate_masked(model, graph, plan, batches)
    pruned = copy.deepcopy(model)
    prunekit.prune(pruned, X1, plan=plan)
    direct = evaluate_batches(pruned, batches)
    assert masked["accuracy"] == direct["accuracy"] == result["fitness"]
    assert masked["loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert pruned.conv1.out_channels == len(plan["conv1"])


def test_crossover_and_exact_search():
    calls = []

    def fitness_of(bits):
        calls.append(bits.copy())
        return float(bits[:3].sum())   # the best keeps channels 0..2

    out = evolve(10, fitness_of, np.random.default_rng(0), pop_size=6, generations=6,
                 crossover_rate=0.3, exact=3)
    assert all(c.sum() == 3 for c in calls) and out["bits"].sum() == 3
    assert out["evaluations"] == len({c.tobytes() for c in calls})  # cached per individual
    calls.clear()
    out = evolve(10, fitness_of, np.random.default_rng(0), generations=3, crossover_rate=1.0,
                 prune_limitation=0.7)
    assert calls and all(c.sum() >= 7 for c in calls) and out["bits"].sum() >= 7


def context(tmp_path, x, **target):
    finetune = TrainConfig(epochs=1, lr=0.01, batch_size=16, progress=False, seed=0)
    return MethodContext(example_inputs=(x,), target=PlanTarget(**target), finetune=finetune,
                         out_dir=Path(tmp_path), data=Data(size=x.shape[-1]))


def test_exact_counts_variant_returns_those_counts(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    method = CCEP({"pop_size": 3, "generations": 2, "fitness_images": 32})
    result = method.run(model, context(tmp_path, X1, counts={"conv1": 5, "conv2": 6}))
    assert {k: len(v) for k, v in result.plan.items()} == {"conv1": 5, "conv2": 6}
    assert model.conv1.out_channels == 5 and model.conv2.out_channels == 6
    assert result.extras["ccep"]["reached"] and len(result.extras["ccep"]["history"]) == 1
    torch.manual_seed(0)
    again = TinyNet()
    assert CCEP({"pop_size": 3, "generations": 2, "fitness_images": 32}).run(
        again, context(tmp_path / "b", X1, counts={"conv1": 5, "conv2": 6})).plan == \
        result.plan   # seeded, deterministic


def test_macs_target_is_reached_within_one_percent_over_rounds(tmp_path):
    model = prunekit.models.create("cifar_resnet20").eval()
    x = torch.randn(1, 3, 16, 16)
    macs0 = prunekit.count_macs(model, x)
    method = CCEP({"pop_size": 3, "generations": 1, "fitness_images": 16,
                   "prune_limitation": 0.8, "round_finetune_max_steps": 1})
    result = method.run(model, context(tmp_path, x, macs_reduction=0.3))
    reduction = 1 - prunekit.count_macs(model, x) / macs0
    history = result.extras["ccep"]["history"]
    assert result.extras["ccep"]["reached"] and len(history) >= 2  # one round cannot reach it
    assert 0.3 <= reduction <= 0.31
    assert history[-1]["macs_reduction"] == pytest.approx(reduction, abs=1e-6)
    graph = prunekit.build_graph(prunekit.models.create("cifar_resnet20"), x)
    streams = set(prunekit.plan.streams.stream_groups(graph))
    assert result.plan and not set(result.plan) & streams   # inner groups only
    assert (tmp_path / "ccep" / "round0" / "last.pt").exists()  # fine-tuned between rounds


def test_round_finetuning_gets_the_distillation_and_budget(tmp_path, monkeypatch):
    import prunekit.methods.ccep as ccep_module
    seen = []
    monkeypatch.setattr(ccep_module, "fit", lambda model, train, val, config, out, **kw:
                        seen.append((config.epochs, config.max_steps_per_epoch, kw)))
    torch.manual_seed(0)
    ctx = context(tmp_path, X1, macs_reduction=0.9)
    ctx.distill = teacher = object()
    method = CCEP({"rounds": 3, "pop_size": 3, "generations": 1, "fitness_images": 16,
                   "prune_limitation": 0.7,
                   "round_finetune_epochs": 2, "round_finetune_max_steps": 3})
    with pytest.warns(prunekit.plan.MacsTargetWarning):
        method.run(TinyNet(), ctx)
    assert len(seen) == 2   # after every round but the last (the job fine-tunes that one)
    assert all(s[:2] == (2, 3) and s[2]["distill"] is teacher and s[2]["resume"] is False
               for s in seen)


def test_recipe_is_the_readme_cifar_command():
    from prunekit.recipes import load_recipe
    recipe = load_recipe("ccep_resnet56")
    config = CCEP.Config.from_dict({k: v for k, v in recipe["method"].items() if k != "name"})
    assert (config.pop_init_rate, config.prune_limitation, config.rounds, config.pop_size,
            config.generations, config.round_finetune_epochs) == (0.95, 0.9, 20, 6, 10, 100)
    assert recipe["finetune"]["milestones"] == [50] and recipe["finetune"]["batch_size"] == 128
    assert recipe["plan"] == {"macs_reduction": 0.6342}
    assert "sign differs" in recipe["paper"]


def test_rounds_running_out_warn(tmp_path):
    torch.manual_seed(0)
    method = CCEP({"rounds": 1, "pop_size": 3, "generations": 1, "fitness_images": 16})
    with pytest.warns(prunekit.plan.MacsTargetWarning, match="short of the target"):
        result = method.run(TinyNet(), context(tmp_path, X1, macs_reduction=0.6))
    assert not result.extras["ccep"]["reached"]


@pytest.mark.parametrize("options, message", [
    ({"pop_size": 0}, "pop_size"), ({"prune_limitation": 1.0}, "prune_limitation"),
    ({"mutation_rate": 0}, "mutation_rate"), ({"generations": -1}, "generations"),
    ({"fitness_images": 2.5}, "fitness_images"), ({"popsize": 3}, "unknown"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        get_method("ccep").Config.from_dict(options)


def test_bad_targets_are_refused_before_work(tmp_path):
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="unknown groups"):
        CCEP().run(model, context(tmp_path, X1, counts={"nope": 3}))
    with pytest.raises(ConfigError, match="macs_reduction or counts"):
        CCEP().run(model, context(tmp_path, X1, ratio=0.5))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "ratio" not in CCEP.target_kinds


@pytest.mark.shared_data
@needs_shared
def test_prune_job_runs_ccep(tmp_path):
    from prunekit.cli import main

    run = tmp_path / "run"
    assert main(["prune", "--model", "cifar_resnet20", "--weights", "pretrained", "--data",
                 str(SHARED), "--method", "ccep", "--macs-reduction", "0.1",
                 "--pop-size", "2", "--generations", "1", "--fitness-images", "16",
                 "--finetune-epochs", "1", "--finetune-max-steps", "2",
                 "--finetune-batch-size", "16", "--eval-splits", "test-lossless", "--limit",
                 "40", "--latency-batches", "", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert 0.1 <= 1 - report["finetuned"]["macs"] / report["before"]["macs"] <= 0.11
    assert report["ccep"]["reached"] and report["plan"]
