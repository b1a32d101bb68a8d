"""Tests for prunekit.models: registry, architectures, exact sizes, checkpoint loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit import models
from prunekit.models import (
    UnknownModelError,
    WeightsLoadError,
    WeightsMismatchError,
    create,
    get_model_spec,
    list_models,
    load_weights,
    pretrained_checkpoint_info,
)
from prunekit.models.cifar_resnet import SHORTCUTS, ZeroPadShortcut

from conftest import SHARED
WEIGHTS_DIR = SHARED / "weights" / "akamaster_resnet_cifar10"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(),
                                  reason=f"shared data folder not found at {SHARED}")

RESNETS = [f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)]
ALL_MODELS = RESNETS + ["cifar_vgg16_bn"]
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def variants():
    for name in ALL_MODELS:
        if name.startswith("cifar_resnet"):
            for shortcut in SHORTCUTS:
                yield name, {"shortcut": shortcut}
        else:
            yield name, {}


def variant_id(v):
    name, kwargs = v
    return name + "".join(f"-{x}" for x in kwargs.values())


def mac_counts(model: nn.Module) -> dict[str, int]:
    """MACs per op kind at batch 1, from FlopCounterMode (which reports 2 FLOPs per MAC)."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    per_op = counter.get_flop_counts()["Global"]
    conv = sum(v for k, v in per_op.items() if "convolution" in str(k))
    linear = sum(v for k, v in per_op.items() if "addmm" in str(k) or str(k).endswith("mm"))
    assert conv + linear == counter.get_total_flops()
    return {"conv": conv // 2, "linear": linear // 2, "total": counter.get_total_flops() // 2}


def n_params(model: nn.Module, *, with_bn: bool = True) -> int:
    bn = (nn.BatchNorm1d, nn.BatchNorm2d)
    return sum(p.numel() for m in model.modules() if with_bn or not isinstance(m, bn)
               for p in m.parameters(recurse=False))


# --------------------------------------------------------------------------- registry

def test_list_models_has_all_builders():
    names = list_models()
    assert names == sorted(names)
    assert set(ALL_MODELS) <= set(names)
    assert list_models("cifar_vgg*") == ["cifar_vgg16_bn"]
    assert list_models("cifar_resnet5?") == ["cifar_resnet56"]


def test_unknown_model_lists_valid_names_and_suggests():
    with pytest.raises(UnknownModelError) as info:
        create("nope")
    assert isinstance(info.value, ValueError)
    for name in ALL_MODELS:
        assert name in str(info.value)
    with pytest.raises(UnknownModelError, match="Did you mean 'cifar_resnet56'"):
        create("cifar_resnet65")


def test_spec_is_recorded_with_defaults_and_is_json():
    model = create("cifar_resnet56", shortcut="B")
    assert model.prunekit_spec == {"name": "cifar_resnet56",
                                   "kwargs": {"num_classes": 10, "shortcut": "B"}}
    # Calling the builder directly stamps the spec as well.
    assert models.cifar_vgg16_bn(num_classes=100).prunekit_spec["kwargs"] == {"num_classes": 100}
    spec = get_model_spec(model)
    assert json.loads(json.dumps(spec)) == {
        "name": "cifar_resnet56",
        "kwargs": {"num_classes": 10, "shortcut": "B", "mid_channels": None, "out_channels": None},
    }
    with pytest.raises(TypeError, match="JSON"):
        create("cifar_resnet20", shortcut=object())
    with pytest.raises(ValueError, match="no 'prunekit_spec'"):
        get_model_spec(nn.Linear(2, 2))


def test_bad_shortcut_lists_options():
    with pytest.raises(ValueError, match="'A', 'A_append', 'B'"):
        create("cifar_resnet20", shortcut="C")


def test_spec_follows_physical_pruning_and_rebuilds():
    model = create("cifar_resnet20").eval()
    block = model.layer2[1]
    keep = torch.arange(0, 32, 2)  # drop every other mid channel of one block
    conv1, bn1, conv2 = block.conv1, block.bn1, block.conv2
    block.conv1 = nn.Conv2d(32, 16, 3, padding=1, bias=False)
    block.conv1.weight.data = conv1.weight.data[keep].clone()
    block.bn1 = nn.BatchNorm2d(16).eval()
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(block.bn1, name).data = getattr(bn1, name).data[keep].clone()
    block.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    block.conv2.weight.data = conv2.weight.data[:, keep].clone()

    spec = get_model_spec(model)
    assert spec["kwargs"]["mid_channels"][4] == 16 and spec["kwargs"]["out_channels"] is None
    rebuilt = create(spec["name"], weights=model.state_dict(), **spec["kwargs"]).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_vgg_spec_rebuilds_pruned_widths():
    widths = [32, 64, 64, 128, 128, 128, 256, 256, 256, 256, 256, 256, 512]
    model = create("cifar_vgg16_bn", channels=widths, hidden_features=256)
    assert get_model_spec(model)["kwargs"]["channels"] == widths
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert get_model_spec(create("cifar_vgg16_bn"))["kwargs"]["channels"] is None


# --------------------------------------------------------------------------- architectures

@pytest.mark.parametrize("variant", list(variants()), ids=variant_id)
def test_forward_shape_and_fx_trace(variant):
    name, kwargs = variant
    torch.manual_seed(0)
    model = create(name, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), out, rtol=0, atol=0)
    assert out.shape == (2, 10)


def test_resnet_module_names_for_activation_hooks():
    model = create("cifar_resnet20")
    names = dict(model.named_modules())
    for key in ("relu", "layer1.0.relu1", "layer1.0.relu2", "layer3.2.relu2", "avgpool", "linear"):
        assert key in names
    assert isinstance(names["layer2.0.shortcut"], ZeroPadShortcut)
    b_names = dict(create("cifar_resnet20", shortcut="B").named_modules())
    assert isinstance(b_names["layer2.0.shortcut.0"], nn.Conv2d)
    assert isinstance(b_names["layer2.0.shortcut.1"], nn.BatchNorm2d)


def test_vgg_layout_matches_hrank_chip():
    model = create("cifar_vgg16_bn")
    convs = [n for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)]
    pools = [n for n, m in model.features.named_children() if isinstance(m, nn.MaxPool2d)]
    assert convs == ["conv0", "conv1", "conv3", "conv4", "conv6", "conv7", "conv8", "conv10",
                     "conv11", "conv12", "conv14", "conv15", "conv16"]
    assert pools == ["pool2", "pool5", "pool9", "pool13"]
    assert all(model.features.get_submodule(c).bias is not None for c in convs)
    assert list(dict(model.classifier.named_children())) == ["linear1", "norm1", "relu1", "linear2"]


@pytest.mark.parametrize("shortcut, zero_channels", [
    ("A", list(range(0, 8)) + list(range(24, 32))),   # symmetric, planes // 4 on each side
    ("A_append", list(range(16, 32))),                # all zeros at the end
])
def test_zero_pad_shortcut_layout(shortcut, zero_channels):
    model = create("cifar_resnet20", shortcut=shortcut)
    x = torch.rand(2, 16, 32, 32) + 0.5
    y = model.layer2[0].shortcut(x)
    assert y.shape == (2, 32, 16, 16)
    is_zero = [bool((y[:, c] == 0).all()) for c in range(32)]
    assert [c for c, z in enumerate(is_zero) if z] == zero_channels
    data = [c for c in range(32) if c not in zero_channels]
    torch.testing.assert_close(y[:, data], x[:, :, ::2, ::2])


def test_zero_pad_shortcut_odd_padding_puts_extra_zero_at_back():
    s = ZeroPadShortcut(12, 25, stride=1)
    assert (s.front, s.back) == (6, 7)
    with pytest.raises(ValueError, match="cannot reduce"):
        ZeroPadShortcut(32, 16)


# --------------------------------------------------------------------------- exact sizes

def test_resnet56_macs_and_params_exact():
    model = create("cifar_resnet56", shortcut="A")
    macs = mac_counts(model)
    assert macs == {"conv": 125_485_056, "linear": 640, "total": 125_485_696}
    assert n_params(model) == 853_018


@pytest.mark.parametrize("name, params", [
    ("cifar_resnet20", 269_722), ("cifar_resnet32", 464_154), ("cifar_resnet44", 658_586),
])
def test_small_resnet_params(name, params):
    assert n_params(create(name)) == params


def test_resnet110_size():
    model = create("cifar_resnet110")
    macs = mac_counts(model)["total"]
    assert macs == 252_887_680 and round(macs / 1e6, 2) == 252.89
    # The literature's "1.72M" leaves out BN's affine parameters (HRank's counter skips BN).
    assert n_params(model) == 1_727_962
    assert n_params(model, with_bn=False) == 1_719_866


def test_vgg16_bn_size_and_literature_convention():
    model = create("cifar_vgg16_bn")
    macs = mac_counts(model)
    assert macs == {"conv": 313_196_544, "linear": 267_264, "total": 313_463_808}
    assert n_params(model) == 14_991_946
    # GAL/HRank/CHIP quote 313.73M "FLOPs" and 14.98M params. The FLOPs figure is matched
    # by conv MACs (bias adds not counted) plus the two linear layers counted twice
    # (multiply + add); the params figure leaves out BN. Counting conv-bias adds instead
    # gives 313.74M and thop's BN counting 314.29M, so neither is the quoted convention.
    assert macs["conv"] + 2 * macs["linear"] == 313_731_072
    assert round((macs["conv"] + 2 * macs["linear"]) / 1e6, 2) == 313.73
    assert round(n_params(model, with_bn=False) / 1e6, 2) == 14.98


# --------------------------------------------------------------------------- checkpoints

def test_prefixed_and_plain_checkpoints_both_load(tmp_path):
    source = create("cifar_resnet20").eval()
    state = source.state_dict()
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    wrapped = tmp_path / "wrapped.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 50.0},
               wrapped)
    compiled = {f"_orig_mod.{k}": v for k, v in state.items()}
    x = torch.randn(2, 3, 32, 32)
    for src in (plain, str(wrapped), compiled):
        model = load_weights(create("cifar_resnet20"), src).eval()
        torch.testing.assert_close(model(x), source(x))
    assert pretrained_checkpoint_info(wrapped) == {"best_prec1": 50.0}
    assert pretrained_checkpoint_info(plain) == {}


def test_missing_file(tmp_path):
    path = tmp_path / "nothing.th"
    with pytest.raises(FileNotFoundError, match="nothing.th"):
        load_weights(create("cifar_resnet20"), path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.th"
    path.write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(WeightsLoadError, match="corrupt or not a PyTorch checkpoint"):
        load_weights(create("cifar_resnet20"), path)


def test_shape_mismatch_message():
    state = create("cifar_resnet20", num_classes=100).state_dict()
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(create("cifar_resnet20"), state)
    assert "linear.weight: checkpoint (100, 64) vs model (10, 64)" in str(info.value)
    assert info.value.shape_mismatches[0][0] == "linear.weight"


def test_non_strict_tolerates_extra_keys_only():
    state = create("cifar_resnet20").state_dict()
    state["extra.weight"] = torch.zeros(1)
    load_weights(create("cifar_resnet20"), state, strict=False)
    with pytest.raises(WeightsMismatchError, match="1 unexpected key"):
        load_weights(create("cifar_resnet20"), state)


def test_pretrained_needs_shortcut_a_and_registered_weights():
    with pytest.raises(ValueError, match="shortcut='A_append' but the checkpoint needs"):
        create("cifar_resnet56", weights="pretrained", shortcut="A_append")
    with pytest.raises(ValueError, match="no pretrained weights are registered"):
        create("cifar_resnet110", weights="pretrained")


def test_pretrained_not_found_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        create("cifar_resnet20", weights="pretrained")
    assert str(tmp_path) in str(info.value) and "PRUNEKIT_WEIGHTS" in str(info.value)


# --------------------------------------------------------------------------- shared files

@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_shared_weights_load_strictly(depth):
    (path,) = WEIGHTS_DIR.glob(f"resnet{depth}-*.th")
    model = load_weights(create(f"cifar_resnet{depth}", shortcut="A"), path, strict=True)
    assert isinstance(model, models.CifarResNet)
    assert 91.0 < pretrained_checkpoint_info(path)["best_prec1"] < 94.0


@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize("depth, top1", [(56, 92.6), (20, 91.5)])
def test_pretrained_accuracy_on_lossless_test_images(depth, top1, monkeypatch, tmp_path):
    # Exercise the default lookup: no env vars, cwd elsewhere -> found next to the repository.
    monkeypatch.delenv("PRUNEKIT_WEIGHTS", raising=False)
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    model = create(f"cifar_resnet{depth}", weights="pretrained").eval()
    data = np.load(SHARED / "cifar10" / "test_lossless_first1000.npz")
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float().div(255)
    x = (x - MEAN) / STD
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(500)])
    acc = 100.0 * (pred.numpy() == data["y"]).mean()
    assert abs(acc - top1) <= 0.05


@pytest.mark.shared_data
@needs_shared
def test_weights_of_other_depth_name_the_keys():
    (path,) = WEIGHTS_DIR.glob("resnet56-*.th")
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(create("cifar_resnet20"), path)
    message = str(info.value)
    assert "unexpected key" in message and "layer1.3.conv1.weight" in message
    assert "and 170 more" in message and len(info.value.unexpected) == 180


@pytest.mark.shared_data
@needs_shared
def test_truncated_weights_file(tmp_path):
    (path,) = WEIGHTS_DIR.glob("resnet20-*.th")
    broken = tmp_path / path.name
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsLoadError, match="re-download") as info:
        load_weights(create("cifar_resnet20"), broken)
    assert not isinstance(info.value, WeightsMismatchError)


@pytest.mark.shared_data
@needs_shared
def test_weights_env_var_points_at_folder(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_WEIGHTS", str(WEIGHTS_DIR))
    model = create("cifar_resnet20", weights="pretrained")
    assert model.prunekit_spec == {"name": "cifar_resnet20",
                                   "kwargs": {"num_classes": 10, "shortcut": "A"}}
