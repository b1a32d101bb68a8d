"""HASTE's HashConv2d (prunekit.nn.hashconv): exact when nothing merges, exact for duplicated
channels, MACs fall as L shrinks, bad options refused, export refused, save/load."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit import io as pio
from prunekit.errors import ConfigError
from prunekit.export import ExportError, export_onnx
from prunekit.nn import HashConv2d, hash_convolutions, haste_macs


@pytest.mark.parametrize("k,s,p,d,patch,n", [(3, 1, 1, 1, 4, 1), (3, 2, 1, 1, 3, 2),
                                              (5, 2, 2, 2, 4, 3), (3, 1, 0, 1, 5, 2),
                                              (2, 3, 1, 1, 2, 1)])
def test_equals_dense_conv_when_buckets_are_singletons(k, s, p, d, patch, n):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, k, stride=s, padding=p, dilation=d).double()
    h = HashConv2d(conv, hyperplanes=40, patch=patch).double()
    x = torch.randn(n, 6, 11, 12, dtype=torch.float64)
    y = h(x)
    assert (h.last_buckets.max(1).values + 1 == 6).all()  # every bucket a singleton
    torch.testing.assert_close(y, conv(x), rtol=1e-10, atol=1e-10)
    assert h.macs["conv"] == h.macs["dense"]


def test_duplicated_channels_merge_exactly():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 4, 3, padding=1).double()
    h = HashConv2d(conv, hyperplanes=30, patch=4).double()
    base = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x = torch.cat([base, base[:, [0, 1, 0]]], 1)      # channels 3, 5 = 0; 4 = 1
    y = h(x)
    assert (h.last_buckets[:, 3] == h.last_buckets[:, 0]).all()
    assert (h.last_buckets.max(1).values + 1 == 3).all()
    torch.testing.assert_close(y, conv(x), rtol=1e-10, atol=1e-10)
    assert h.macs["conv"] == h.macs["dense"] // 2


def test_merge_equals_direct_per_tile_loop():
    torch.manual_seed(2)
    conv = nn.Conv2d(5, 3, 3, padding=1).double()
    h = HashConv2d(conv, hyperplanes=2, patch=2).double()
    x = torch.randn(1, 5, 4, 4, dtype=torch.float64)
    y = h(x)
    ids = h.last_buckets  # [4 tiles, 5]
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    ref = torch.zeros_like(y)
    for t in range(4):
        ti, tj = divmod(t, 2)
        win = xp[0, :, 2 * ti:2 * ti + 4, 2 * tj:2 * tj + 4]
        for b in ids[t].unique():
            members = (ids[t] == b).nonzero().flatten()
            mean = win[members].mean(0, keepdim=True)
            w = conv.weight[:, members].sum(1, keepdim=True)
            ref[0, :, 2 * ti:2 * ti + 2, 2 * tj:2 * tj + 2] += \
                torch.nn.functional.conv2d(mean[None], w)[0]
    torch.testing.assert_close(y, ref + conv.bias.view(1, -1, 1, 1))
    assert (ids.max(1).values < 4).any()  # something merged


def test_macs_fall_as_hyperplanes_decrease():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1))
    x = torch.randn(4, 3, 16, 16)
    conv = []
    for L in (24, 12, 6, 3, 1):
        hashed = copy.deepcopy(model)
        hash_convolutions(hashed, hyperplanes=L)
        conv.append(haste_macs(hashed, [x])["conv_macs"])
    assert all(a >= b for a, b in zip(conv, conv[1:])) and conv[-1] < conv[0]


def test_bad_options_and_modules_are_refused():
    conv = nn.Conv2d(4, 4, 3)
    for bad in ({"hyperplanes": 0}, {"hyperplanes": 63}, {"sparsity": 1.0}, {"patch": 0},
                {"centring": "x"}, {"halo": "x"}):
        with pytest.raises(ConfigError):
            HashConv2d(conv, **bad)
    with pytest.raises(ConfigError, match="groups"):
        HashConv2d(nn.Conv2d(4, 4, 3, groups=2))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.raises(ConfigError):
        hash_convolutions(model, hyperplanes={"nope": 4})
    assert all(type(m) is nn.Conv2d for m in model)  # untouched


def test_deterministic_and_export_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    hash_convolutions(a, hyperplanes=4)
    hash_convolutions(b, hyperplanes=4)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ExportError, match="HashConv2d"):
        export_onnx(a, tmp_path / "m.onnx", x)
    assert not list(tmp_path.iterdir())


@pytest.mark.shared_data
def test_cli_haste_runs_without_training_and_saves(tmp_path):
    import json
    from conftest import SHARED, needs_shared  # noqa: F401
    if not (SHARED / "cifar10").exists():
        pytest.skip("shared data not found")
    from prunekit.cli import main
    run = tmp_path / "haste"
    if True:  # the CLI reports HasteMacsWarning its own way
        assert main(["prune", "--model", "cifar_resnet20", "--weights", "pretrained", "--data",
                     str(SHARED), "--method", "haste", "--haste-hyperplanes", "8",
                     "--haste-macs-images", "16", "--eval-splits", "test-lossless", "--limit",
                     "20", "--latency-batches", "1", "--latency-runs", "1",
                     "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    haste = report["haste"]
    assert haste["macs_input_dependent"] and "layer1.0.conv1" in haste["swap"]["swapped"]
    assert 0 < haste["mean_macs"]["model_macs"] < haste["dense_model_macs"]
    loaded = pio.load(run / "model.safetensors").eval()
    assert isinstance(loaded.layer1[0].conv1, HashConv2d)
