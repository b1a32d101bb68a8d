"""SWP: filter skeleton training, stripe/filter/block removal, exactness, save/load, export."""
import io as stdio
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit.io as pio
from prunekit import models
from prunekit.cli import main
from prunekit.methods.swp import (FilterSkeleton, ShortcutBlock, SWPExactnessError, swp_prune)
from prunekit.nn import StripeConv2d
from prunekit.train import TrainConfig, fit

from conftest import SHARED, tiny_data

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread

X = torch.randn(1, 3, 32, 32)


class Plain(nn.Module):
    """Not a CIFAR ResNet: conv-BN-ReLU-conv-BN-ReLU-pool-fc, a biased conv, a 5x5 kernel."""

    def __init__(self, act=torch.relu):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc, self.act = nn.Linear(6, 4), act

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def config(**kw):
    return TrainConfig(**{"epochs": 2, "lr": 0.05, "batch_size": 4, "schedule": "constant",
                          "progress": False, **kw})


def randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def sparsify(skeleton, keep=0.5, dead_filters=2, seed=0, empty=()):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, s in skeleton.skeletons().items():
            s.mul_((torch.rand(s.shape, generator=g) < keep).to(s.dtype))
            s[:dead_filters] = 0
            if name in empty:
                s.zero_()
    for name, s in skeleton.skeletons().items():
        skeleton._hard_zero(name, s)  # as the hook does before a step: BN of dead filters too


def test_skeleton_starts_as_identity_and_multiplies_the_weight():
    model = Plain().eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8))
    assert skeleton.names == ["conv1", "conv2"] and skeleton.stripe_fraction() == 1.0
    torch.testing.assert_close(model(x), before)
    with torch.no_grad():
        skeleton.skeletons()["conv2"][1, 0, 0] = 0.5
    w = model.conv2.parametrizations.weight.original
    assert torch.equal(model.conv2.weight[1, :, 0, 0], 0.5 * w[1, :, 0, 0])
    assert skeleton.norms == {"conv1": ["bn1"], "conv2": ["bn2"]}


def test_l1_subgradient_and_hard_zeroing_before_each_step():
    model = Plain()
    skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8), sr=0.1, threshold=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    skeleton.on_train_start(model, opt)
    s = skeleton.skeletons()["conv2"]
    with torch.no_grad():
        s[0, 1, 1] = 0.2    # below the threshold: must be hard-zeroed
        s[1, 0, 0] = -0.8   # negative: its subgradient is -sr
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    task_grad = s.grad.clone()
    skeleton.after_backward(0)
    assert s[0, 1, 1] == 0 and s.grad[0, 1, 1] == 0
    assert s.grad[1, 0, 0] == pytest.approx(task_grad[1, 0, 0].item() - 0.1, abs=1e-6)
    assert s.grad[2, 2, 2] == pytest.approx(task_grad[2, 2, 2].item() + 0.1, abs=1e-6)


def test_zeroed_stripes_and_dead_filters_stay_zero_through_training(tmp_path):
    model = Plain()
    skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8), sr=1e-4, threshold=0.01)
    with torch.no_grad():
        skeleton.skeletons()["conv1"][0] = 0.005        # a whole filter below the threshold
        skeleton.skeletons()["conv2"][3, 2, :] = 0.0    # one row of stripes
    fit(model, tiny_data(16), None, config(momentum=0.9, nesterov=True), tmp_path,
        hooks=[skeleton])
    s1, s2 = skeleton.skeletons()["conv1"], skeleton.skeletons()["conv2"]
    assert s1[0].abs().max() == 0 and s2[3, 2].abs().max() == 0
    assert model.bn1.weight[0] == 0 and model.bn1.bias[0] == 0  # the dead filter's BN
    assert model.bn1.weight[1] != 0
    assert skeleton.stripe_fraction() < 1


def test_sr_drives_stripes_below_the_threshold(tmp_path):
    rates = []
    for sr in (0.0, 0.05):
        torch.manual_seed(0)
        model = Plain()
        skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8), sr=sr, threshold=0.9)
        fit(model, tiny_data(16), None, config(epochs=3, lr=0.5, momentum=0.0), tmp_path / str(sr),
            hooks=[skeleton])
        rates.append(skeleton.stripe_fraction())
    assert rates[0] > rates[1]  # the L1 term shrinks the skeleton: more stripes die
    # the live fraction and |I| quantiles are recorded every 50 steps (12 steps: step 0 only)
    (record,) = skeleton.history
    assert record["step"] == 0 and 0 < record["alive"] <= 1
    assert record["q10"] <= record["q50"] <= record["q90"] <= 1
    # the history travels with fit's checkpoints, so a resumed run keeps it
    fresh = FilterSkeleton(Plain(), torch.randn(1, 3, 8, 8))
    fresh.load_state_dict(skeleton.state_dict())
    assert fresh.history == skeleton.history


def test_an_emptied_network_is_refused_not_saved():
    model = Plain()
    skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8), threshold=0.5)
    with torch.no_grad():
        for s in skeleton.skeletons().values():
            s.fill_(0.4)  # every stripe at or below the threshold
    with pytest.raises(ValueError, match="every stripe .* lower sr"):
        swp_prune(model, skeleton, torch.randn(1, 3, 8, 8))


def test_skeleton_must_exist_before_the_optimizer():
    model = Plain()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="before the optimizer"):
        skeleton.on_train_start(model, opt)


@pytest.mark.parametrize("kw, message", [({"threshold": 1.0}, r"\[0, 1\)"),
                                         ({"sr": -1.0}, "sr"),
                                         ({"modules": ["fc"]}, "not an nn.Conv2d")])
def test_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        FilterSkeleton(Plain(), torch.randn(1, 3, 8, 8), **kw)


def resnet56_pruned(seed=0, empty=("layer2.3.conv1", "layer3.5.conv2")):
    torch.manual_seed(seed)
    model = randomise_bn(models.create("cifar_resnet56")).eval()
    skeleton = FilterSkeleton(model, X)
    sparsify(skeleton, empty=empty, seed=seed)
    inputs = {b: torch.randn(b, 3, 32, 32) for b in (1, 64)}
    with torch.no_grad():  # the masked dense model (a parametrized model cannot be deep-copied)
        masked = {b: (x, model(x)) for b, x in inputs.items()}
    result = swp_prune(model, skeleton, X)
    return model, masked, result


@pytest.fixture(scope="module")
def pruned56():
    torch.set_num_threads(1)
    return resnet56_pruned()


@pytest.mark.parametrize("batch", [1, 64])
def test_stripe_pruned_resnet56_equals_masked_dense(pruned56, batch):
    model, masked, result = pruned56
    x, expected = masked[batch]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    assert result.replaced_blocks == ["layer2.3", "layer3.5"]
    assert isinstance(model.layer2[3], ShortcutBlock)
    assert isinstance(model.layer1[0].conv1, StripeConv2d)
    assert result.removed_channels  # dead filters were removed as channels
    assert result.stripes_after < 0.5 * result.stripes_before
    assert result.macs_after < 0.5 * result.macs_before
    assert result.params_after < result.params_before
    # SWP's own FLOPs count (2 x MACs + BN + fc bias), beside the MACs, as the paper reports
    from prunekit.measure import reference_flops
    assert result.reference_flops_before == 2 * result.macs_before + 2 * 532480 + 10
    assert result.reference_flops_after == reference_flops(model, X)
    assert 2 * result.macs_after < result.reference_flops_after < 2.1 * result.macs_after
    assert result.to_dict()["reference_flops_reduction"] == pytest.approx(
        1 - result.reference_flops_after / result.reference_flops_before)


def test_stripe_pruned_model_save_load_and_export_round_trip(pruned56, tmp_path):
    model, _, _ = pruned56
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        path = pio.save(model, tmp_path / "swp.safetensors", method={"name": "swp"})
        loaded = pio.load(path).eval()
        torch.testing.assert_close(loaded(x), ref)
        assert isinstance(loaded.layer3[5], ShortcutBlock)
        assert pio.read_spec(path)["replaced"]["layer1.0.conv1"]["class"] == "StripeConv2d"
        traced = torch.jit.trace(model, x)
        buffer = stdio.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.jit.load(buffer)(x), ref)


def test_stripe_pruned_resnet20_onnx_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(1)
    model = randomise_bn(models.create("cifar_resnet20")).eval()
    skeleton = FilterSkeleton(model, X)
    sparsify(skeleton, empty=("layer2.1.conv1",))
    swp_prune(model, skeleton, X)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "swp.onnx"
    torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"])
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-4, atol=1e-4)


def test_generic_model_and_dense_executor():
    for executor in ("stripe", "dense"):
        torch.manual_seed(0)
        model = randomise_bn(Plain()).eval()
        skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8))
        sparsify(skeleton, dead_filters=3)
        x = torch.randn(4, 3, 8, 8)
        with torch.no_grad():
            masked = model(x)
        result = swp_prune(model, skeleton, torch.randn(1, 3, 8, 8), executor=executor)
        torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-5)
        assert model.conv1.out_channels == 5 and model.conv2.in_channels == 5
        assert isinstance(model.conv2, StripeConv2d) == (executor == "stripe")
        assert result.removed_channels == {"conv1": 3, "conv2": 3}


def test_zero_channel_into_non_zero_preserving_activation_is_refused():
    torch.manual_seed(0)
    model = randomise_bn(Plain(act=torch.sigmoid)).eval()  # sigmoid(0) = 0.5: not removable
    skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8))
    sparsify(skeleton)
    with pytest.raises(SWPExactnessError, match="differs from the masked model"):
        swp_prune(model, skeleton, torch.randn(1, 3, 8, 8))


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "cifar10").exists(), reason="shared data not found")
def test_cli_swp(tmp_path):
    run = tmp_path / "swp"
    assert main(["prune", "--model", "cifar_resnet20", "--weights", "pretrained", "--data",
                 str(SHARED), "--method", "swp", "--sr", "0.2", "--threshold", "0.995",
                 "--finetune-epochs", "2", "--finetune-max-steps", "3", "--penalty-epochs", "1",
                 "--bn-recalibration", "2",
                 "--finetune-batch-size", "16", "--eval-splits", "test-lossless", "--limit",
                 "50", "--latency-batches", "1", "--latency-runs", "2", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["bn_recalibration"]["batches"] == 2
    assert report["options"]["method"]["penalty_epochs"] == 1
    assert report["swp"]["stripes_after"] < report["swp"]["stripes_before"]
    assert report["finetuned"]["macs"] < report["before"]["macs"]
    loaded = pio.load(run / "model.safetensors").eval()
    x = torch.randn(2, 3, 32, 32)
    assert loaded(x).shape == (2, 10)


def test_cli_swp_paper_recipe_trains_from_scratch(tmp_path):
    """The paper's setting: the skeleton trained together with a randomly initialised
    option-B ResNet-56 (two steps here; the recipe's 160 epochs are a manual run)."""
    run = tmp_path / "swp-paper"
    assert main(["prune", "--recipe", "swp_resnet56", "--data", str(SHARED),
                 "--finetune-epochs", "1", "--finetune-max-steps", "2",
                 "--finetune-batch-size", "16", "--eval-splits", "test-lossless", "--limit",
                 "50", "--latency-batches", "1", "--latency-runs", "2", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["options"]["model"] == {"name": "cifar_resnet56", "weights": None,
                                          "kwargs": {"shortcut": "B", "init": "swp"}}
    method = report["options"]["method"]
    assert (method["name"], method["sr"], method["threshold"]) == ("swp", 1e-5, 0.01)
    assert (method["mask_norms"], method["empty_blocks"]) == ("reference", "reference")
    assert report["options"]["finetune"]["lr"] == 0.1
    assert report["swp"]["stripes_before"] == 18288  # every 3x3 conv carries a skeleton
    loaded = pio.load(run / "model.safetensors").eval()
    assert loaded(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cli_swp_flags_need_swp(tmp_path, capsys):
    assert main(["prune", "--model", "cifar_resnet20", "--ratio", "0.3", "--sr", "1e-4",
                 "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "--method swp" in capsys.readouterr().err


def test_threshold_zero_masks_only_exact_zeros():
    model = Plain().eval()
    skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8), threshold=0.0)
    with torch.no_grad():
        skeleton.skeletons()["conv1"][0, 0, 0] = 0.0
    assert skeleton.stripe_masks()["conv1"].sum() == 8 * 25 - 1
    assert F.relu(torch.zeros(1)).item() == 0  # the exactness argument relies on ReLU(0) = 0


def test_skeleton_lr_scale_and_weight_decay_get_their_own_param_group():
    from prunekit.train import build_optimizer

    model = Plain()
    skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8), lr_scale=50, weight_decay=0.0)
    optimizer = build_optimizer(model, config(lr=0.02, weight_decay=1e-3))
    groups = optimizer.param_groups
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (0.02, 1e-3)  # the weights first
    (special,) = [g for g in groups if g["lr"] != 0.02]
    assert special["lr"] == pytest.approx(1.0) and special["weight_decay"] == 0.0
    assert {id(p) for p in special["params"]} == {id(s) for s in skeleton.skeletons().values()}
    # without a skeleton there is one group, as before
    plain = build_optimizer(Plain(), config(lr=0.02, weight_decay=0.0, momentum=0.0))
    assert len(plain.param_groups) == 1
    with pytest.raises(ValueError, match="lr_scale"):
        FilterSkeleton(Plain(), torch.randn(1, 3, 8, 8), lr_scale=0)


def test_dead_channels_through_a_zero_padding_shortcut_follow_the_carried_channel():
    """ResNet-20 option A: layer3's stream channel 16 + i carries layer2's channel i (16 zero
    channels are padded on each side). Zero producers alone do not make such a channel zero."""
    from prunekit.methods.swp import _zero_channel_plan
    from prunekit.plan import validate_plan
    from prunekit.graph import build_graph

    torch.manual_seed(0)
    model = randomise_bn(models.create("cifar_resnet20")).eval()
    with torch.no_grad():
        for i in range(3):  # zero channels 0 (padding only) and 17 (carries layer2's 1)
            block = model.layer3[i]
            for ch in (0, 17):
                block.conv2.weight[ch] = 0
                block.bn2.weight[ch] = 0
                block.bn2.bias[ch] = 0
    plan, removed = _zero_channel_plan(model, X)
    (name,) = [g for g in plan if 0 not in plan[g]]  # the layer3 stream group
    assert 17 in plan[name] and removed[name] == 1
    validate_plan(build_graph(model, X), plan)
    reference = model(X)
    pruned = prunekit_prune(model, plan)
    torch.testing.assert_close(pruned(X), reference, rtol=1e-4, atol=1e-4)


def prunekit_prune(model, plan):
    from prunekit import prune

    prune(model, X, plan=plan)
    return model


def test_penalty_epochs_then_the_skeleton_is_frozen_and_dead_stripes_stay_dead(tmp_path):
    sums, flags = {}, {}
    for penalty_epochs in (None, 1):
        torch.manual_seed(0)
        model = Plain()
        skeleton = FilterSkeleton(model, torch.randn(1, 3, 8, 8), sr=0.05, threshold=0.85,
                                  penalty_epochs=penalty_epochs)
        seen = []

        class Record:
            def on_epoch_end(self, epoch):
                seen.append((skeleton.penalising, sum(float(s.detach().abs().sum())
                                                      for s in skeleton.skeletons().values())))
        fit(model, tiny_data(16), None, config(epochs=3, lr=0.5, momentum=0.0, weight_decay=0.0),
            tmp_path / str(penalty_epochs), hooks=[skeleton, Record()])
        flags[penalty_epochs] = [p for p, _ in seen]
        sums[penalty_epochs] = [s for _, s in seen]
        dead = {n: ~m for n, m in skeleton.stripe_masks().items()}
        assert all(bool((s[dead[n]] == 0).all()) for n, s in skeleton.skeletons().items())
    assert flags[None] == [True, True, True] and flags[1] == [True, False, False]
    # the same first epoch; afterwards the skeleton is frozen where the penalty stopped
    assert sums[1][0] == pytest.approx(sums[None][0])
    assert sums[None][2] < sums[None][0] - 1 and sums[1][2] == sums[1][1] == sums[1][0]
