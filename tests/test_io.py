"""Saving, loading and exporting pruned models (``prunekit.io``).

Every model is pruned once per module (pruning dominates the run time) and shared by the
tests. Round trips must be *exact*: the loaded model has the same classes, attributes and
tensors, so in eval mode its outputs are bit-identical to the pruned model's.
"""
from __future__ import annotations

import copy
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import prunekit
import prunekit.export
import prunekit.io as pio
from prunekit.models import UnknownModelError, WeightsLoadError, WeightsMismatchError

torchvision = pytest.importorskip("torchvision")

CIFAR = {  # id -> (model name, kwargs)
    "resnet56_A": ("cifar_resnet56", {}),
    "resnet56_B": ("cifar_resnet56", {"shortcut": "B"}),
    "vgg16_bn": ("cifar_vgg16_bn", {}),
}
TORCHVISION = {  # name -> classifier kept unpruned
    "resnet18": "fc",
    "mobilenet_v2": "classifier.1",
    "mobilenet_v3_small": "classifier.3",
}


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def _pruned_cifar(key, randomize_norms):
    name, kwargs = CIFAR[key]
    torch.manual_seed(0)
    model = randomize_norms(prunekit.models.create(name, **kwargs).eval())
    result = prunekit.prune(model, torch.randn(1, 3, 32, 32), criterion="random", ratio=0.5)
    return model.eval(), result


def _pruned_torchvision(name, randomize_norms):
    torch.manual_seed(0)
    model = randomize_norms(pio.create_base("torchvision", name).eval())
    result = prunekit.prune(model, torch.randn(1, 3, 64, 64), criterion="random", ratio=0.3,
                            ignore=[TORCHVISION[name]])
    return model.eval(), result


@pytest.fixture(scope="module")
def resnet56(randomize_norms):
    return _pruned_cifar("resnet56_A", randomize_norms)


@pytest.fixture(scope="module")
def mobilenet_v2(randomize_norms):
    return _pruned_torchvision("mobilenet_v2", randomize_norms)


@pytest.fixture(scope="module")
def saved_resnet56(resnet56, tmp_path_factory):
    model, result = resnet56
    path = tmp_path_factory.mktemp("saved") / "resnet56.safetensors"
    return pio.save(model, path, method="random", plan=result.plan, metrics=result)


def _assert_round_trip(model, path, x):
    loaded = pio.load(path).eval()
    assert type(loaded) is type(model)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    for (name, a), (_, b) in zip(model.named_modules(), loaded.named_modules()):
        assert type(a) is type(b), name
        assert pio.structural_attributes(a) == pio.structural_attributes(b), name
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad
               for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    return loaded


def test_resnet56_round_trip(resnet56, saved_resnet56):
    model, result = resnet56
    loaded = _assert_round_trip(model, saved_resnet56, torch.randn(4, 3, 32, 32))
    spec = pio.read_spec(saved_resnet56)
    assert spec["format"] == "prunekit/1"
    assert spec["base"] == {"source": "prunekit", "name": "cifar_resnet56",
                            "kwargs": {"num_classes": 10, "shortcut": "A"}}
    assert spec["shapes"] == {k: list(v.shape) for k, v in model.state_dict().items()}
    assert spec["modules"]["conv1"]["out_channels"] == model.conv1.out_channels < 16
    assert spec["plan"] == result.plan and spec["method"] == "random"
    assert spec["metrics"]["macs_after"] == result.macs_after
    assert loaded.prunekit_saved_spec == spec
    assert loaded.prunekit_spec == {"name": "cifar_resnet56", "kwargs": spec["base"]["kwargs"]}
    # The parameter-free option-A shortcut carries its layout in attributes (and a buffer
    # derived from them that no state dict holds).
    assert {"layer2.0.shortcut", "layer3.0.shortcut"} <= set(spec["modules"])
    for stage in ("layer2", "layer3"):
        want = getattr(model, stage)[0].shortcut
        got = getattr(loaded, stage)[0].shortcut
        assert (got.front, got.back, got.in_channels, got.out_channels) == \
            (want.front, want.back, want.in_channels, want.out_channels)
        assert getattr(got, "positions", None) == getattr(want, "positions", None)
        index = getattr(got, "scatter_index", None)
        want_index = getattr(want, "scatter_index", None)
        assert (index is None) == (want_index is None)
        assert index is None or torch.equal(index, want_index)


@pytest.mark.parametrize("key", ["resnet56_B", "vgg16_bn"])
def test_cifar_round_trip(key, randomize_norms, tmp_path):
    model, _ = _pruned_cifar(key, randomize_norms)
    path = pio.save(model, tmp_path / "m.safetensors", spec_json=True)
    _assert_round_trip(model, path, torch.randn(3, 3, 32, 32))
    assert json.loads((tmp_path / "spec.json").read_text()) == pio.read_spec(path)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "mobilenet_v2"])
def test_torchvision_round_trip(name, randomize_norms, mobilenet_v2, tmp_path):
    model, _ = mobilenet_v2 if name == "mobilenet_v2" else _pruned_torchvision(name,
                                                                              randomize_norms)
    path = pio.save(model, tmp_path / f"{name}.safetensors")
    loaded = _assert_round_trip(model, path, torch.randn(2, 3, 64, 64))
    assert pio.read_spec(path)["base"] == {"source": "torchvision", "name": name, "kwargs": {}}
    assert loaded.prunekit_spec["source"] == "torchvision"
    if name.startswith("mobilenet"):
        # Depthwise convolutions: pruning changed groups, and the load must restore it.
        base = torchvision.models.get_model(name)
        depthwise = [(n, m.groups) for n, m in loaded.named_modules()
                     if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
        assert depthwise
        assert any(groups < base.get_submodule(n).groups for n, groups in depthwise)


def test_explicit_base_for_plain_torchvision_model(tmp_path):
    model = torchvision.models.resnet18(num_classes=7).eval()
    with pytest.raises(ValueError, match="base="):
        pio.save(model, tmp_path / "m.safetensors")
    path = pio.save(model, tmp_path / "m.safetensors",
                    base=("torchvision", "resnet18", {"num_classes": 7}))
    _assert_round_trip(model, path, torch.randn(1, 3, 64, 64))


def test_unpruned_round_trip(tmp_path):
    model = prunekit.models.create("cifar_resnet20", num_classes=5).eval()
    path = pio.save(model, tmp_path / "plain.safetensors")
    _assert_round_trip(model, path, torch.randn(2, 3, 32, 32))
    assert pio.read_spec(path)["modules"] == {}


def test_file_holds_no_pickle_and_load_never_unpickles(saved_resnet56, monkeypatch):
    data = saved_resnet56.read_bytes()
    assert data[:1] != b"\x80" and not data.startswith(b"PK\x03\x04")  # pickle / torch.save zip
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    assert "prunekit_spec" in header["__metadata__"]

    def refuse(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    pio.load(saved_resnet56)


def test_load_state_into(resnet56, saved_resnet56):
    model, _ = resnet56
    target = copy.deepcopy(model)
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    assert pio.load_state_into(target, saved_resnet56) is target
    for (k, a), b in zip(target.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    unpruned = prunekit.models.create("cifar_resnet56")
    with pytest.raises(WeightsMismatchError, match="prunekit.io.load") as err:
        pio.load_state_into(unpruned, saved_resnet56)
    assert err.value.shape_mismatches


class _Widths(torch.nn.Module):
    prunekit_structural = ("width",)  # declared by the class itself

    def __init__(self):
        super().__init__()
        self.width, self.depth, self.derived = 4, 2, None


class _Registered(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.slots, self.derived = [0, 1], None


def test_structural_attribute_extension_points():
    def restore(module, attrs):  # a hook replaces setattr for its names, and can derive more
        module.slots, module.derived = attrs["slots"], len(attrs["slots"])

    pio.register_structural_attributes(_Registered, ["slots"], restore=restore)
    pruned = torch.nn.Sequential(_Widths(), _Registered())
    pruned[0].width, pruned[1].slots = 3, [1]
    changed = pio._changed_modules(pruned, torch.nn.Sequential(_Widths(), _Registered()))
    assert changed == {"0": {"width": 3}, "1": {"slots": [1]}}
    fresh = torch.nn.Sequential(_Widths(), _Registered())
    pio._restore_structure(fresh, changed, "spec")
    assert (fresh[0].width, fresh[0].depth, fresh[1].slots, fresh[1].derived) == (3, 2, [1], 1)


# --- errors ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        pio.load(path)


def test_truncated_file(saved_resnet56, tmp_path):
    data = saved_resnet56.read_bytes()
    half = tmp_path / "half.safetensors"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsLoadError, match="truncated or not a safetensors file"):
        pio.load(half)


@pytest.mark.parametrize("content", [b"", b"not a model at all\n" * 20, bytes(range(256)) * 4])
def test_garbage_file(content, tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsLoadError, match="truncated or not a safetensors file"):
        pio.load(path)


def test_torch_save_checkpoint_points_to_load_weights(tmp_path):
    path = tmp_path / "ckpt.th"
    torch.save(prunekit.models.create("cifar_resnet20").state_dict(), path)
    with pytest.raises(WeightsLoadError, match="load_weights"):
        pio.load(path)


def test_plain_safetensors_without_spec(tmp_path):
    model = prunekit.models.create("cifar_resnet20")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    for reader in (pio.load, pio.read_spec):
        with pytest.raises(WeightsLoadError, match="plain weights.*load_weights"):
            reader(path)
    # ...but their weights can be copied into a model of the right shape.
    pio.load_state_into(prunekit.models.create("cifar_resnet20"), path)


def test_expect_other_architecture(saved_resnet56):
    assert pio.load(saved_resnet56, expect="cifar_resnet56") is not None
    with pytest.raises(WeightsMismatchError, match="cifar_resnet56.*cifar_resnet20"):
        pio.load(saved_resnet56, expect="cifar_resnet20")


def _rewrite(src, dst, *, spec_update=None, extra=None):
    """Copy a saved file, changing its spec and/or adding tensors."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        spec = json.loads(f.metadata()["prunekit_spec"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    spec.update(spec_update or {})
    tensors.update(extra or {})
    save_file(tensors, dst, metadata={"prunekit_spec": json.dumps(spec)})
    return dst


def test_unknown_base_model(saved_resnet56, tmp_path):
    base = {"source": "prunekit", "name": "cifar_resnet57", "kwargs": {}}
    path = _rewrite(saved_resnet56, tmp_path / "x.safetensors", spec_update={"base": base})
    with pytest.raises(UnknownModelError, match="cifar_resnet57"):
        pio.load(path)


def test_tensors_that_do_not_fit(saved_resnet56, tmp_path):
    path = _rewrite(saved_resnet56, tmp_path / "x.safetensors",
                    extra={"layer9.weight": torch.zeros(3)})
    with pytest.raises(WeightsMismatchError, match="layer9.weight") as err:
        pio.load(path)
    assert err.value.unexpected == ["layer9.weight"]
    pio.load(path, strict=False)  # extra tensors are tolerated on request, shapes never


def test_newer_format_is_refused(saved_resnet56, tmp_path):
    path = _rewrite(saved_resnet56, tmp_path / "x.safetensors",
                    spec_update={"format": "prunekit/2"})
    with pytest.raises(WeightsLoadError, match="upgrade prunekit"):
        pio.load(path)


# --- export ------------------------------------------------------------------------------


def _assert_onnx_matches(model, path, shape):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1, np.abs(want).max()))


def test_onnx_export_resnet56(resnet56, tmp_path):
    pytest.importorskip("onnx")
    model, _ = resnet56
    path = pio.export_onnx(model, tmp_path / "r56.onnx", torch.randn(1, 3, 32, 32))
    assert path.exists() and not model.training
    _assert_onnx_matches(model, path, (3, 32, 32))


def test_onnx_export_mobilenet_v2(mobilenet_v2, tmp_path):
    pytest.importorskip("onnx")
    model, _ = mobilenet_v2
    model.train()
    path = pio.export_onnx(model, tmp_path / "mv2.onnx", torch.randn(1, 3, 64, 64))
    assert model.training  # export switches to eval mode temporarily only
    _assert_onnx_matches(model.eval(), path, (3, 64, 64))


def test_onnx_missing_dependency(resnet56, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match=r"prunekit\[export\]"):
        pio.export_onnx(resnet56[0], tmp_path / "x.onnx", torch.randn(1, 3, 32, 32))


def test_export_check_reports_max_difference():
    with pytest.raises(pio.ExportCheckError, match="max abs difference 0.5"):
        prunekit.export._assert_match([torch.zeros(2, 3)], [np.full((2, 3), 0.5, np.float32)], "model", 2)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export(resnet56, tmp_path):
    model, _ = resnet56
    path = pio.export_torchscript(model, tmp_path / "r56.pt", torch.randn(2, 3, 32, 32))
    scripted = torch.jit.load(str(path))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)
