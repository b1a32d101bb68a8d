"""The kernel's wide build (16-float vectors on AVX-512, stripe_native.wide_library): which convs
it takes, that it computes what the default width does (and the dense conv on the masked
weights), that a sequence may mix both widths, and that it stays out of the way where the CPU
has no AVX-512 or the user turned it off."""
from __future__ import annotations

import subprocess

import pytest
import torch
from torch import nn

import prunekit
from prunekit.deployment import NativeSequence, deploy
from prunekit.nn import stripe_build, stripe_native
from prunekit.nn.stripe import StripeConv2d, stripe_prune_model

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(stripe_native.library() is None,
                                 reason=f"native stripe kernel unavailable: "
                                        f"{stripe_native.unavailable_reason()}")]
TOL = dict(rtol=1e-4, atol=1e-4)
HAS_AVX512 = " avx512f" in stripe_build._cpu_identity()
needs_wide = pytest.mark.skipif(stripe_native.wide_library() is None,
                                reason="no wide build here (the CPU has no AVX-512)")


def _stripe(cin, cout, stride, keep, seed, bias=True, dilation=1):
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation,
                     bias=bias)
    with torch.no_grad():
        conv.weight.normal_(generator=gen)
    return StripeConv2d.from_dense(conv, torch.rand(cout, 3, 3, generator=gen) < keep), gen


def _masked_reference(sconv, x):
    return nn.functional.conv2d(x, sconv.dense_weight(), sconv.bias, sconv.stride,
                                sconv.padding, sconv.dilation)


def test_the_wide_build_exists_exactly_where_the_cpu_has_avx512():
    wide = stripe_native.wide_library()
    if not HAS_AVX512:
        assert wide is None
        return
    base = stripe_native.library()
    assert wide is not None and wide is not base
    assert wide.prunekit_stripe_vl() == 2 * base.prunekit_stripe_vl() == 16
    # one chunk layout for both: a plan's packed weights serve either build
    assert wide.prunekit_stripe_chunk() == base.prunekit_stripe_chunk()


@needs_wide
@pytest.mark.parametrize("cin,cout,h,w,stride,dilation", [
    (16, 16, 32, 32, 1, 1),   # ResNet-56's stages: two and one wide vectors a row
    (16, 32, 32, 32, 2, 1),
    (32, 32, 16, 16, 1, 1),
    (5, 33, 20, 48, 1, 2),    # dilation, filters beyond a chunk, three vectors a row
    (3, 7, 31, 32, 2, 1),     # odd height, stride 2 onto 16 columns
])
@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_wide_and_default_width_compute_the_same(cin, cout, h, w, stride, dilation, keep,
                                                 monkeypatch):
    sconv, gen = _stripe(cin, cout, stride, keep, seed=cin * 7 + w, dilation=dilation)
    for batch in (1, 3, 64):
        x = torch.randn(batch, cin, h, w, generator=gen)
        got = {}
        for wide in (False, True):
            monkeypatch.setattr(stripe_native, "WIDE_VECTORS", wide)
            plan = stripe_native.NativeStripePlan(
                sconv.weight, sconv.out_index, sconv.segments, sconv.bias, cout,
                sconv.stride, sconv.padding, sconv.dilation, sconv.kernel_size)
            with torch.no_grad():
                got[wide] = plan(x)
            assert plan._layout(batch, h, w)["vl"] == (16 if wide else 8)
        with torch.no_grad():
            want = _masked_reference(sconv, x)
        torch.testing.assert_close(got[True], want, **TOL)
        torch.testing.assert_close(got[True], got[False], **TOL)


@needs_wide
@pytest.mark.parametrize("relu", [False, True])
def test_wide_epilogue_adds_the_residual_and_clips(relu):
    sconv, gen = _stripe(16, 16, 1, 0.5, seed=4)
    plan = sconv._native_plan()
    x = torch.randn(2, 16, 16, 32, generator=gen)
    residual = torch.randn(2, 16, 16, 32, generator=gen)
    assert plan._layout(2, 16, 32)["vl"] == 16
    with torch.no_grad():
        got = plan(x, residual, relu)
        want = _masked_reference(sconv, x) + residual
    torch.testing.assert_close(got, torch.relu(want) if relu else want, **TOL)


@needs_wide
@pytest.mark.parametrize("w", [8, 24, 33])
def test_rows_that_are_not_whole_wide_vectors_use_the_default_width(w):
    sconv, gen = _stripe(8, 8, 1, 0.5, seed=w)
    x = torch.randn(2, 8, 9, w, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(sconv(x), _masked_reference(sconv, x), **TOL)
    assert sconv._native_plan()._layout(2, 9, w)["vl"] == 8


@needs_wide
def test_a_sequence_runs_each_step_on_its_own_width(randomize_norms):
    """A stripe ResNet-20 (32-, 16- and 8-wide stages): the wide build takes the first two,
    the default width the last, and the one native call gives bitwise the convs' results."""
    model = randomize_norms(prunekit.models.create("cifar_resnet20")).eval()
    g = torch.Generator().manual_seed(5)
    masks = {n: torch.rand(m.out_channels, 3, 3, generator=g) < 0.5
             for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv1"}
    model = stripe_prune_model(model, masks)
    x = torch.randn(1, 3, 32, 32)
    grouped = deploy(model, x, native_convs=True, channels_last=False)
    alone = deploy(model, x, native_convs=True, channels_last=False, native_sequences=False)
    wide = stripe_native.forward_address(stripe_native.wide_library())
    narrow = stripe_native.forward_address(stripe_native.library())
    with torch.no_grad():
        for batch in (1, 4):
            xb = torch.randn(batch, 3, 32, 32)
            assert torch.equal(grouped(xb), alone(xb))
            torch.testing.assert_close(grouped(xb), model(xb), **TOL)
    used = {step.forward for s in grouped.modules() if isinstance(s, NativeSequence)
            for _, program in s._programs.items() for step in program[1].table}
    assert used == {wide, narrow}


def test_turned_off_every_conv_runs_on_the_default_width(monkeypatch):
    monkeypatch.setattr(stripe_build, "_state", dict(stripe_build._state))
    stripe_build._state.pop("wide", None)
    monkeypatch.setenv("PRUNEKIT_WIDE", "0")
    assert stripe_native.wide_library() is None
    sconv, gen = _stripe(16, 16, 1, 0.5, seed=2)
    x = torch.randn(2, 16, 16, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(sconv(x), _masked_reference(sconv, x), **TOL)
    assert sconv._native_plan()._layout(2, 16, 32)["vl"] == stripe_native.library(
        ).prunekit_stripe_vl()


def test_no_wide_build_is_tried_without_native_code_generation(monkeypatch, private_cache):
    """A build for the baseline ISA (no -march=native) never has AVX-512: no second compile,
    no wide library, and convs still compute the same."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    monkeypatch.setattr(stripe_build, "FLAGS", [
        "-march=x86-64" if f == "-march=native" else f for f in stripe_build.FLAGS])
    monkeypatch.setattr(stripe_build, "_state", {})
    builds = []
    real = stripe_build._build
    monkeypatch.setattr(stripe_build, "_build", lambda extra=(): builds.append(extra) or
                        real(extra))
    assert stripe_native.wide_library() is None
    assert builds == [()]
    sconv, gen = _stripe(6, 10, 1, 0.5, seed=9)
    x = torch.randn(2, 6, 8, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(sconv(x), _masked_reference(sconv, x), **TOL)


def test_wide_build_compiles_for_avx512(tmp_path):
    """The wide variant at least compiles for an AVX-512 target (it cannot run elsewhere)."""
    compiler, march = stripe_build._compiler(), "skylake-avx512"
    if compiler is None:
        pytest.skip("no C compiler")
    flags = [f"-march={march}" if f == "-march=native" else f
             for f in stripe_build.FLAGS] + stripe_build.WIDE_FLAGS
    result = subprocess.run([compiler, *flags, str(stripe_build.SOURCE), "-o",
                             str(tmp_path / "k.so")], capture_output=True, text=True)
    if "march" in result.stderr and result.returncode != 0:
        pytest.skip(f"{compiler} does not know -march={march}")
    assert result.returncode == 0, result.stderr[-2000:]


@needs_wide
@pytest.mark.parametrize("batch", [1, 12])
def test_wide_build_on_two_threads(batch, monkeypatch):
    """Two threads on the wide build: whole groups per thread (batch 12), and one group's
    blocks shared by the threads (batch 1, enough multiply-adds to use both)."""
    monkeypatch.setattr(stripe_native, "MACS_PER_THREAD", 1 << 10)
    sconv, gen = _stripe(32, 48, 1, 0.5, seed=batch)
    x = torch.randn(batch, 32, 24, 32, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        lay = sconv._native_plan()._layout(batch, 24, 32)
        assert lay["vl"] == 16
        assert stripe_native.NativeStripePlan.threads_and_scratch(lay, 2)[0] == 2
        with torch.no_grad():
            got = sconv(x)
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():
        torch.testing.assert_close(got, _masked_reference(sconv, x), **TOL)
