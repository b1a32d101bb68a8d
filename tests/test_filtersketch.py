"""FilterSketch: Frequent Directions against a direct transcription of the reference loop and
Liberty's guarantee, the reference's consumer quirk, the least-squares consumer, and prune()
with the rewrites on a residual net."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from prunekit.criteria import get_criterion
from prunekit.criteria.sketch import FilterSketch, code_consumer_sketch, frequent_directions
from prunekit.errors import ConfigError
from prunekit.plan import PlanTarget, resolve_counts
from prunekit.recipes import load_recipe

pytestmark = pytest.mark.usefixtures("single_thread")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def direct_fd(A: np.ndarray, l: int, early_stop: bool = True) -> np.ndarray:
    """The reference's ``sketch_matrix`` loop (sketch_cifar.py), line for line, in NumPy."""
    B = np.zeros((l, A.shape[1]))
    ind = int(l / 2)
    n = A.shape[0]
    num_nonzero_rows = 0
    for i in range(n):
        if num_nonzero_rows < l:
            B[num_nonzero_rows, :] = A[i, :]
        else:
            if early_stop and n - i < l // 2:
                break
            u, sigma, _ = np.linalg.svd(B.T, full_matrices=False)
            sigma_square_diag = np.diag(sigma * sigma)
            theta = sigma_square_diag[ind]
            sigma_square = sigma_square_diag - np.eye(l) * np.sum(theta)
            sigma_hat = np.sqrt(np.where(sigma_square > 0, sigma_square, 0.0))
            B = sigma_hat @ u.T
            num_nonzero_rows = ind
            B[num_nonzero_rows, :] = A[i, :]
        num_nonzero_rows = num_nonzero_rows + 1
    return B


def same_up_to_row_signs(a: np.ndarray, b: np.ndarray) -> bool:
    """The SVD fixes each singular vector up to its sign (LAPACK's choice)."""
    signs = np.where(np.einsum("ij,ij->i", a, b) < 0, -1.0, 1.0)
    return np.allclose(a, signs[:, None] * b, atol=1e-9)


@pytest.mark.parametrize("n, d, l", [(16, 27, 9), (32, 144, 19), (64, 288, 38), (20, 40, 5),
                                     (12, 30, 1), (10, 30, 10)])
@pytest.mark.parametrize("early_stop", [True, False])
def test_frequent_directions_is_the_reference_loop(n, d, l, early_stop):
    A = np.random.default_rng(n + l).standard_normal((n, d))
    B, used = frequent_directions(torch.from_numpy(A), l, early_stop=early_stop)
    assert same_up_to_row_signs(B.numpy(), direct_fd(A, l, early_stop))
    if not early_stop or l == 1:
        assert used == n
    else:  # the quirk: once full, fewer than l // 2 rows left are never sketched
        assert n - l // 2 < used <= n


@pytest.mark.parametrize("seed", range(6))
def test_the_sketch_keeps_liberty_guarantee(seed):
    rng = np.random.default_rng(seed)
    n, d, l = int(rng.integers(20, 80)), int(rng.integers(30, 120)), int(rng.integers(2, 19))
    A = rng.standard_normal((n, d)) * rng.exponential(size=(n, 1))

    def error(rows, B):
        return np.linalg.norm(rows.T @ rows - B.T @ B, 2), 2 * np.sum(rows ** 2) / l

    B, _ = frequent_directions(torch.from_numpy(A), l, early_stop=False)
    err, bound = error(A, B.numpy())
    assert err <= bound + 1e-9
    B, used = frequent_directions(torch.from_numpy(A), l, early_stop=True)
    err, bound = error(A[:used], B.numpy())  # the guarantee holds for the rows that entered
    assert err <= bound + 1e-9


def test_code_consumer_is_the_references_reshape():
    W2 = torch.randn(16, 16, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    l = 9
    # the reference's three lines: sketch_matrix(W2, l, dim=1), B.view(out, l, k, k), weight_norm
    B = direct_fd(W2.view(W2.size(1), -1).numpy(), l)
    literal = torch.from_numpy(B).view(W2.size(0), l, 3, 3)
    literal = literal / torch.sqrt(torch.sum(literal.pow(2)))
    ours = code_consumer_sketch(W2, l)
    assert ours.shape == (16, 9, 3, 3)
    assert same_up_to_row_signs(ours.reshape(l, -1).numpy(), literal.reshape(l, -1).numpy())
    assert torch.isclose(torch.linalg.vector_norm(ours), torch.tensor(1.0, dtype=torch.float64))
    # the quirk itself: the view's rows are output filters, not input-channel slices
    assert torch.equal(W2.view(16, -1)[1], W2[1].flatten())
    assert not torch.equal(W2.view(16, -1)[1], W2[:, 1].flatten())


class ConvConv(nn.Module):
    """conv -> conv with nothing between: the least-squares consumer is exact here."""

    def __init__(self, rank: int | None = None):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 5, 3, padding=1)
        if rank is not None:  # filters (and biases) in a rank-r row space
            with torch.no_grad():
                rows = torch.randn(16, rank, generator=gen) @ torch.randn(rank, 28, generator=gen)
                self.conv1.weight.copy_(rows[:, :27].view(16, 3, 3, 3))
                self.conv1.bias.copy_(rows[:, 27])

    def forward(self, x):
        return self.conv2(self.conv1(x))


def _pruned_output(model, consumer, **options):
    model = copy.deepcopy(model)
    crit = FilterSketch(consumer=consumer, **options)
    result = prunekit.prune(model, X, criterion=crit, ratio=0.5, ignore=["conv2"])
    return model, result, model(X)


@pytest.mark.parametrize("rank", [3, 8])  # <= floor(l/2): FD loses nothing; <= l: B spans A
@pytest.mark.parametrize("early_stop", [True, False])
def test_project_consumer_is_exact_when_the_sketch_spans_the_filters(early_stop, rank):
    model = ConvConv(rank=rank).eval()
    with torch.no_grad():
        before = model(X)
        pruned, result, after = _pruned_output(model, "project", early_stop=early_stop)
    assert pruned.conv1.out_channels == 8 and result.rewrites[0]["rows"] == 8
    assert (after - before).norm() / before.norm() < 1e-4


def test_project_consumer_is_closer_than_slice():
    model = ConvConv().eval()
    with torch.no_grad():
        before = model(X)
        errors = {c: (_pruned_output(model, c)[2] - before).norm() / before.norm()
                  for c in ("project", "slice", "code")}
    assert errors["project"] < errors["slice"] and errors["project"] < 0.9


def _resnet():
    torch.manual_seed(0)
    return prunekit.models.create("cifar_resnet20").eval()


def test_prune_rewrites_every_inner_conv_of_a_residual_net():
    model = _resnet()
    original = {n: t.detach().clone() for n, t in model.state_dict().items()}
    result = prunekit.prune(model, X, criterion="filtersketch",
                            target=PlanTarget(ratio=0.4, stream_scale=0.0))
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert [r["group"] for r in result.rewrites] == [f"{b}.conv1" for b in blocks]
    assert all(r["applied"] and r["consumers"] == [f"{r['group'][:-5]}conv2.weight"]
               for r in result.rewrites)
    assert model.conv1.out_channels == 16 and model.layer3[2].conv2.out_channels == 64
    for name in blocks:
        block, width = model.get_submodule(name), {"1": 16, "2": 32, "3": 64}[name[5]]
        l = width - int(0.4 * width)
        assert block.conv1.weight.shape == (l, block.conv1.in_channels, 3, 3)
        assert block.conv2.weight.shape == (width, l, 3, 3)
        A = original[f"{name}.conv1.weight"].double().flatten(1)
        B, _ = frequent_directions(A, l)
        B = B / B.norm()
        assert torch.allclose(block.conv1.weight.double().flatten(1), B, atol=1e-6)
        W2 = original[f"{name}.conv2.weight"].double()
        T = A @ torch.linalg.pinv(B)
        projected = torch.einsum("oikl,ij->ojkl", W2, T)
        assert torch.allclose(block.conv2.weight.double(), projected, atol=1e-5)
        assert torch.equal(block.bn1.weight, torch.ones(l))
        assert torch.equal(block.bn1.running_var, torch.ones(l))
        assert torch.equal(block.bn1.running_mean, torch.zeros(l))
        assert torch.equal(block.bn2.weight, original[f"{name}.bn2.weight"])  # copied
    assert torch.isfinite(model(X)).all()


def test_code_consumer_and_the_options_write_what_they_say():
    model = _resnet()
    with torch.no_grad():
        model.layer2[1].bn1.weight.uniform_(0.5, 1.5)
    original = {n: t.detach().clone() for n, t in model.state_dict().items()}
    crit = FilterSketch(consumer="code", unit_frobenius=False, bn_reset=False, early_stop=False)
    result = prunekit.prune(model, X, criterion=crit,
                            target=PlanTarget(ratio=0.4, stream_scale=0.0))
    block = model.layer2[1]
    A = original["layer2.1.conv1.weight"].double().flatten(1)
    assert torch.allclose(block.conv1.weight.double().flatten(1), frequent_directions(
        A, 20, early_stop=False)[0], atol=1e-6)
    expected = code_consumer_sketch(original["layer2.1.conv2.weight"], 20, early_stop=False,
                                    unit_frobenius=False)
    assert torch.allclose(block.conv2.weight.double(), expected, atol=1e-6)
    kept = result.plan["layer2.1.conv1"]  # bn_reset=False: the BN as surgery sliced it
    assert torch.equal(block.bn1.weight, original["layer2.1.bn1.weight"][kept])


def test_streams_are_warned_about_or_refused():
    model = _resnet()
    with pytest.warns(UserWarning, match="residual stream"):
        prunekit.prune(model, X, criterion="filtersketch", ratio=0.4)
    assert model.conv1.out_channels < 16  # the stream lost channels by plain surgery
    model = _resnet()
    weight = model.layer1[0].conv1.weight.detach().clone()
    with pytest.raises(ConfigError, match="stream_scale 0"):
        prunekit.prune(model, X, criterion=FilterSketch(streams="refuse"), ratio=0.4)
    assert torch.equal(model.layer1[0].conv1.weight, weight)  # restored


@pytest.mark.parametrize("options, message", [
    ({"consumer": "lstsq"}, "consumer"), ({"streams": "spare"}, "streams"),
    ({"early_stop": "yes"}, "early_stop"), ({"bn_reset": 1}, "bn_reset"),
    ({"unit_frobenius": None}, "unit_frobenius")])
def test_bad_options_say_which(options, message):
    with pytest.raises(ConfigError, match=message):
        get_criterion("filtersketch", **options)


def test_the_defaults_are_the_codes_except_the_consumer():
    assert repr(get_criterion("filtersketch")) == (
        "FilterSketch(consumer='project', early_stop=True, unit_frobenius=True, bn_reset=True, "
        "streams='warn')")
    assert not FilterSketch.needs_data


def test_the_recipe_keeps_int_0_6_planes_of_every_inner_conv():
    recipe = load_recipe("filtersketch_resnet56")
    assert recipe["finetune"]["milestones"] == [50, 100] and recipe["finetune"]["epochs"] == 150
    get_criterion(recipe["criterion"]["name"], **recipe["criterion"]["options"])
    model = prunekit.models.create("cifar_resnet56").eval()
    graph = prunekit.build_graph(model, X[:1])
    counts = resolve_counts(graph, model, PlanTarget.from_dict(recipe["plan"]))
    assert len(counts) == 27 and all(name.endswith(".conv1") for name in counts)
    assert {counts[f"layer{s}.0.conv1"] for s in (1, 2, 3)} == {9, 19, 38}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = prunekit.prune(model, X[:1], criterion=get_criterion(
            "filtersketch", **recipe["criterion"]["options"]), graph=graph,
            target=PlanTarget.from_dict(recipe["plan"]))
    assert len(result.rewrites) == 27 and torch.isfinite(model(X[:1])).all()
