"""reference_flops counts FLOPs as SWP's flops.py does (2 x MACs + BN + linear bias [+ ReLU
modules] [+ fixed pools]), checked against hand counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit import measure, models
from prunekit.nn import StripeConv2d


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x))))
        x = torch.relu(self.conv2(x))          # functional: never counted
        return self.fc(self.avg(x).flatten(1))


def _hand(batch: int, relu: bool, pooling: bool) -> int:
    conv = 9 * 3 * 8 * 16 * 16                  # per image, 16x16 output
    conv2 = 9 * 8 * 4 * 4 * 4                   # 8x8 input, stride 2 -> 4x4
    fc = 4 * 5
    flops = 2 * (conv + conv2 + fc) + 5         # Linear: 2 x weight + bias
    flops += 2 * 8 * 16 * 16                    # BN: 2 x input elements
    if relu:
        flops += 8 * 16 * 16                    # the nn.ReLU module only
    if pooling:
        flops += 4 * 8 * 8 * 8                  # MaxPool2d(2): k^2 x output elements
    return batch * flops


@pytest.mark.parametrize("relu,pooling", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("batch", [1, 3])
def test_small_model_matches_hand_count(relu, pooling, batch):
    model = Small()
    got = measure.reference_flops(model, torch.randn(batch, 3, 16, 16), relu=relu,
                                  pooling=pooling)
    assert got == _hand(batch, relu, pooling)


def test_resnet56_is_twice_macs_plus_bn_and_bias():
    model = models.create("cifar_resnet56")
    macs = measure.count_macs(model, (1, 3, 32, 32))
    # BN input elements: stem 16x32x32, then 2 BN per block over 9 blocks of each stage.
    bn = 16 * 32 * 32 + 18 * (16 * 32 * 32) + 18 * (32 * 16 * 16) + 18 * (64 * 8 * 8)
    assert measure.reference_flops(model, (1, 3, 32, 32)) == 2 * macs + 2 * bn + 10
    # prunekit's nn.ReLU modules are the reference's F.relu: counted only when asked.
    relus = 16 * 32 * 32 + 18 * (16 * 32 * 32) + 18 * (32 * 16 * 16) + 18 * (64 * 8 * 8)
    assert measure.reference_flops(model, (1, 3, 32, 32), relu=True) == \
        2 * macs + 2 * bn + 10 + relus


def test_stripe_conv_counts_twice_its_stripe_macs():
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 5, 3, padding=1, bias=False)
    mask = torch.rand(5, 3, 3) > 0.5
    mask[0, 1, 1] = True
    stripe = StripeConv2d.from_dense(dense, mask)
    stripe.use_native = False  # the count, not the kernel, is under test
    x = torch.randn(2, 6, 10, 10)
    assert measure.reference_flops(stripe, x) == 2 * 2 * int(mask.sum()) * 6 * 10 * 10


def test_training_flag_restored_and_pruned_below_dense():
    model = Small().train()
    before = measure.reference_flops(model, (1, 3, 16, 16))
    assert model.training
    model.conv2 = nn.Conv2d(8, 2, 3, stride=2, padding=1, bias=False)
    model.fc = nn.Linear(2, 5)
    assert measure.reference_flops(model, (1, 3, 16, 16)) < before
