"""FSDP (Gkalelis & Mezaris, ICMEW 2020): the class-separability criterion, labels through the
calibration runner, the fractional steps on weights and gradients, the CS/GM split, resume
and the final removal."""
import copy
import itertools

import numpy as np
import pytest
import torch

import prunekit
from prunekit.criteria import ClassSeparability, get_criterion, run_calibration
from prunekit.criteria.calibration import CalibrationLabelsError
from prunekit.criteria.separability import class_separability
from prunekit.criteria.weight import distance_sums
from prunekit.methods import FractionalStepPruning, get_method
from prunekit.methods.fsdp import FSDP_TAU, fractional_step, split_counts
from prunekit.methods.soft_schedules import asymptotic_rate
from prunekit.train import TrainConfig, fit

from conftest import TinyNet, tiny_data

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread

X1 = torch.randn(1, 3, 8, 8)


def new_tiny(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def labelled(n_batches=2, size=16, classes=4, seed=0):
    images, labels = tiny_data(n_batches * size, seed=seed, classes=classes).tensors
    return [(images[i * size:(i + 1) * size], labels[i * size:(i + 1) * size])
            for i in range(n_batches)]


def hook_for(model, **kw):
    kw = {"calibration": labelled(), "ratio": 0.5, "cs_ratio": 0.25, "epochs": 11, **kw}
    return FractionalStepPruning(model=model, example_inputs=X1, **kw)


def started(model, optimizer=None, **kw):
    hook = hook_for(model, **kw)
    hook.on_train_start(model, optimizer)
    hook.on_epoch_start(0)
    return hook


def removed(hook, group):
    return sorted(set(range(hook.graph.by_name[group].size)) - set(hook.plan.get(group, [])))


def config(**kw):
    base = dict(epochs=3, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                schedule="constant", batch_size=8, progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------ the CS score
def test_cs_score_is_the_between_class_scatter_of_the_class_means():
    rng = np.random.default_rng(0)
    x = rng.random((30, 5))               # x_f(n): 30 images, 5 filters
    y = np.arange(30) % 4                 # 4 classes
    onehot = np.eye(4)[y]                 # R
    score = class_separability(onehot.T @ x, onehot.sum(0))
    for f in range(5):
        means = [x[y == c, f].mean() for c in range(4)]
        loop = sum((means[i] - means[j]) ** 2 for i, j in itertools.combinations(range(4), 2))
        assert score[f] == pytest.approx(loop, rel=1e-12)
        assert score[f] == pytest.approx(4 ** 2 * np.var(means), rel=1e-12)  # C^2 Var
        # the code's matrices: M = (R^T X_f)^T N^-1, P = C I - 1 1^T, score tr(M P M^T)
        m = (onehot.T @ x[:, [f]]).T @ np.diag(1 / onehot.sum(0))
        p = 4 * np.eye(4) - np.ones((4, 4))
        assert score[f] == pytest.approx(np.trace(m @ p @ m.T), rel=1e-12)
    # a class absent from the labels does not count (the code would divide by n_c = 0)
    padded = class_separability(np.vstack([onehot.T @ x, np.zeros((1, 5))]),
                                np.append(onehot.sum(0), 0))
    assert np.allclose(padded, score)


def test_criterion_matches_a_direct_computation_on_tinynet():
    model = new_tiny().eval()
    graph = prunekit.build_graph(model, X1)
    batches = labelled(n_batches=3)
    scores = get_criterion("class_separability", progress=False).score(graph, model, batches)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches]).numpy()
    with torch.no_grad():
        first = torch.relu(model.bn1(model.conv1(images)))
        second = torch.relu(model.bn2(model.conv2(first)))  # the 4-D map before the pooling
    for group, fmap in (("conv1", first), ("conv2", second)):
        x = fmap.amax(dim=(2, 3)).double().numpy()
        for f in range(8):
            means = [x[labels == c, f].mean() for c in range(4)]
            direct = sum((a - b) ** 2 for a, b in itertools.combinations(means, 2))
            assert scores[group][f] == pytest.approx(direct, rel=1e-9)
    assert ClassSeparability.needs_data and ClassSeparability.needs_labels


def test_labels_reach_the_consumer_through_run_calibration():
    model = new_tiny().eval()
    graph = prunekit.build_graph(model, X1)
    batches = labelled(n_batches=3)
    node = graph.by_name["conv1"].feature_maps()[0][0]
    seen = []
    run_calibration(graph, model, batches, [node],
                    lambda n, out, targets: seen.append((out.shape[0], targets)),
                    progress=False, with_targets=True)
    assert [t.tolist() for _, t in seen] == [b[1].tolist() for b in batches]
    plain = []  # the default still calls consume(node, output)
    run_calibration(graph, model, batches, [node], lambda n, out: plain.append(n),
                    progress=False)
    assert plain == [node] * 3


def test_a_batch_without_labels_is_refused():
    model = new_tiny().eval()
    graph = prunekit.build_graph(model, X1)
    batches = [b[0] for b in labelled(n_batches=2)]  # inputs only
    with pytest.raises(CalibrationLabelsError, match="batch 0 .* has no targets"):
        ClassSeparability(progress=False).score(graph, model, batches)
    batches = labelled(n_batches=2)
    batches[1] = (batches[1][0],)
    with pytest.raises(CalibrationLabelsError, match="calibration batch 1"):
        ClassSeparability(progress=False).score(graph, model, batches)
    soft_labels = [(x, torch.nn.functional.one_hot(y, 4).float()) for x, y in labelled()]
    with pytest.raises(CalibrationLabelsError, match="one integer class index per image"):
        ClassSeparability(progress=False).score(graph, model, soft_labels)
    with pytest.raises(ValueError, match="labelled calibration"):
        hook_for(new_tiny(), calibration=None)


# ------------------------------------------------------------------ schedule and zeta
def test_rate_and_zeta_follow_the_three_point_schedule():
    epochs, tau = 21, FSDP_TAU
    hook = hook_for(new_tiny(), epochs=epochs, ratio=0.5)
    fractions = [hook.fraction(e) for e in range(epochs)]
    assert fractions[0] == 0 and fractions[2] == pytest.approx(0.75)  # (E - 1) / tau = 2
    assert fractions[-1] == 1.0  # e3 = E - 1
    for e in range(epochs):
        assert fractions[e] == asymptotic_rate(1.0, e, epochs, d=1 / tau, point=0.75)
        assert hook.zeta_of(e) == pytest.approx(1 - fractions[e])
        assert hook.rates(e)["conv1"] == pytest.approx(0.5 * fractions[e])
        assert hook.cs_rate("conv1", e) == min(0.25, 0.5 * fractions[e])
    assert hook.zeta_of(0) == 1 and hook.zeta_of(epochs - 1) == 0
    assert fractional_step(0.4, attenuation=0.5) == pytest.approx(0.3)
    assert fractional_step(0.4, zero_scaling=True) == 0
    assert hook_for(new_tiny(), use_zero_scaling=True).zeta_of(1) == 0
    with pytest.raises(ValueError, match="tau"):
        hook_for(new_tiny(), tau=1.2)


def test_split_counts():
    assert split_counts(16, 8, 0.1) == (1, 7)     # floor(1.6) by CS, the rest by GM
    assert split_counts(16, 2, 0.25) == (2, 0)    # CS capped by the whole count
    assert split_counts(10, 5, 0.3) == (3, 2)
    hook = started(new_tiny(), epochs=21, ratio=0.5, cs_ratio=0.25)
    for epoch in (1, 2, 3, 20):
        hook.update_mask(epoch)
        for group in ("conv1", "conv2"):
            n_cs, n_gm = split_counts(8, 8 - hook.counts(epoch)[group],
                                      hook.cs_rate(group, epoch))
            assert len(removed(hook, group)) == n_cs + n_gm
            assert len(hook.cs_selected.get(group, [])) == n_cs
        assert hook.history[-1]["cs"] + hook.history[-1]["gm"] == hook.masked_count()
    assert hook.masked_count() == 8 and hook.history[-1]["cs"] == 4  # the target: 2 + 2


def test_cs_first_then_gm_among_the_other_filters():
    model = new_tiny()
    hook = started(model, epochs=3, ratio=0.5, cs_ratio=0.25)
    scores = ClassSeparability(progress=False).score(hook.graph, model, hook.calibration)
    rows = model.conv1.weight.detach().flatten(1).clone()
    hook.update_mask(2)  # the last epoch: the full target, zeta = 0
    cs = sorted(np.argsort(scores["conv1"], kind="stable")[:2].tolist())
    assert hook.cs_selected["conv1"] == cs
    include = ~np.isin(np.arange(8), cs)
    gm_sums = distance_sums(rows, include)  # FPGM among the filters CS did not select
    gm = sorted(np.flatnonzero(include)[np.argsort(gm_sums[include], kind="stable")[:2]])
    assert removed(hook, "conv1") == sorted(cs + [int(i) for i in gm])


def test_cs_is_rescored_every_cs_period_epochs():
    for period, due in ((2, [1, 3, 5, 7, 9]), (3, [1, 4, 7, 10])):
        hook = started(new_tiny(), epochs=11, cs_period=period)
        for epoch in range(1, 11):
            hook.update_mask(epoch)
        assert [h["epoch"] for h in hook.history if h["cs_rescored"]] == due


# ------------------------------------------------------------------ fractional steps
def test_fractional_step_scales_the_current_weights_and_compounds():
    model = new_tiny()
    hook = started(model, epochs=11)
    before = copy.deepcopy(model.state_dict())
    hook.update_mask(1)
    zeta, rows = hook.zeta, removed(hook, "conv1")
    assert 0 < zeta < 1 and rows
    kept = hook.plan["conv1"]
    assert torch.allclose(model.conv1.weight[rows], before["conv1.weight"][rows] * zeta)
    assert torch.equal(model.conv1.weight[kept], before["conv1.weight"][kept])
    assert torch.equal(model.bn1.bias, before["bn1.bias"])  # BN untouched (scale_norm=False)
    hook.apply_mask()  # the same mask again: compounding, as the code multiplies current values
    assert torch.allclose(model.conv1.weight[rows], before["conv1.weight"][rows] * zeta ** 2)
    hook.apply_mask(fresh=False)  # a resume's re-application does not multiply again
    assert torch.allclose(model.conv1.weight[rows], before["conv1.weight"][rows] * zeta ** 2)
    scaled = started(new_tiny(), epochs=11, scale_norm=True)
    bias = scaled.model.bn1.bias.detach().clone()
    scaled.update_mask(1)
    rows = removed(scaled, "conv1")
    assert torch.allclose(scaled.model.bn1.bias[rows], bias[rows] * scaled.zeta)


@pytest.mark.parametrize("scale_norm", [False, True])
def test_gradients_of_selected_filters_are_scaled(scale_norm):
    model = new_tiny()
    hook = started(model, epochs=11, scale_norm=scale_norm)
    hook.update_mask(1)
    rows, kept, zeta = removed(hook, "conv1"), hook.plan["conv1"], hook.zeta
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    hook.after_backward(0)
    assert torch.allclose(model.conv1.weight.grad[rows], torch.full_like(
        model.conv1.weight.grad[rows], zeta))
    assert (model.conv1.weight.grad[kept] == 1).all() and (model.fc.weight.grad == 1).all()
    expected = zeta if scale_norm else 1.0
    assert torch.allclose(model.bn1.weight.grad[rows], torch.full((len(rows),), expected))
    assert (model.bn1.weight.grad[kept] == 1).all()


def test_zeta_zero_is_hard_zeroing_with_momentum_reset():
    model = new_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()  # momentum buffers exist
    hook = started(model, optimizer, epochs=3)
    hook.update_mask(2)
    rows = removed(hook, "conv1")
    assert hook.zeta == 0 and len(rows) == 4
    assert model.conv1.weight[rows].abs().max() == 0 and model.bn1.bias[rows].abs().max() == 0
    assert model.bn1.running_mean[rows].abs().max() == 0
    buffer = optimizer.state[model.conv1.weight]["momentum_buffer"]
    assert buffer[rows].abs().max() == 0
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    hook.after_backward(0)
    assert model.conv1.weight.grad[rows].abs().max() == 0
    assert model.bn1.bias.grad[rows].abs().max() == 0


# ------------------------------------------------------------------ training, resume, removal
def run_fit(model, out, epochs=4, hooks=(), **kw):
    hook = hook_for(model, epochs=epochs, **kw)
    fit(model, tiny_data(), None, config(epochs=epochs, deterministic=True), out,
        hooks=[hook, *hooks])
    return hook


def test_resume_matches_uninterrupted_run(tmp_path):
    full = new_tiny()
    full_hook = run_fit(full, tmp_path / "full")

    class Stop:
        def on_epoch_end(self, epoch):
            if epoch == 1:
                raise KeyboardInterrupt

    part = new_tiny()
    with pytest.raises(KeyboardInterrupt):
        run_fit(part, tmp_path / "part", hooks=[Stop()])
    resumed = new_tiny(seed=5)  # restored from the checkpoint, whatever it starts from
    resumed_hook = run_fit(resumed, tmp_path / "part")
    assert resumed_hook.plan == full_hook.plan and resumed_hook.history == full_hook.history
    assert resumed_hook.cs_scores == full_hook.cs_scores
    assert any(not h["cs_rescored"] and h["cs"] for h in full_hook.history)  # stored ranking
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_final_pruned_model_equals_the_masked_one(tmp_path):
    model = prunekit.models.create("cifar_resnet20")
    images, labels = tiny_data(32, size=16, classes=4).tensors
    calibration = [(images[:16], labels[:16]), (images[16:], labels[16:])]
    x = torch.randn(4, 3, 16, 16)
    hook = FractionalStepPruning(model=model, example_inputs=x[:1], calibration=calibration,
                                 ratio=0.4, cs_ratio=0.1, epochs=3)
    fit(model, tiny_data(32, size=16), None, config(epochs=3), tmp_path, hooks=[hook])
    assert hook.zeta == 0 and hook.history[-1]["cs"] > 0 and hook.history[-1]["gm"] > 0
    model.eval()
    with torch.no_grad():
        masked = model(x)
    result = hook.finalize(model)
    with torch.no_grad():
        pruned = model(x)
    assert torch.allclose(pruned, masked, atol=1e-5, rtol=1e-4)
    assert result.plan == hook.plan and result.macs_after < result.macs_before
    assert result.criterion == "fsdp-class_separability+fpgm"


def test_method_is_registered_with_its_options():
    method = get_method("fsdp")
    config = method().config
    assert (config.cs_ratio, config.tau, config.cs_period, config.attenuation,
            config.use_zero_scaling, config.scale_norm) == (0.1, 10.0, 2, 1.0, False, False)
    assert method.trains and method.default_criterion == "class_separability"
    from prunekit.errors import ConfigError
    with pytest.raises(ConfigError, match="tau"):
        method.Config.from_dict({"tau": 1.0})
    with pytest.raises(ConfigError, match="cs_period"):
        method.Config.from_dict({"cs_period": 0})
