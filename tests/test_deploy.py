"""prunekit.deploy: BatchNorm folding, identity/dropout removal, epilogue fusion, channels_last
by measurement (cached). The deployed model must compute what the original computes (eval mode)
and the original must be left as it was."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.deployment import DEPLOY_ATTR, FusedConv2d, FusedStripeConv2d, deploy, layout, \
    original_named_modules
from prunekit.errors import ConfigError
from prunekit.nn.stripe import StripeConv2d, stripe_prune_model


pytestmark = pytest.mark.usefixtures("single_thread", "private_cache")


def _close(a, b):
    scale = max(1.0, float(b.abs().max()))
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


class Convs(nn.Module):
    """Dense, grouped and depthwise convs, each followed by BN; dropout and identity."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn_g = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, stride=2)
        self.bn_d = nn.BatchNorm2d(8, affine=False)
        self.drop, self.same = nn.Dropout(0.5), nn.Identity()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.relu(self.bn_g(self.grouped(x)))
        x = self.same(self.bn_d(self.depthwise(x)).relu())
        return self.fc(self.drop(x.mean((2, 3))))


def test_dense_grouped_and_depthwise_bn_folded_exactly(randomize_norms):
    model = randomize_norms(Convs()).eval()
    x = torch.randn(2, 3, 12, 12)
    deployed = deploy(model, x, channels_last=False)
    kinds = {type(m) for m in deployed.modules()}
    assert not kinds & {nn.BatchNorm2d, nn.Dropout, nn.Identity}
    record = getattr(deployed, DEPLOY_ATTR)
    assert sorted(bn for _, bn in record["folded_bn"]) == ["bn", "bn_d", "bn_g"]
    assert sorted(record["dropped"]) == ["drop", "same"]
    with torch.no_grad():
        assert _close(deployed(x), model(x))
        other = torch.randn(5, 3, 12, 12)  # another batch size
        assert _close(deployed(other), model(other))


def test_folded_weights_are_the_bn_scale_times_the_conv_weights(randomize_norms):
    conv, bn = nn.Conv2d(3, 4, 3, groups=1), nn.BatchNorm2d(4)
    model = randomize_norms(nn.Sequential(conv, bn)).eval()
    deployed = deploy(model, channels_last=False)
    folded = [m for m in deployed.modules() if isinstance(m, nn.Conv2d)]
    assert len(folded) == 1
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        torch.testing.assert_close(folded[0].weight, conv.weight * scale.view(-1, 1, 1, 1))
        torch.testing.assert_close(folded[0].bias,
                                   (conv.bias - bn.running_mean) * scale + bn.bias)


class SharedConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.free = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.free(self.conv2(y))


def test_bn_is_not_folded_when_the_conv_output_is_used_elsewhere_or_stats_are_missing(
        randomize_norms):
    model = randomize_norms(SharedConvOutput()).eval()
    x = torch.randn(2, 3, 8, 8)
    deployed = deploy(model, x, channels_last=False)
    assert getattr(deployed, DEPLOY_ATTR)["folded_bn"] == []
    assert sum(isinstance(m, nn.BatchNorm2d) for m in deployed.modules()) == 2
    with torch.no_grad():
        assert _close(deployed(x), model(x))


class StripeBlock(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> (+ x) -> ReLU, convs stripe-pruned."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def _stripe(model, seed=0, keep=0.5):
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(m.out_channels, *m.kernel_size, generator=g) < keep
             for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1
             and n not in ("conv1", "")}
    return stripe_prune_model(model, masks)


@pytest.mark.parametrize("native", [True, False])
def test_stripe_conv_bn_folded_and_residual_relu_fused(randomize_norms, native):
    model = randomize_norms(StripeBlock()).eval()
    g = torch.Generator().manual_seed(1)
    for name in ("conv1", "conv2"):
        conv = getattr(model, name)
        setattr(model, name, StripeConv2d.from_dense(
            conv, torch.rand(conv.out_channels, 3, 3, generator=g) < 0.5))
    x = torch.randn(3, 8, 8, 8)
    deployed = deploy(model, x, channels_last=False)
    fused = {n: m for n, m in original_named_modules(deployed)
             if isinstance(m, FusedStripeConv2d)}
    assert set(fused) == {"conv1", "conv2"}
    assert fused["conv1"].relu and not fused["conv1"].residual
    assert fused["conv2"].relu and fused["conv2"].residual
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    for m in fused.values():
        m.use_native = native
    with torch.no_grad():
        assert _close(deployed(x), model(x))
        # folded stripe rows against a direct computation
        bn = model.bn1
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        want = model.conv1.weight * scale[model.conv1.out_index][:, None]
        torch.testing.assert_close(fused["conv1"].weight, want)


def test_cifar_resnet20_stripe_pruned_deploys_exactly_and_the_model_is_untouched(
        randomize_norms):
    model = _stripe(randomize_norms(prunekit.models.create("cifar_resnet20")))
    model.train()  # the caller's mode must survive
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    x = torch.randn(2, 3, 32, 32)
    deployed = deploy(model, x)
    assert all(m.training for m in model.modules())
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    record = getattr(deployed, DEPLOY_ATTR)
    assert len(record["folded_bn"]) == 19 and len(record["stripe_residual"]) == 9
    model.eval()
    with torch.no_grad():
        assert _close(deployed(x), model(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_deploy_exactly(randomize_norms, name):
    torchvision = pytest.importorskip("torchvision")
    model = randomize_norms(getattr(torchvision.models, name)(num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    deployed = deploy(model, x, channels_last=False)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in deployed.modules())
    with torch.no_grad():
        assert _close(deployed(x), model(x))


def test_a_channel_pruned_model_deploys_exactly(randomize_norms):
    model = randomize_norms(prunekit.models.create("cifar_resnet20")).eval()
    x = torch.randn(1, 3, 32, 32)
    prunekit.prune(model, x, criterion="l1", ratio=0.4)
    deployed = deploy(model, x, channels_last=True)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in deployed.modules() if type(m) in (nn.Conv2d, FusedConv2d))
    assert getattr(deployed, DEPLOY_ATTR)["channels_last"]["channels_last"] is True
    with torch.no_grad():
        assert _close(deployed(x), model(x))
    assert prunekit.count_macs(deployed, x) == prunekit.count_macs(model, x)


def test_deployed_stripe_model_exports_to_onnx(randomize_norms, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from prunekit.export import export_onnx

    model = _stripe(randomize_norms(prunekit.models.create("cifar_resnet20"))).eval()
    x = torch.randn(1, 3, 32, 32)
    deployed = deploy(model, x, channels_last=False)
    path = export_onnx(deployed, tmp_path / "deployed.onnx", x)  # checks onnxruntime == torch
    assert path.stat().st_size > 0


def test_bad_options_and_untraceable_models_are_refused_before_work():
    with pytest.raises(ConfigError, match="channels_last"):
        deploy(nn.Conv2d(3, 3, 1), channels_last="yes")
    with pytest.raises(ConfigError, match="channels_last"):
        deploy(nn.Conv2d(3, 3, 1), channels_last=1)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ConfigError, match="could not be traced"):
        deploy(Branchy())


def test_cache_key_depends_on_device_threads_dtype_shape_and_model():
    base = dict(device="cpu", threads=1, dtype=torch.float32, input_shape=(1, 3, 32, 32),
                fingerprint="abc")
    key = layout.cache_key(**base)
    for change in (dict(threads=2), dict(dtype=torch.float64), dict(input_shape=(64, 3, 32, 32)),
                   dict(fingerprint="abd"), dict(device="meta")):
        assert layout.cache_key(**{**base, **change}) != key, change
    assert layout.cache_key(**base) == key
    a, b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    assert layout.structure_fingerprint(a) == layout.structure_fingerprint(b)  # weights differ
    assert layout.structure_fingerprint(a) != layout.structure_fingerprint(nn.Conv2d(3, 5, 3))


def test_layout_decision_is_cached_and_the_cache_can_be_disabled(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    timed = []
    real = layout.measure_layouts
    monkeypatch.setattr(layout, "measure_layouts",
                        lambda *args, **kw: timed.append(1) or real(*args, **kw))
    first = layout.choose_channels_last(model, (x,))
    assert first["source"] == "measured" and layout.cache_path().exists()
    stored = layout.read_cache()[first["key"]]
    assert stored["channels_last"] == first["channels_last"]
    assert stored["channels_last"] == (first["ms"]["channels_last"] < first["ms"]["contiguous"])
    second = layout.choose_channels_last(model, (x,))
    assert second["source"] == "cache" and second["channels_last"] == first["channels_last"]
    assert len(timed) == 1
    monkeypatch.setenv("PRUNEKIT_DEPLOY_CACHE", "0")
    assert layout.choose_channels_last(model, (x,))["source"] == "measured"
    assert len(timed) == 2
    layout.cache_path().write_text("{not json")  # a damaged cache is measured again
    monkeypatch.delenv("PRUNEKIT_DEPLOY_CACHE")
    assert layout.choose_channels_last(model, (x,))["source"] == "measured"
    assert first["key"] in layout.read_cache()


def test_auto_layout_decision_is_used_by_deploy(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    for faster in (True, False):
        for post_ops_faster in (True, False):
            def timings(m, i, layouts, post_ops, native=None, f=faster, p=post_ops_faster,
                        sequences=False):
                assert set(layouts) == {"contiguous", "channels_last"}
                assert set(post_ops) == {False, True}  # the conv + ReLU was fused
                ms = {f"{lay}{'+post_ops' if on else ''}":
                      (1.0 if (lay == "channels_last") == f else 2.0) -
                      (0.5 if on == p else 0.0)
                      for lay in layouts for on in post_ops}
                return {**ms, **{f"native{'+post_ops' if on else ''}": 9.0
                                 for on in post_ops if native}}
            monkeypatch.setattr(layout, "measure_layouts", timings)
            deployed = deploy(model, x, cache=False)
            conv = next(m for m in deployed.modules() if isinstance(m, FusedConv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last) == faster
            record = getattr(deployed, DEPLOY_ATTR)
            assert record["channels_last"]["channels_last"] == faster
            assert record["dense_post_ops"] == post_ops_faster == conv.use_onednn


def test_dense_post_ops_option(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    monkeypatch.setattr(layout, "measure_layouts", lambda *a: pytest.fail("nothing to time"))
    for option in (True, False):
        deployed = deploy(model, x, channels_last=False, dense_post_ops=option,
                          native_convs=False)
        conv = next(m for m in deployed.modules() if isinstance(m, FusedConv2d))
        assert conv.use_onednn is option and getattr(deployed, DEPLOY_ATTR)["dense_post_ops"] is option
    with pytest.warns(UserWarning, match="cannot time"):
        deployed = deploy(model)  # no example: NCHW, plain epilogues
    assert getattr(deployed, DEPLOY_ATTR)["dense_post_ops"] is False
    with pytest.raises(ConfigError, match="dense_post_ops"):
        deploy(model, x, dense_post_ops="yes")


class _ScaledBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward is not torch's: must not be folded."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_bn_subclasses_fold_only_with_a_known_forward(randomize_norms):
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), _ScaledBN(8), nn.ReLU())).eval()
    x = torch.randn(2, 3, 12, 12)
    deployed = deploy(model, x, channels_last=False)
    assert getattr(deployed, DEPLOY_ATTR)["folded_bn"] == []
    assert any(isinstance(m, _ScaledBN) for m in deployed.modules())
    with torch.no_grad():
        assert _close(deployed(x), model(x))


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_timm_batchnorm_act_is_folded_and_its_activation_kept(randomize_norms, act):
    norm_act = pytest.importorskip("timm.layers.norm_act")
    bn = norm_act.BatchNormAct2d(8, act_layer=act)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(2, 3, 12, 12)
    deployed = deploy(model, x, channels_last=False, native_convs=False)
    record = getattr(deployed, DEPLOY_ATTR)
    assert len(record["folded_bn"]) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    if act == "relu":  # the kept ReLU is then fused into the conv's epilogue
        assert record["dense_relu"] == ["0"]
    else:
        assert any(isinstance(m, nn.SiLU) for m in deployed.modules())
    with torch.no_grad():
        assert _close(deployed(x), model(x))
