"""Physical pruning of timm's CNN zoo (random init, small inputs, issue 16).

For every architecture, the smallest variant of its family is built as a new user would
(``timm.create_model(name, pretrained=False, num_classes=10)``, eval mode) and pruned with
``prunekit.prune(model, x, criterion="l1", ratio=0.5, ignore=[model.get_classifier()])``.
Then

* the output shape is unchanged and MACs and parameters both drop by at least 20%,
* every layer's bookkeeping attributes match its new tensor shapes,
* the pruned model computes what the unpruned model computes with the removed channels
  zeroed (``prunekit.zero_removed_channels``), in eval mode -- or, for the models in
  ``SHAPES_ONLY``, where a normalisation over the channels makes that impossible, it has the
  right shape and is finite,
* a forward/backward pass in training mode gives finite gradients for every parameter.

Each model is built and pruned once (module-scoped fixture shared by the three tests) on a
64x64 input (Inception-v3: 96x96, the least its stem accepts): the time goes to tracing, not
to arithmetic. The whole file (62 models, 186 tests) takes about 70 s on the 2-core CI machine
when it is otherwise idle.
Models that prunekit cannot prune yet are marked ``xfail(strict=True)`` with their failure
class, so the mark must be removed when the fix lands.
"""
from __future__ import annotations

import copy

import pytest
import torch

import prunekit

timm = pytest.importorskip("timm", reason="timm is not installed (pip install prunekit[test])")

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = 10
SIZE = 64
SIZES = {"inception_v3": 96}  # its stem needs more than 64 pixels

# family -> smallest timm variant(s) of it
FAMILIES = {
    "ResNet": ["resnet18", "resnet26d", "resnetaa34d", "resnet32ts"],
    "SE/ECA/GC-ResNet": ["seresnet18", "ecaresnet26t", "gcresnet33ts"],
    "ResNeXt": ["resnext26ts", "seresnext26d_32x4d"],
    "ResNet-V2": ["resnetv2_18"],
    "BlurPool ResNet": ["resnetblur18"],
    "ResNeSt": ["resnest14d"],
    "SKNet": ["skresnet18"],
    "Res2Net": ["res2net50_48w_2s"],
    "CSP": ["cspresnet50", "cs3darknet_s", "cspnext_tiny"],
    "DLA": ["dla46_c"],
    "DPN": ["dpn48b"],
    "DenseNet": ["densenet121"],
    "GhostNet": ["ghostnet_050", "ghostnetv2_100", "repghostnet_050"],
    "MixNet": ["mixnet_s"],
    "EfficientNet": ["efficientnet_b0", "efficientnet_b0_gn", "tinynet_e"],
    "EfficientNet-V2": ["tf_efficientnetv2_b0"],  # also: TF "same" padding (Conv2dSame)
    "MobileNet": ["mobilenetv1_100", "mobilenetv2_050"],
    "MobileNet-V3": ["mobilenetv3_small_050"],
    "MobileNet-V4": ["mobilenetv4_conv_small"],
    "MobileOne": ["mobileone_s0"],
    "RepVGG": ["repvgg_a0"],
    "RepViT": ["repvit_m0_9"],
    "FastViT (RepMixer, no attention)": ["fastvit_t8"],
    "RegNet": ["regnetx_002", "regnety_002"],
    "RegNetZ": ["regnetz_005"],
    "NFNet": ["nf_resnet26"],
    "HRNet": ["hrnet_w18_small"],
    "VoVNet": ["vovnet39a", "ese_vovnet19b_dw"],
    "ConvNeXt": ["convnext_atto", "convnextv2_atto"],
    "GERNet": ["gernet_s"],
    "HGNet": ["hgnet_tiny", "hgnetv2_b0"],
    "TResNet": ["tresnet_m"],
    "LCNet": ["lcnet_050"],
    "HardCoReNAS": ["hardcorenas_a"],
    "FBNet": ["fbnetc_100"],
    "MnasNet": ["mnasnet_small", "semnasnet_050"],
    "RexNet": ["rexnet_100"],
    "SelecSLS": ["selecsls42b"],
    "Xception": ["xception41"],
    "Inception": ["inception_v3"],
    "InceptionNeXt": ["inception_next_atto"],
    "DarkNet": ["darknet17"],
    "FasterNet": ["fasternet_t0"],
    "StarNet": ["starnet_s050"],
}
MODELS = [name for names in FAMILIES.values() for name in names]

# Where the zeroed reference is not the function the pruned model computes, only shapes
# (and training) can be compared:
SHAPES_ONLY = {
    # GroupNorm over the channels: a zeroed channel still counts in the group statistics
    "efficientnet_b0_gn": "GroupNorm statistics",
    # LayerNorm over the channels (and ConvNeXt-V2's GRN divides by a mean over channels)
    "convnext_atto": "LayerNorm over channels",
    "convnextv2_atto": "LayerNorm over channels, GRN mean over channels",
    # the classifier head's hidden layer (fc1, pruned) is followed by a LayerNorm
    "inception_next_atto": "LayerNorm in the MLP head",
    # weight standardisation: each filter is normalised over its input channels, so zeroing
    # input columns changes the remaining weights, removing them does not
    "nf_resnet26": "ScaledStdConv2d standardises over input channels",
}

ALL = ("costs", "equal", "backward")
# model -> (tests expected to fail, failure class), e.g.
#     "mixnet_s": (("costs",), "MixConv: torch.split sizes pin the channels"),
# strict, so the entry must go when the fix lands. Empty: every model above prunes.
XFAIL: dict[str, tuple[tuple[str, ...], str]] = {}

assert len(MODELS) == len(set(MODELS)) >= 40, "list at least 40 distinct architectures"
assert set(SHAPES_ONLY) <= set(MODELS) and set(XFAIL) <= set(MODELS)
assert all(set(tests) <= set(ALL) and reason for tests, reason in XFAIL.values())


def _cases(test: str):
    out = []
    for name in MODELS:
        tests, reason = XFAIL.get(name, ((), ""))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if test in tests else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=CLASSES).eval()


@pytest.fixture(scope="module")
def pruned(request, prune_and_compare):
    name = request.param
    model = _build(name)
    head = model.get_classifier()
    size = SIZES.get(name, SIZE)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    check = prune_and_compare(model, x, ignore=[head], criterion="l1", ratio=0.5,
                              compare_values=False)
    return name, head, x, check


@pytest.mark.parametrize("pruned", _cases("costs"), indirect=True)
def test_shapes_and_costs(pruned, assert_module_metadata):
    name, head, x, check = pruned
    result = check.result
    assert check.after.shape == check.before.shape == (2, CLASSES)
    assert result.unreached_modules == []
    assert result.macs_after == prunekit.count_macs(check.pruned, x[:1])
    assert result.params_after == prunekit.count_params(check.pruned)
    assert result.macs_reduction >= 0.2, result.summary()
    assert result.params_reduction >= 0.2, result.summary()
    assert_module_metadata(check.pruned)
    # the ignored classifier keeps its outputs
    assert any(m is head for m in check.pruned.modules())
    weights = [p for p in head.parameters() if p.dim() >= 2]
    assert weights and all(w.shape[0] == CLASSES for w in weights), name


@pytest.mark.parametrize("pruned", _cases("equal"), indirect=True)
def test_equivalent_to_zeroed_reference(pruned, assert_matches_zeroed):
    name, _, _, check = pruned
    assert_matches_zeroed(check, name, shapes_only=name in SHAPES_ONLY)


@pytest.mark.parametrize("pruned", _cases("backward"), indirect=True)
def test_backward_in_training_mode(pruned):
    name, _, x, check = pruned
    model = copy.deepcopy(check.pruned).train()
    out = model(x)
    assert out.shape == (2, CLASSES)
    out.float().pow(2).mean().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {pname} got no gradient"
            assert p.grad.shape == p.shape
            assert torch.isfinite(p.grad).all(), f"{name}: {pname}"
