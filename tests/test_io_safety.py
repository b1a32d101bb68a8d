"""A saved file loads back as the same network, or save refuses it; and the spec inside a file
is untrusted input (issue 14, items 6 and 7).

Round trips compare outputs after save -> load. Refusals at save name the module, tensor or
attribute. Files are edited the way a third party would: read the header with safe_open,
change the spec JSON, rewrite with save_file.
"""
from __future__ import annotations

import copy
import json
import socket
import urllib.request
from collections import OrderedDict

import pytest
import torch
import torch.nn.utils.prune
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import prunekit
import prunekit.io as pio
from prunekit.errors import PrunekitError
from prunekit.models import WeightsLoadError, WeightsMismatchError
from prunekit.models import registry as model_registry
from prunekit.nn.registry import json_value, structural_checks
from prunekit.nn.shortcut import ShortcutBlock
from prunekit.nn.stripe import StripeConv2d

pytestmark = pytest.mark.usefixtures("single_thread")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _resnet20(randomize_norms, **kwargs):
    torch.manual_seed(0)
    return randomize_norms(prunekit.models.create("cifar_resnet20", **kwargs)).eval()


def _round_trip(model, tmp_path, x=X):
    path = pio.save(model, tmp_path / "m.safetensors")
    loaded = pio.load(path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    return loaded, path


def _edit(path, dst, change):
    """Rewrite ``path`` as ``dst`` after ``change(spec, tensors)`` edited them in place."""
    with safe_open(str(path), framework="pt") as f:
        spec = json.loads(f.metadata()["prunekit_spec"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(spec, tensors)
    save_file(tensors, str(dst), metadata={"prunekit_spec": json.dumps(spec), "format": "pt"})
    return dst


def _set_modules(entries):
    def change(spec, tensors):
        spec["modules"].update(entries)
    return change


@pytest.fixture(scope="module")
def saved20(tmp_path_factory):
    """An unpruned cifar_resnet20 file: its spec records no module."""
    model = prunekit.models.create("cifar_resnet20")
    return pio.save(model, tmp_path_factory.mktemp("saved20") / "r20.safetensors")


# --- round trips: what a model changed keeps after save -> load ---------------------------


def test_changed_norm_attributes_round_trip(randomize_norms, tmp_path):
    model = _resnet20(randomize_norms)
    model.bn1.eps = 0.25
    model.layer1[0].bn2.eps, model.layer1[0].bn2.momentum = 1e-2, None
    loaded, path = _round_trip(model, tmp_path)
    assert (loaded.bn1.eps, loaded.layer1[0].bn2.eps) == (0.25, 1e-2)
    assert loaded.layer1[0].bn2.momentum is None
    assert pio.read_spec(path)["modules"]["bn1"]["eps"] == 0.25


def test_changed_conv_geometry_round_trip_on_zoo_model(randomize_norms, tmp_path):
    model = _resnet20(randomize_norms)
    model.conv1.stride = (2, 2)
    conv = model.layer1[0].conv1
    conv.padding, conv.dilation = (2, 2), (2, 2)
    model.layer2[0].conv2.padding_mode = "reflect"
    loaded, _ = _round_trip(model, tmp_path)
    assert loaded.conv1.stride == (2, 2) and loaded.layer1[0].conv1.dilation == (2, 2)
    assert loaded.layer2[0].conv2.padding_mode == "reflect"


def test_changed_conv_and_pool_geometry_round_trip_on_torchvision(randomize_norms, tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(pio.create_base("torchvision", "resnet18", num_classes=10)).eval()
    model.conv1.stride = (1, 1)
    model.maxpool.stride = 1
    model.layer1[0].conv1.padding, model.layer1[0].conv1.dilation = (2, 2), (2, 2)
    loaded, _ = _round_trip(model, tmp_path)
    assert (loaded.conv1.stride, loaded.maxpool.stride) == ((1, 1), 1)


def test_pruned_model_with_changed_attributes_round_trip(randomize_norms, tmp_path):
    model = _resnet20(randomize_norms, shortcut="B")
    result = prunekit.prune(model, X[:1], criterion="random", ratio=0.5)
    model.layer3[0].bn1.eps = 0.5
    model.layer2[0].conv1.padding, model.layer2[0].conv1.dilation = (2, 2), (2, 2)
    loaded, _ = _round_trip(model, tmp_path)
    assert loaded.layer2[0].conv1.out_channels == model.layer2[0].conv1.out_channels < 32
    assert result.plan


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "mixed"])
def test_low_precision_round_trip_keeps_dtypes(dtype, randomize_norms, tmp_path):
    model = _resnet20(randomize_norms)
    prunekit.prune(model, X[:1], criterion="random", ratio=0.3)
    if dtype == "mixed":
        model.half()
        model.bn1.float()
        model.linear.to(torch.bfloat16)
    else:
        model.to(dtype)
    path = pio.save(model, tmp_path / "m.safetensors")
    loaded = pio.load(path).eval()
    want, got = model.state_dict(), loaded.state_dict()
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(loaded).float()(X), copy.deepcopy(model).float()(X))


def test_module_versions_survive_the_file(tmp_path):
    # MNASNet reads its layout version from state dict metadata, which safetensors drops.
    torch.manual_seed(0)
    model = pio.create_base("torchvision", "mnasnet0_5", num_classes=10).eval()
    _round_trip(model, tmp_path, X[:1])


class _TinyNet(nn.Module):
    """Every declared torch kind, plus a module the base itself shares under two names."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(3, 8, 3, padding=1), gn=nn.GroupNorm(2, 8), act=nn.PReLU(8),
            pool=nn.MaxPool2d(2), conv2=nn.Conv2d(8, 8, 3, padding=1), gn2=nn.GroupNorm(1, 8),
            avg=nn.AvgPool2d(2), drop=nn.Dropout(0.1), gap=nn.AdaptiveAvgPool2d(2),
            flat=nn.Flatten(), fc=nn.Linear(32, 6), norm=nn.LayerNorm(6)))
        self.shared = self.body.act  # aliasing the base model has: allowed, and kept

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def tiny_base():
    """``_io_safety_net`` registered as a prunekit model for the duration of a test."""
    name = "_io_safety_net"

    def _io_safety_net():
        return _TinyNet()

    model_registry.register_model(_io_safety_net)
    yield name
    for table in (model_registry._BUILDERS, model_registry._SIGNATURES):
        table.pop(name, None)


def test_every_declared_kind_round_trips_and_base_aliasing_is_kept(tiny_base, tmp_path):
    torch.manual_seed(0)
    model = prunekit.models.create(tiny_base).eval()
    body = model.body
    body.gn.eps, body.gn2.eps, body.norm.eps = 0.3, 0.2, 0.1
    body.pool.kernel_size, body.pool.stride, body.pool.padding = 3, 2, 1
    body.avg.count_include_pad, body.avg.padding = False, 1
    body.gap.output_size = (2, 2)
    body.drop.p = 0.7
    loaded, path = _round_trip(model, tmp_path, torch.randn(2, 3, 16, 16))
    assert loaded.shared is loaded.body.act
    got = loaded.body
    assert (got.pool.kernel_size, got.pool.padding, got.avg.count_include_pad) == (3, 1, False)
    assert (got.drop.p, got.norm.eps, got.gn2.eps) == (0.7, 0.1, 0.2)
    separate = prunekit.models.create(tiny_base)
    separate.shared = copy.deepcopy(separate.body.act)
    with pytest.raises(pio.SaveError, match="base model shares one module as 'body.act' and "
                                            "'shared'"):
        pio.save(separate, tmp_path / "x.safetensors")


# --- save refuses what a file cannot describe ---------------------------------------------


def _stale_reflect_padding(m):
    m.conv1.padding_mode = "reflect"
    m.conv1.padding = (2, 2)  # torch pads by the derived copy, which stays (1, 1, 1, 1)


REFUSED = {  # what was done to a cifar_resnet20 -> what save says
    "added": (lambda m: setattr(m, "extra", nn.Linear(2, 2)),
              r"module 'extra' \(Linear\) is not part of the base model.*register_replacement"
              r".*save_file\(model.state_dict\(\)"),
    "added_nested": (lambda m: setattr(m.layer1[0], "gate", nn.Sigmoid()),
                     r"module 'layer1.0.gate' \(Sigmoid\) is not part of the base model"),
    "aliased": (lambda m: m.layer1.__setitem__(1, m.layer1[0]),
                r"module 'layer1.1' is the same object as 'layer1.0' \(aliased\).*deepcopy"),
    "aliased_new_name": (lambda m: setattr(m, "head", m.linear),
                         r"module 'head' is the same object as 'linear'"),
    "tied": (lambda m: setattr(m.layer1[1].conv1, "weight", m.layer1[0].conv2.weight),
             r"tensor 'layer1.1.conv1.weight' is the same object as 'layer1.0.conv2.weight' "
             r"\(tied\)"),
    "class_changed": (lambda m: setattr(m.layer1[0], "relu1", nn.GELU()),
                      r"module 'layer1.0.relu1' is a GELU where the base model has a ReLU.*"
                      r"not a registered replacement"),
    "removed": (lambda m: delattr(m.layer1[0], "relu1"),
                r"lacks the base model's module 'layer1.0.relu1' \(ReLU\)"),
    "bias_removed": (lambda m: setattr(m.linear, "bias", None),
                     r"lacks tensors of the base model: linear.bias"),
    "torch_pruned": (lambda m: torch.nn.utils.prune.l1_unstructured(m.conv1, "weight", 0.5),
                     r"tensors the base model does not have: conv1.weight_orig, "
                     r"conv1.weight_mask"),
    "non_persistent_buffer": (lambda m: m.conv1.register_buffer("scale", torch.ones(1),
                                                                persistent=False),
                              r"module 'conv1' has buffer or parameter 'scale', which the "
                              r"base model's Conv2d lacks"),
    "undeclared_attribute": (lambda m: setattr(m, "depth", 21),
                             r"<model>.depth is 21 but 20 in the base model "
                             r"\(CifarResNet does not record it\).*"
                             r"register_structural_attributes"),
    "forward_overridden": (lambda m: setattr(m.layer1[0], "forward", lambda x: x),
                           r"layer1.0.forward is set on the module itself, overriding "
                           r"BasicBlock.forward"),
    "invalid_value": (lambda m: setattr(m.bn1, "eps", -1.0),
                      r"bn1.eps is -1.0, which prunekit.io.load refuses \(eps must be a "
                      r"finite number > 0.0\)"),
    "inconsistent": (lambda m: setattr(m.conv1, "out_channels", 8),
                     r"conv1.weight has shape \[16, 3, 3, 3\] but conv1's out_channels=8.* "
                     r"need \[8, 3, 3, 3\]"),
    "reordered": (lambda m: setattr(m.layer1, "_modules",
                                    OrderedDict(reversed(list(m.layer1._modules.items())))),
                  r"another order than the base model's \(first difference at 'layer1.2'\)"),
    "stale_reflect_padding": (_stale_reflect_padding,
                              r"conv1._reversed_padding_repeated_twice is \(1, 1, 1, 1\) but "
                              r"\(2, 2, 2, 2\)"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_save_refuses_what_a_file_cannot_describe(case, tmp_path):
    change, message = REFUSED[case]
    model = prunekit.models.create("cifar_resnet20")
    change(model)
    path = tmp_path / "m.safetensors"
    with pytest.raises(pio.SaveError, match=message) as err:
        pio.save(model, path)
    assert isinstance(err.value, PrunekitError) and isinstance(err.value, ValueError)
    assert err.value.args[0].startswith("cannot save this cifar_resnet20 model: ")
    assert not path.exists()


# --- load trusts the spec no further than each module kind declares -----------------------


@pytest.mark.parametrize("entries, message", [
    ({"conv1": {"forward": "print"}}, "sets conv1.forward, which prunekit never restores"),
    ({"bn1": {"__class__": "Linear"}}, "sets bn1.__class__, which prunekit never restores"),
    ({"layer1.0": {"training": False}}, "sets layer1.0.training, which prunekit never"),
    ({"conv1": {"_parameters": {}}}, "sets conv1._parameters, which prunekit never"),
    ({"conv1": {"width": 3}}, "sets conv1.width, which prunekit never restores"),
    ({"": {"depth": 56}}, r"sets <model>.depth, which prunekit never restores"),
    ({"bn1": {"eps": -1e-5}}, r"sets bn1.eps to -1e-05, which is not allowed: eps must be a "
                              r"finite number > 0.0"),
    ({"bn1": {"eps": float("nan")}}, r"sets bn1.eps to nan"),
    ({"bn1": {"momentum": 2.0}}, r"sets bn1.momentum to 2.0, .*momentum must be null or"),
    ({"conv1": {"out_channels": "16"}}, r"sets conv1.out_channels to '16', .*integer"),
    ({"conv1": {"out_channels": True}}, r"sets conv1.out_channels to True"),
    ({"conv1": {"out_channels": 10 ** 12}}, r"sets conv1.out_channels to 1000000000000, "
                                            r"which is not allowed"),
    ({"conv1": {"stride": [10 ** 9, 1]}}, r"sets conv1.stride to \[1000000000, 1\]"),
    ({"conv1": {"padding": "full"}}, r"sets conv1.padding to 'full'.*'same', 'valid'"),
    ({"conv1": {"padding_mode": "mirror"}}, r"sets conv1.padding_mode to 'mirror'"),
    ({"layer2.0.shortcut": {"positions": {"a": 1}}}, r"sets layer2.0.shortcut.positions to "
                                                      r"\{'a': 1\}.*never objects|a list"),
    ({"layer2.0.shortcut": {"positions": [0] * 16, "out_channels": 32}},
     r"sets layer2.0.shortcut .*do not fit together .*distinct"),
])
def test_load_refuses_an_edited_spec(saved20, tmp_path, entries, message):
    path = _edit(saved20, tmp_path / "x.safetensors", _set_modules(entries))
    with pytest.raises(WeightsLoadError, match=message) as err:
        pio.load(path)
    assert "the file was edited or comes from another program; re-save it" in str(err.value)


def test_generic_check_for_attributes_registered_without_one():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.width, self.depth = 4, 2

    pio.register_structural_attributes(Gate, ["width"])
    assert structural_checks(Gate())["width"] is json_value
    assert json_value([1, [2.5, None], "a", True]) == [1, [2.5, None], "a", True]
    for bad in ({"a": 1}, print, float("inf"), 1 << 40, [[[[[[[[[1]]]]]]]]]):
        with pytest.raises(ValueError, match="must be null, a boolean"):
            json_value(bad)
    fresh = nn.Sequential(Gate())
    with pytest.raises(WeightsLoadError, match=r"sets 0.width to \{'x': 1\}"):
        pio._restore_structure(fresh, {"0": {"width": {"x": 1}}}, "spec")
    with pytest.raises(WeightsLoadError, match="sets 0.depth, which prunekit never restores"):
        pio._restore_structure(fresh, {"0": {"depth": 3}}, "spec")
    assert (fresh[0].width, fresh[0].depth) == (4, 2)
    def small(value):
        if value not in (1, 2, 3):
            raise ValueError("must be 1, 2 or 3")
        return value

    pio.register_structural_attributes(Gate, {"depth": small})
    with pytest.raises(WeightsLoadError, match="sets 0.depth to 7.*depth must be 1, 2 or 3"):
        pio._restore_structure(fresh, {"0": {"depth": 7}}, "spec")
    pio._restore_structure(fresh, {"0": {"depth": 3}}, "spec")
    assert fresh[0].depth == 3


@pytest.fixture
def no_network(monkeypatch):
    """Any download or socket connection raises; the attempts are recorded."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError("loading must not touch the network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


@pytest.mark.parametrize("key, value", [("weights", "DEFAULT"), ("pretrained", True),
                                        ("weights_backbone", "DEFAULT")])
def test_load_never_builds_pretrained_weights(key, value, no_network, tmp_path):
    model = pio.create_base("torchvision", "resnet18", num_classes=10)
    path = pio.save(model, tmp_path / "tv.safetensors")
    assert pio.read_spec(path)["base"]["kwargs"] == {"num_classes": 10}
    pio.load(path)  # the plain file loads with the network blocked

    def ask(spec, tensors):
        spec["base"]["kwargs"][key] = value

    edited = _edit(path, tmp_path / "edited.safetensors", ask)
    with pytest.raises(WeightsLoadError, match=rf"asks for pretrained weights \({key}\) for its "
                                               "resnet18 base; .*never does.*nothing is "
                                               "downloaded: the file was edited"):
        pio.load(edited)
    assert no_network == []


def test_prunekit_base_is_built_without_weights(saved20, tmp_path, monkeypatch):
    built = []
    import prunekit.models.sources as model_sources
    real = model_sources.create

    def spy(name, weights=None, **kwargs):
        built.append(weights)
        return real(name, weights=weights, **kwargs)

    monkeypatch.setattr(model_sources, "create", spy)
    pio.load(saved20)
    assert built == [None]

    def ask(spec, tensors):
        spec["base"]["kwargs"]["weights"] = "pretrained"

    with pytest.raises(WeightsLoadError, match=r"pretrained weights \(weights\)"):
        pio.load(_edit(saved20, tmp_path / "x.safetensors", ask))
    assert built == [None]
    # A base asking for weights is left out of what save writes: the file holds them.
    model = pio.create_base("torchvision", "resnet18", num_classes=10)
    assert pio.read_spec(pio.save(model, tmp_path / "m.safetensors",
                                  base=("torchvision", "resnet18",
                                        {"num_classes": 10, "weights": None})))["base"] == \
        {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}}


# --- shapes: attributes, stored tensors and the spec's copy must agree --------------------


def _resized_weight(spec, tensors):
    tensors["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    spec["shapes"]["conv1.weight"] = [8, 3, 3, 3]


def _shapes_copy(spec, tensors):
    spec["shapes"]["conv1.weight"] = [8, 3, 3, 3]


def _float_counter(spec, tensors):
    tensors["bn1.num_batches_tracked"] = torch.zeros((), dtype=torch.float32)


@pytest.mark.parametrize("change, message", [
    (_set_modules({"conv1": {"in_channels": 3, "out_channels": 8, "groups": 1}}),
     r"conv1.weight has shape \[16, 3, 3, 3\] but conv1's out_channels=8.*need \[8, 3, 3, 3\]"),
    (_set_modules({"bn1": {"num_features": 8}}), r"bn1.weight has shape \[16\] but bn1's "
                                                  r"num_features=8 need \[8\]"),
    (_set_modules({"conv1": {"groups": 5}}), r"conv1.groups =5 does not divide|"
                                             r"conv1.groups=5 does not divide"),
    (_set_modules({"conv1": {"kernel_size": [3]}}), r"conv1.kernel_size is \(3,\), not 2"),
    (_set_modules({"conv1": {"stride": [2, 2], "padding": "same"}}),
     r"conv1.padding is 'same', which needs stride 1"),
    (_set_modules({"bn1": {"affine": False}}), r"bn1.affine is False but the module has "
                                               r"'weight'"),
    (_resized_weight, r"conv1.weight has shape \[8, 3, 3, 3\] but conv1's out_channels=16"),
    (_shapes_copy, r"conv1.weight: spec \[8, 3, 3, 3\] vs stored \[16, 3, 3, 3\]"),
    (_float_counter, r"bn1.num_batches_tracked is torch.float32 in the file but torch.int64"),
])
def test_load_refuses_shapes_that_disagree(saved20, tmp_path, change, message):
    path = _edit(saved20, tmp_path / "x.safetensors", change)
    with pytest.raises(WeightsMismatchError, match=message):
        pio.load(path)


# --- replacement modules: their init payloads are checked before anything is built --------


@pytest.fixture(scope="module")
def saved_replacements(tmp_path_factory):
    torch.manual_seed(0)
    model = prunekit.models.create("cifar_resnet20", shortcut="B").eval()
    model.layer2[1] = ShortcutBlock(model.layer2[1].shortcut, torch.randn(32))
    mask = torch.rand(16, 3, 3) > 0.5
    model.layer1[0].conv1 = StripeConv2d.from_dense(model.layer1[0].conv1, mask)
    # A replacement inside a replacement: rebuilt parents first.
    block = model.layer2[0] = ShortcutBlock(model.layer2[0].shortcut, torch.randn(32))
    block.shortcut[0] = StripeConv2d.from_dense(block.shortcut[0], torch.rand(32, 1, 1) > 0.3)
    path = pio.save(model, tmp_path_factory.mktemp("replaced") / "r.safetensors")
    return model, path


def test_replacements_round_trip(saved_replacements):
    model, path = saved_replacements
    loaded = pio.load(path).eval()
    assert isinstance(loaded.layer2[1], ShortcutBlock)
    assert isinstance(loaded.layer1[0].conv1, StripeConv2d)
    assert isinstance(loaded.layer2[0].shortcut[0], StripeConv2d)
    assert list(pio.read_spec(path)["replaced"]) == ["layer1.0.conv1", "layer2.0",
                                                     "layer2.0.shortcut.0", "layer2.1"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)


def _init(name, **values):
    def change(spec, tensors):
        spec["replaced"][name]["init"].update(values)
    return change


@pytest.mark.parametrize("change, error, message", [
    (_init("layer2.1", channels=10 ** 12), WeightsLoadError,
     r"sets layer2.1.init.channels to 1000000000000, which is not allowed"),
    (_init("layer2.1", channels="32"), WeightsLoadError, r"sets layer2.1.init.channels to '32'"),
    (_init("layer2.1", evil=1), WeightsLoadError, r"unknown: \['evil'\]"),
    (_init("layer2.1", channels=16), WeightsMismatchError,
     r"layer2.1.constant has shape \[1, 32, 1, 1\] but the module's init payload needs "
     r"\[1, 16, 1, 1\]"),
    (_init("layer1.0.conv1", in_channels=10 ** 9), WeightsLoadError,
     r"sets layer1.0.conv1.init.in_channels to 1000000000"),
    (_init("layer1.0.conv1", in_channels=1000), WeightsMismatchError,
     r"layer1.0.conv1.weight has shape \[\d+, 16\] but .* needs \[\d+, 1000\]"),
    (_init("layer1.0.conv1", kernel_size=[3]), WeightsLoadError,
     r"init.kernel_size .*list of 2 integers"),
    (_init("layer1.0.conv1", stripe_mask=[[[2]]]), WeightsLoadError,
     r"init.stripe_mask .*nested list"),
    (_init("layer1.0.conv1", stripe_mask=[[[1, 1, 1]] * 3] * 4), WeightsLoadError,
     r"stripe_mask is not \[16\]\[3\]\[3\]"),
])
def test_load_refuses_an_edited_replacement(saved_replacements, tmp_path, change, error,
                                            message):
    path = _edit(saved_replacements[1], tmp_path / "x.safetensors", change)
    with pytest.raises(error, match=message):
        pio.load(path)


def test_edited_stripe_routing_is_refused_not_silently_computed(tmp_path):
    """StripeConv2d's out_index/stripe_mask buffers are derived from its init mask; a file
    whose buffers disagree would scatter stripes into the wrong filters."""
    from prunekit.nn.stripe import StripeConv2d
    from prunekit.utils import set_submodule
    torch.manual_seed(0)
    model = prunekit.models.create("cifar_resnet20").eval()
    conv = model.layer1[0].conv1
    set_submodule(model, "layer1.0.conv1",
                  StripeConv2d.from_dense(conv, torch.rand(conv.out_channels, 3, 3) > 0.5))
    path = tmp_path / "stripe.safetensors"
    pio.save(model, path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(pio.load(path).eval()(x), model(x))
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = "layer1.0.conv1.out_index"
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(WeightsMismatchError, match="out_index disagrees with the stripe mask"):
        pio.load(path)


def test_zero_pad_shortcut_geometry_round_trips_and_is_checked(tmp_path):
    model = prunekit.models.create("cifar_resnet20").eval()
    model.layer2[0].shortcut.stride = 1  # recorded now (it was refused at save before)
    model.layer2[0].conv1.stride = (1, 1)
    model.layer3[0].shortcut.stride, model.layer3[0].conv1.stride = 1, (1, 1)
    path = tmp_path / "s1.safetensors"
    pio.save(model, path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(pio.load(path).eval()(x), model(x))

    def huge(spec, tensors):
        spec["modules"]["layer2.0.shortcut"]["out_channels"] = 10 ** 12
    _edit(path, tmp_path / "huge.safetensors", huge)
    with pytest.raises(WeightsLoadError, match="layer2.0.shortcut.*out_channels"):
        pio.load(tmp_path / "huge.safetensors")
