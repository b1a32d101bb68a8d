"""Latency targets on prunekit's C kernel (``latency_kernel="native"``): the lookup table times
the kernel the deployment runs, its cache key names the kernel, the loop deploys both models on
it, and a kernel that cannot run here is a clear error before anything is measured."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
import prunekit.plan.latency_table as latency_table
from prunekit.cli import main
from prunekit.graph import build_graph
from prunekit.nn import stripe_native
from prunekit.nn.stripe import StripeConv2d
from prunekit.plan import PlanError, PlanTarget
from prunekit.plan.latency_table import ConvLayer, LatencyTable, table_key, time_conv

from conftest import TinyNet

pytestmark = pytest.mark.usefixtures("single_thread", "private_cache")
needs_kernel = pytest.mark.skipif(stripe_native.library() is None,
                                  reason="the C kernel cannot be built here")


def _layer(groups=1, **changes):
    fields = dict(module="conv", in_channels=8, out_channels=8, kernel=(3, 3), stride=(1, 1),
                  padding=(1, 1), dilation=(1, 1), groups=groups, depthwise=False, spatial=(6, 6))
    return ConvLayer(**{**fields, **changes})


def test_the_cache_key_names_the_kernel_and_its_source():
    base = dict(device="cpu", threads=1, dtype=torch.float32, batch=1)
    onednn = table_key(_layer(), **base)
    native = table_key(_layer(), **base, kernel="native")
    assert onednn["kernel"] == "onednn" and native["kernel"] == "native"
    assert onednn != native and "kernel_source" not in onednn
    assert native["kernel_source"] == stripe_native.kernel_identity()
    assert native["kernel_source"].startswith(stripe_native.source_digest())
    assert table_key(_layer(), **base) == onednn


def test_the_cache_key_tells_the_wide_build_from_the_default_width(monkeypatch):
    """Timings made with the wide build (AVX-512) are never reused with it turned off."""
    base = dict(device="cpu", threads=1, dtype=torch.float32, batch=1, kernel="native")
    monkeypatch.setattr(stripe_native, "WIDE_VECTORS", False)
    narrow = table_key(_layer(), **base)
    assert narrow["kernel_source"] == stripe_native.source_digest()
    monkeypatch.setattr(stripe_native, "WIDE_VECTORS", True)
    if stripe_native.wide_library() is None:
        assert table_key(_layer(), **base) == narrow  # one width only here
    else:
        assert table_key(_layer(), **base)["kernel_source"] == narrow["kernel_source"] + "+vl16"


@needs_kernel
def test_native_points_time_the_c_kernel_and_other_convs_stay_onednn(monkeypatch):
    timed = []

    def fake_time(module, x, *_):
        timed.append((type(module), module(x).shape))
        return [1.0]
    monkeypatch.setattr(latency_table, "_time_batch", fake_time)
    assert time_conv(_layer(), 4, 6, batch=2, device="cpu", dtype=torch.float32,
                     kernel="native") == 1.0
    assert timed[-1] == (StripeConv2d, (2, 6, 6, 6))
    time_conv(_layer(), 4, 6, batch=2, device="cpu", dtype=torch.float32)
    assert timed[-1][0] is nn.Conv2d
    # what the kernel cannot take (groups, asymmetric padding, float64) is timed as deploy
    # leaves it: a torch conv
    for layer, dtype in ((_layer(groups=2), torch.float32),
                         (_layer(padding=(1, 0)), torch.float32), (_layer(), torch.float64)):
        time_conv(layer, 4, 6, batch=1, device="cpu", dtype=dtype, kernel="native")
        assert timed[-1][0] is nn.Conv2d, layer


@needs_kernel
def test_a_native_stripe_twin_computes_the_timed_conv():
    conv = nn.Conv2d(5, 7, 3, 2, 1).eval()
    twin = StripeConv2d.from_dense(conv, torch.ones(7, 3, 3, dtype=torch.bool)).eval()
    x = torch.randn(2, 5, 9, 9)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), conv(x), rtol=1e-4, atol=1e-5)


def test_bad_kernels_are_refused():
    with pytest.raises(PlanError, match="latency_kernel must be one of"):
        PlanTarget(latency_reduction=0.3, latency_kernel="mkl")
    model, x = TinyNet().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="kernel must be one of"):
        LatencyTable.measure(model, build_graph(model, x), x, kernel="cuda")


def test_a_native_target_without_the_kernel_fails_before_measuring(monkeypatch):
    monkeypatch.setattr(stripe_native, "library", lambda: None)
    monkeypatch.setattr(stripe_native, "unavailable_reason", lambda: "disabled by the test")
    monkeypatch.setattr(LatencyTable, "measure", lambda *a, **k: pytest.fail("measured"))
    model = TinyNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="disabled by the test.*latency_kernel='onednn'"):
        prunekit.prune(model, torch.randn(1, 3, 8, 8),
                       target=PlanTarget(latency_reduction=0.3, latency_kernel="native"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                  for k in before)


@needs_kernel
@pytest.mark.filterwarnings("ignore::prunekit.measure.LatencyWarning")
def test_prune_measures_on_the_native_kernel_for_real():
    model, x = TinyNet().eval(), torch.randn(1, 3, 8, 8)
    result = prunekit.prune(model, x, target=PlanTarget(
        latency_reduction=0.3, latency_samples=2, latency_steps=2, latency_kernel="native"))
    lat = result.latency
    assert lat["table"]["kernel"] == "native" and lat["table"]["measured_points"] > 0
    m = lat["measurement"]
    assert m["kernel"] == "native" and m["deployed"] is True
    assert m["native_convs"] == sum(isinstance(c, nn.Conv2d) for c in model.modules()) > 0
    assert model(x).shape == (1, 4)


def test_cli_flag_reaches_the_plan(tmp_path, prune_job_options, capsys):
    seen = prune_job_options
    assert main(["prune", "--model", "cifar_resnet20", "--latency-reduction", "0.4",
                 "--latency-kernel", "native", "--out", str(tmp_path / "run")]) == 2
    assert seen["plan"] == {"latency_reduction": 0.4, "latency_kernel": "native"}
    assert PlanTarget.from_dict(seen["plan"]).latency_kernel == "native"
    with pytest.raises(SystemExit):
        main(["prune", "--model", "cifar_resnet20", "--latency-reduction", "0.4",
              "--latency-kernel", "avx", "--out", str(tmp_path / "run")])
    assert "invalid choice: 'avx'" in capsys.readouterr().err
