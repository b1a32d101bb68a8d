"""FusedConv2d: a dense conv with its residual add and ReLU as oneDNN post-ops, and the deploy
pass that makes it. Fused must equal the plain ``conv + add + relu`` wherever it runs, and the
plain path must take over wherever oneDNN's op cannot serve."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import prunekit
from prunekit.deployment import DEPLOY_ATTR, FusedConv2d, deploy

pytestmark = pytest.mark.usefixtures("single_thread", "private_cache")
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this torch build has no oneDNN")
TOL = dict(rtol=1e-4, atol=1e-4)


def _plain(conv, x, residual, relu):
    out = conv._conv_forward(x, conv.weight, conv.bias)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _fused(cin, cout, relu, residual, seed=0, **kwargs):
    torch.manual_seed(seed)
    return FusedConv2d.from_conv(nn.Conv2d(cin, cout, 3, **kwargs).eval(), relu=relu,
                                 residual=residual).requires_grad_(False)


@needs_onednn
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu,with_residual", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding=1, stride=2, bias=False),
                                    dict(padding=2, dilation=2), dict(padding=1, groups=4),
                                    dict(padding=1, groups=8)],
                         ids=["dense", "stride2-nobias", "dilated", "grouped", "depthwise"])
def test_fused_conv_matches_conv_add_relu(kwargs, relu, with_residual, channels_last):
    conv = _fused(8, 8, relu, with_residual, **kwargs)
    x = torch.randn(3, 8, 11, 12)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    out_shape = conv._out_shape(x)
    residual = torch.randn(out_shape) if with_residual else None
    if residual is not None and channels_last:
        residual = residual.contiguous(memory_format=torch.channels_last)
    assert conv._fused_applies(x, residual)
    with torch.no_grad():
        got = conv(x, residual) if with_residual else conv(x)
        want = _plain(conv, x, residual, relu)
    assert got.shape == want.shape == out_shape
    torch.testing.assert_close(got, want, **TOL)
    if relu:
        assert (got >= 0).all() and (got == 0).any()


def test_plain_path_where_onednn_cannot_serve():
    conv = _fused(4, 4, relu=True, residual=True, padding=1)
    x = torch.randn(2, 4, 6, 6)
    residual = torch.randn(2, 4, 6, 6)
    assert conv._fused_applies(x, residual)
    assert not conv._fused_applies(x.double(), residual)
    assert not conv._fused_applies(x, residual.transpose(2, 3))  # not laid out like x
    with torch.enable_grad():
        assert not conv._fused_applies(x.clone().requires_grad_(), residual)
    with FlopCounterMode(display=False):
        assert not conv._fused_applies(x, residual)
    for other in (torch.randn(1, 4, 1, 1), torch.randn(2, 4, 6, 6).transpose(2, 3)):
        with torch.no_grad():  # broadcasting and transposed residuals: plain, still right
            torch.testing.assert_close(conv(x, other), _plain(conv, x, other, True), **TOL)
    # autograd through the plain path
    conv.requires_grad_(True)
    out = conv(x, residual)
    out.sum().backward()
    assert conv.weight.grad is not None


def test_same_padding_strings_take_the_plain_path():
    torch.manual_seed(0)
    conv = FusedConv2d.from_conv(nn.Conv2d(4, 4, 3, padding="same"), relu=True)
    x = torch.randn(1, 4, 5, 5)
    assert not conv._fused_applies(x, None)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), _plain(conv, x, None, True), **TOL)


@needs_onednn
def test_deploy_fuses_dense_residual_blocks_exactly(randomize_norms):
    model = randomize_norms(prunekit.models.create("cifar_resnet20")).eval()
    x = torch.randn(2, 3, 32, 32)
    prunekit.prune(model, x[:1], criterion="l1", ratio=0.3)
    for layout in (False, True):
        deployed = deploy(model, x, channels_last=layout)
        record = getattr(deployed, DEPLOY_ATTR)
        # 9 blocks: conv1 + ReLU in each, conv2 + add + ReLU in each, the stem's conv + ReLU
        assert len(record["dense_relu"]) == 19 and len(record["dense_residual"]) == 9
        fused = [m for m in deployed.modules() if isinstance(m, FusedConv2d)]
        assert len(fused) == 19 and sum(m.residual for m in fused) == 9
        assert not any(n.op == "call_function" and "add" in str(n.target)
                       for n in deployed.graph.nodes)
        with torch.no_grad():
            torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)
        assert prunekit.count_macs(deployed, x) == prunekit.count_macs(model, x)


def test_deployed_dense_model_exports_to_onnx(randomize_norms, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from prunekit.export import export_onnx

    model = randomize_norms(prunekit.models.create("cifar_resnet20")).eval()
    x = torch.randn(1, 3, 32, 32)
    deployed = deploy(model, x, channels_last=False)
    assert any(isinstance(m, FusedConv2d) for m in deployed.modules())
    path = export_onnx(deployed, tmp_path / "deployed.onnx", x)  # checks onnxruntime == torch
    assert path.stat().st_size > 0
