"""Channel-graph patterns of timm's CNN zoo (issue 16), each in a small hand-written module.

Every pruning is checked against the zeroed reference (``prune_and_compare``): the pruned model
computes what the unpruned one computes with the removed channels zeroed. Patterns prunekit
cannot follow (a channel count used as a number, a constant made inside forward) must keep
their channels, never change the function silently; and a prune that fails after the graph is
built leaves the user's model exactly as it was.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
import prunekit.pruning
from prunekit.graph import GraphError, TraceError
from prunekit.plan import PlanError

pytestmark = pytest.mark.usefixtures("single_thread")


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _fingerprint(model: nn.Module):
    """Everything a failed prune must leave as it was."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()], repr(model),
            sorted(k for m in model.modules() for k in vars(m)))


def _assert_same(model, fingerprint):
    state, modules, text, attrs = _fingerprint(model)
    assert modules == fingerprint[1] and text == fingerprint[2] and attrs == fingerprint[3]
    assert state.keys() == fingerprint[0].keys()
    for k, v in state.items():
        assert v.shape == fingerprint[0][k].shape and torch.equal(v, fingerprint[0][k]), k


def _cbr(cin, cout, k=3, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False, **kw),
                         nn.BatchNorm2d(cout), nn.ReLU())


# ================================================================================================
# nn.Linear / nn.Conv2d subclasses with their own forward (timm's Linear, StdConv2d)
# ================================================================================================
class _FunctionalLinear(nn.Linear):
    """timm's Linear: calls F.linear itself."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _GainConv(nn.Conv2d):
    """A conv subclass with one extra gain per output channel (like ScaledStdConv2d)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.gain, self.bias, self.stride, self.padding)


class _SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16)
        self.conv = _GainConv(16, 24, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.head = _FunctionalLinear(24, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_linear_subclass_head_ignored_keeps_outputs_and_bias(prune_and_compare):
    model = _SubclassNet()
    check = prune_and_compare(model, _x(2, 3, 8, 8), ignore=["head"], ratio=0.5)
    assert model.head.weight.shape == (10, 12) and model.head.bias.shape == (10,)
    assert model.head.out_features == 10 and model.head.in_features == 12
    assert check.after.shape == (2, 10)


def test_conv_subclass_extra_per_channel_tensor_is_sliced(prune_and_compare):
    model = _SubclassNet()
    prune_and_compare(model, _x(2, 3, 8, 8), ignore=["head"], ratio=0.5)
    assert model.conv.weight.shape[0] == 12 and model.conv.gain.shape == (12, 1, 1, 1)


class _OddTensorConv(nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mix = nn.Parameter(torch.eye(self.out_channels))  # no per-channel layout

    def forward(self, x):
        y = super().forward(x)
        return torch.einsum("nchw,dc->ndhw", y, self.mix)


def test_conv_subclass_with_unmappable_tensor_keeps_its_outputs(prune_and_compare):
    model = nn.Sequential(_cbr(3, 8), _OddTensorConv(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    graph = prunekit.build_graph(model.eval(), _x(1, 3, 8, 8))
    group = graph.group("1")
    assert not group.prunable and "cannot map" in " ".join(group.fixed_reasons)
    prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    assert model[1].weight.shape[0] == 8 and model[1].in_channels == 4


# ================================================================================================
# Split attention (ResNeSt): reshape into radix groups, softmax over the radix dimension
# ================================================================================================
class _SplitAttn(nn.Module):
    """timm's SplitAttn with its rSoftMax (radix groups, cardinality ``card``)."""

    def __init__(self, c=8, radix=2, card=1, attn=4):
        super().__init__()
        self.radix, self.card = radix, card
        self.conv = nn.Conv2d(c, c * radix, 3, padding=1, groups=card * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(c * radix)
        self.fc1 = nn.Conv2d(c, attn, 1, groups=card)
        self.bn1 = nn.BatchNorm2d(attn)
        self.fc2 = nn.Conv2d(attn, c * radix, 1, groups=card)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv(x)))
        B, RC, H, W = x.shape
        x = x.reshape((B, self.radix, RC // self.radix, H, W))
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        attn = self.fc2(torch.relu(self.bn1(self.fc1(gap))))
        attn = attn.view(B, self.card, self.radix, -1).transpose(1, 2)
        attn = F.softmax(attn, dim=1).reshape(B, -1).view(B, -1, 1, 1)
        out = (x * attn.reshape((B, self.radix, RC // self.radix, 1, 1))).sum(dim=1)
        return out.contiguous()


@pytest.mark.parametrize("card", [1, 2])
def test_softmax_over_radix_prunes_split_attention(card, prune_and_compare):
    model = nn.Sequential(_cbr(3, 8), _SplitAttn(card=card), nn.Conv2d(8, 4, 1))
    graph = prunekit.build_graph(model.eval(), _x(1, 3, 8, 8))
    assert graph.group("1.conv").prunable and graph.group("1.fc1").prunable
    check = prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    attn = model[1]
    assert attn.conv.out_channels == 8 and attn.fc2.out_channels == 8  # radix 2 x 4
    assert model[2].in_channels == 4
    assert check.result.macs_reduction > 0.4


def test_softmax_over_channels_keeps_them(prune_and_compare):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _cbr(3, 8), nn.Conv2d(8, 8, 1)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(F.softmax(self.b(self.a(x)), dim=1))

    graph = prunekit.build_graph(Net().eval(), _x(1, 3, 8, 8))
    assert graph.group("a.0").prunable
    assert not graph.group("b").prunable
    assert "softmax over channels" in " ".join(graph.group("b").fixed_reasons)
    prune_and_compare(Net(), _x(2, 3, 8, 8), ratio=0.5)


# ================================================================================================
# Selective kernel (SKNet): torch.stack of branch outputs, softmax over the path dimension
# ================================================================================================
class _SelectiveKernel(nn.Module):
    def __init__(self, c=8, paths=2):
        super().__init__()
        self.paths = nn.ModuleList(_cbr(c, c, k) for k in (3, 5)[:paths])
        self.num_paths = paths
        self.fc_reduce = nn.Conv2d(c, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc_select = nn.Conv2d(4, c * paths, 1, bias=False)

    def forward(self, x):
        x = torch.stack([p(x) for p in self.paths], dim=1)
        a = x.sum(1).mean((2, 3), keepdim=True)
        a = self.fc_select(torch.relu(self.bn(self.fc_reduce(a))))
        B, C, H, W = a.shape
        a = torch.softmax(a.view(B, self.num_paths, C // self.num_paths, H, W), dim=1)
        return torch.sum(x * a, dim=1)


def test_stack_of_branches_prunes_selective_kernel(prune_and_compare):
    model = nn.Sequential(_cbr(3, 8), _SelectiveKernel(), nn.Conv2d(8, 4, 1))
    check = prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    sk = model[1]
    assert [p[0].out_channels for p in sk.paths] == [4, 4]
    assert sk.fc_select.out_channels == 8 and model[2].in_channels == 4
    assert check.result.macs_reduction > 0.4


def test_cat_and_stack_of_a_whole_split(prune_and_compare):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _cbr(3, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            parts = self.a(x).chunk(2, dim=1)  # passed on as one value
            return self.b(torch.cat(parts, dim=1) + torch.stack(parts, 1).flatten(1, 2))

    model = Net()
    prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    assert model.a[0].out_channels == 4 and model.b.in_channels == 4


def test_unbind_over_channels_keeps_them():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _cbr(3, 8), nn.Conv2d(8, 3, 1)

        def forward(self, x):
            r, g, b = self.b(self.a(x)).unbind(1)
            return r * g + b

    graph = prunekit.build_graph(Net().eval(), _x(1, 3, 8, 8))
    assert "unbound into single channels" in " ".join(graph.group("b").fixed_reasons)
    assert graph.group("a.0").prunable


# ================================================================================================
# torch.split into an attribute's sizes: MixConv (list), Res2Net (int), FasterNet (one each)
# ================================================================================================
class _MixConv(nn.Module):
    """timm's MixedConv2d: depthwise kernels 3/5/7 over three channel groups."""

    def __init__(self, c=24, kernels=(3, 5, 7)):
        super().__init__()
        self.splits = [c // len(kernels)] * len(kernels)
        self.splits[0] += c - sum(self.splits)
        self.convs = nn.ModuleList(nn.Conv2d(s, s, k, padding=k // 2, groups=s, bias=False)
                                   for s, k in zip(self.splits, kernels))

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1)


class _MixBlock(nn.Module):
    def __init__(self, mixed: bool, c=26, cin=3):
        super().__init__()
        self.pw = _cbr(cin, c, 1)
        self.dw = _MixConv(c) if mixed else nn.Conv2d(c, c, 5, padding=2, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pwl = nn.Conv2d(c, 8, 1)

    def forward(self, x):
        return self.pwl(torch.relu(self.bn(self.dw(self.pw(x)))))


def test_mixconv_split_sizes_follow_the_pruning(prune_and_compare):
    model = _MixBlock(mixed=True)
    x = _x(2, 3, 16, 16)
    check = prune_and_compare(model, x, ratio=0.5, criterion="l1")
    splits = model.dw.splits
    # each piece is a group of its own: half of each goes
    assert splits == [5, 4, 4] and sum(splits) == model.pw[0].out_channels
    assert [c.in_channels for c in model.dw.convs] == splits
    # as much goes as from the same block with one plain depthwise conv
    plain = prune_and_compare(_MixBlock(mixed=False), x, ratio=0.5, criterion="l1")
    assert abs(check.result.macs_reduction - plain.result.macs_reduction) < 0.08
    assert check.result.macs_reduction > 0.45


def test_mixconv_plan_emptying_a_piece_is_refused_and_model_unchanged():
    model = _MixBlock(mixed=True).eval()
    x = _x(1, 3, 16, 16)
    group = prunekit.build_graph(model, x).group("pw.0")
    before = _fingerprint(model)
    assert group.size == 10  # the first piece
    with pytest.raises(PlanError, match="keep at least one") as err:
        prunekit.prune(model, x, plan={group.name: []})
    assert "the model was left unchanged" in str(err.value)
    _assert_same(model, before)


def test_split_into_literal_sizes_not_an_attribute_keeps_the_channels(prune_and_compare):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = _cbr(3, 8), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            left, right = torch.split(self.a(x), [4, 4], 1)
            return self.c(torch.cat([self.b(left), right], 1))

    graph = prunekit.build_graph(Net().eval(), _x(1, 3, 8, 8))
    assert not graph.group("a.0").prunable
    assert "no attribute of its module" in " ".join(graph.group("a.0").fixed_reasons)
    prune_and_compare(Net(), _x(2, 3, 8, 8), ratio=0.5)


class _Res2Split(nn.Module):
    """Res2Net: torch.split(x, self.width, 1) into equal pieces, hierarchical adds."""

    def __init__(self, width=6, scale=3):
        super().__init__()
        self.width = width
        self.conv1 = _cbr(3, width * scale, 1)
        self.convs = nn.ModuleList(_cbr(width, width) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(width * scale, 8, 1)

    def forward(self, x):
        spx = torch.split(self.conv1(x), self.width, 1)
        out, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = conv(sp)
            out.append(sp)
        out.append(spx[-1])
        return self.conv3(torch.cat(out, 1))


def test_res2net_int_split_width_follows_the_pruning(prune_and_compare):
    model = _Res2Split()
    check = prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    assert model.width == 3 and model.conv1[0].out_channels == 9
    assert model.conv3.in_channels == 9
    assert check.result.macs_reduction > 0.5


class _PartialConv(nn.Module):
    """FasterNet: split into [self.dim_conv3, self.dim_untouched], conv the first part only."""

    def __init__(self, dim=16, n_div=4):
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.dim_untouched = dim - self.dim_conv3
        self.partial = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, padding=1, bias=False)

    def forward(self, x):
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial(x1), x2), 1)


def test_split_with_one_attribute_per_piece(prune_and_compare):
    model = nn.Sequential(_cbr(3, 16), _PartialConv(), nn.Conv2d(16, 4, 1))
    prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    pconv = model[1]
    assert pconv.dim_conv3 + pconv.dim_untouched == model[0][0].out_channels == 8
    assert pconv.partial.in_channels == pconv.dim_conv3 >= 1


# ================================================================================================
# ConvNeXt (timm): LayerNorm2d, NHWC LayerNorm + Linear MLP, layer scale gamma
# ================================================================================================
class _LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.fc2(F.gelu(self.fc1(self.norm(x)))).permute(0, 3, 1, 2)
        return x.mul(self.gamma.reshape(1, -1, 1, 1)) + shortcut


class _ConvNeXt(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 2, stride=2), _LayerNorm2d(c))
        self.blocks = nn.Sequential(_ConvNeXtBlock(c), _ConvNeXtBlock(c))
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(self.norm(x.mean((2, 3))))


def test_convnext_mlp_hidden_prunes_exactly(prune_and_compare):
    """The MLP's hidden channels are not normalised: pruning them is exact."""
    model = _ConvNeXt()
    check = prune_and_compare(model, _x(2, 3, 16, 16), ratios={"blocks.*.fc1": 0.5},
                              ignore=["fc"])
    assert [b.fc1.out_features for b in model.blocks] == [16, 16]
    assert [b.fc2.in_features for b in model.blocks] == [16, 16]
    assert check.result.macs_reduction > 0.2


def test_convnext_stream_prunes_with_layer_norms(prune_and_compare):
    model = _ConvNeXt()
    # LayerNorm over channels: a zeroed channel still counts in the statistics, so only the
    # shapes can be compared (as for torchvision's ConvNeXt).
    check = prune_and_compare(model, _x(2, 3, 16, 16), ratio=0.5, ignore=["fc"],
                              compare_values=False)
    assert model.stem[1].normalized_shape == (4,) and model.stem[1].weight.shape == (4,)
    assert [b.gamma.shape for b in model.blocks] == [(4,), (4,)]
    assert model.norm.normalized_shape == (4,) and model.fc.in_features == 4
    assert check.result.macs_reduction > 0.6


# ================================================================================================
# Channel counts used as numbers, constants made inside forward: kept, never silently changed
# ================================================================================================
class _CountNet(nn.Module):
    """``use(x)`` reads the channel count of conv ``b``'s output; ``a`` is free to prune."""

    def __init__(self, use):
        super().__init__()
        self.use = use
        self.a, self.b = _cbr(3, 8), _cbr(8, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.use(self.b(self.a(x))))


COUNT_USES = {
    "divide by shape[1]": lambda x: x / x.shape[1],
    "times sqrt(size(1))": lambda x: x * math.sqrt(x.size(1)),
    "size()[1]": lambda x: x - x.size()[1],
    "numel": lambda x: x * (x.numel() / 1000),
    "arange made in forward": lambda x: x + torch.arange(16.).view(1, 16, 1, 1),
    "ones(C) made in forward": lambda x: x * torch.ones(x.shape[1]).view(1, -1, 1, 1).cumsum(1),
}


@pytest.mark.parametrize("use", list(COUNT_USES), ids=list(COUNT_USES))
def test_channel_count_or_constant_keeps_those_channels(use, prune_and_compare):
    model = _CountNet(COUNT_USES[use])
    graph = prunekit.build_graph(model.eval(), _x(1, 3, 8, 8))
    fixed = graph.group("b.0")
    assert not fixed.prunable, use
    assert any(w in " ".join(fixed.fixed_reasons) for w in ("channel count", "constant")), \
        fixed.fixed_reasons
    assert graph.group("a.0").prunable
    prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)  # pruned == masked original
    assert model.b[0].out_channels == 16 and model.a[0].out_channels == 4
    assert not [k for k in vars(model) if k.startswith("_tensor_constant")]


def test_channel_count_used_as_a_size_stays_prunable(prune_and_compare):
    model = _CountNet(lambda x: x.reshape(x.shape[0], x.shape[1], -1).softmax(-1).view_as(x))
    assert prunekit.build_graph(model.eval(), _x(1, 3, 8, 8)).group("b.0").prunable
    prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    assert model.b[0].out_channels == 8


def test_constant_made_in_forward_leaves_model_unchanged():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _cbr(3, 16), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.b(self.a(x) + torch.arange(16.).view(1, 16, 1, 1))

    model = Net().eval()
    x = _x(1, 3, 8, 8)
    before = _fingerprint(model)
    prunekit.build_graph(model, x)
    _assert_same(model, before)  # no stray _tensor_constant0 from fx
    with pytest.raises(PlanError, match="no prunable channel group") as err:
        prunekit.prune(model, x, ratio=0.5)
    assert "the model was left unchanged" in str(err.value)
    _assert_same(model, before)
    assert "constant made inside forward" in prunekit.build_graph(model, x).explain()


def test_registered_buffer_is_sliced_while_forward_constant_is_kept(prune_and_compare):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _cbr(3, 8), _cbr(8, 16)
            self.head = nn.Conv2d(16, 4, 1)
            self.register_buffer("offset", torch.arange(8.).view(1, 8, 1, 1))

        def forward(self, x):
            x = self.a(x) + self.offset
            return self.head(self.b(x) * torch.linspace(0.5, 1.5, 16).view(1, 16, 1, 1))

    model = Net()
    check = prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    kept = check.result.plan["a.0"]
    assert model.offset.shape == (1, 4, 1, 1)
    assert model.offset.reshape(-1).tolist() == [float(i) for i in kept]
    assert "b.0" not in check.result.plan and model.b[0].out_channels == 16


# ================================================================================================
# Other timm patterns: global-context matmul, ECA's conv over channels, BlurPool's groups,
# shape-dependent branches, ignoring a module that is traced through
# ================================================================================================
class _GlobalContext(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv_attn = nn.Conv2d(c, 1, 1)
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        attn = F.softmax(self.conv_attn(x).reshape(B, 1, H * W), dim=-1).unsqueeze(3)
        context = (x.reshape(B, C, H * W).unsqueeze(1) @ attn).view(B, C, 1, 1)
        return x + self.fc(context)


class _Eca(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * y.view(x.shape[0], -1, 1, 1).sigmoid().expand_as(x)


class _BlurPool(nn.Module):
    """timm's BlurPool2d: F.conv2d(x, self.filt, groups=self.channels)."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", torch.rand(channels, 1, 3, 3))

    def forward(self, x):
        return F.conv2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), self.filt, stride=2,
                        groups=self.channels)


def test_global_context_matmul(prune_and_compare):
    model = nn.Sequential(_cbr(3, 8), _GlobalContext(), nn.Conv2d(8, 4, 1))
    check = prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    assert model[1].fc.out_channels == 4 and model[1].conv_attn.out_channels == 1
    assert check.result.macs_reduction > 0.3


def test_eca_conv_over_channels_keeps_them(prune_and_compare):
    model = nn.Sequential(_cbr(3, 8), _cbr(8, 8), _Eca(), nn.Conv2d(8, 4, 1))
    graph = prunekit.build_graph(model.eval(), _x(1, 3, 8, 8))
    assert not graph.group("1.0").prunable and graph.group("0.0").prunable
    assert "slides over them" in " ".join(graph.group("1.0").fixed_reasons)
    prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    assert model[1][0].in_channels == 4 and model[1][0].out_channels == 8


def test_blurpool_groups_attribute_follows_the_pruning(prune_and_compare):
    model = nn.Sequential(_cbr(3, 8), _BlurPool(8), nn.Conv2d(8, 4, 1))
    prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    assert model[1].channels == 4 and model[1].filt.shape == (4, 1, 3, 3)


def test_shape_dependent_branch_follows_the_example_input(prune_and_compare):
    class PoolIfLarge(nn.Module):
        def forward(self, x):
            if x.shape[-1] > 4:
                x = F.max_pool2d(x, 2)
            return x

    model = nn.Sequential(_cbr(3, 8), PoolIfLarge(), nn.Conv2d(8, 4, 1))
    check = prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    assert check.after.shape == (2, 4, 4, 4) and model[0][0].out_channels == 4

    class SignGate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # values, not shapes: still refused

    with pytest.raises(TraceError, match="data-dependent control flow"):
        prunekit.build_graph(nn.Sequential(_cbr(3, 8), SignGate()), _x(1, 3, 8, 8))


def test_ignoring_a_traced_through_module_keeps_its_outputs(prune_and_compare):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _cbr(3, 8), _cbr(8, 8)

        def forward(self, x):
            return self.b(self.a(x))

    model = nn.Sequential(Block(), _cbr(8, 8), nn.Conv2d(8, 4, 1))
    prune_and_compare(model, _x(2, 3, 8, 8), ignore=["0"], ratio=0.5)
    assert model[0].b[0].out_channels == 8 and model[0].a[0].out_channels == 4
    assert model[1][0].out_channels == 4


class _Attention(nn.Module):
    """Spatial self-attention over a conv feature map with F.scaled_dot_product_attention."""

    def __init__(self, c=8, d=4, scale=None):
        super().__init__()
        self.q, self.k, self.v = nn.Conv2d(c, d, 1), nn.Conv2d(c, d, 1), nn.Conv2d(c, 6, 1)
        self.proj = nn.Conv2d(6, c, 1)
        self.scale = scale

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = (f(x).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return x + self.proj(out.transpose(1, 2).reshape(B, -1, H, W))


@pytest.mark.parametrize("scale", [None, 0.5])
def test_scaled_dot_product_attention(scale, prune_and_compare):
    model = nn.Sequential(_cbr(3, 8), _Attention(scale=scale), nn.Conv2d(8, 4, 1))
    graph = prunekit.build_graph(model.eval(), _x(1, 3, 4, 4))
    qk = graph.group("1.q")
    assert graph.group("1.k") is qk  # paired along the contracted dimension
    assert qk.prunable == (scale is not None)
    if scale is None:
        assert "default scale" in " ".join(qk.fixed_reasons)
    assert graph.group("1.v").prunable
    prune_and_compare(model, _x(2, 3, 4, 4), ratio=0.5)
    assert model[1].v.out_channels == 3 and model[1].proj.in_channels == 3
    assert model[1].q.out_channels == (4 if scale is None else 2)


def test_reshape_sized_by_other_channels_keeps_both():
    class Net(nn.Module):
        """EdgeNeXt's XCA: the block output is reshaped with the block input's count."""

        def __init__(self):
            super().__init__()
            self.a, self.b = _cbr(3, 8), nn.Conv2d(8, 8, 1)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.a(x)
            B, C, H, W = x.shape
            y = self.b(x).flatten(2)  # (B, 8, HW): other channels than x's
            return self.head(y.reshape(B, C, H, W))

    graph = prunekit.build_graph(Net().eval(), _x(1, 3, 4, 4))
    for name in ("a.0", "b"):
        assert not graph.group(name).prunable, name
        assert "sized by the count of other channels" in " ".join(graph.group(name).fixed_reasons)
    model = Net().eval()
    before = _fingerprint(model)
    with pytest.raises(PlanError, match="no prunable channel group"):  # not a crash
        prunekit.prune(model, _x(1, 3, 4, 4), ratio=0.5)
    _assert_same(model, before)


def test_global_response_norm_and_pow(prune_and_compare):
    class Grn(nn.Module):
        """ConvNeXt-V2's GRN (NCHW here) after a squared ReLU (StarReLU-like)."""

        def __init__(self, c=8):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 1)
            self.weight, self.bias = nn.Parameter(torch.rand(1, c, 1, 1)), nn.Parameter(
                torch.rand(1, c, 1, 1))

        def forward(self, x):
            x = torch.relu(self.conv(x)) ** 2
            gx = x.norm(p=2, dim=(2, 3), keepdim=True)
            nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
            return torch.addcmul(self.bias + x, self.weight, x * nx)

    model = nn.Sequential(_cbr(3, 8), Grn(), nn.Conv2d(8, 4, 1))
    graph = prunekit.build_graph(model.eval(), _x(1, 3, 4, 4))
    assert graph.group("0.0").prunable
    assert "reduced over channels" in " ".join(graph.group("1.conv").fixed_reasons)
    prune_and_compare(model, _x(2, 3, 4, 4), ratio=0.5)
    assert model[1].conv.in_channels == 4 and model[1].conv.out_channels == 8


# ================================================================================================
# prune() is transactional
# ================================================================================================
def _resnetish():
    torch.manual_seed(0)
    return nn.Sequential(_cbr(3, 8), _BlurPool(8), _cbr(8, 12), nn.Flatten(1),
                         nn.Linear(12 * 8 * 8, 3)).eval()


@pytest.mark.parametrize("step", ["count_macs", "apply_plan"])
def test_prune_failing_after_the_graph_restores_the_model(step, monkeypatch):
    model = _resnetish()
    x = _x(1, 3, 16, 16)
    before = _fingerprint(model)
    real = getattr(prunekit.pruning, step)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if step == "apply_plan":
            real(*args, **kwargs)  # the model is modified, then something fails
            raise RuntimeError("boom after surgery")
        if len(calls) == 2:  # the count after surgery
            raise RuntimeError("boom while counting")
        return real(*args, **kwargs)

    monkeypatch.setattr(prunekit.pruning, step, failing)
    with pytest.raises(GraphError) as err:
        prunekit.prune(model, x, ratio=0.5, ignore=["4"])
    msg = str(err.value)
    assert "boom" in msg and "the model was left unchanged" in msg
    assert isinstance(err.value.__cause__, RuntimeError)
    _assert_same(model, before)
    assert model[1].channels == 8
    with torch.no_grad():  # and it still runs as before
        assert model(x).shape == (1, 3)


def test_prune_restores_attributes_and_modules_exactly(monkeypatch):
    model = _resnetish()
    x = _x(1, 3, 16, 16)
    reference = copy.deepcopy(model)
    shapes = iter([[(1, 3)], [(1, 2)]])  # as if surgery had changed the output
    monkeypatch.setattr(prunekit.pruning, "_output_shapes", lambda model, inputs: next(shapes))
    with pytest.raises(GraphError, match="outputs have shapes") as err:
        prunekit.prune(model, x, ratio=0.5, ignore=["4"])
    assert "the model was left unchanged" in str(err.value)
    for (n1, m1), (n2, m2) in zip(model.named_modules(), reference.named_modules()):
        assert n1 == n2 and type(m1) is type(m2)
        plain = {k: v for k, v in vars(m1).items() if not isinstance(v, (dict, torch.Tensor))}
        ref = {k: v for k, v in vars(m2).items() if not isinstance(v, (dict, torch.Tensor))}
        assert plain == ref, n1
    for (k, v), (k2, v2) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_successful_prune_keeps_attributes_it_rewrote(prune_and_compare):
    model = _resnetish()
    check = prune_and_compare(model, _x(2, 3, 16, 16), ratio=0.5, ignore=["4"])
    assert check.result.macs_reduction > 0.4
    assert model[1].channels == 4 and model[2][0].in_channels == 4
