"""NativeConv2d: a dense conv on the stripe kernel. It must equal the conv (+ add + ReLU) on
every geometry it accepts, hand every other call to the plain conv, and deploy must put it only
where it was measured faster (or asked for), cache that choice and still export plain convs."""
from __future__ import annotations

import copy
import itertools
import pickle
import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import prunekit
from prunekit.deployment import DEPLOY_ATTR, FusedConv2d, NativeConv2d, NativeSequence, deploy, \
    layout, native_dense, original_named_modules
from prunekit.nn import stripe_native

pytestmark = [pytest.mark.usefixtures("single_thread", "private_cache"),
              pytest.mark.skipif(stripe_native.library() is None,
                                 reason="the native kernel is unavailable here")]
TOL = dict(rtol=1e-4, atol=1e-4)


def _reference(conv, x, residual, relu):
    out = nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding,
                               conv.dilation)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _geometries(count=48, seed=0):
    rng = random.Random(seed)
    grid = list(itertools.product((1, 3, 5, 7), (1, 2, 3), (0, 1, 2, 3), (1, 2)))
    rng.shuffle(grid)
    for k, s, p, d in grid[:count]:
        c, f = rng.choice((1, 3, 5, 12, 16)), rng.choice((1, 4, 7, 11, 16, 20))
        smallest = max(1, d * (k - 1) + 1 - 2 * p)  # the input the kernel's extent needs
        h, w = rng.randint(smallest, 19), rng.randint(smallest, 21)
        yield dict(c=c, f=f, k=k, s=s, p=p, d=d, h=h, w=w,
                   bias=rng.random() < 0.7, n=rng.choice((1, 2, 3)))


@pytest.mark.parametrize("g", list(_geometries()),
                         ids=lambda g: "c{c}f{f}k{k}s{s}p{p}d{d}_{h}x{w}n{n}".format(**g))
def test_native_conv_equals_the_dense_conv_on_many_geometries(g):
    torch.manual_seed(hash(tuple(g.values())) % 1000)
    conv = nn.Conv2d(g["c"], g["f"], g["k"], g["s"], g["p"], g["d"], bias=g["bias"]).eval()
    x = torch.randn(g["n"], g["c"], g["h"], g["w"])
    with torch.no_grad():
        want = conv(x)
        for relu, with_residual in ((False, False), (True, False), (True, True), (False, True)):
            native = NativeConv2d.from_conv(conv, relu=relu, residual=with_residual)
            residual = torch.randn_like(want) if with_residual else None
            assert native.native_plan_for(x, residual) is not None  # the kernel runs
            got = native(x, residual) if with_residual else native(x)
            torch.testing.assert_close(got, _reference(conv, x, residual, relu), **TOL)
    assert got.shape == want.shape


def test_native_conv_with_two_threads_matches(monkeypatch):
    torch.set_num_threads(2)
    conv = nn.Conv2d(16, 24, 3, 1, 1).eval()
    x = torch.randn(8, 16, 32, 32)  # enough work for the kernel to use both threads
    native = NativeConv2d.from_conv(FusedConv2d.from_conv(conv, relu=True))
    with torch.no_grad():
        torch.testing.assert_close(native(x), torch.relu(conv(x)), **TOL)


def test_native_conv_hands_other_calls_to_the_plain_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    native = NativeConv2d.from_conv(FusedConv2d.from_conv(conv, relu=True))
    x = torch.randn(2, 4, 9, 9)
    # autograd: the kernel has no backward, so the plain conv runs and gradients flow
    native.requires_grad_(True)
    assert native.native_plan_for(x) is None
    native(x).sum().backward()
    assert native.weight.grad is not None and native.weight.grad.abs().sum() > 0
    native.requires_grad_(False)
    with torch.no_grad():
        want = torch.relu(conv(x))
        assert native.native_plan_for(x) is not None
        assert native.native_plan_for(x.double()) is None
        torch.testing.assert_close(native.double()(x.double()), want.double(), **TOL)
        native.float()
        # a channels_last input is made contiguous for the kernel
        torch.testing.assert_close(native(x.contiguous(memory_format=torch.channels_last)),
                                   want, **TOL)
        with FlopCounterMode(display=False) as counter:
            native(x)
        assert counter.get_total_flops() == 2 * 2 * 6 * 4 * 9 * 9 * 9  # seen as a conv
        traced = torch.jit.trace(native, x)
        assert "aten::_convolution" in str(traced.graph) or "conv" in str(traced.graph)
        native.use_native = False
        assert native.native_plan_for(x) is None
        torch.testing.assert_close(native(x), want, **TOL)


def test_wrong_channel_count_is_an_error_not_a_read_past_the_input():
    native = NativeConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1)).requires_grad_(False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="4 channels"):
        native._native_plan()(torch.randn(1, 5, 8, 8))


def test_plan_follows_weight_edits_copies_and_pickles():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1).eval().requires_grad_(False)
    native = NativeConv2d.from_conv(conv)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        native(x)
        native.weight.mul_(2.0)  # in place: the cached plan must not keep the old weights
        torch.testing.assert_close(native(x), nn.functional.conv2d(x, native.weight,
                                                                   native.bias, padding=1), **TOL)
        native.bias = nn.Parameter(torch.ones(5), requires_grad=False)  # replaced
        want = nn.functional.conv2d(x, native.weight, native.bias, padding=1)
        torch.testing.assert_close(native(x), want, **TOL)
        for twin in (copy.deepcopy(native), pickle.loads(pickle.dumps(native))):
            twin.weight.zero_()
            torch.testing.assert_close(native(x), want, **TOL)  # the original is untouched
            torch.testing.assert_close(twin(x), torch.ones_like(want))


def test_grouped_string_padded_and_non_square_convs_are_not_eligible():
    assert native_dense.eligible(nn.Conv2d(4, 4, 3))
    assert native_dense.eligible(FusedConv2d.from_conv(nn.Conv2d(4, 4, 3), relu=True))
    for conv in (nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding="same"),
                 nn.Conv2d(4, 4, (3, 1)), nn.Conv2d(4, 4, 3, stride=(1, 2)),
                 nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                 nn.Conv2d(4, 4, 3).double()):
        assert not native_dense.eligible(conv)


def _pruned_resnet20(randomize_norms):
    model = randomize_norms(prunekit.models.create("cifar_resnet20")).eval()
    prunekit.prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.4)
    return model


def test_deploy_with_native_convs_equals_the_model_and_exports_plain_convs(randomize_norms,
                                                                          tmp_path):
    model = _pruned_resnet20(randomize_norms)
    x = torch.randn(2, 3, 32, 32)
    deployed = deploy(model, x, native_convs=True)
    natives = [n for n, m in original_named_modules(deployed) if isinstance(m, NativeConv2d)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(natives) == len(convs) and getattr(deployed, DEPLOY_ATTR)["native_convs"] == \
        sorted(natives)
    # consecutive kernel convs run as sequences (the stem and the blocks' convs up to each
    # downsampling shortcut)
    assert any(isinstance(m, NativeSequence) for m in deployed.modules())
    assert any(m.residual for m in deployed.modules() if isinstance(m, NativeConv2d))
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)
    assert prunekit.count_macs(deployed, x) == prunekit.count_macs(model, x)
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx
    from prunekit.export import export_onnx

    def ops(module, name):  # exported, checked against onnxruntime by export_onnx
        path = export_onnx(module, tmp_path / name, x[:1])
        return sorted(node.op_type for node in onnx.load(str(path)).graph.node)
    plain = deploy(model, x, native_convs=False, channels_last=False)
    got = ops(deployed, "native.onnx")
    assert got == ops(plain, "plain.onnx") and got.count("Conv") == len(convs)


def test_torchvision_model_deploys_exactly_with_native_convs(randomize_norms):
    torchvision = pytest.importorskip("torchvision")
    model = randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    deployed = deploy(model, x, native_convs=True)  # 7x7 s2 stem, 1x1 s2 downsamples
    kinds = {m.kernel_size for m in deployed.modules() if isinstance(m, NativeConv2d)}
    assert kinds == {(7, 7), (3, 3), (1, 1)}
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)


def test_auto_puts_native_convs_only_where_measured_faster_and_caches_it(randomize_norms,
                                                                        monkeypatch):
    model = _pruned_resnet20(randomize_norms)
    x = torch.randn(1, 3, 32, 32)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    fast = set(names[::3])
    timed = []

    def layer_times(m, inputs, twins):
        timed.append(sorted(twins))
        return {n: {"native": 1.0 if n in fast else 3.0, "dense": 2.0} for n in twins}

    def whole(m, inputs, layouts, post_ops, native=None, win="native", sequences=False):
        assert native is None or set(native) == fast  # only the faster layers are tried
        ms = {f"{lay}{'+post_ops' if on else ''}": 2.0 for lay in layouts for on in post_ops}
        ms.update({f"native{'+post_ops' if on else ''}": 1.0 if win == "native" else 3.0
                   for on in post_ops if native})
        return ms

    monkeypatch.setattr(layout, "time_layers", layer_times)
    monkeypatch.setattr(layout, "measure_layouts", whole)
    deployed = deploy(model, x)
    record = getattr(deployed, DEPLOY_ATTR)
    got = {n for n, m in original_named_modules(deployed) if isinstance(m, NativeConv2d)}
    assert got == fast and set(record["native_convs"]) == fast
    assert record["channels_last"]["source"] == "measured" and len(timed) == 1
    assert not any(m.weight.is_contiguous(memory_format=torch.channels_last)
                   and not m.weight.is_contiguous() for m in deployed.modules()
                   if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)
    again = deploy(model, x)  # the decision comes from the cache, the same convs go native
    assert getattr(again, DEPLOY_ATTR)["channels_last"]["source"] == "cache" and len(timed) == 1
    assert {n for n, m in original_named_modules(again) if isinstance(m, NativeConv2d)} == fast
    # the whole network is slower that way: nothing goes native
    monkeypatch.setattr(layout, "measure_layouts",
                        lambda *a, **k: whole(*a, **k, win="dense"))
    slower = deploy(model, x, cache=False)
    assert not any(isinstance(m, NativeConv2d) for m in slower.modules())
    assert getattr(slower, DEPLOY_ATTR)["native_convs"] == []


def test_native_convs_option_is_checked_and_channels_last_excludes_it(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(prunekit.errors.ConfigError, match="native_convs"):
        deploy(model, x, native_convs="yes")
    monkeypatch.setattr(layout, "time_layers", lambda *a: pytest.fail("nothing to time"))
    deployed = deploy(model, x, channels_last=True)
    assert not any(isinstance(m, NativeConv2d) for m in deployed.modules())
    deployed = deploy(model, x, native_convs=False, channels_last=False)
    assert not any(isinstance(m, NativeConv2d) for m in deployed.modules())


def test_time_layers_times_each_conv_on_its_own_input():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    twins = native_dense.native_twins(model)
    assert set(twins) == {"0", "2"}
    seen = {}
    for name in twins:
        real = twins[name].forward
        twins[name].forward = lambda *a, real=real, name=name: seen.setdefault(
            name, a[0].shape) and real(*a)
    times = layout.time_layers(model, (torch.randn(2, 3, 10, 10),), twins)
    assert set(times) == {"0", "2"} and all(t["native"] > 0 and t["dense"] > 0
                                            for t in times.values())
    assert seen == {"0": (2, 3, 10, 10), "2": (2, 8, 10, 10)}


@pytest.mark.parametrize("native_ms,chosen", [(0.97, False), (0.90, True)])
def test_native_variant_must_win_by_the_margin(monkeypatch, native_ms, chosen):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 16, 16)
    monkeypatch.setattr(layout, "time_layers", lambda m, i, twins: {
        n: {"native": 1.0, "dense": 2.0} for n in twins})
    monkeypatch.setattr(layout, "measure_layouts", lambda m, i, layouts, post_ops, native=None,
                        sequences=False: {
        "contiguous": 1.1, "channels_last": 1.0, "native": native_ms, **(
            {"contiguous+post_ops": 1.2, "channels_last+post_ops": 1.3,
             "native+post_ops": 5.0} if True in post_ops else {})})
    assert layout.NATIVE_MARGIN == 0.05
    deployed = deploy(model, x, cache=False)
    record = getattr(deployed, DEPLOY_ATTR)
    assert bool(record["native_convs"]) is chosen
    assert record["channels_last"]["channels_last"] is not chosen
    assert any(isinstance(m, NativeConv2d) for m in deployed.modules()) is chosen
