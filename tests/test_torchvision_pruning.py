"""Physical pruning of the torchvision classification zoo (random init, small inputs).

For every architecture: prune half of every prunable channel group (classifier ignored) with
the random criterion, then check that

* the output shape is unchanged and MACs and parameters both go down,
* every layer's bookkeeping attributes match its new tensor shapes,
* the pruned model computes exactly what the unpruned model computes with the removed
  channels zeroed (``prunekit.zero_removed_channels``), in eval mode,
* the pruned model still trains: a forward/backward pass in training mode with a batch of 2
  (for GoogLeNet and Inception-v3 this includes the auxiliary heads, which only run in
  training mode and therefore must have been pruned consistently too).

Each model is built and pruned once (module-scoped fixture) and shared by the tests below.
"""
from __future__ import annotations

import copy

import pytest
import torch

import prunekit

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("single_thread")

# name -> (classifier to ignore, input size). 64x64 keeps everything fast; every model here
# accepts it (AlexNet needs >= 63, GoogLeNet's aux heads pool adaptively). Inception-v3 needs
# 299 so that its training-only AuxLogits head (5x5 conv after a 5x5/3 pool on the 17x17
# map) can be traced in training mode; with a smaller input that head would stay unpruned.
MODELS = {
    "alexnet": ("classifier.6", 64),
    "vgg16_bn": ("classifier.6", 64),
    "resnet18": ("fc", 64),
    "resnet50": ("fc", 64),
    "resnext50_32x4d": ("fc", 64),
    "wide_resnet50_2": ("fc", 64),
    "densenet121": ("classifier", 64),
    "googlenet": ("fc", 64),
    "inception_v3": ("fc", 299),
    "mobilenet_v2": ("classifier.1", 64),
    "mobilenet_v3_large": ("classifier.3", 64),
    "mnasnet1_0": ("classifier.1", 64),
    "shufflenet_v2_x1_0": ("fc", 64),
    "squeezenet1_1": ("classifier.1", 64),  # the classifier is a 1x1 convolution
    "efficientnet_b0": ("classifier.1", 64),
    "efficientnet_v2_s": ("classifier.1", 64),
    "regnet_x_400mf": ("fc", 64),
    "regnet_y_400mf": ("fc", 64),
    "convnext_tiny": ("classifier.2", 64),
}
# ConvNeXt normalises with LayerNorm over the channel dimension: a zeroed channel still
# counts in the LayerNorm mean/variance, a removed one does not, so the zeroed reference is
# not the same function as the pruned model. Only shapes (and training) can be compared.
SHAPES_ONLY = {"convnext_tiny"}
AUX_HEADS = {"googlenet", "inception_v3"}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"init_weights": True} if name in AUX_HEADS else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def pruned(request, prune_and_compare):
    name = request.param
    classifier, size = MODELS[name]
    model = _build(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    check = prune_and_compare(model, x, ignore=[classifier], criterion="random", ratio=0.5,
                              compare_values=False)
    return name, classifier, x, check


def test_shapes_and_costs(pruned, assert_module_metadata):
    name, classifier, x, check = pruned
    result = check.result
    assert check.after.shape == check.before.shape == (2, 1000)
    assert result.unreached_modules == []
    assert result.plan, "nothing was pruned"
    assert result.macs_after < result.macs_before
    assert result.params_after < result.params_before
    assert result.macs_after == prunekit.count_macs(check.pruned, x[:1])
    assert result.params_after == prunekit.count_params(check.pruned)
    # half of every prunable group goes, so the model loses well over a third of its MACs
    assert result.macs_reduction > 0.4, result.summary()
    assert_module_metadata(check.pruned)
    # the ignored classifier keeps its outputs and its weight tensor is untouched row-wise
    head = check.pruned.get_submodule(classifier)
    assert head.weight.shape[0] == 1000


def test_equivalent_to_zeroed_reference(pruned, assert_matches_zeroed):
    name, _, _, check = pruned
    assert_matches_zeroed(check, name, shapes_only=name in SHAPES_ONLY)


def test_backward_in_training_mode(pruned):
    name, _, x, check = pruned
    model = copy.deepcopy(check.pruned).train()
    out = model(x)
    if name in AUX_HEADS:
        # GoogLeNetOutputs / InceptionOutputs: main logits plus auxiliary logits
        outputs = [o for o in out if o is not None]
        assert len(outputs) == (3 if name == "googlenet" else 2)
    else:
        outputs = [out]
    for o in outputs:
        assert o.shape == (2, 1000)
    loss = sum(o.float().pow(2).mean() for o in outputs)
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert p.grad.shape == p.shape
            assert torch.isfinite(p.grad).all(), pname
