"""Reproduction options of CHIP and SWP (issue 20): CHIP's BatchNorm transfer (``copy_bn``),
SWP's from-scratch init, which norms a dead stripe filter masks, and what replaces an emptied
block. Each option is tested in both settings."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit import models
from prunekit.errors import ConfigError
from prunekit.methods import MethodContext, get_method
from prunekit.methods.oneshot import reset_batchnorms
from prunekit.methods.swp_parts import norms_reading
from prunekit.plan import PlanTarget
from prunekit.train import TrainConfig

X = torch.randn(1, 3, 32, 32)


def _resnet20_with_trained_bn(seed=0):
    torch.manual_seed(seed)
    model = models.create("cifar_resnet20").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _oneshot(model, tmp_path, **options):
    context = MethodContext(example_inputs=(X,), target=PlanTarget(macs_reduction=0.3),
                            finetune=TrainConfig(epochs=1, lr=0.01), out_dir=tmp_path, criterion="l1")
    method = get_method("oneshot")({"bn_recalibration_batches": 0, **options})
    return method.run(model, context)


def test_reset_batchnorms_puts_every_norm_at_its_fresh_state():
    model = _resnet20_with_trained_bn()
    names = reset_batchnorms(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(names) == len(norms) == 19  # stem + 2 per block x 9
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight))
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))


@pytest.mark.parametrize("copy_bn", [True, False])
def test_chip_copy_bn_keeps_or_resets_the_pruned_models_batchnorms(tmp_path, copy_bn):
    original = _resnet20_with_trained_bn()
    model = _resnet20_with_trained_bn()
    result = _oneshot(model, tmp_path, copy_bn=copy_bn)
    bn, before = model.layer1[0].bn1, original.layer1[0].bn1
    kept = result.plan["layer1.0.conv1"]
    assert bn.num_features == len(kept) < before.num_features  # pruned
    if copy_bn:
        assert torch.equal(bn.weight, before.weight[kept])
        assert torch.equal(bn.running_var, before.running_var[kept])
        assert "bn_reset" not in result.extras
    else:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert torch.equal(m.weight, torch.ones_like(m.weight))
                assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
                assert torch.equal(m.running_var, torch.ones_like(m.running_var))
        assert result.extras["bn_reset"] == {"layers": 19}


def test_copy_bn_must_be_a_bool():
    with pytest.raises(ConfigError, match="copy_bn"):
        get_method("oneshot")({"copy_bn": "no"})


def test_swp_init_is_the_references():
    torch.manual_seed(0)
    model = models.create("cifar_resnet56", init="swp")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.full_like(m.weight, 0.5)) for m in norms)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert abs(linear.weight.std().item() - 0.01) < 0.002
    torch.manual_seed(0)
    default = models.create("cifar_resnet56")
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in default.modules()
               if isinstance(m, nn.BatchNorm2d))
    # PyTorch's default conv init (kaiming-uniform a=sqrt(5)) is bounded by 1/sqrt(fan_in)
    conv = model.layer2[0].conv1
    bound = 1 / (conv.in_channels * 9) ** 0.5
    assert conv.weight.abs().max() <= bound
    with pytest.raises(ValueError, match="unknown init"):
        models.create("cifar_resnet20", init="xavier")


def test_swp_mask_norms_reference_masks_only_block_bn1():
    model = models.create("cifar_resnet20").eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    full = norms_reading(model, X, convs, "all")
    reference = norms_reading(model, X, convs, "reference")
    assert full["conv1"] == ["bn1"] and full["layer1.0.conv2"] == ["layer1.0.bn2"]
    assert reference["conv1"] == [] and reference["layer1.0.conv2"] == []
    assert all(reference[f"layer{s}.{b}.conv1"] == [f"layer{s}.{b}.bn1"]
               for s in (1, 2, 3) for b in range(3))
    with pytest.raises(ValueError, match="mask_norms"):
        norms_reading(model, X, convs, "some")


@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_swp_empty_blocks_exact_keeps_the_output_reference_drops_the_relu(mode):
    from prunekit.methods.swp_parts import replace_empty_blocks
    from prunekit.nn import ShortcutBlock

    torch.manual_seed(1)
    model = _resnet20_with_trained_bn().eval()
    block = model.layer2[0]  # the projection (option A) block of stage 2
    with torch.no_grad():
        block.conv1.weight.zero_()  # every stripe of conv1 dead: the branch adds a constant
        block.bn1.bias.fill_(-0.1)
        block.bn1.running_mean.zero_()  # relu(bn1(0)) = 0, so bn2(conv2(.)) is spatially constant
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    masks = {"layer2.0.conv1": torch.zeros(block.conv1.out_channels, dtype=torch.bool)}
    shortcut_in = {}
    handle = block.register_forward_pre_hook(lambda m, a: shortcut_in.setdefault("x", a[0]))
    model(x)
    handle.remove()
    replaced = replace_empty_blocks(model, masks, (x[:1],), mode)
    assert replaced == ["layer2.0"] and isinstance(model.layer2[0], ShortcutBlock)
    if mode == "exact":
        assert model.layer2[0].relu
        assert torch.allclose(model(x), before, atol=1e-5)
    else:
        assert not model.layer2[0].relu
        out = model.layer2[0](shortcut_in["x"])
        assert torch.equal(out, block.shortcut(shortcut_in["x"]))  # bare shortcut, no ReLU
    with pytest.raises(ValueError, match="empty_blocks"):
        replace_empty_blocks(model, masks, (x[:1],), "neither")


def test_swp_method_exposes_the_reference_options_and_the_paper_recipe_uses_them():
    from prunekit.recipes import load_recipe

    method = get_method("swp")({"mask_norms": "reference", "empty_blocks": "reference"})
    assert (method.config.mask_norms, method.config.empty_blocks) == ("reference", "reference")
    default = get_method("swp")()
    assert (default.config.mask_norms, default.config.empty_blocks) == ("all", "exact")
    with pytest.raises(ConfigError, match="mask_norms"):
        get_method("swp")({"mask_norms": "bn2"})
    recipe = load_recipe("swp_resnet56")
    assert recipe["method"]["mask_norms"] == recipe["method"]["empty_blocks"] == "reference"
    assert recipe["model"]["kwargs"]["init"] == "swp"
