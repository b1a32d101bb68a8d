"""CHIP channel independence (prunekit.criteria.nuclear): every fast method against the
reference recipe (one SVD per image and channel, float64), plus the exact properties of
CI(i) = ||A||_* - ||A_{-i}||_*.

Tolerance everywhere: rtol 1e-4 and atol 1e-6 x (nuclear norm of the image).
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.criteria import nuclear as nu
from prunekit.criteria.nuclear import (
    channel_independence,
    channel_independence_direct,
    channel_independence_reference,
    nuclear_norms,
    round_features,
)

from conftest import SHARED

FAST = [("quadrature", "gram"), ("quadrature", "svd"), ("secular", "gram"), ("secular", "svd"),
        ("gram_eig", "auto"), ("downdate", "auto")]
ALL = FAST + [("direct", "auto")]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def assert_ci_close(actual, expected, features, what=""):
    scale = nuclear_norms(features).clamp_min(1e-300)[:, None].expand_as(expected)
    actual = actual.double()
    expected = expected.double()
    bad = (actual - expected).abs() > 1e-4 * expected.abs() + 1e-6 * scale
    if bad.any():
        worst = ((actual - expected).abs() / (1e-4 * expected.abs() + 1e-6 * scale)).max()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} scores differ "
                             f"(worst {float(worst):.3g} x tolerance)\nactual={actual}\n"
                             f"expected={expected}")


def make_features(kind: str, n_img: int, n_ch: int, n_pix: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_img, n_ch, n_pix, generator=gen, dtype=torch.float64)
    if kind == "gauss":
        return x
    if kind == "relu":  # rank deficient: zero entries, a dead channel, a dead pixel
        x = torch.relu(x - 0.3)
        x[:, 0] = 0
        x[:, :, -1] = 0
        return x
    if kind == "lowrank":  # exactly rank 2 (or less), non-negative like post-ReLU maps
        rank = max(1, min(2, n_ch, n_pix))
        left = torch.rand(n_img, n_ch, rank, generator=gen, dtype=torch.float64)
        right = torch.rand(n_img, rank, n_pix, generator=gen, dtype=torch.float64)
        return left @ right
    if kind == "duplicate":  # repeated rows -> repeated / zero eigenvalues
        half = max(1, n_ch // 2)
        base = x[:, :half]
        return torch.cat([base, base, base][: (n_ch + half - 1) // half + 1], 1)[:, :n_ch]
    if kind == "scaled":  # wide dynamic range of row norms
        return x * torch.logspace(-3, 3, n_ch, dtype=torch.float64)[None, :, None]
    raise ValueError(kind)


# --------------------------------------------------------------------------- vs the reference
@pytest.mark.parametrize("n_img", [1, 3])
@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (24, 24)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["gauss", "relu", "lowrank", "duplicate", "scaled"])
def test_fast_methods_match_reference(kind, shape, n_img):
    x = make_features(kind, n_img, *shape, seed=hash((kind, shape, n_img)) % 1000)
    ref = channel_independence_reference(x)
    for method, fac in ALL:
        out = channel_independence(x, method=method, factorization=fac)
        assert out.shape == (n_img, shape[0]) and out.dtype == torch.float64
        assert_ci_close(out, ref, x, f"{kind} {shape} {method}/{fac}")


@settings(max_examples=40, deadline=None)
@given(n_img=st.integers(1, 3), n_ch=st.integers(1, 24), n_pix=st.integers(1, 40),
       kind=st.sampled_from(["gauss", "relu", "lowrank", "duplicate"]),
       seed=st.integers(0, 2**16))
def test_random_shapes_match_reference(n_img, n_ch, n_pix, kind, seed):
    x = make_features(kind, n_img, n_ch, n_pix, seed)
    ref = channel_independence_reference(x)
    for method, fac in ALL:
        assert_ci_close(channel_independence(x, method=method, factorization=fac), ref, x,
                        f"{kind} {tuple(x.shape)} {method}/{fac}")


def test_direct_equals_reference_and_fast():
    x = make_features("relu", 3, 12, 30, seed=5)
    ref = channel_independence_reference(x)
    direct = channel_independence_direct(x)
    torch.testing.assert_close(direct, ref, rtol=1e-12, atol=1e-12)
    assert_ci_close(channel_independence(x), direct, x, "auto vs direct")


def test_quadrature_is_far_more_accurate_than_needed():
    """The quadrature error bound (~5e-12 relative) against exact secular roots (SVD)."""
    x = make_features("gauss", 4, 20, 50, seed=3)
    exact = channel_independence(x, method="secular", factorization="svd")
    quad = channel_independence(x, method="quadrature", factorization="svd")
    scale = nuclear_norms(x)[:, None]
    assert ((quad - exact).abs() / scale).max() < 1e-10
    # a coarser step is still accurate: error ~ 4 exp(-pi^2 / step)
    coarse = channel_independence(x, method="quadrature", factorization="svd", quad_step=0.7)
    assert ((coarse - exact).abs() / scale).max() < 1e-5


# --------------------------------------------------------------------------- exact properties
@pytest.mark.parametrize("method, fac", ALL)
def test_bounds_zero_rows_and_closed_forms(method, fac):
    x = make_features("relu", 3, 10, 20, seed=1)
    ci = channel_independence(x, method=method, factorization=fac)
    scale = nuclear_norms(x)[:, None]
    # 0 <= CI(i) <= ||a_i|| (removing a row never increases the nuclear norm; triangle ineq.)
    assert (ci >= -1e-9 * scale).all()
    assert (ci <= x.norm(dim=-1) + 1e-9 * scale).all()
    assert (ci[:, 0] == 0).all()  # an all-zero row has CI exactly 0

    # C = 1: CI = ||a||;  N = 1: CI = ||a|| - sqrt(||a||^2 - a_i^2)
    one_ch = make_features("gauss", 2, 1, 7)
    torch.testing.assert_close(channel_independence(one_ch, method=method, factorization=fac),
                               one_ch.norm(dim=-1), rtol=1e-9, atol=1e-12)
    one_px = make_features("gauss", 2, 6, 1)
    col = one_px[..., 0]
    expected = col.norm(dim=1, keepdim=True) - (col.norm(dim=1, keepdim=True) ** 2
                                                 - col ** 2).clamp_min(0).sqrt()
    torch.testing.assert_close(channel_independence(one_px, method=method, factorization=fac),
                               expected, rtol=1e-7, atol=1e-9)

    # orthogonal rows of equal norm: G = 4 I, all eigenvalues repeated; every CI = 2
    q, _ = torch.linalg.qr(torch.randn(30, 8, dtype=torch.float64))
    ortho = (2 * q.mT)[None]
    torch.testing.assert_close(channel_independence(ortho, method=method, factorization=fac),
                               torch.full((1, 8), 2.0, dtype=torch.float64), rtol=1e-7, atol=1e-9)

    # all-zero image
    assert (channel_independence(torch.zeros(2, 4, 5), method=method, factorization=fac) == 0).all()


def test_invariances():
    x = make_features("gauss", 2, 9, 15, seed=7)
    ci = channel_independence(x)
    perm = torch.randperm(9)
    torch.testing.assert_close(channel_independence(x[:, perm]), ci[:, perm])
    torch.testing.assert_close(channel_independence(-2.5 * x), 2.5 * ci)
    rot, _ = torch.linalg.qr(torch.randn(15, 15, dtype=torch.float64))
    torch.testing.assert_close(channel_independence(x @ rot), ci)


def test_input_handling():
    x4 = torch.relu(torch.randn(2, 5, 4, 3))
    out = channel_independence(x4)  # [B, C, H, W] is flattened
    assert out.shape == (2, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, channel_independence(x4.flatten(2)))
    assert_ci_close(channel_independence(x4.flatten(2), dtype=None), out, x4.flatten(2), "float32")
    assert channel_independence(x4, dtype=None).dtype == torch.float32
    assert channel_independence_reference(x4, dtype=None).dtype == torch.float32
    assert channel_independence(torch.zeros(0, 3, 4)).shape == (0, 3)
    torch.testing.assert_close(channel_independence(x4, chunk_elements=1),
                               channel_independence(x4))
    assert nu.nuclear_norm_drop is channel_independence
    with pytest.raises(ValueError):
        channel_independence(x4, method="nope")
    with pytest.raises(ValueError):
        channel_independence(x4, factorization="nope")
    with pytest.raises(ValueError):
        channel_independence(torch.randn(3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x = make_features("relu", 3, 16, 40, seed=2)
    for method, fac in FAST:
        out = channel_independence(x.cuda(), method=method, factorization=fac)
        assert out.is_cuda
        assert_ci_close(out.cpu(), channel_independence_reference(x), x, f"cuda {method}")


# --------------------------------------------------------------------------- rounding
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_features_matches_numpy_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200_000) * 5).astype(dtype)
    x[:2000] = ((np.arange(2000) - 1000) + 0.5).astype(dtype) / dtype(1e4)  # ties
    expected = np.round(x, 4)
    for faithful in (False, True):
        got = round_features(torch.from_numpy(x), 4, bit_faithful=faithful).numpy()
        assert got.dtype == expected.dtype
        assert np.array_equal(got.view(np.uint8), expected.view(np.uint8))


# --------------------------------------------------------------------------- real feature maps
@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")
def test_real_resnet20_feature_maps():
    import prunekit.data
    import prunekit.models

    model = prunekit.models.create("cifar_resnet20", weights="pretrained").eval()
    data = prunekit.data.CIFAR10(SHARED, split="test-lossless", limit=4)
    images = torch.stack([data[i][0] for i in range(len(data))])
    names = {"relu": (16, 1024), "layer2.0.relu1": (32, 256), "layer3.0.relu1": (64, 64)}
    feats = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda mod, inp, out, name=name: feats.__setitem__(name, out.detach()))
        for name in names]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    for name, shape in names.items():
        x = feats[name].flatten(2)
        assert tuple(x.shape) == (4, *shape)
        ref = channel_independence_reference(x)
        assert (ref > 0).any()
        for method, fac in ALL:
            if method == "downdate" and shape[1] > shape[0]:
                continue  # C eigvalsh of N x N = 1024 x 1024 matrices: correct but slow
            assert_ci_close(channel_independence(x, method=method, factorization=fac), ref, x,
                            f"{name} {method}/{fac}")
        # also on the reference code's rounded float32 input
        rounded = round_features(x)
        assert_ci_close(channel_independence(rounded), channel_independence_reference(rounded),
                        rounded, f"{name} rounded")
