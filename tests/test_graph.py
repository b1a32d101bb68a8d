"""The channel dependency graph (prunekit.graph) and the physical surgery it drives.

Every pruning here is checked against the *zeroed reference*: the unpruned model with the
removed channels zeroed by ``prunekit.zero_removed_channels`` must compute exactly what the
physically pruned model computes (eval mode, random BN statistics).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit
from prunekit.criteria import RandomCriterion
from prunekit.graph import TraceError, UnsupportedOpError, register_function_rule
from prunekit.graph import register_module_rule
from prunekit.graph.registry import FUNCTION_RULES, LEAF_TYPES, MODULE_RULES
from prunekit.models.cifar_resnet import ZeroPadShortcut
from prunekit.plan import keep_count


pytestmark = pytest.mark.usefixtures("single_thread")


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ================================================================================================
# CIFAR ResNet-56 with the three shortcut options
# ================================================================================================
X32 = _x(2, 3, 32, 32)


def _resnet56(shortcut):
    torch.manual_seed(0)
    return prunekit.models.create("cifar_resnet56", shortcut=shortcut).eval()


MID_GROUPS = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)]
STAGE_GROUPS = {"conv1": 16, "layer2.0.conv2": 32, "layer3.0.conv2": 64}  # residual streams


@pytest.mark.parametrize("shortcut", ["A", "A_append", "B"])
def test_resnet56_groups(shortcut):
    """All three shortcuts give 27 + 3 + 1 groups:

    * the 27 conv1 outputs (inside the blocks) are independent groups;
    * each stage's residual stream is one group (16, 32, 64 channels) shared by the stage's
      first producer, every block's conv2/bn2 and every next block's conv1 input. With option
      B the 1x1 projection produces fresh channels, so stages are separate groups naturally.
      With option A the zero-padding shortcut *maps* channels one way: slot ``positions[i]``
      of the new stage carries channel ``i`` of the previous stage, so removing that slot
      requires removing the channel (``graph.requirements``), while the stages are still
      separate groups that prune at their own ratios;
    * the linear head's outputs are the model output: one more, fixed, group.
    """
    graph = prunekit.build_graph(_resnet56(shortcut), X32[:1])
    assert len(graph.groups) == 27 + 3 + 1
    assert len(graph.prunable_groups()) == 30
    names = {g.name for g in graph.groups}
    assert set(MID_GROUPS) <= names and set(STAGE_GROUPS) <= names
    for name in MID_GROUPS:
        g = graph.group(name)
        assert g.size == {"1": 16, "2": 32, "3": 64}[name[5]]
        assert g.prunable and not g.fixed.any()
        assert {m.module for m, _ in g.producers()} == {name}
    for name, size in STAGE_GROUPS.items():
        g = graph.group(name)
        assert g.size == size and g.prunable and not g.fixed.any()
    stage = {s: graph.group(n) for s, n in zip((1, 2, 3), STAGE_GROUPS)}
    # every block's conv2 writes its stage's stream; found from any producing module
    for s in (1, 2, 3):
        producers = {m.module for m, _ in stage[s].producers()}
        assert {f"layer{s}.{b}.conv2" for b in range(9)} <= producers
        assert graph.group(f"layer{s}.8.conv2") is stage[s]
    if shortcut == "B":
        assert graph.group("layer2.0.shortcut.0") is stage[2]
        assert graph.group("layer3.0.shortcut.0") is stage[3]
        assert not getattr(graph, "requirements", [])
    else:
        # one requirement per carried channel: 16 into stage 2, 32 into stage 3
        reqs = graph.requirements
        assert len(reqs) == 16 + 32
        pairs = {(graph.groups[ga].name, graph.groups[gb].name) for (ga, _), (gb, _) in reqs}
        assert pairs == {("layer2.0.conv2", "conv1"), ("layer3.0.conv2", "layer2.0.conv2")}
        front = 0 if shortcut == "A_append" else 8
        stage2_slots = sorted(ca for (ga, ca), _ in reqs if ga == stage[2].index)
        assert stage2_slots == list(range(front, front + 16))
    head = graph.group("linear")
    assert head.size == 10 and not head.prunable
    assert head.fixed_reasons == ["model output"]


@pytest.mark.parametrize("shortcut", ["A", "A_append", "B"])
def test_resnet56_prune_matches_zeroed_reference(shortcut, prune_and_compare,
                                                  assert_module_metadata):
    model = _resnet56(shortcut)
    check = prune_and_compare(model, X32, ignore=["linear"], ratio=0.5)
    result = check.result
    assert result.macs_after < result.macs_before
    assert result.params_after < result.params_before
    assert_module_metadata(model)
    for name in MID_GROUPS:
        assert len(result.plan[name]) == result.group_sizes[name] // 2
        assert model.get_submodule(name).out_channels == result.group_sizes[name] // 2
    assert model.linear.out_features == 10


def _shortcut_expectation(graph, plan, module, original_positions):
    """Positions the pruned shortcut must use: each kept input channel keeps its slot,
    renumbered among the kept output slots (computed from the graph's attribute members)."""
    kept = {}
    for attr, roots in zip(graph.state.attr_members, graph.attr_roots):
        if attr.module != module:
            continue
        flags = []
        for r in roots:
            g = next(g for g in graph.groups if int(r) in set(g.channels.tolist()))
            index = int(np.flatnonzero(g.channels == r)[0])
            flags.append(g.name not in plan or index in set(plan[g.name]))
        kept[attr.attr] = [p for p, f in enumerate(flags) if f]
    out_slots = kept["out"]
    assert all(original_positions[i] in out_slots for i in kept["in"]), \
        "a kept input channel lost its output slot"
    return [out_slots.index(original_positions[i]) for i in kept["in"]], len(out_slots)


def _assert_shortcut_semantics(sc):
    """The shortcut puts input channel i at output channel positions[i], zeros elsewhere."""
    z = _x(1, sc.in_channels, 8, 8, seed=5)
    y = sc(z)
    assert y.shape == (1, sc.out_channels, 8 // sc.stride, 8 // sc.stride)
    sub = z[:, :, ::sc.stride, ::sc.stride]
    others = sorted(set(range(sc.out_channels)) - set(sc.positions))
    torch.testing.assert_close(y[:, sc.positions], sub, rtol=0, atol=0)
    assert (y[:, others] == 0).all()
    if sc.front is not None:  # contiguous: a plain F.pad with these widths
        assert sc.positions == list(range(sc.front, sc.front + sc.in_channels))
        assert sc.front + sc.in_channels + sc.back == sc.out_channels


@pytest.mark.parametrize("shortcut", ["A", "A_append"])
def test_option_a_shortcut_follows_the_kept_slots(shortcut, prune_and_compare):
    model = _resnet56(shortcut)
    originals = {s: list(getattr(model, f"layer{s}")[0].shortcut.positions) for s in (2, 3)}
    check = prune_and_compare(model, X32, ignore=["linear"], ratio=0.5, seed=3)
    widths = {s: getattr(model, f"layer{s}")[0].bn2.num_features for s in (1, 2, 3)}
    assert widths == {1: 8, 2: 16, 3: 32}
    for s in (2, 3):
        sc = getattr(model, f"layer{s}")[0].shortcut
        assert isinstance(sc, ZeroPadShortcut)
        positions, out = _shortcut_expectation(check.graph, check.result.plan,
                                               f"layer{s}.0.shortcut", originals[s])
        assert sc.positions == positions
        assert sc.in_channels == widths[s - 1] == len(positions)
        assert sc.out_channels == widths[s] == out
        _assert_shortcut_semantics(sc)


@pytest.mark.parametrize("shortcut", ["A", "A_append"])
def test_option_a_pruning_only_zero_slots_keeps_a_plain_pad(shortcut, prune_and_compare):
    """Remove only zero slots of stage 2 (none that carries a stage-1 channel): the shortcut
    stays a contiguous F.pad whose front/back are the kept zero slots before/after the input."""
    model = _resnet56(shortcut)
    graph = prunekit.build_graph(model, X32[:1])
    stage2 = graph.group("layer2.0.conv2")
    carrying = {ca for (ga, ca), _ in graph.requirements if ga == stage2.index}
    zero_slots = sorted(set(range(32)) - carrying)
    assert len(zero_slots) == 16
    # channel index -> output position of the shortcut (from its "out" attribute member)
    out_roots = next(r for a, r in zip(graph.state.attr_members, graph.attr_roots)
                     if a.module == "layer2.0.shortcut" and a.attr == "out")
    position = {int(np.flatnonzero(stage2.channels == r)[0]): p for p, r in enumerate(out_roots)}
    first_in = min(position[c] for c in carrying)
    before = sorted(c for c in zero_slots if position[c] < first_in)
    after = sorted(c for c in zero_slots if position[c] > first_in)
    drop = set(before[: len(before) // 2]) | set(after[: 3])  # e.g. 4 of 8 front, 3 back
    kept = sorted(set(range(32)) - drop)
    check = prune_and_compare(model, X32, plan={stage2.name: kept})
    sc = model.layer2[0].shortcut
    assert sc.in_channels == 16 and sc.out_channels == 32 - len(drop) == model.layer2[0].bn2.num_features
    assert sc.front == len(before) - len(before) // 2
    assert sc.back == len(after) - 3
    assert sc.front + sc.in_channels + sc.back == sc.out_channels
    _assert_shortcut_semantics(sc)
    assert check.result.macs_after < check.result.macs_before


def test_option_a_plan_removing_a_carrying_slot_alone_is_rejected():
    model = _resnet56("A")
    graph = prunekit.build_graph(model, X32[:1])
    stage2 = graph.group("layer2.0.conv2")
    (_, slot), (_, channel) = next(r for r in graph.requirements if r[0][0] == stage2.index)
    weights = model.layer2[0].conv2.weight.clone()
    with pytest.raises(prunekit.PlanError):
        prunekit.prune(model, X32[:1], plan={stage2.name: [c for c in range(32) if c != slot]})
    assert torch.equal(model.layer2[0].conv2.weight, weights)  # nothing was touched


# ================================================================================================
# Hypothesis: random small CNNs built from supported ops
# ================================================================================================
ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish}


@st.composite
def architectures(draw):
    """A list of op descriptions, tracking the channel count ``c`` and spatial size ``s``."""
    c = draw(st.sampled_from([4, 6, 8, 12]))
    s = size = draw(st.sampled_from([8, 12, 16]))  # input size; s: current spatial size
    ops = [("conv", dict(cin=3, cout=c, k=3, stride=1, pad=1, groups=1, bias=draw(st.booleans())))]
    n_ops = draw(st.integers(2, 9))
    for _ in range(n_ops):
        kind = draw(st.sampled_from(["conv", "bn", "act", "residual", "cat", "chunk", "split",
                                     "shuffle", "se", "pool", "add2", "padchan",
                                     "spatial_attn", "upsample"]))
        # "crop" (x[:, a:b]) is left out until test_literal_channel_slice passes.
        if kind == "conv":
            k = draw(st.sampled_from([1, 3]))
            stride = draw(st.sampled_from([1, 2])) if s >= 6 else 1
            pad = draw(st.sampled_from([0, 1])) if (k == 1 or s >= 6) else 1
            mode = draw(st.sampled_from(["dense", "depthwise", "grouped", "grouped_1x1"]))
            if mode == "depthwise":
                groups, cout = c, c * draw(st.sampled_from([1, 2]))
            elif mode == "grouped" and any(c % g == 0 for g in (2, 4) if g < c):
                # directly on the current tensor: after a cat/chunk/shuffle its blocks may mix
                # channels of several groups
                groups = draw(st.sampled_from([g for g in (2, 4) if c % g == 0 and g < c]))
                cout = groups * draw(st.integers(1, 4))
            elif mode == "grouped_1x1":
                # after a dense 1x1 conv of its own: its input is exactly one channel group
                groups = draw(st.sampled_from([2, 4]))
                width = groups * draw(st.integers(1, 3))
                ops.append(("conv", dict(cin=c, cout=width, k=1, stride=1, pad=0, groups=1,
                                         bias=draw(st.booleans()))))
                c = width
                cout = groups * draw(st.integers(1, 4))
            else:
                groups, cout = 1, draw(st.sampled_from([1, 4, 6, 8, 12]))
            ops.append(("conv", dict(cin=c, cout=cout, k=k, stride=stride, pad=pad,
                                     groups=groups, bias=draw(st.booleans()))))
            c = cout
            s = (s + 2 * pad - k) // stride + 1
        elif kind == "bn":
            ops.append(("bn", dict(c=c)))
        elif kind == "act":
            ops.append(("act", dict(fn=draw(st.sampled_from(sorted(ACTS))))))
        elif kind == "residual":
            ops.append(("residual", dict(c=c, mid=draw(st.sampled_from([2, 4, 8])),
                                         act=draw(st.sampled_from(sorted(ACTS))))))
        elif kind == "cat":
            a, b = draw(st.sampled_from([2, 4, 6])), draw(st.sampled_from([2, 4, 6]))
            ops.append(("cat", dict(cin=c, a=a, b=b)))
            c = a + b
        elif kind in ("chunk", "split") and c % 2 == 0 and c >= 2:
            ops.append((kind, dict(half=c // 2)))
        elif kind == "shuffle" and c % 2 == 0:
            ops.append(("shuffle", dict(groups=draw(st.sampled_from(
                [g for g in (2, 3, 4) if c % g == 0])))))
        elif kind == "se":
            ops.append(("se", dict(c=c, squeeze=draw(st.sampled_from([1, 2, 4])))))
        elif kind == "pool" and s >= 4:
            ops.append(("pool", dict(fn=draw(st.sampled_from(["max", "avg"])))))
            s //= 2
        elif kind == "add2":
            # two convolutions of the same input, summed: their outputs become one group
            cout = draw(st.sampled_from([2, 4, 6]))
            ops.append(("add2", dict(cin=c, cout=cout)))
            c = cout
        elif kind == "padchan":
            # zero channels padded with literal widths in forward (a hand-written option A)
            front, back = draw(st.integers(0, 2)), draw(st.integers(1, 3))
            ops.append(("padchan", dict(front=front, back=back)))
            c += front + back
        elif kind == "crop" and c >= 2:
            # a literal channel slice: the dropped channels are simply never read again
            start = draw(st.integers(0, 1))
            stop = draw(st.integers(start + 1, c))
            ops.append(("crop", dict(start=start, stop=stop)))
            c = stop - start
        elif kind == "spatial_attn":
            # CBAM-style: mean and max over channels -> conv(2 -> 1) -> sigmoid gate
            ops.append(("spatial_attn", dict()))
        elif kind == "upsample" and s <= 8:
            ops.append(("upsample", dict()))
            s *= 2
    head = draw(st.sampled_from(["pool", "flatten", "view_literal"]))
    ops.append(("head", dict(c=c, s=s, kind=head)))
    return ops, size


class _RandomNet(nn.Module):
    """Applies ``ops`` in order; the Python loop over constant descriptions unrolls in fx."""

    def __init__(self, ops):
        super().__init__()
        self.kinds = [kind for kind, _ in ops]
        self.layers = nn.ModuleList()
        for kind, p in ops:
            layer = nn.Module()
            if kind == "conv":
                layer.conv = nn.Conv2d(p["cin"], p["cout"], p["k"], stride=p["stride"],
                                       padding=p["pad"], groups=p["groups"], bias=p["bias"])
            elif kind == "bn":
                layer.bn = nn.BatchNorm2d(p["c"])
            elif kind == "act":
                layer.act = ACTS[p["fn"]]()
            elif kind == "residual":
                layer.conv1 = nn.Conv2d(p["c"], p["mid"], 3, padding=1, bias=False)
                layer.bn1 = nn.BatchNorm2d(p["mid"])
                layer.act = ACTS[p["act"]]()
                layer.conv2 = nn.Conv2d(p["mid"], p["c"], 3, padding=1, bias=False)
                layer.bn2 = nn.BatchNorm2d(p["c"])
            elif kind == "cat":
                layer.a = nn.Conv2d(p["cin"], p["a"], 1)
                layer.b = nn.Conv2d(p["cin"], p["b"], 3, padding=1)
            elif kind in ("chunk", "split"):
                layer.conv = nn.Conv2d(p["half"], p["half"], 1, bias=False)
                layer.bn = nn.BatchNorm2d(p["half"])
                layer.half = p["half"]
            elif kind == "shuffle":
                layer.groups = p["groups"]
            elif kind == "se":
                layer.fc1 = nn.Conv2d(p["c"], p["squeeze"], 1)
                layer.fc2 = nn.Conv2d(p["squeeze"], p["c"], 1)
            elif kind == "pool":
                layer.fn = p["fn"]
            elif kind == "add2":
                layer.a = nn.Conv2d(p["cin"], p["cout"], 1, bias=False)
                layer.b = nn.Conv2d(p["cin"], p["cout"], 3, padding=1)
            elif kind == "padchan":
                layer.widths = (0, 0, 0, 0, p["front"], p["back"])
            elif kind == "crop":
                layer.start, layer.stop = p["start"], p["stop"]
            elif kind == "spatial_attn":
                layer.conv = nn.Conv2d(2, 1, 3, padding=1)
            elif kind == "head":
                # "pool": global average pool; "flatten": torch.flatten of the whole map, so
                # every channel owns s*s input columns of the Linear; "view_literal":
                # x.view(n, c*s*s) with a literal size, which must fix those channels
                layer.kind = p["kind"]
                layer.features = p["c"] * (1 if p["kind"] == "pool" else p["s"] ** 2)
                layer.fc = nn.Linear(layer.features, 3)
            self.layers.append(layer)

    def forward(self, x):
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "conv":
                x = layer.conv(x)
            elif kind == "bn":
                x = layer.bn(x)
            elif kind == "act":
                x = layer.act(x)
            elif kind == "residual":
                x = x + layer.bn2(layer.conv2(layer.act(layer.bn1(layer.conv1(x)))))
            elif kind == "cat":
                x = torch.cat([layer.a(x), layer.b(x)], dim=1)
            elif kind == "chunk":
                a, b = x.chunk(2, dim=1)
                x = torch.cat([a, F.relu(layer.bn(layer.conv(b)))], dim=1)
            elif kind == "split":
                a, b = torch.split(x, layer.half, dim=1)
                x = torch.cat([layer.bn(layer.conv(a)), b], dim=1)
            elif kind == "shuffle":
                n, c, h, w = x.size()
                x = x.view(n, layer.groups, c // layer.groups, h, w)
                x = torch.transpose(x, 1, 2).contiguous()
                x = x.view(n, -1, h, w)
            elif kind == "se":
                scale = F.adaptive_avg_pool2d(x, 1)
                scale = torch.sigmoid(layer.fc2(F.relu(layer.fc1(scale))))
                x = x * scale
            elif kind == "pool":
                x = F.max_pool2d(x, 2) if layer.fn == "max" else F.avg_pool2d(x, 2)
            elif kind == "add2":
                x = layer.a(x) + layer.b(x)
            elif kind == "padchan":
                x = F.pad(x, layer.widths)
            elif kind == "crop":
                x = x[:, layer.start:layer.stop]
            elif kind == "spatial_attn":
                pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], 1)
                x = x * torch.sigmoid(layer.conv(pooled))
            elif kind == "upsample":
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            elif kind == "head":
                if layer.kind == "pool":
                    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
                elif layer.kind == "flatten":
                    x = torch.flatten(x, 1)
                else:
                    x = x.view(x.size(0), layer.features)
                x = layer.fc(x)
        return x


def _conv_op(cin, cout, groups=1, bias=False, k=1):
    return ("conv", dict(cin=cin, cout=cout, k=k, stride=1, pad=k // 2, groups=groups, bias=bias))


# Found by Hypothesis: the second channel shuffle ties all six stream channels into one class,
# whose ids then looked like a broadcast to the residual add after it.
_TWO_SHUFFLES = ([_conv_op(3, 6, k=3), ("shuffle", dict(groups=2)),
                  ("residual", dict(c=6, mid=2, act="hardswish")),
                  ("residual", dict(c=6, mid=2, act="hardswish")), ("shuffle", dict(groups=2)),
                  ("residual", dict(c=6, mid=2, act="hardswish")),
                  _conv_op(6, 1), _conv_op(1, 4), _conv_op(4, 2, bias=True),
                  _conv_op(2, 4, groups=2), ("chunk", dict(half=2)),
                  ("head", dict(c=4, s=8, kind="view_literal"))], 8)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(arch=architectures(), ratio=st.floats(0.0, 0.9, exclude_max=True),
       seed=st.integers(0, 2**16))
@example(arch=_TWO_SHUFFLES, ratio=0.9, seed=245)
def test_random_cnns_prune_like_zeroed_reference(arch, ratio, seed, prune_and_compare,
                                                 assert_module_metadata):
    ops, size = arch
    torch.manual_seed(seed)
    model = _RandomNet(ops)
    x = _x(2, 3, size, size, seed=seed)
    graph = prunekit.build_graph(model, x[:1])
    if ratio > 0 and all(keep_count(g, ratio) == g.size for g in graph.prunable_groups()):
        # Nothing would go (tiny groups round up): refused rather than "pruned" unchanged.
        with pytest.raises(prunekit.plan.PlanError, match="removes no channel"):
            prunekit.prune(model, x[:1], criterion=RandomCriterion(seed), ratio=ratio)
        return
    # A uniform ratio must always give a valid pruning equal to the zeroed reference.
    check = prune_and_compare(model, x, criterion=RandomCriterion(seed), ratio=ratio, seed=seed)
    result = check.result
    assert result.macs_after <= result.macs_before
    assert result.params_after <= result.params_before
    assert check.after.shape == (2, 3)
    assert_module_metadata(model)
    for name, kept in result.plan.items():
        # never empty; may keep all (layers that must stay alive can lock the rest)
        assert 0 < len(kept) <= result.group_sizes[name]
        assert kept == sorted(set(kept))


# ================================================================================================
# Convolution kinds
# ================================================================================================
def test_single_channel_dense_conv_is_not_depthwise(prune_and_compare):
    """groups == 1 == in_channels (a grayscale stem) or out_channels == 1 is a dense conv: its
    outputs are fresh channels and its inputs stay prunable on their own."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),   # in_channels == groups == 1
        nn.ReLU(),
        nn.Conv2d(8, 1, 3, padding=1),   # out_channels == groups == 1
        nn.ReLU(),
        nn.Conv2d(1, 6, 1),              # in_channels == groups == 1 again
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 2),
    )
    x = _x(2, 1, 4, 4)
    graph = prunekit.build_graph(model, x[:1])
    first, squeeze, widen = graph.group("0"), graph.group("2"), graph.group("4")
    assert len({first.name, squeeze.name, widen.name}) == 3
    assert first.size == 8 and first.prunable and not first.fixed.any()
    assert squeeze.size == 1
    assert widen.size == 6
    # flatten into a Linear with a literal in_features is fine: no literal reshape involved
    check = prune_and_compare(model, x, ratio=0.5)
    assert model[0].weight.shape == (4, 1, 3, 3)
    assert model[2].weight.shape == (1, 4, 3, 3)       # input columns pruned independently
    assert model[4].weight.shape[1] == 1
    assert model[0].groups == model[2].groups == model[4].groups == 1
    assert check.result.plan["0"] and "2" not in check.result.plan


def test_grouped_conv_keeps_equal_counts_per_block(prune_and_compare, assert_module_metadata):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    x = _x(2, 3, 8, 8)
    graph = prunekit.build_graph(model, x[:1])
    for name in ("0", "3"):
        g = graph.group(name)
        assert g.blocks, f"group {name} should carry the groups=4 block constraint"
        assert all(sorted(np.bincount(b).tolist()) == [4, 4, 4, 4] for b in g.blocks)
    assert "blocks" in graph.explain()
    check = prune_and_compare(model, x, ratio=0.3)   # 16 - floor(4.8) = 12 -> 3 per block
    plan = check.result.plan
    for name in ("0", "3"):
        g = graph.group(name)
        kept = np.zeros(g.size, dtype=bool)
        kept[plan[name]] = True
        counts = np.bincount(g.blocks[0][kept], minlength=4)
        assert counts.tolist() == [3, 3, 3, 3]
    grouped = model[3]
    assert grouped.groups == 4
    assert grouped.weight.shape == (12, 3, 3, 3)
    assert grouped.in_channels == grouped.out_channels == 12
    assert_module_metadata(model)


def test_grouped_conv_explicit_unequal_plan_is_rejected():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1, groups=2), nn.Flatten())
    x = _x(1, 3, 2, 2)
    graph = prunekit.build_graph(model, x)
    with pytest.raises(prunekit.PlanError, match="block"):
        prunekit.prune(model, x, plan={graph.group("0").name: [0, 1, 2, 4]})


class _CatIntoGroupedConv(nn.Module):
    """A grouped conv over the concatenation of two independently produced tensors: its
    blocks hold channels of two different channel groups."""

    def __init__(self, groups):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.grouped = nn.Conv2d(8, 8, 1, groups=groups)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.grouped(torch.cat([self.a(x), self.b(x)], dim=1)))


# Regression: the block constraint used to be attached only to the first group among the
# grouped conv's inputs; the plan then kept unequal counts per block and surgery raised a
# RuntimeError after part of the model had already been sliced.
@pytest.mark.parametrize("groups, kwargs", [(4, dict(ratio=0.5)), (2, dict(ratios={"a": 0.5}))],
                         ids=["groups4-uniform", "groups2-one-side"])
def test_grouped_conv_over_two_groups(groups, kwargs, prune_and_compare):
    model = _CatIntoGroupedConv(groups).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x(2, 3, 4, 4)
    try:
        prune_and_compare(model, x, **kwargs)
    except prunekit.PlanError:
        # refusing is acceptable, but only before anything was changed
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
        return
    g = model.grouped
    assert g.groups == groups and g.weight.shape[1] * groups == g.in_channels
    assert g.in_channels == model.a.out_channels + model.b.out_channels


class _GroupedPlusDenseResidual(nn.Module):
    """cat([grouped conv, dense conv]) + projection: one channel group in which only the
    grouped conv's half is split into blocks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 4, 1, groups=2)
        self.dense = nn.Conv2d(8, 4, 1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.cat([self.grouped(x), self.dense(x)], dim=1) + self.proj(x))


def test_grouped_channels_mixed_with_free_channels(prune_and_compare):
    model = _GroupedPlusDenseResidual().eval()
    check = prune_and_compare(model, _x(2, 3, 4, 4), ratio=0.5)
    assert model.grouped.groups == 2
    assert model.grouped.out_channels % 2 == 0
    assert check.result.macs_after < check.result.macs_before


class _ShuffleThenGroupedConv(nn.Module):
    """ShuffleNet-v1 style: channel shuffle (2 groups) followed by a grouped 1x1 conv (4)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 1)
        self.grouped = nn.Conv2d(12, 4, 1, groups=4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(self.grouped(x))


class _GroupedConvThenShuffle(nn.Module):
    """A grouped conv (2 groups, 6 outputs) followed by a channel shuffle with 3 groups."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.grouped = nn.Conv2d(4, 6, 1, groups=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.grouped(self.stem(x))
        n, c, h, w = x.size()
        x = x.view(n, 3, c // 3, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(x)


@pytest.mark.parametrize("net", [
    # A shuffle unites channels that lie in different blocks of a grouped conv: no per-block
    # count can hold, so the group stays whole (and the rest of the model prunes).
    pytest.param(_ShuffleThenGroupedConv, id="shuffle-then-grouped"),
    pytest.param(_GroupedConvThenShuffle, id="grouped-then-shuffle"),
])
def test_grouped_conv_and_channel_shuffle(net, prune_and_compare):
    model = net().eval()
    try:
        prune_and_compare(model, _x(2, 3, 4, 4), ratio=0.5)
    except prunekit.PlanError:
        return  # refusing cleanly (before any change) would be acceptable too
    assert model.grouped.groups in (2, 4)


class _TwoShufflesResidual(nn.Module):
    """A stream shuffled twice (2 groups) with a residual block after each shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(4, 6, 3, padding=1))
        self.block2 = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(4, 6, 3, padding=1))
        self.head = nn.Conv2d(6, 3, 1)

    @staticmethod
    def shuffle(x):
        n, c, h, w = x.size()
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)

    def forward(self, x):
        x = self.shuffle(self.stem(x))
        x = self.shuffle(x + self.block1(x))
        return self.head(x + self.block2(x)).mean((2, 3))


def test_two_channel_shuffles_tie_the_stream_and_its_residual_branches(prune_and_compare):
    """The first shuffle pairs channel i with i + 3; the second pairs the paired stream again,
    which ties all six together. The residual branch added after it must then keep its six
    outputs too (it was once pruned alone, and the add failed)."""
    model = _TwoShufflesResidual().eval()
    x = _x(2, 3, 8, 8)
    graph = prunekit.build_graph(model, x[:1])
    stream = graph.group("stem")
    assert stream.fixed.all()
    assert any("must go together" in r for r in stream.fixed_reasons)
    assert graph.group("block2.2") is stream  # the branch's outputs join the stream
    prune_and_compare(model, x, ratio=0.5)
    assert model.stem.out_channels == model.block2[2].out_channels == 6
    assert model.block1[0].out_channels == model.block2[0].out_channels == 2


class _ExpandedGate(nn.Module):
    """A one-channel gate expanded over a conv's channels, to a literal size or to follow."""

    def __init__(self, literal: bool):
        super().__init__()
        self.literal = literal
        self.features = nn.Conv2d(3, 6, 3, padding=1)
        self.gate = nn.Conv2d(3, 1, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y, gate = self.features(x), self.gate(x)
        gate = gate.expand(-1, 6, -1, -1) if self.literal else gate.expand_as(y)
        return self.head(y + gate).mean((2, 3))


def test_expand_to_a_literal_channel_count_fixes_the_channels_it_meets():
    model = _ExpandedGate(literal=True).eval()
    graph = prunekit.build_graph(model, _x(1, 3, 8, 8))
    assert graph.group("features").fixed.all()
    with pytest.raises(prunekit.PlanError, match="removes no channel"):
        prunekit.prune(model, _x(1, 3, 8, 8), ratio=0.5)
    assert model.features.out_channels == 6


def test_expand_as_follows_the_channels_it_meets(prune_and_compare):
    model = _ExpandedGate(literal=False).eval()
    graph = prunekit.build_graph(model, _x(1, 3, 8, 8))
    assert graph.group("features").prunable and not graph.group("features").fixed.any()
    prune_and_compare(model, _x(2, 3, 8, 8), ratio=0.5)
    assert model.features.out_channels == 3 and model.head.in_channels == 3


class _CatResidualIntoGroupedConv(nn.Module):
    """cat([a (2 ch), b (4 ch)]) + proj (6 ch) -> Conv2d(6, 2, groups=2): one group whose
    first block holds both channels of ``a`` and one of ``b``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(4, 2, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.proj = nn.Conv2d(4, 6, 1)
        self.grouped = nn.Conv2d(6, 2, 1, groups=2)
        self.head = nn.Conv2d(2, 2, 1)
        with torch.no_grad():  # l1 ranks b's channels above a's
            self.a.weight.fill_(0.01)
            self.b.weight.fill_(1.0)
            self.proj.weight.fill_(0.1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.grouped(torch.cat([self.a(x), self.b(x)], dim=1) + self.proj(x)))


def test_ratio_on_grouped_blocks_never_empties_a_layer(prune_and_compare):
    model = _CatResidualIntoGroupedConv().eval()
    prune_and_compare(model, _x(2, 3, 4, 4), criterion="l1", ratio=0.75)
    assert model.a.out_channels >= 1
    assert model.grouped.in_channels % 2 == 0


class _UserPadResNet(nn.Module):
    """An option-A block written by hand: ``F.pad`` with literal widths in forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu(y + shortcut)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_user_written_channel_pad_is_fixed(ratio, prune_and_compare):
    model = _UserPadResNet()
    x = _x(2, 3, 16, 16)
    graph = prunekit.build_graph(model, x[:1])
    stream = graph.group("stem")
    assert stream is graph.group("conv2")
    assert stream.size == 16               # 8 stem channels + 8 padded zero slots
    assert int(stream.fixed.sum()) == 8    # the literal widths cannot follow a pruning
    assert stream.prunable
    assert any("pad" in r for r in stream.fixed_reasons)
    assert "fixed" in graph.explain()
    check = prune_and_compare(model, x, criterion="l1", ratio=ratio)
    kept = check.result.plan["stem"]
    assert set(np.flatnonzero(stream.fixed).tolist()) <= set(kept)
    # the stem keeps at least one channel (never emptied), the pad widths are unchanged
    assert 1 <= model.stem.out_channels < 8
    assert model.conv2.out_channels == len(kept)
    assert model.conv2.out_channels == model.stem.out_channels + 8


# Regression: validate_plan used to accept this; surgery then left a conv with 0 outputs and
# count_macs failed with a RuntimeError on the already modified model.
def test_explicit_plan_emptying_a_layer_is_rejected():
    model = _UserPadResNet().eval()
    x = _x(1, 3, 16, 16)
    stream = prunekit.build_graph(model, x).group("stem")
    only_padding = np.flatnonzero(stream.fixed).tolist()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunekit.PlanError, match="empty"):
        prunekit.prune(model, x, plan={stream.name: only_padding})
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


class _LiteralChannelSlice(nn.Module):
    """Reads channels 2..5 of an 8-channel conv output through a literal slice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():  # l1 ranks channels 0, 5, 6, 7 first
            self.conv.weight[[0, 5, 6, 7]] *= 100

    def forward(self, x):
        x = self.conv(x)[:, 2:6]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_literal_channel_slice(prune_and_compare):
    model = _LiteralChannelSlice().eval()
    x = _x(2, 3, 4, 4)
    sliced = set(range(2, 6))
    group = prunekit.build_graph(model, x[:1]).group("conv")
    assert sliced <= set(np.flatnonzero(group.fixed).tolist())
    # Nothing else may go: the prune is refused as a no-op, the model left as it was.
    with pytest.raises(prunekit.plan.PlanError, match="no prunable channel group"):
        prunekit.prune(model, x[:1], criterion="l1", ratio=0.5)
    assert model.fc.in_features == 4 and model.conv.out_channels == 8


# ================================================================================================
# Errors and extension points
# ================================================================================================
class _DataDependentGate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class _NetWithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = _DataDependentGate()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.gate(self.conv(x)))


def test_data_dependent_control_flow_raises_trace_error():
    x = _x(1, 3, 8, 8)
    with pytest.raises(TraceError) as err:
        prunekit.build_graph(_NetWithGate(), x)
    msg = str(err.value)
    assert "_NetWithGate" in msg
    assert "data-dependent control flow" in msg
    assert "leaf_modules" in msg
    assert "register_module_rule" in msg
    assert isinstance(err.value.__cause__, Exception)  # fx's own error is chained
    with pytest.raises(TraceError):
        prunekit.prune(_NetWithGate(), x, ratio=0.5)


# Regression: the module path used to be popped in a `finally`, so the message always said
# "failed inside module '<root>'" and suggested leaf_modules=['<root>'].
def test_trace_error_names_the_failing_submodule():
    with pytest.raises(TraceError) as err:
        prunekit.build_graph(_NetWithGate(), _x(1, 3, 8, 8))
    msg = str(err.value)
    assert "failed inside module 'gate'" in msg
    assert "leaf_modules=['gate']" in msg


def test_trace_error_names_a_nested_submodule_by_its_path():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 3, 1), _NetWithGate())

        def forward(self, x):
            return self.block(x)

    with pytest.raises(TraceError) as err:
        prunekit.build_graph(Outer(), _x(1, 3, 8, 8))
    assert "failed inside module 'block.1.gate'" in str(err.value)


class _GateAtRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            return x
        return -x


def test_trace_error_at_the_root_gives_usable_advice():
    with pytest.raises(TraceError) as err:
        prunekit.build_graph(_GateAtRoot(), _x(1, 3, 8, 8))
    msg = str(err.value)
    assert "_GateAtRoot" in msg
    assert "leaf_modules=['<root>']" not in msg


@pytest.fixture
def scoped_rules():
    """Restore the global rule registries after a test registers its own rules."""
    saved = (dict(FUNCTION_RULES), dict(MODULE_RULES), set(LEAF_TYPES))
    yield
    for registry, old in zip((FUNCTION_RULES, MODULE_RULES), saved[:2]):
        registry.clear()
        registry.update(old)
    LEAF_TYPES.clear()
    LEAF_TYPES.update(saved[2])


def test_leaf_module_with_registered_rule_makes_gate_traceable(scoped_rules, prune_and_compare):
    def gate_rule(ctx, node, module):
        return ctx.ids(node.args[0])   # sign flip per sample: channels pass through unchanged

    register_module_rule(_DataDependentGate, gate_rule)
    model = _NetWithGate()
    x = _x(2, 3, 8, 8)
    graph = prunekit.build_graph(model, x[:1], leaf_modules=["gate"])
    assert graph.group("conv").prunable
    prune_and_compare(model, x, ratio=0.5, leaf_modules=["gate"])
    assert model.conv.out_channels == 4 and model.head.in_channels == 4


class _CumsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.cumsum(self.mid(x), dim=1)   # mixes channels: no built-in rule
        return self.head(x)


def test_op_without_rule_raises_unsupported_op_error(scoped_rules):
    FUNCTION_RULES.pop(torch.cumsum, None)
    x = _x(1, 3, 8, 8)
    with pytest.raises(UnsupportedOpError) as err:
        prunekit.build_graph(_CumsumNet(), x)
    msg = str(err.value)
    assert err.value.node.name in msg and "cumsum" in msg
    assert "register_function_rule" in msg
    with pytest.raises(UnsupportedOpError):
        prunekit.prune(_CumsumNet(), x, ratio=0.5)


def test_registered_function_rule_makes_op_supported(scoped_rules, prune_and_compare):
    @register_function_rule(torch.cumsum)
    def cumsum_rule(ctx, node, module=None):
        ids = ctx.ids(node.args[0])
        ctx.fix(ids, "cumulative sum over channels")  # every channel feeds later ones
        return ids

    model = _CumsumNet()
    x = _x(2, 3, 8, 8)
    graph = prunekit.build_graph(model, x[:1])
    assert not graph.group("mid").prunable
    assert graph.group("conv").prunable
    assert "cumulative sum over channels" in graph.explain()
    prune_and_compare(model, x, ratio=0.5)
    assert model.conv.out_channels == 4
    assert model.mid.in_channels == 4 and model.mid.out_channels == 8


def test_explain_lists_groups_sizes_and_fixed(capsys):
    model = _resnet56("B")
    graph = prunekit.build_graph(model, X32[:1])
    text = graph.explain()
    lines = text.splitlines()
    for g in graph.groups:
        assert any(g.name in line and str(g.size) in line for line in lines), g.name
    assert "fixed" in text and "model output" in text
    printed = prunekit.explain(model, X32[:1])
    assert printed == text
    assert capsys.readouterr().out.strip() == text.strip()


def test_unreached_modules_are_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.unused = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x)

    graph = prunekit.build_graph(Net().eval(), _x(1, 3, 4, 4))
    assert graph.unreached == ["unused"]
    assert "unused" in graph.explain()
