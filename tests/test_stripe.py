"""Tests for the stripe-wise pruning (SWP) executor ``prunekit.nn.StripeConv2d``."""
from __future__ import annotations

import copy
import io
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import models
from prunekit.nn import StripeConv2d, stripe_prune_model

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread

TOL = dict(rtol=1e-5, atol=1e-5)


def _random_mask(out: int, k: int, removed: float, gen: torch.Generator) -> torch.Tensor:
    """Boolean [out, k, k] mask with round(removed * total) stripes removed."""
    total = out * k * k
    n_removed = int(round(removed * total))
    perm = torch.randperm(total, generator=gen)
    mask = torch.ones(total, dtype=torch.bool)
    mask[perm[:n_removed]] = False
    return mask.view(out, k, k)


def _masked_reference(conv: nn.Conv2d, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight * mask[:, None].to(conv.weight.dtype), conv.bias,
                    conv.stride, conv.padding, conv.dilation)


CASES = [
    # (kernel, stride, padding, dilation, bias)
    c for c in itertools.product([1, 3, 5], [1, 2], [0, 1, 2], [1, 2], [True, False])
]


@pytest.mark.parametrize("removed", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("k,stride,padding,dilation,bias", CASES)
def test_matches_masked_dense_conv(removed, k, stride, padding, dilation, bias):
    gen = torch.Generator().manual_seed(hash((removed, k, stride, padding, dilation, bias)) % 2**31)
    cin, cout = 5, 7
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    mask = _random_mask(cout, k, removed, gen)
    sconv = StripeConv2d.from_dense(conv, mask)
    assert sconv.stripe_count == int(mask.sum())
    for n, (h, w) in [(1, (11, 9)), (3, (13, 15))]:
        x = torch.randn(n, cin, h, w, generator=gen)
        ref = _masked_reference(conv, mask, x)
        out = sconv(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(sconv.dense_weight(), conv.weight.detach() * mask[:, None], **TOL)


def test_rectangular_kernel_and_same_padding():
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 6, (3, 5), padding="same", dilation=(2, 1))
    mask = torch.rand(6, 3, 5, generator=gen) > 0.5
    sconv = StripeConv2d.from_dense(conv, mask)
    x = torch.randn(2, 4, 9, 10, generator=gen)
    ref = F.conv2d(x, conv.weight * mask[:, None], conv.bias, 1, "same", (2, 1))
    torch.testing.assert_close(sconv(x), ref, **TOL)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (2, 0)])
def test_all_kept_equals_dense(stride, padding):
    conv = nn.Conv2d(6, 8, 3, stride=stride, padding=padding)
    sconv = StripeConv2d.from_dense(conv, torch.ones(8, 3, 3, dtype=torch.bool))
    assert sconv.stripe_count == 8 * 9
    x = torch.randn(2, 6, 10, 9)
    torch.testing.assert_close(sconv(x), conv(x), **TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_all_removed_gives_bias(bias):
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=bias)
    sconv = StripeConv2d.from_dense(conv, torch.zeros(8, 3, 3, dtype=torch.bool))
    assert sconv.stripe_count == 0 and sconv.segments == ()
    x = torch.randn(2, 6, 9, 9)
    out = sconv(x)
    assert out.shape == conv(x).shape
    expected = torch.zeros_like(out)
    if bias:
        expected = expected + conv.bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(out, expected)


def test_empty_filter_outputs_zero_and_positions_skipped():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    mask = torch.zeros(4, 3, 3, dtype=torch.bool)
    mask[0, 1, 1] = True
    mask[2, 0, 2] = True
    mask[2, 1, 1] = True
    sconv = StripeConv2d.from_dense(conv, mask)
    assert [(i, j) for i, j, _, _ in sconv.segments] == [(0, 2), (1, 1)]
    out = sconv(torch.randn(1, 3, 5, 5))
    assert torch.all(out[:, 1] == 0) and torch.all(out[:, 3] == 0)
    assert "stripes=3/36" in repr(sconv) and "positions=2/9" in repr(sconv)


def test_macs_hand_computed():
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    mask = torch.zeros(32, 3, 3, dtype=torch.bool)
    mask[:10, 1, 1] = True       # 10 stripes
    mask[5:12, 0, 0] = True      # 7 stripes
    sconv = StripeConv2d.from_dense(conv, mask)
    # 32x32 input, stride 2, pad 1, k 3 -> 16x16 output; 17 stripes * 16 C_in * 256
    assert sconv.output_hw((32, 32)) == (16, 16)
    assert sconv.macs((32, 32)) == 17 * 16 * 16 * 16
    # odd size, no padding: (9 - 2 - 1)//2 + 1 = 4, (7 - 2 - 1)//2 + 1 = 3
    conv2 = nn.Conv2d(3, 2, 3, stride=2)
    s2 = StripeConv2d.from_dense(conv2, torch.ones(2, 3, 3, dtype=torch.bool))
    assert s2.macs((9, 7)) == 18 * 3 * 4 * 3
    # all kept == dense conv MACs
    assert s2.macs((9, 7)) == 2 * 3 * 9 * 4 * 3


def _resnet_with_masks(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = models.create("cifar_resnet20").eval()
    # Non-trivial BN statistics so that every path matters.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    masks = {name: _random_mask(m.out_channels, 3, 0.5, gen)
             for name, m in net.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    return net, masks


def test_cifar_resnet20_equivalence():
    net, masks = _resnet_with_masks()
    assert len(masks) == 19
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for name, mask in masks.items():
            conv = reference.get_submodule(name)
            conv.weight.mul_(mask[:, None].to(conv.weight.dtype))
    stripe_prune_model(net, masks)
    n_stripe = sum(isinstance(m, StripeConv2d) for m in net.modules())
    assert n_stripe == 19
    assert not any(type(m) is nn.Conv2d and m.kernel_size == (3, 3) for m in net.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), **TOL)


def test_stripe_prune_model_errors():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(KeyError):
        stripe_prune_model(net, {"nope": torch.ones(4, 3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError):
        stripe_prune_model(net, {"1": torch.ones(4, 3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError):
        stripe_prune_model(net, {"0": torch.ones(4, 2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError):
        StripeConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), torch.ones(4, 3, 3, dtype=torch.bool))


def _small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 5, 5, padding=2, dilation=2)).eval()
    gen = torch.Generator().manual_seed(0)
    masks = {"0": _random_mask(8, 3, 0.5, gen), "3": _random_mask(6, 3, 0.5, gen),
             "5": _random_mask(5, 5, 0.75, gen)}
    return stripe_prune_model(net, masks)


def test_onnx_export_matches_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = _small_net()
    x = torch.randn(2, 3, 15, 15)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    for xb in (x, torch.randn(5, 3, 15, 15)):
        (y,) = sess.run(None, {"x": xb.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), net(xb), **TOL)


def test_torchscript_trace_roundtrip():
    net = _small_net()
    x = torch.randn(2, 3, 15, 15)
    with torch.no_grad():
        traced = torch.jit.trace(net, (x,))
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        x2 = torch.randn(2, 3, 15, 15)
        torch.testing.assert_close(loaded(x2), net(x2), **TOL)


def test_state_dict_and_grad():
    conv = nn.Conv2d(4, 5, 3, padding=1)
    mask = torch.rand(5, 3, 3) > 0.5
    a = StripeConv2d.from_dense(conv, mask)
    b = StripeConv2d(4, 5, 3, mask, padding=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    torch.testing.assert_close(a(x), b(x))
    a(x).sum().backward()
    assert a.weight.grad is not None and a.weight.grad.shape == a.weight.shape


# --------------------------------------------------------------------------- native kernel
from prunekit.nn import stripe_build, stripe_native  # noqa: E402
from prunekit.nn import stripe_chunks  # noqa: E402

needs_native = pytest.mark.skipif(stripe_native.library() is None,
                                  reason=f"native stripe kernel unavailable: "
                                         f"{stripe_native.unavailable_reason()}")


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = stripe_native.NativeStripePlan.__call__

        def counting(plan, x):
            self.calls += 1
            return original(plan, x)
        monkeypatch.setattr(stripe_native.NativeStripePlan, "__call__", counting)


@needs_native
@pytest.mark.parametrize("removed", [0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("k,stride,padding,dilation,bias", CASES)
def test_native_kernel_matches_masked_dense_conv(removed, k, stride, padding, dilation, bias,
                                                  monkeypatch):
    gen = torch.Generator().manual_seed(hash((removed, k, stride, padding, dilation)) % 2**31)
    conv = nn.Conv2d(6, 9, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    sconv = StripeConv2d.from_dense(conv, _random_mask(9, k, removed, gen))
    spy = _Spy(monkeypatch)
    for n, (h, w) in [(1, (11, 9)), (5, (13, 16))]:
        x = torch.randn(n, 6, h, w, generator=gen)
        with torch.no_grad():
            ref = _masked_reference(conv, sconv.stripe_mask, x)
            torch.testing.assert_close(sconv(x), ref, **TOL)
    supported = stripe_native.NativeStripePlan.supports(sconv.stride, sconv.padding,
                                                        sconv.dilation, sconv.kernel_size)
    assert spy.calls == (2 if supported else 0)


@needs_native
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("cin,cout,size,stride", [(16, 16, 32, 1), (16, 32, 32, 2),
                                                  (32, 32, 16, 1), (32, 64, 16, 2),
                                                  (64, 64, 8, 1)])
def test_native_kernel_on_resnet56_shapes(cin, cout, size, stride, batch):
    gen = torch.Generator().manual_seed(cin * 7 + stride)
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    sconv = StripeConv2d.from_dense(conv, _random_mask(cout, 3, 0.5, gen))
    x = torch.randn(batch, cin, size, size, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(sconv(x), sconv.forward_torch(x), rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 7, 12])
@pytest.mark.parametrize("stride", [1, 2])
def test_native_kernel_batch_groups_and_threads(batch, stride, threads, monkeypatch):
    """The batch is packed and convolved in cache-sized groups of images: every split (one
    group per thread, threads sharing one group's blocks, a prime batch, a group size that
    leaves fewer groups than threads) must give the same result as the torch formulation."""
    monkeypatch.setattr(stripe_native, "GROUP_BYTES", 24 * 1024)  # 2-4 images a group
    monkeypatch.setattr(stripe_native, "MACS_PER_THREAD", 1)  # small work still splits
    gen = torch.Generator().manual_seed(batch * 10 + stride)
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=1, bias=True)
    sconv = StripeConv2d.from_dense(conv, _random_mask(12, 3, 0.5, gen))
    x = torch.randn(batch, 8, 10, 9, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out = sconv(x)
    finally:
        torch.set_num_threads(previous)
    layout = sconv._native_plan()._shapes[(batch, 10, 9)]
    assert batch % layout["plan"].G == 0
    if batch == 12:  # several images per group, several groups
        assert 1 < layout["plan"].G < 12
    with torch.no_grad():
        torch.testing.assert_close(out, sconv.forward_torch(x), rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 3, 1, 1), (3, 3, 4, 2), (5, 4, 2, 1),
                                                       (2, 2, 0, 1), (4, 1, 3, 1)])
def test_native_kernel_other_strides_and_even_kernels(k, stride, padding, dilation, monkeypatch):
    """Strides above 2 (generic phase packing), even kernels and padding beyond the kernel's
    reach; rectangular inputs whose output maps are not a multiple of the block size."""
    gen = torch.Generator().manual_seed(k * 100 + stride * 10 + padding)
    conv = nn.Conv2d(5, 6, k, stride=stride, padding=padding, dilation=dilation)
    sconv = StripeConv2d.from_dense(conv, _random_mask(6, k, 0.4, gen))
    spy = _Spy(monkeypatch)
    x = torch.randn(3, 5, 17, 12, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(sconv(x), _masked_reference(conv, sconv.stripe_mask, x), **TOL)
    assert spy.calls == 1


@needs_native
@pytest.mark.parametrize("w", [15, 16, 17, 31, 32, 33, 40, 48])
@pytest.mark.parametrize("k,padding,dilation", [(3, 1, 1), (3, 0, 1), (3, 2, 1), (2, 0, 1),
                                                (4, 3, 1), (3, 1, 2), (1, 0, 1), (1, 1, 1)])
def test_native_stride2_packs_both_column_phases_in_one_pass(w, k, padding, dilation,
                                                             monkeypatch):
    """Stride 2: where a conv uses both column phases (a, 0) and (a, 1) of a row phase, one
    pass splits every input row into its even and odd columns, 16 at a time, then a scalar tail
    (widths below, at and around multiples of 16; padding that shifts which columns are even;
    even kernels; dilation 2, whose taps all fall on one phase; 1x1 convs, which use a single
    phase). Every stripe kept, so every phase the geometry can use is packed."""
    gen = torch.Generator().manual_seed(w * 100 + k * 10 + padding)
    conv = nn.Conv2d(4, 5, k, stride=2, padding=padding, dilation=dilation)
    sconv = StripeConv2d.from_dense(conv, torch.ones(5, k, k, dtype=torch.bool))
    spy = _Spy(monkeypatch)
    h = 13 if k < 4 else 14
    x = torch.randn(3, 4, h, w, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(sconv(x), conv(x), **TOL)
        half = StripeConv2d.from_dense(conv, _random_mask(5, k, 0.5, gen))
        torch.testing.assert_close(half(x), _masked_reference(conv, half.stripe_mask, x), **TOL)
    assert spy.calls == 2


@needs_native
def test_native_loader_refuses_a_kernel_with_another_plan_layout(monkeypatch):
    """A process that imported an older stripe_build.py and compiles a newer kernel (prunekit
    edited under a running job) must not call it with the wrong struct: it falls back."""
    import ctypes

    class Older(ctypes.Structure):
        _fields_ = [("N", ctypes.c_int64)]

    monkeypatch.setattr(stripe_build, "_Plan", Older)
    with pytest.raises(RuntimeError, match="restart"):
        stripe_build._build()


def test_group_size_is_the_largest_divisor_that_fits():
    per_image = 1000  # floats
    fits = stripe_native.GROUP_BYTES // (4 * per_image)
    assert stripe_native._group_size(64, per_image) == max(
        g for g in range(1, 65) if 64 % g == 0 and g <= fits)
    assert stripe_native._group_size(7, per_image) in (1, 7)
    assert stripe_native._group_size(5, 10 ** 9) == 1  # one image larger than the budget


@needs_native
def test_native_scratch_buffer_is_reused_across_layers_of_different_sizes():
    """One per-thread packing buffer serves every layer: a large layer then a small one, and
    again, must not read stale data left by the other."""
    gen = torch.Generator().manual_seed(3)
    big = StripeConv2d.from_dense(nn.Conv2d(16, 8, 3, padding=1),
                                  _random_mask(8, 3, 0.5, gen))
    small = StripeConv2d.from_dense(nn.Conv2d(4, 8, 3, stride=2, padding=1),
                                    _random_mask(8, 3, 0.5, gen))
    xb, xs = torch.randn(4, 16, 20, 20, generator=gen), torch.randn(3, 4, 7, 7, generator=gen)
    with torch.no_grad():
        for _ in range(2):
            for conv, x in ((big, xb), (small, xs)):
                torch.testing.assert_close(conv(x), conv.forward_torch(x), rtol=1e-4, atol=1e-4)


@needs_native
def test_native_kernel_is_skipped_where_it_cannot_serve(monkeypatch):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    sconv = StripeConv2d.from_dense(conv, torch.rand(6, 3, 3) < 0.5)
    x = torch.randn(2, 4, 8, 8)
    spy = _Spy(monkeypatch)
    out = sconv(x)                    # autograd needs the graph: torch formulation
    out.sum().backward()
    assert spy.calls == 0 and sconv.weight.grad is not None
    with torch.no_grad():
        sconv(x.double().float())     # plain inference: native
        assert spy.calls == 1
        sconv(x.to(torch.float64).to(torch.float32)[:, :, ::1])
        sconv.use_native = False
        sconv(x)
    assert spy.calls == 2
    sconv.use_native = True
    # FLOP counting sees the ops of the torch formulation: MACs are counted, not skipped
    from prunekit.measure import count_macs
    with torch.no_grad():
        assert count_macs(sconv, x) == sconv.macs((8, 8)) * 2
    assert spy.calls == 2
    # weights changed in place: the packed plan is rebuilt
    with torch.no_grad():
        sconv.weight.mul_(2)
        torch.testing.assert_close(sconv(x), sconv.forward_torch(x), **TOL)


def test_native_kernel_disabled_or_without_compiler(monkeypatch):
    monkeypatch.setattr(stripe_build, "_state", {})
    monkeypatch.setenv("PRUNEKIT_NATIVE", "0")
    assert stripe_native.library() is None
    assert "PRUNEKIT_NATIVE=0" in stripe_native.unavailable_reason()
    monkeypatch.setattr(stripe_build, "_state", {})
    monkeypatch.delenv("PRUNEKIT_NATIVE")
    monkeypatch.setenv("CC", "/no/such/compiler")
    monkeypatch.setattr(stripe_build.shutil, "which", lambda name: None)
    assert stripe_native.library() is None
    assert "no C compiler" in stripe_native.unavailable_reason()
    conv = nn.Conv2d(3, 4, 3, padding=1)
    sconv = StripeConv2d.from_dense(conv, torch.rand(4, 3, 3) < 0.5)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():  # falls back to the torch formulation, same result
        torch.testing.assert_close(sconv(x), _masked_reference(conv, sconv.stripe_mask, x), **TOL)


@needs_native
def test_copy_and_pickle_after_a_native_forward():
    """The cached native plan holds ctypes pointers; copies must build their own."""
    import pickle

    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    sconv = StripeConv2d.from_dense(conv, _random_mask(8, 3, 0.5, gen))
    x = torch.randn(2, 8, 10, 10, generator=gen)
    with torch.no_grad():
        expected = sconv(x)  # builds and caches the native plan
        clone = copy.deepcopy(sconv)
        restored = pickle.loads(pickle.dumps(sconv))
        with torch.no_grad():
            clone.weight.mul_(2)  # the copy owns its weights: the original is unaffected
        torch.testing.assert_close(sconv(x), expected)
        torch.testing.assert_close(restored(x), expected)
        torch.testing.assert_close(clone(x) - clone.bias.view(1, -1, 1, 1),
                                   2 * (expected - sconv.bias.view(1, -1, 1, 1)))


# ------------------------------------------------- padded phase planes, tiles, multi-tap chunks
@needs_native
@pytest.mark.parametrize("seed", range(6))
def test_native_kernel_on_random_geometries(seed, monkeypatch):
    """Random shapes against the dense conv on the masked weights: odd and vector-multiple
    widths (partial and full output vectors), strides 1-3, padding 0-2, dilation 1-2, channel
    counts that give every chunk width 1..FC and chunks of one or several taps, batch 1 / 3 /
    64 (several groups), all stripes kept and every stripe removed."""
    import random

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    spy = _Spy(monkeypatch)
    cases = 0
    for _ in range(12):
        k, s, d = rng.choice([1, 3, 3, 5]), rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2])
        p = rng.choice([0, 1, 2])
        cin, cout = rng.choice([1, 3, 8, 16, 17]), rng.choice([1, 2, 5, 16, 33])
        reach = d * (k - 1) + 1 - 2 * p
        h, w = rng.randint(max(1, reach), 19), rng.choice([max(1, reach), 8, 16, 17, 32, 33])
        w = max(w, reach)
        n = rng.choice([1, 3, 64]) if cin * h * w <= 4096 else rng.choice([1, 3])
        removed = rng.choice([0.0, 0.3, 0.5, 0.8, 1.0])
        conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=rng.random() < 0.5)
        sconv = StripeConv2d.from_dense(conv, _random_mask(cout, k, removed, gen))
        x = torch.randn(n, cin, h, w, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(sconv(x), _masked_reference(conv, sconv.stripe_mask, x),
                                       rtol=1e-4, atol=1e-4)
        cases += 1
    assert spy.calls == cases


@needs_native
@pytest.mark.parametrize("cout", [1, 5, 16, 64])
def test_native_chunks_cover_every_kept_stripe_once(cout):
    """Chunks (filters, taps): every filter of a chunk keeps all of its taps, at most FC
    filters, each kept stripe in exactly one chunk; a one-tap chunk split is near-equal."""
    gen = torch.Generator().manual_seed(cout)
    sconv = StripeConv2d.from_dense(nn.Conv2d(4, cout, 3, padding=1),
                                    _random_mask(cout, 3, 0.5, gen))
    fc = stripe_native.library().prunekit_stripe_chunk()
    chunks = stripe_chunks.chunks(sconv.segments, sconv.out_index, fc)
    covered = [(f, t) for filters, taps in chunks for f in filters for t in taps]
    kept = {(f, (i, j)) for f, i, j in sconv.stripe_mask.nonzero().tolist()}
    assert len(covered) == len(set(covered)) and set(covered) == kept
    assert all(1 <= len(filters) <= fc for filters, _ in chunks)
    for tap in {t for _, taps in chunks for t in taps}:
        sizes = [len(f) for f, taps in chunks if taps == [tap]]
        assert not sizes or max(sizes) - min(sizes) <= 1
    if cout == 64:  # 32 of 64 filters per tap: pairs of taps share plenty
        assert any(len(taps) > 1 for _, taps in chunks)


def _fake_compiler(tmp_path, reject: str) -> str:
    """A compiler that fails whenever its arguments include `reject`, else runs the real one."""
    real = stripe_build._compiler()
    script = tmp_path / "cc-without"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{reject}" ] && '
                      f'{{ echo "unsupported {reject}" >&2; exit 1; }}; done\nexec {real} "$@"\n')
    script.chmod(0o755)
    return str(script)


@needs_native
def test_native_build_falls_back_to_fewer_flags(tmp_path, monkeypatch, private_cache):
    """A compiler without OpenMP (or without -march=native) still builds the kernel: the
    variants are tried in turn, and the kernel computes the same result."""
    monkeypatch.setattr(stripe_build, "_state", {})
    monkeypatch.setenv("CC", _fake_compiler(tmp_path, "-fopenmp"))
    lib = stripe_native.library()
    assert lib is not None and stripe_native.unavailable_reason() is None
    assert [f for f in stripe_build._flag_variants()[1] if f == "-fopenmp"] == []
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    sconv = StripeConv2d.from_dense(conv, _random_mask(10, 3, 0.5, gen))
    x = torch.randn(3, 6, 13, 11, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(sconv(x), _masked_reference(conv, sconv.stripe_mask, x),
                                   rtol=1e-4, atol=1e-4)


def test_native_failed_compile_warns_and_falls_back(tmp_path, monkeypatch, private_cache):
    """Every compile failing (here: a compiler that rejects every source) gives a warning
    naming the reason, and StripeConv2d computes with the torch formulation."""
    monkeypatch.setattr(stripe_build, "_state", {})
    monkeypatch.setenv("CC", _fake_compiler(tmp_path, "-shared"))
    with pytest.warns(RuntimeWarning, match="torch formulation"):
        assert stripe_native.library() is None
    assert "unsupported -shared" in stripe_native.unavailable_reason()
    conv = nn.Conv2d(3, 4, 3, padding=1)
    sconv = StripeConv2d.from_dense(conv, torch.rand(4, 3, 3) < 0.5)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(sconv(x), _masked_reference(conv, sconv.stripe_mask, x), **TOL)


@needs_native
def test_native_kernel_without_avx_builds_and_matches(monkeypatch, private_cache):
    """Any x86-64: a build for the baseline ISA (SSE2 only: 4-float vectors, other tile
    shapes) computes the same as the dense conv."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    monkeypatch.setattr(stripe_build, "FLAGS", [
        "-march=x86-64" if f == "-march=native" else f for f in stripe_build.FLAGS])
    monkeypatch.setattr(stripe_build, "_state", {})
    lib = stripe_native.library()
    assert lib is not None, stripe_native.unavailable_reason()
    assert lib.prunekit_stripe_vl() == 4
    gen = torch.Generator().manual_seed(11)
    for k, s, cin, cout, (h, w) in [(3, 1, 16, 16, (12, 13)), (3, 2, 5, 33, (15, 16)),
                                    (1, 1, 3, 9, (4, 5))]:
        conv = nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)
        sconv = StripeConv2d.from_dense(conv, _random_mask(cout, k, 0.5, gen))
        x = torch.randn(3, cin, h, w, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(sconv(x), _masked_reference(conv, sconv.stripe_mask, x),
                                       rtol=1e-4, atol=1e-4)


@needs_native
def test_native_kernel_compiles_for_avx512(tmp_path):
    """The 32-register variant (AVX-512: 8 filters a chunk, other tiles) at least compiles
    (it cannot run on a CPU without AVX-512)."""
    import subprocess

    compiler, march = stripe_build._compiler(), "skylake-avx512"
    flags = [f"-march={march}" if f == "-march=native" else f for f in stripe_build.FLAGS]
    result = subprocess.run([compiler, *flags, str(stripe_build.SOURCE), "-o",
                             str(tmp_path / "k.so")], capture_output=True, text=True)
    if "march" in result.stderr and result.returncode != 0:
        pytest.skip(f"{compiler} does not know -march={march}")
    assert result.returncode == 0, result.stderr[-2000:]
