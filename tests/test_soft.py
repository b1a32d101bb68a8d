"""Soft pruning (SFP / FPGM-soft / ASFP) as a fit() hook: masks, regrowth, schedule, finalize."""
import copy

import pytest
import torch

import prunekit
from prunekit.measure import count_macs
from prunekit.methods import SoftPruning, asymptotic_rate, finalize, soft_prune
from prunekit.methods.soft_schedules import asfp_xi
from prunekit.train import TrainConfig, fit

from conftest import TinyNet, tiny_data


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def config(**kw):
    base = dict(epochs=2, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant",
                batch_size=8, progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


def new_tiny(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def started(model, optimizer=None, **kw):
    kw = {"criterion": "l2", "ratio": 0.5, **kw}
    hook = SoftPruning(model=model, example_inputs=torch.randn(1, 3, 8, 8), **kw)
    hook.on_train_start(model, optimizer)
    hook.on_epoch_start(0)
    return hook


def removed(hook, group):
    return sorted(set(range(hook.graph.by_name[group].size)) - set(hook.plan[group]))


class Probe:
    """Records, after every optimizer step, how large the masked conv1 filters are."""

    def __init__(self, model, soft):
        self.model, self.soft, self.values = model, soft, []

    def after_step(self, step):
        rows = removed(self.soft, "conv1")
        self.values.append(self.model.conv1.weight[rows].abs().max().item())


def test_masks_zero_producers_and_bn_shift():
    model = new_tiny()
    hook = started(model)
    assert set(hook.plan) == {"conv1", "conv2"} and hook.masked_count() == 8
    for conv, bn in ((model.conv1, model.bn1), (model.conv2, model.bn2)):
        group = "conv1" if conv is model.conv1 else "conv2"
        rows = removed(hook, group)
        assert len(rows) == 4
        assert conv.weight[rows].abs().max() == 0 and conv.bias[rows].abs().max() == 0
        assert bn.bias[rows].abs().max() == 0 and bn.running_mean[rows].abs().max() == 0
        assert bn.weight[rows].abs().min() > 0  # gamma kept by default: filters can regrow
        kept = hook.plan[group]
        assert conv.weight[kept].abs().amax((1, 2, 3)).min() > 0
    # consumer columns untouched
    assert model.conv2.weight[:, removed(hook, "conv1")].abs().max() > 0
    # the masked channels output exactly zero in train and eval mode
    x = torch.randn(4, 3, 8, 8)
    for mode in (True, False):
        model.train(mode)
        out = model.bn1(model.conv1(x))
        assert out[:, removed(hook, "conv1")].abs().max() == 0


def test_zero_norm_weight_zeroes_bn_weight_and_bias():
    model = new_tiny()
    hook = started(model, zero_norm_weight=True)
    rows = removed(hook, "conv1")
    assert model.bn1.weight[rows].abs().max() == 0 and model.bn1.bias[rows].abs().max() == 0


def test_masks_recomputed_from_current_weights():
    model = new_tiny()
    hook = started(model)
    first = removed(hook, "conv1")
    with torch.no_grad():  # make the masked filters the largest, the kept ones tiny
        model.conv1.weight[first] = 1.0
        model.conv1.weight[hook.plan["conv1"]] *= 1e-3
    hook.on_epoch_end(0)
    assert removed(hook, "conv1") == sorted(set(range(8)) - set(first))
    assert hook.epoch == 1 and len(hook.history) == 2


def test_fit_remasks_every_epoch(tmp_path):
    model = new_tiny()
    soft = SoftPruning(model=model, example_inputs=torch.randn(1, 3, 8, 8), criterion="fpgm",
                       ratio=0.5)
    fit(model, tiny_data(), None, config(epochs=3), tmp_path, hooks=[soft])
    assert [h["epoch"] for h in soft.history] == [0, 1, 2, 3]
    assert all(h["masked"] == 8 for h in soft.history)
    assert model.conv1.weight[removed(soft, "conv1")].abs().max() == 0  # masked at the end


@pytest.mark.parametrize("variant", ["sfp", "mask_grads", "reset_momentum"])
def test_regrowth_only_without_grad_masking(tmp_path, variant):
    model = new_tiny()
    soft = SoftPruning(model=model, example_inputs=torch.randn(1, 3, 8, 8), criterion="l2",
                       ratio=0.5, mask_grads=variant == "mask_grads",
                       reset_momentum=variant == "reset_momentum")
    probe = Probe(model, soft)
    moved = {}

    class Swap:  # before the re-mask of epoch 0: make the mask move to the kept filters
        def on_epoch_end(self, epoch):
            with torch.no_grad():
                model.conv1.weight[removed(soft, "conv1")] = 1.0
                model.conv1.weight[soft.plan["conv1"]] *= 1e-3
            moved["rows"] = list(soft.plan["conv1"])  # the filters the re-mask will take

    class Momentum:  # after the re-mask of epoch 0: the newly masked rows' momentum
        def on_epoch_end(self, epoch):
            buffer = soft.optimizer.state[model.conv1.weight]["momentum_buffer"]
            moved["momentum"] = buffer[moved["rows"]].abs().max().item()

    fit(model, tiny_data(), None, config(epochs=2), tmp_path,
        hooks=[Swap(), soft, Momentum(), probe])
    assert len(probe.values) == 8  # 4 steps per epoch, 2 epochs
    assert removed(soft, "conv1") == moved["rows"]
    if variant == "sfp":
        # Filters masked before training (no momentum yet) stay at zero: their channel outputs
        # exactly 0, and ReLU'(0) = 0 blocks every gradient. Filters newly masked at the end of
        # epoch 0 carry a momentum buffer, which moves them off zero during epoch 1; once their
        # output is nonzero (gamma is kept) they get gradients again: regrowth.
        assert moved["momentum"] > 0
        assert probe.values[:4] == [0.0] * 4
        assert probe.values[4] > 0 and probe.values[7] > 0
    else:  # exactly zero at every step of both epochs (momentum leak closed too)
        assert moved["momentum"] == 0
        assert max(probe.values) == 0


def test_asymptotic_schedule():
    # ASFP's D = 1/8 (issue 18; tests/test_soft_schedules.py checks the values in detail)
    epochs, target = 41, 0.4
    rates = [asymptotic_rate(target, e, epochs) for e in range(epochs + 1)]
    assert rates[0] == 0
    assert all(b > a for a, b in zip(rates[:epochs], rates[1:epochs]))  # rising to E - 1
    assert rates[(epochs - 1) // 8] == pytest.approx(0.75 * target, rel=1e-9)  # D (E - 1) = 5
    # the last epoch trains at the target, and the final mask (the one finalize removes) is
    # computed at the same rate
    assert rates[epochs - 1] == rates[epochs] == target
    # prunekit's schedule before the fix (k = 4 ln 4 / E) stays reachable, value for value
    old = dict(d=0.25, fit="approximate")
    assert asymptotic_rate(target, 10, 40, **old) == pytest.approx(0.75 * target, rel=0.01)
    short = [asymptotic_rate(1.0, e, 3, **old) for e in range(4)]
    assert short[0] == 0 and short[1] == pytest.approx(0.8425 / 0.9752, rel=1e-3)
    assert short[2] == short[3] == 1.0
    model = new_tiny()
    hook = started(model, schedule="asymptotic", epochs=4, asfp_d=0.25, asfp_fit="approximate")
    assert hook.plan == {} and hook.fraction(0) == 0  # nothing masked before training
    hook.on_epoch_end(0)  # rate(1) = 0.5 * 0.75 / (1 - 4**-3) = 0.381 -> 3 of 8 channels
    assert hook.rates(1)["conv1"] == pytest.approx(0.375 / (1 - 4 ** -3))
    assert len(removed(hook, "conv1")) == 3
    hook.on_epoch_end(2)  # the last epoch (3) already trains at the target
    assert hook.fraction(3) == 1.0 and len(removed(hook, "conv1")) == 4
    new = started(new_tiny(), schedule="asymptotic", epochs=4)  # D = 1/8: faster
    assert new.fraction(1) == pytest.approx((1 - asfp_xi() ** (8 / 3)) / (1 - asfp_xi() ** 8))
    with pytest.raises(ValueError, match="epochs"):
        SoftPruning(model=model, example_inputs=torch.randn(1, 3, 8, 8), ratio=0.5,
                    schedule="asymptotic")


def test_finalize_matches_masked_model_resnet():
    model = prunekit.models.create("cifar_resnet20")
    x = torch.randn(4, 3, 16, 16)
    hook = SoftPruning(model=model, example_inputs=x[:1], criterion="fpgm", ratio=0.4)
    hook.on_train_start(model, None)
    hook.on_epoch_start(0)
    model.train()
    with torch.no_grad():  # move BN running stats so that eval mode is non-trivial
        model(torch.randn(8, 3, 16, 16))
    hook.on_epoch_end(0)  # re-mask (running means of masked channels back to 0)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    macs = count_macs(model, (x[:1],))
    result = hook.finalize(model)
    with torch.no_grad():
        pruned = model(x)
    assert torch.allclose(pruned, masked, atol=1e-5, rtol=1e-4)
    assert result.macs_after < result.macs_before == macs
    assert count_macs(model, (x[:1],)) == result.macs_after
    assert result.plan == hook.plan and result.criterion == "soft-fpgm"


def test_finalize_function_with_plan_dict():
    model = new_tiny()
    hook = started(model)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    expected = model(x).detach()
    result = finalize(model, hook.graph, dict(hook.plan), x[:1])
    assert model.conv1.out_channels == 4 and result.macs_after < result.macs_before
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_state_dict_round_trip():
    model = new_tiny()
    hook = started(model, criterion="fpgm")
    with torch.no_grad():
        model.conv1.weight.add_(torch.randn_like(model.conv1.weight))
    hook.on_epoch_end(0)
    state = copy.deepcopy(hook.state_dict())
    torch.save(state, "/dev/null")  # plain values only
    other = new_tiny()
    other.load_state_dict(model.state_dict())
    fresh = SoftPruning(model=other, example_inputs=torch.randn(1, 3, 8, 8), criterion="fpgm",
                        ratio=0.5)
    fresh.on_train_start(other, None)  # as fit() does on resume: start, then load
    fresh.load_state_dict(state)
    fresh.on_epoch_start(1)
    assert fresh.plan == hook.plan and fresh.epoch == hook.epoch == 1
    assert fresh.history == hook.history
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)  # resume did not re-mask the restored weights


def test_resume_matches_uninterrupted_run(tmp_path):
    data = tiny_data()
    cfg = dict(deterministic=True)

    def run(model, out, epochs, resume=True):
        soft = SoftPruning(model=model, example_inputs=torch.randn(1, 3, 8, 8),
                           criterion="fpgm", ratio=0.5, schedule="asymptotic", epochs=3)
        fit(model, data, None, config(epochs=epochs, **cfg), out, hooks=[soft], resume=resume)
        return soft

    full = new_tiny()
    full_hook = run(full, tmp_path / "full", 3)
    part = new_tiny()
    # the interrupted run: 2 epochs of a 3-epoch schedule, then resume with a fresh model/hook
    soft = SoftPruning(model=part, example_inputs=torch.randn(1, 3, 8, 8), criterion="fpgm",
                       ratio=0.5, schedule="asymptotic", epochs=3)

    class Stop:
        def on_epoch_end(self, epoch):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(part, data, None, config(epochs=3, **cfg), tmp_path / "part", hooks=[soft, Stop()])
    resumed = new_tiny()
    resumed_hook = run(resumed, tmp_path / "part", 3)
    assert resumed_hook.plan == full_hook.plan
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_soft_prune_end_to_end(tmp_path):
    model = new_tiny()
    x = torch.randn(2, 3, 8, 8)
    model, result, summary = soft_prune(
        model, tiny_data(), tiny_data(8, seed=1), config(epochs=2).to_dict(), tmp_path,
        criterion="l2", ratio=0.5, schedule="asymptotic", mask_grads=False, example_inputs=x[:1])
    assert summary["epochs_run"] == 2 and summary["best_val_top1"] is not None
    assert model.conv1.out_channels == 4 and model.conv2.out_channels == 4
    assert result.macs_reduction > 0.4
    assert torch.isfinite(model(x)).all()


def test_rejects_data_criteria():
    with pytest.raises(ValueError, match="calibration"):
        SoftPruning(model=new_tiny(), example_inputs=torch.randn(1, 3, 8, 8), criterion="chip",
                    ratio=0.5)
