"""The stripe kernel's output epilogue: ``relu?(conv(x) + bias [+ residual])`` computed by the C
kernel as it writes each block of outputs, against the same operations in torch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.deployment import FusedStripeConv2d
from prunekit.nn import stripe_native
from prunekit.nn.stripe import StripeConv2d

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(stripe_native.library() is None,
                                 reason=f"native stripe kernel unavailable: "
                                        f"{stripe_native.unavailable_reason()}")]
TOL = dict(rtol=1e-4, atol=1e-4)


def _stripe(cin, cout, stride, seed, keep=0.5, bias=True, k=3, padding=1):
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    return StripeConv2d.from_dense(conv, torch.rand(cout, k, k, generator=gen) < keep), gen


def _reference(sconv, x, residual, relu):
    out = sconv.forward_torch(x)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("cin,cout,h,w,stride", [
    (16, 16, 32, 32, 1),   # a ResNet-56 shape: every vector full
    (16, 32, 32, 32, 2),
    (6, 9, 11, 13, 1),     # rows that end in partial vectors
    (5, 7, 9, 10, 2),
])
def test_kernel_epilogue_matches_torch(cin, cout, h, w, stride, with_residual, relu):
    sconv, gen = _stripe(cin, cout, stride, seed=cin * 31 + h)
    plan = sconv._native_plan()
    for batch in (1, 3):
        x = torch.randn(batch, cin, h, w, generator=gen)
        shape = (batch, cout, *sconv._out_hw(h, w))
        residual = torch.randn(shape, generator=gen) if with_residual else None
        with torch.no_grad():
            got = plan(x, residual, relu)
            want = _reference(sconv, x, residual, relu)
        torch.testing.assert_close(got, want, **TOL)
        if relu:
            assert (got >= 0).all()
            assert (got == 0).any()  # some outputs were really clipped


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [2, 12])
def test_kernel_epilogue_reads_each_group_of_images_residual(batch, threads, monkeypatch):
    """The batch runs in groups of images (per thread, or threads sharing a group): each group
    must add its own images' residual."""
    monkeypatch.setattr(stripe_native, "GROUP_BYTES", 24 * 1024)
    monkeypatch.setattr(stripe_native, "MACS_PER_THREAD", 1)
    sconv, gen = _stripe(8, 12, 1, seed=batch)
    x = torch.randn(batch, 8, 10, 9, generator=gen)
    residual = torch.arange(batch, dtype=torch.float32).view(-1, 1, 1, 1) * 100 + \
        torch.randn(batch, 12, 10, 9, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = sconv._native_plan()(x, residual, True)
    finally:
        torch.set_num_threads(previous)
    with torch.no_grad():
        torch.testing.assert_close(got, _reference(sconv, x, residual, True), **TOL)


@pytest.mark.parametrize("direct", [True, False])
def test_kernel_epilogue_in_direct_and_block_buffer_output_modes(direct, monkeypatch):
    """Whole output vectors (16 columns) accumulate straight into the output by default; the
    block-buffer path (DIRECT_OUTPUT off, and every width VL does not divide) must agree."""
    monkeypatch.setattr(stripe_native, "DIRECT_OUTPUT", direct)
    sconv, gen = _stripe(8, 8, 1, seed=3)
    x = torch.randn(2, 8, 8, 16, generator=gen)
    residual = torch.randn(2, 8, 8, 16, generator=gen)
    plan = sconv._native_plan()
    with torch.no_grad():
        got = plan(x, residual, True)
    assert plan._shapes[(2, 8, 16)]["plan"].direct == int(direct)
    with torch.no_grad():
        torch.testing.assert_close(got, _reference(sconv, x, residual, True), **TOL)


def test_relu_keeps_nan_like_torch():
    sconv, gen = _stripe(4, 4, 1, seed=5)
    x = torch.randn(1, 4, 6, 8, generator=gen)
    residual = torch.zeros(1, 4, 6, 8)
    residual[0, 1, 2, 3] = float("nan")
    residual[0, 2] = -1e9  # whole channel clipped
    with torch.no_grad():
        got = sconv._native_plan()(x, residual, True)
    assert torch.isnan(got[0, 1, 2, 3])
    assert (got[0, 2] == 0).all()
    assert torch.isnan(got).sum() == 1


@pytest.mark.parametrize("residual_kind", ["broadcast", "channels_last", "float64"])
def test_residual_the_kernel_cannot_read_is_added_after_it(residual_kind):
    sconv, gen = _stripe(8, 8, 1, seed=7)
    x = torch.randn(2, 8, 9, 9, generator=gen)
    residual = {"broadcast": torch.randn(1, 8, 1, 1, generator=gen),
                "channels_last": torch.randn(2, 8, 9, 9, generator=gen).contiguous(
                    memory_format=torch.channels_last),
                "float64": torch.randn(2, 8, 9, 9, generator=gen, dtype=torch.float64)
                }[residual_kind]
    with torch.no_grad():
        got = sconv._native_plan()(x, residual, True)
        want = _reference(sconv, x, residual, True)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)


def test_every_stripe_removed_still_applies_the_epilogue():
    sconv, gen = _stripe(4, 6, 1, seed=9, keep=0.0)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    residual = torch.randn(2, 6, 5, 5, generator=gen)
    with torch.no_grad():
        got = sconv._native_plan()(x, residual, True)
        torch.testing.assert_close(got, _reference(sconv, x, residual, True), **TOL)


def test_fused_module_uses_the_kernel_epilogue(monkeypatch):
    """FusedStripeConv2d hands the residual and ReLU to the kernel (no add_/relu_ after it)."""
    sconv, gen = _stripe(8, 8, 1, seed=11)
    fused = FusedStripeConv2d.from_stripe(sconv, sconv.weight, sconv.bias, relu=True,
                                          residual=True)
    calls = []
    original = stripe_native.NativeStripePlan.__call__

    def spy(plan, x, residual=None, relu=False):
        calls.append((residual is not None, relu))
        return original(plan, x, residual, relu)
    monkeypatch.setattr(stripe_native.NativeStripePlan, "__call__", spy)
    x = torch.randn(2, 8, 8, 8, generator=gen)
    residual = torch.randn(2, 8, 8, 8, generator=gen)
    with torch.no_grad():
        got = fused(x, residual)
        torch.testing.assert_close(got, _reference(sconv, x, residual, True), **TOL)
    assert calls == [(True, True)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_finished_stores_of_one_chunk_filters_and_filters_without_stripes(
        stride, with_residual, relu, with_bias):
    """Where every filter is in one chunk (dense convs) the tiles store finished outputs (bias,
    residual, ReLU) straight into the output; filters with no stripe left are written alone
    (their bias, residual, ReLU). Both must match torch, and a mask that splits a filter over
    chunks must take the separate passes."""
    gen = torch.Generator().manual_seed(11 + stride)
    conv = nn.Conv2d(8, 18, 3, stride=stride, padding=1, bias=with_bias)
    mask = torch.zeros(18, 3, 3, dtype=torch.bool)
    mask[:16] = True                 # dense filters, 16: whole chunks of 4 or 8
    sconv = StripeConv2d.from_dense(conv, mask)   # filters 16 and 17 keep nothing
    plan = sconv._native_plan()
    assert plan.single and plan.orphans.tolist() == [16, 17]
    x = torch.randn(2, 8, 16, 32, generator=gen)
    shape = (2, 18, *sconv._out_hw(16, 32))
    residual = torch.randn(shape, generator=gen) if with_residual else None
    with torch.no_grad():
        got = plan(x, residual, relu)
        want = _reference(sconv, x, residual, relu)
    assert plan._shapes[(2, 16, 32)]["plan"].direct == 1
    torch.testing.assert_close(got, want, **TOL)
    if with_bias and not with_residual:  # the stripe-less filters are their bias (ReLU'd)
        bias = conv.bias.detach()[16:].view(1, 2, 1, 1)
        torch.testing.assert_close(got[:, 16:], (bias.relu() if relu else bias).expand(
            2, 2, *shape[2:]))
    ragged = mask.clone()
    ragged[0, 0, 0] = False          # filter 0 now splits over chunks
    assert not StripeConv2d.from_dense(conv, ragged)._native_plan().single
