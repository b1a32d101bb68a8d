"""Tests for prunekit.measure: exact MAC/param counts, latency bookkeeping, evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.measure import (
    LatencyResult,
    count_macs,
    count_params,
    evaluate,
    macs_by_module,
    measure_latency,
    profile,
    resolve_device,
    speedup,
)


def conv_macs(c_in, c_out, kernel, h_out, w_out, groups=1, batch=1):
    """Textbook formula: one MAC per weight per output position."""
    return batch * c_out * (c_in // groups) * kernel * kernel * h_out * w_out


# --------------------------------------------------------------------------- reference ResNet-56
class BasicBlockOptionA(nn.Module):
    """CIFAR basic block with the parameter-free zero-padding ("option A") shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad_shortcut = stride != 1 or in_planes != planes
        self.pad = planes // 4

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad_shortcut:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class CifarResNet56(nn.Module):
    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 9):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(BasicBlockOptionA(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


@pytest.fixture(scope="module")
def resnet56():
    torch.manual_seed(0)
    return CifarResNet56()


def test_resnet56_reference_numbers(resnet56):
    assert count_macs(resnet56, torch.randn(1, 3, 32, 32)) == 125_485_696
    assert count_params(resnet56) == 853_018


def test_resnet56_thop_and_profile(resnet56):
    # Each BN output: stem 16x32x32, then per stage 18 BNs of 16x32x32 / 32x16x16 / 64x8x8.
    bn_elements = 16 * 32 * 32 + 18 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8)
    result = profile(resnet56, (1, 3, 32, 32))
    assert result == {
        "macs": 125_485_696,
        "macs_thop": 125_485_696 + 2 * bn_elements,
        "params": 853_018,
    }
    # The research note quotes 126.55M for ResNet-56 with BN counted.
    assert round(result["macs_thop"] / 1e6, 2) == 126.55


def test_macs_by_module_sums_to_total(resnet56):
    per_module = macs_by_module(resnet56, torch.randn(1, 3, 32, 32))
    assert sum(per_module.values()) == 125_485_696
    assert per_module["fc"] == 640
    assert per_module["conv1"] == conv_macs(3, 16, 3, 32, 32)
    assert per_module["layer2.0.conv1"] == conv_macs(16, 32, 3, 16, 16)
    assert not any(name.endswith("bn1") for name in per_module)
    with_bn = macs_by_module(resnet56, torch.randn(1, 3, 32, 32), include="thop")
    assert with_bn["bn1"] == 2 * 16 * 32 * 32
    assert sum(with_bn.values()) == profile(resnet56, (1, 3, 32, 32))["macs_thop"]


# --------------------------------------------------------------------------- exact tiny MACs
@pytest.mark.parametrize("bias", [False, True])
def test_conv_macs_ignore_bias(bias):
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
    assert count_macs(conv, torch.randn(1, 3, 10, 10)) == conv_macs(3, 8, 3, 10, 10)


def test_strided_grouped_and_depthwise_conv():
    strided = nn.Conv2d(4, 6, 3, stride=2, padding=1)  # 9x9 -> 5x5
    assert count_macs(strided, torch.randn(1, 4, 9, 9)) == conv_macs(4, 6, 3, 5, 5)
    grouped = nn.Conv2d(8, 12, 3, groups=4)  # 7x7 -> 5x5, no padding
    assert count_macs(grouped, torch.randn(1, 8, 7, 7)) == conv_macs(8, 12, 3, 5, 5, groups=4)
    depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    assert count_macs(depthwise, torch.randn(1, 16, 8, 8)) == 16 * 9 * 8 * 8


def test_linear_and_batch_scaling():
    linear = nn.Linear(20, 7)
    assert count_macs(linear, torch.randn(1, 20)) == 140
    # Counts are per example_inputs batch, not per image.
    assert count_macs(linear, torch.randn(4, 20)) == 4 * 140


def test_tuple_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 3), nn.Linear(4, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    assert count_macs(TwoInputs(), (torch.randn(1, 5), torch.randn(1, 4))) == 15 + 12


def test_thop_mode_adds_twice_bn_output_numel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))
    x = torch.randn(1, 3, 6, 6)
    plain = count_macs(model, x)
    assert plain == conv_macs(3, 4, 3, 6, 6) + 4 * 6 * 6 * 5
    assert count_macs(model, x, include="thop") == plain + 2 * (4 * 6 * 6) + 2 * 5
    with pytest.raises(ValueError):
        count_macs(model, x, include="fvcore")


def test_macs_independent_of_mode_and_modes_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    x = torch.randn(1, 3, 8, 8)
    model.train()
    model[1].eval()  # a deliberately frozen BN must stay frozen
    macs_train = count_macs(model, x, include="thop")
    assert model.training and model[0].training and model[2].training
    assert not model[1].training
    model.eval()
    assert count_macs(model, x, include="thop") == macs_train
    assert not model.training


# --------------------------------------------------------------------------- params
def test_count_params_shared_once_buffers_excluded():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4, bias=False)
            self.decoder = nn.Linear(4, 4, bias=False)
            self.decoder.weight = self.encoder.weight
            self.bn = nn.BatchNorm1d(4)  # 8 affine params + 3 buffers
            self.register_buffer("scale", torch.ones(100))

    model = Tied()
    assert count_params(model) == 16 + 8
    model.bn.weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 16 + 4
    assert count_params(model) == 16 + 8


# --------------------------------------------------------------------------- latency
def test_measure_latency_keys_and_thread_restore():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))  # materialise the lazy layer
    model.train()
    threads_before = torch.get_num_threads()
    result = measure_latency(model, (1, 3, 8, 8), batch_sizes=(1, 2), warmup=1, runs=3, threads=1)
    assert torch.get_num_threads() == threads_before
    assert model.training
    assert isinstance(result, LatencyResult)
    assert result.num_threads == 1
    assert result.device == "cpu" and result.device_name
    assert result.input_shape == [3, 8, 8]
    assert set(result.median_ms) == {1, 2}
    assert all(ms > 0 for ms in result.median_ms.values())
    as_dict = json.loads(json.dumps(result.as_dict()))
    assert as_dict["torch_version"] == torch.__version__
    for batch_size in ("1", "2"):
        stats = as_dict["batches"][batch_size]
        assert stats["runs"] == 3
        for key in ("median_ms", "mean_ms", "std_ms", "p10_ms", "p90_ms", "min_ms"):
            assert stats[key] >= 0
        assert stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] + 1e-9


def test_measure_latency_accepts_tensor():
    result = measure_latency(nn.Linear(6, 3), torch.randn(5, 6), batch_sizes=(1,), warmup=0, runs=2)
    assert result.batches[1].runs == 2 and result.input_shape == [6]


def test_measure_latency_lays_inputs_out_in_the_requested_memory_format():
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last)
                        and not x.is_contiguous())
            return x

    measure_latency(Record(), (1, 3, 4, 5), batch_sizes=(2,), warmup=0, runs=1,
                    memory_format=torch.channels_last)
    measure_latency(Record(), (1, 3, 4, 5), batch_sizes=(2,), warmup=0, runs=1)
    assert seen == [True, False]


# --------------------------------------------------------------------------- evaluate
class FixedLogits(nn.Module):
    """Ignores pixel values; input[:, 0] holds a row index into a fixed logit table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)
        self.unused = nn.Linear(1, 1)  # gives the model a parameter/device

    def forward(self, x):
        return self.table[x[:, 0].long()]


def make_loader(rows, targets, batch_size):
    data = torch.tensor(rows, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(targets)
    return [(data[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def test_evaluate_exact_top1_top5():
    # Class ranking for every row: 0 > 1 > 2 > ... > 9.
    table = torch.arange(10, 0, -1, dtype=torch.float32).expand(1, 10).clone()
    targets = [0, 1, 4, 5, 9]  # top-1 hit: 0; top-5 hits: 0, 1, 4
    model = FixedLogits(table)
    model.train()
    result = evaluate(model, make_loader([0] * 5, targets, batch_size=2), progress=False)
    assert result["n"] == 5
    assert result["top1"] == pytest.approx(20.0)
    assert result["top5"] == pytest.approx(60.0)
    expected_loss = F.cross_entropy(table.expand(5, 10), torch.tensor(targets)).item()
    assert result["loss"] == pytest.approx(expected_loss)
    assert model.training


def test_evaluate_three_classes_and_max_batches():
    table = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    loader = make_loader([0, 1, 0, 1], [0, 2, 2, 1], batch_size=2)
    result = evaluate(model=FixedLogits(table), loader=loader, progress=False)
    assert result["top1"] == pytest.approx(50.0)  # rows 0 and 3 are right
    assert result["top5"] == pytest.approx(100.0)  # top-min(5, 3) always contains the label
    first_batch = evaluate(FixedLogits(table), loader, progress=True, max_batches=1)
    assert first_batch["n"] == 2 and first_batch["top1"] == pytest.approx(50.0)


# --------------------------------------------------------------------------- devices / speedup
def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected and resolve_device("auto").type == expected
    with pytest.raises(ValueError):
        resolve_device("not-a-device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("request_", ["cuda", "cuda:1", torch.device("cuda:0")])
def test_resolve_device_cuda_unavailable(request_):
    with pytest.raises(ValueError, match="CUDA requested but torch.cuda.is_available"):
        resolve_device(request_)


def test_speedup_ratios():
    before = {"macs": 100, "params": 50, "latency": {1: 2.0, 64: 40.0}}
    after = {"macs": 50, "params": 25, "latency": {"1": 1.0, "64": 10.0}}
    result = speedup(before, after)
    assert result["macs_x"] == 2.0 and result["params_x"] == 2.0
    assert result["macs_reduction_pct"] == pytest.approx(50.0)
    assert result["latency_x"] == {1: 2.0, 64: 4.0}
    assert speedup({"macs": 10, "params": 4}, {"macs": 5, "params": 4})["latency_x"] is None


def test_speedup_from_latency_results():
    model = nn.Linear(4, 2)
    latency = measure_latency(model, (1, 4), batch_sizes=(1,), warmup=0, runs=2)
    summary = profile(model, (1, 4)) | {"latency": latency}
    serialised = profile(model, (1, 4)) | {"latency": latency.as_dict()}
    result = speedup(summary, serialised)
    assert result["macs_x"] == 1.0 and result["macs_thop_x"] == 1.0
    assert result["latency_x"] == {1: pytest.approx(1.0)}


def test_recalibrate_bn_estimates_the_statistics_of_the_data():
    from prunekit.measure import recalibrate_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=0.3))
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
        model[1].running_var.fill_(9.0)
    weight = model[0].weight.detach().clone()
    batches = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(5)]
    assert recalibrate_bn(model, batches, batches=3, progress=False) == 3
    with torch.no_grad():
        features = model[0](torch.cat(batches[:3]))
    mean = features.mean((0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, mean, rtol=1e-4, atol=1e-5)
    # cumulative average of the per-batch unbiased variances
    per_batch = torch.stack([model[0](b).detach().transpose(0, 1).flatten(1).var(1)
                             for b in batches[:3]])
    torch.testing.assert_close(model[1].running_var, per_batch.mean(0), rtol=1e-4, atol=1e-5)
    assert torch.equal(model[0].weight, weight) and not model.training
    assert model[1].momentum == 0.3
    # (inputs, targets) batches work too; an empty loader is refused and changes nothing
    assert recalibrate_bn(model, [(b, None) for b in batches], batches=10, progress=False) == 5
    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="empty loader"):
        recalibrate_bn(model, [], progress=False)
    assert torch.equal(model[1].running_mean, before)
