"""NativeSequence: consecutive kernel convs of a deployed graph run as one C call. It must give
bit for bit what the convs give one by one (dense and stripe convs, residuals, several shapes
and thread counts), hand every call the convs could not take natively to them, follow weight
changes, never let a returned tensor share memory with another, and survive copies."""
from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import prunekit
from prunekit.deployment import NativeConv2d, NativeSequence, deploy, original_named_modules
from prunekit.deployment.native_sequence import _share_memory, group_native_convs
from prunekit.nn.stripe import stripe_prune_model
from prunekit.nn import stripe_native

pytestmark = [pytest.mark.usefixtures("private_cache"),
              pytest.mark.skipif(stripe_native.library() is None,
                                 reason="the native kernel is unavailable here")]


def _pruned_resnet20(randomize_norms):
    model = randomize_norms(prunekit.models.create("cifar_resnet20")).eval()
    prunekit.prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.4)
    return model


def _stripe_resnet20(randomize_norms):
    model = randomize_norms(prunekit.models.create("cifar_resnet20")).eval()
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(m.out_channels, 3, 3, generator=g) < 0.5
             for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv1"}
    return stripe_prune_model(model, masks)


def _pair(model, x):
    """The model deployed with and without sequences (the same kernel convs)."""
    grouped = deploy(model, x, native_convs=True, channels_last=False)
    alone = deploy(model, x, native_convs=True, channels_last=False, native_sequences=False)
    return grouped, alone


@pytest.mark.parametrize("kind", ["dense", "stripe"])
def test_sequences_give_bitwise_the_convs_results_at_every_shape_and_thread_count(
        randomize_norms, kind):
    make = _pruned_resnet20 if kind == "dense" else _stripe_resnet20
    model = make(randomize_norms)
    grouped, alone = _pair(model, torch.randn(1, 3, 32, 32))
    sequences = [m for m in grouped.modules() if isinstance(m, NativeSequence)]
    assert sequences and not any(isinstance(m, NativeSequence) for m in alone.modules())
    assert sum(len(s.convs) for s in sequences) >= 15  # resnet20's 19 convs, few left alone
    assert any(res is not None for s in sequences for _, res in s.wiring)  # residuals fused
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            for threads, shape in ((1, (1, 3, 32, 32)), (2, (1, 3, 32, 32)),
                                   (2, (5, 3, 32, 32)), (1, (3, 3, 20, 24))):
                torch.set_num_threads(threads)
                x = torch.randn(shape)
                assert torch.equal(grouped(x), alone(x))
                torch.testing.assert_close(grouped(x), model(x), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)
    programs = sequences[0]._programs  # one per (shapes, threads), each run natively
    assert len(programs) >= 3 and all(program is not None for _, program in programs.values())


def test_calls_the_kernel_cannot_take_go_to_the_convs_one_by_one(randomize_norms):
    model = _pruned_resnet20(randomize_norms)
    grouped, _ = _pair(model, torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    # autograd: gradients reach the input through the plain convs
    xg = x.clone().requires_grad_(True)
    grouped.requires_grad_(True)
    out = grouped(xg)
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-4)
    grouped.requires_grad_(False)
    # one conv switched to torch: the whole run falls back, the result is unchanged
    conv = next(m for m in grouped.modules() if isinstance(m, NativeConv2d))
    conv.use_native = False
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), want, rtol=1e-4, atol=1e-4)
    conv.use_native = True
    # another dtype and a channels_last input
    with torch.no_grad():
        torch.testing.assert_close(grouped.double()(x.double()), want.double(),
                                   rtol=1e-4, atol=1e-4)
        grouped.float()
        torch.testing.assert_close(grouped(x.to(memory_format=torch.channels_last)), want,
                                   rtol=1e-4, atol=1e-4)
    # a wrong input: the conv's own error, not a read past the input, at every call (the
    # second finds these shapes already marked as not plannable)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="channels"):
            with torch.no_grad():
                grouped(torch.randn(1, 4, 32, 32))


def test_a_weight_changed_in_place_is_used_at_the_next_call(randomize_norms):
    model = _pruned_resnet20(randomize_norms)
    grouped, alone = _pair(model, torch.randn(1, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        first = grouped(x)
        for deployed in (grouped, alone):
            conv = next(m for n, m in original_named_modules(deployed)
                        if n == "layer2.1.conv1")
            conv.weight.mul_(-2.0)
        changed = grouped(x)
        assert not torch.equal(first, changed) and torch.equal(changed, alone(x))


def test_returned_tensors_never_share_memory_and_survive_the_next_call():
    convs = {f"c{k}": NativeConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1), relu=k % 2 == 0,
                                             residual=k == 2).eval() for k in range(4)}
    # x -> c0 -> c1 -> c2(+ c0) -> c3; returns c1, c2 and c3 (c0 is only read inside)
    seq = NativeSequence(convs, [(0, None), (1, None), (2, 1), (3, None)], [2, 3, 4], 1)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        first = seq(x)
        copies = [t.clone() for t in first]
        y0 = convs["c0"](x)
        y1 = convs["c1"](y0)
        y2 = convs["c2"](y1, y0)
        want = (y1, y2, convs["c3"](y2))
        second = seq(torch.randn(2, 4, 9, 9))
    assert seq._programs and all(program is not None  # the kernel ran
                                 for _, program in seq._programs.values())
    for got, kept, expected in zip(first, copies, want):
        assert torch.equal(got, kept) and torch.equal(got, expected)
    pointers = {t.data_ptr() for t in first + second}
    assert len(pointers) == 6


def test_workspace_reuses_dead_intermediates_but_never_a_steps_own_operands():
    shape = (1, 4, 8, 8)
    wiring = [(0, None), (1, None), (2, None), (3, 1), (4, None)]
    offsets, size = _share_memory(wiring, [5], [shape] * 6, 1)
    assert offsets[5] is None  # the output is a fresh tensor
    assert offsets[2] != offsets[1] and offsets[3] not in (offsets[2],)
    assert offsets[4] not in (offsets[3], offsets[1])  # step 3 reads values 3 and 1
    assert size < 4 * (256 + 16)  # four intermediates in fewer than four slots


def test_threads_calling_one_deployed_model_get_their_own_results(randomize_norms):
    model = _pruned_resnet20(randomize_norms)
    grouped, _ = _pair(model, torch.randn(1, 3, 32, 32))
    inputs = [torch.randn(1, 3, 32, 32) for _ in range(4)]
    with torch.no_grad():
        want = [model(x) for x in inputs]
    got = [None] * len(inputs)

    def work(k):
        with torch.no_grad():
            for _ in range(20):
                got[k] = grouped(inputs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_copies_and_pickles_run_their_own_programs(randomize_norms):
    model = _stripe_resnet20(randomize_norms)
    grouped, _ = _pair(model, torch.randn(1, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = grouped(x)  # plans and programs now exist
        for other in (copy.deepcopy(grouped), pickle.loads(pickle.dumps(grouped))):
            assert torch.equal(other(x), want)
            seq = next(m for m in other.modules() if isinstance(m, NativeSequence))
            assert seq._programs and all(  # built afresh for the copy, run natively
                program is not None for _, program in seq._programs.values())


def test_counts_and_names_see_the_plain_convs(randomize_norms):
    model = _pruned_resnet20(randomize_norms)
    x = torch.randn(1, 3, 32, 32)
    grouped, _ = _pair(model, x)
    assert prunekit.count_macs(grouped, x) == prunekit.count_macs(model, x)
    names = {n for n, m in original_named_modules(grouped) if isinstance(m, NativeConv2d)}
    assert names == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert not any(".convs." in n or n.startswith("native_sequence")
                   for n, _ in original_named_modules(grouped))


def test_grouping_leaves_single_convs_and_other_modules_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    deployed = deploy(model, torch.randn(1, 3, 12, 12), native_convs=True,
                      channels_last=False)
    # conv + ReLU fused, then one conv: two kernel convs in a row -> one sequence
    assert sum(isinstance(m, NativeSequence) for m in deployed.modules()) == 1
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    assert group_native_convs(gm) == []  # a plain conv is not a kernel conv
    with torch.no_grad():
        x = torch.randn(2, 3, 12, 12)
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "stripe"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_batch_runs_in_chunks_of_images_each_through_every_step(
        randomize_norms, kind, threads, monkeypatch):
    """Above batch 1 a sequence runs every step on one chunk of images before the next
    (spread over the threads): each sequence's outputs are, bit for bit, its own on each
    image alone, and the model's output the whole batch's up to float rounding."""
    from prunekit.deployment import native_sequence
    monkeypatch.setattr(native_sequence, "CHUNK_BYTES", 1)  # one image a chunk
    model = (_pruned_resnet20 if kind == "dense" else _stripe_resnet20)(randomize_norms)
    grouped, alone = _pair(model, torch.randn(1, 3, 32, 32))
    sequences = [m for m in grouped.modules() if isinstance(m, NativeSequence)]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, args))
             for m in sequences]
    x = torch.randn(6, 3, 32, 32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = grouped(x)
            for h in hooks:
                h.remove()
            for seq, args in seen.items():
                together = seq(*args)
                alone_images = [seq(*[a[i:i + 1] for a in args]) for i in range(6)]
                for k, out in enumerate(together):
                    assert torch.equal(out, torch.cat([o[k] for o in alone_images]))
            whole = alone(x)
    finally:
        torch.set_num_threads(before)
    programs = [p for s in sequences for _, p in s._programs.values() if p and p.chunk]
    assert len(seen) == len(sequences) >= 2
    assert len(programs) >= 2 and all(p.chunk == 1 for p in programs)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)


def test_chunk_sizes_divide_the_batch_and_fit_the_budget():
    from prunekit.deployment.native_sequence import CHUNK_BYTES, _chunk_images
    image = (16, 32, 32)  # 64 KB an image
    assert _chunk_images(1, [(1, *image)]) is None              # batch 1: nothing to chunk
    per = CHUNK_BYTES // (4 * 16 * 32 * 32)
    assert _chunk_images(64, [(64, *image)]) == min(per, 32)
    assert _chunk_images(7, [(7, *image)]) == 1                 # a prime batch: one image
    assert _chunk_images(64, [(64, 3, 512, 512)]) == 1          # too big even alone: 1
    assert _chunk_images(2, [(2, 1, 4, 4)]) == 1                # never the whole batch
