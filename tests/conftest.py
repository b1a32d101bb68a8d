"""Shared fixtures for the pruning tests (test_graph, test_prune_api, test_torchvision_pruning).

The central check is the *equivalence recipe*: physically removing channels must compute
exactly what the unpruned model computes once the removed channels are zeroed
(``prunekit.zero_removed_channels``). The fixtures return plain functions and are
session-scoped so they also work inside Hypothesis tests.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import prunekit


# ---------------------------------------------------------------- shared test models and data
# Imported by the test modules (``from conftest import ...``: pytest puts tests/ on sys.path).
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "cifar10").exists(),
                                  reason=f"shared data not found at {SHARED}")


class TinyNet(nn.Module):
    """conv-BN-ReLU twice, global pooling, a linear classifier: a CNN in miniature."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def tiny_data(n=32, size=8, seed=0, classes=4):
    """``n`` random ``3 x size x size`` images with labels in ``[0, classes)``."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g),
                         torch.randint(0, classes, (n,), generator=g))


@dataclass
class PruneCheck:
    """What :func:`prune_and_compare` did: the result and the outputs it compared."""

    result: prunekit.PruningResult
    pruned: nn.Module          # the model after physical pruning (the one passed in)
    reference: nn.Module       # a copy of the original with the removed channels zeroed
    graph: prunekit.ChannelGraph  # the graph of the reference (built from the original)
    before: torch.Tensor       # output of the original model
    after: torch.Tensor        # output of the pruned model
    zeroed: torch.Tensor       # output of the zeroed reference


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a channel whose BN shift or
    statistics were not removed/zeroed consistently changes the output."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.running_mean is not None:
                    uniform(mod.running_mean, -0.2, 0.2)
                    uniform(mod.running_var, 0.5, 2.0)
                if mod.affine:
                    uniform(mod.weight, 0.5, 1.5)
                    uniform(mod.bias, -0.2, 0.2)
            elif isinstance(mod, (nn.GroupNorm, nn.LayerNorm)) and mod.weight is not None:
                uniform(mod.weight, 0.5, 1.5)
                uniform(mod.bias, -0.2, 0.2)
    return model


def _first_tensor(out):
    """The main output of a model (GoogLeNet/Inception return namedtuples in training)."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def _assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor, what: str = ""):
    scale = max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: pruned model != zeroed reference "
                                             f"(output scale {scale:.3g})\n{m}")


def _assert_matches_zeroed(check: "PruneCheck", what: str, shapes_only: bool = False) -> None:
    """The pruned model computes what the zeroed reference computes (or, ``shapes_only``,
    has its shape and is finite), and pruning really changed the function."""
    if shapes_only:
        assert check.after.shape == check.zeroed.shape
        assert torch.isfinite(check.after).all()
        return
    _assert_outputs_close(check.after, check.zeroed, what)
    # and the pruning really changed the function (the check above is not vacuous)
    assert not torch.allclose(check.after, check.before, rtol=1e-3, atol=1e-4 * float(
        check.before.abs().max())), f"{what}: pruning left the outputs unchanged"


def _prune_and_compare(model: nn.Module, x: torch.Tensor, *, ignore=(), criterion="random",
                       compare_values: bool = True, randomize: bool = True, seed: int = 0,
                       **prune_kwargs) -> PruneCheck:
    """Prune ``model`` in place on ``x[:1]`` and check it against the zeroed reference on ``x``.

    ``compare_values=False`` compares shapes only (models normalising over channels with
    LayerNorm/GroupNorm: zeroing a channel still changes the statistics).
    """
    model.eval()
    if randomize:
        _randomize_norms(model, seed)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        before = _first_tensor(model(x))
    if "ratio" not in prune_kwargs and "ratios" not in prune_kwargs \
            and "macs_reduction" not in prune_kwargs and "plan" not in prune_kwargs:
        prune_kwargs["ratio"] = 0.5
    result = prunekit.prune(model, x[:1], criterion=criterion, ignore=ignore, **prune_kwargs)
    ignore_names = [n if isinstance(n, str) else _name_in(ref, model, n) for n in ignore]
    graph = prunekit.build_graph(ref, x[:1], ignore=ignore_names,
                                 leaf_modules=prune_kwargs.get("leaf_modules", ()))
    prunekit.zero_removed_channels(ref, graph, result.plan)
    model.eval()
    with torch.no_grad():
        after = _first_tensor(model(x))
        zeroed = _first_tensor(ref(x))
    assert after.shape == before.shape == zeroed.shape
    if compare_values:
        _assert_outputs_close(after, zeroed, type(model).__name__)
    return PruneCheck(result, model, ref, graph, before, after, zeroed)


def _name_in(ref, model, module):
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise AssertionError("ignored module is not part of the model")


def _assert_module_metadata(model: nn.Module) -> None:
    """Bookkeeping attributes of every layer agree with its (sliced) tensors."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            assert mod.in_channels % mod.groups == 0 and mod.out_channels % mod.groups == 0, name
            assert mod.weight.shape[:2] == (mod.out_channels, mod.in_channels // mod.groups), name
            if mod.bias is not None:
                assert mod.bias.shape == (mod.out_channels,), name
        elif isinstance(mod, nn.Linear):
            assert mod.weight.shape == (mod.out_features, mod.in_features), name
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            for t in (mod.weight, mod.bias, mod.running_mean, mod.running_var):
                if t is not None:
                    assert t.shape == (mod.num_features,), name
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            assert tuple(mod.weight.shape) == tuple(mod.normalized_shape), name


@pytest.fixture(scope="session")
def assert_module_metadata():
    """``assert_module_metadata(model)``: conv/linear/BN attributes match tensor shapes."""
    return _assert_module_metadata


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one intra-op thread, then restore the setting.

    These tests run many small convolutions and much Python (tracing, rules); one thread is
    as fast on an idle machine and far faster on a busy CI runner, where spinning worker
    threads compete for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """prunekit's cache directory (PRUNEKIT_CACHE) inside the test's tmp_path, so cached
    measurements neither come from nor reach the user's cache."""
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def prune_job_options(monkeypatch):
    """The options dict ``prunekit prune`` hands its job, filled by the CLI call; the job
    itself is replaced by one that stops with a PlanError ("stopped by the test": exit 2)."""
    from prunekit.plan import PlanError

    seen: dict = {}

    def fake_run(options):
        seen.update(options)
        raise PlanError("stopped by the test")
    monkeypatch.setattr("prunekit.cli.prune.run_prune", fake_run)
    return seen


@pytest.fixture(scope="session")
def randomize_norms():
    """``randomize_norms(model, seed=0)``: random BN statistics/affine parameters."""
    return _randomize_norms


@pytest.fixture(scope="session")
def prune_and_compare():
    """``prune_and_compare(model, x, ignore=..., ratio=..., ...) -> PruneCheck`` (see above)."""
    return _prune_and_compare


@pytest.fixture
def opened_cifar_splits(monkeypatch) -> list:
    """The CIFAR-10 splits opened during the test, in order (``data.CIFAR10`` spied on)."""
    from prunekit import data
    opened = []
    real = data.CIFAR10.__init__

    def spy(self, root=None, split="test", *args, **kwargs):
        opened.append(split)
        return real(self, root, split, *args, **kwargs)
    monkeypatch.setattr(data.CIFAR10, "__init__", spy)
    return opened


@pytest.fixture(scope="session")
def assert_matches_zeroed():
    """``assert_matches_zeroed(check, what, shapes_only=False)`` (see _assert_matches_zeroed)."""
    return _assert_matches_zeroed


@pytest.fixture(scope="session")
def assert_outputs_close():
    """``assert_outputs_close(actual, expected, what)`` with a tolerance relative to scale."""
    return _assert_outputs_close


class TinyRunData:
    """A method's RunData with tiny random train and val splits (seeds 1 and 2)."""

    def __init__(self, size=8, n=48):
        self.size, self.n = size, n

    def train_set(self):
        return tiny_data(self.n, size=self.size, seed=1)

    def val_set(self):
        return tiny_data(self.n, size=self.size, seed=2)
