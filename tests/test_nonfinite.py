"""NaN in, numbers out - no more (issue 14, items 3 and 9): training that diverges stops with
DivergenceError and keeps its last good files, TrainConfig refuses non-finite settings, every
criterion refuses to score from (or to return) NaN/inf with ScoreError naming the layer, and
evaluate never measures a broken model silently."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import prunekit
from conftest import TinyNet, tiny_data
from prunekit.criteria import CRITERIA, Criterion, get_criterion, list_criteria, register_criterion
from prunekit.criteria.base import ScoreError
from prunekit.criteria.calibration import CalibrationDataError
from prunekit.criteria.nuclear import channel_independence
from prunekit.errors import ConfigError, DataError, PrunekitError
from prunekit.measure.evaluation import NonFiniteWarning, evaluate
from prunekit.train import CheckpointError, DivergenceError, TrainConfig, fit

DATA_CRITERIA = [n for n in list_criteria() if CRITERIA[n].needs_data]


def config(**overrides) -> TrainConfig:
    values = dict(epochs=2, lr=0.05, batch_size=8, device="cpu", progress=False,
                  schedule="constant")
    values.update(overrides)
    return TrainConfig(**values)


def new_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def poison(model: nn.Module, name: str = "conv2.weight", value: float = float("nan")):
    with torch.no_grad():
        model.get_parameter(name).view(-1)[3] = value
    return model


class Poisonable(Dataset):
    """tiny_data whose images turn NaN once ``poisoned`` is set (by a hook, between epochs)."""

    def __init__(self, n: int = 32):
        self.data = tiny_data(n)
        self.poisoned = False

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image, label = self.data[index]
        return (torch.full_like(image, float("nan")) if self.poisoned else image), label


# --------------------------------------------------------------------------- training
def test_errors_belong_to_the_family():
    assert issubclass(DivergenceError, PrunekitError) and issubclass(DivergenceError, RuntimeError)
    assert issubclass(ScoreError, PrunekitError) and issubclass(ScoreError, ValueError)
    assert issubclass(CalibrationDataError, ScoreError)
    assert issubclass(CalibrationDataError, DataError)


def test_a_huge_learning_rate_raises_divergence_and_writes_no_checkpoint(tmp_path):
    with pytest.raises(DivergenceError) as caught:
        fit(new_model(), tiny_data(32), tiny_data(16, seed=1), config(lr=1e6), tmp_path)
    message = str(caught.value)
    assert "training diverged in epoch 1 of 2" in message
    assert "NaN/inf" in message and "lr=1e+06" in message and "--finetune-lr" in message
    assert "No checkpoint of this run was written" in message
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()
    assert (tmp_path / "log.jsonl").read_text() == ""


def test_divergence_keeps_the_last_good_epoch_byte_for_byte(tmp_path):
    data = Poisonable()
    snapshot = {}

    class PoisonSecondEpoch:
        def on_epoch_start(self, epoch):
            if epoch == 1:  # epoch 0's files are written by now
                snapshot.update({n: (tmp_path / n).read_bytes()
                                 for n in ("last.pt", "best.pt", "log.jsonl")})
                data.poisoned = True

    with pytest.raises(DivergenceError) as caught:
        fit(new_model(), data, tiny_data(16, seed=1), config(), tmp_path,
            hooks=[PoisonSecondEpoch()])
    message = str(caught.value)
    assert "epoch 2 of 2, step 1/4 (global step 4): the loss is nan" in message
    assert f"{tmp_path / 'last.pt'} (after epoch 1 of 2), was kept" in message
    assert str(tmp_path / "best.pt") in message and "check the training data" in message
    for name, before in snapshot.items():
        assert (tmp_path / name).read_bytes() == before, name
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and len(last["history"]) == 1
    model = TinyNet()
    model.load_state_dict(last["model"])
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_weights_that_turn_non_finite_on_the_last_step_are_caught_at_the_epoch_end(tmp_path):
    class InfAfterLastStep:
        def on_train_start(self, model, optimizer):
            self.model = model

        def after_step(self, step):
            if step == 3:  # 32 images / batch 8: the last step of epoch 1
                poison(self.model, "conv1.weight", float("inf"))

    with pytest.raises(DivergenceError) as caught:
        fit(new_model(), tiny_data(32), None, config(), tmp_path, hooks=[InfAfterLastStep()])
    message = str(caught.value)
    assert "epoch 1 of 2, at the end of the epoch" in message
    assert "'conv1.weight' holds 1 NaN/inf value(s)" in message
    assert not (tmp_path / "last.pt").exists()


def test_a_hook_failing_on_weights_a_step_made_non_finite_is_reported_as_divergence(tmp_path):
    class ScoresAfterEveryStep:  # like LFPC's mask refresh
        def on_train_start(self, model, optimizer):
            self.model = model
            self.graph = prunekit.build_graph(model, torch.randn(1, 3, 8, 8))

        def after_step(self, step):
            if step == 1:
                poison(self.model)
            get_criterion("l1").score(self.graph, self.model)

    with pytest.raises(DivergenceError) as caught:
        fit(new_model(), tiny_data(32), None, config(), tmp_path, hooks=[ScoresAfterEveryStep()])
    assert "step 2/4 (global step 1): the optimizer step made 'conv2.weight' non-finite" \
        in str(caught.value)
    assert isinstance(caught.value.__cause__, ScoreError)


def test_a_model_or_checkpoint_that_is_non_finite_before_training_is_refused(tmp_path):
    with pytest.raises(DivergenceError, match="weights are not finite.*'conv2.weight'"):
        fit(poison(new_model()), tiny_data(16), None, config(), tmp_path / "fresh")

    out = tmp_path / "resume"
    fit(new_model(), tiny_data(16), None, config(epochs=1), out)
    last = torch.load(out / "last.pt", weights_only=True)
    last["model"]["bn1.running_var"][0] = float("inf")
    torch.save(last, out / "last.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt holds non-finite weights.*"
                                              r"bn1\.running_var.*Delete it"):
        fit(new_model(), tiny_data(16), None, config(epochs=1), out)


@pytest.mark.parametrize("field, value", [
    ("lr", float("inf")), ("lr", float("nan")), ("lr", 0), ("lr", 0.0), ("lr", -1),
    ("lr", "0.1"), ("lr", True),
])
def test_train_config_refuses_a_learning_rate_that_is_not_finite_and_positive(field, value):
    with pytest.raises(ConfigError, match=r"TrainConfig: lr \(the learning rate; --finetune-lr"
                                          r".*must be a finite number > 0, got"):
        config(**{field: value})


@pytest.mark.parametrize("overrides, fragment", [
    ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0"),
    ({"gamma": float("inf")}, "gamma must be a finite number > 0"),
    ({"grad_clip": float("inf")}, "grad_clip must be None (no clipping) or a finite number > 0"),
    ({"milestones": 3}, "milestones must be a list of epochs, got 3"),
    ({"deterministic": "yes"}, "deterministic must be a bool, got 'yes'"),
])
def test_train_config_refuses_other_non_finite_or_malformed_values(overrides, fragment):
    with pytest.raises(ConfigError) as caught:
        config(**overrides)
    assert fragment in str(caught.value)


def test_train_config_from_dict_needs_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping of settings"):
        TrainConfig.from_dict(["epochs", "lr"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


WORKER = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[2])
    from conftest import TinyNet, tiny_data
    from prunekit.train import DivergenceError, TrainConfig, fit

    rank = int(os.environ["RANK"])
    data = tiny_data(32)
    if rank == 1:  # only this rank's shard is poisoned: rank 0 must stop too, not hang
        data.tensors[0][:] = float("nan")
    torch.manual_seed(0)
    config = TrainConfig(epochs=1, lr=0.05, batch_size=8, device="cpu", progress=False)
    try:
        fit(TinyNet(), data, None, config, Path(sys.argv[1]))
    except DivergenceError as error:
        Path(sys.argv[1], f"rank{rank}.txt").write_text(str(error))
''')


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_ddp_ranks_stop_together_when_one_rank_diverges(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "run"
    out.mkdir()
    tests_dir = str(Path(__file__).resolve().parent)
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={_free_port()}", str(worker), str(out), tests_dir],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    rank0, rank1 = ((out / f"rank{r}.txt").read_text() for r in (0, 1))
    assert "step 1/4 (global step 0): the loss is not finite on 1 of 2 processes" in rank0
    assert "step 1/4 (global step 0): the loss is nan" in rank1
    assert not (out / "last.pt").exists()


# --------------------------------------------------------------------------- criteria
def graph_and_batches(model, n_batches=2, scale=1.0, targets=True):
    graph = prunekit.build_graph(model, torch.randn(1, 3, 8, 8))
    batches = []
    for b in range(n_batches):
        images, labels = tiny_data(8, seed=b).tensors
        batches.append((images * scale, labels) if targets else images * scale)
    return graph, batches


def test_the_registry_has_a_list_function():
    assert list_criteria() == sorted(CRITERIA) and {"l1", "hrank", "taylor"} <= set(list_criteria())


@pytest.mark.parametrize("name", list_criteria())
def test_every_criterion_refuses_a_model_with_a_nan_weight(name):
    model = poison(new_model().eval())
    graph, batches = graph_and_batches(model)
    with pytest.raises(ScoreError) as caught:
        get_criterion(name).score(graph, model, batches)
    message = str(caught.value)
    assert f"criterion '{name}'" in message
    assert "'conv2.weight' (layer 'conv2', group 'conv2') holds 1 NaN/inf value(s)" in message


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_every_data_criterion_refuses_a_nan_calibration_batch_by_index(name):
    model = new_model().eval()
    graph, batches = graph_and_batches(model, n_batches=3)
    batches[1][0][2, 0, 1, 1] = float("nan")
    with pytest.raises(CalibrationDataError) as caught:
        get_criterion(name, progress=False).score(graph, model, batches)
    assert f"{name}: calibration batch 1 (counting from 0) holds 1 NaN/inf value(s) in its " \
           "input 0" in str(caught.value)


class Overflowing(TinyNet):
    """TinyNet squaring its first block's output: large finite inputs overflow float32 in
    the second block (inf, then inf - inf = NaN), with finite weights and finite data."""

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x * x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_every_data_criterion_refuses_non_finite_features_naming_the_layer(name):
    torch.manual_seed(0)
    model = Overflowing().eval()
    graph, batches = graph_and_batches(model, scale=1e20)
    with pytest.raises(ScoreError) as caught:
        get_criterion(name, progress=False).score(graph, model, batches)
    assert not isinstance(caught.value, torch.linalg.LinAlgError)
    message = str(caught.value)
    assert "the weights and calibration inputs are finite, so the forward pass overflows" \
        in message
    if name == "taylor":
        assert "the loss on calibration batch 0 (counting from 0) is nan" in message
    elif name == "lfe":  # it only measures losses of masked models, never the maps
        assert "the loss of sampled mask 0 is nan" in message
    else:
        # conv2 consumes x * x, the map of group conv1, which overflows first
        assert "feature map 'mul' (group(s) conv1) on calibration batch 0 (counting from 0) " \
               "holds" in message and "\n" not in message


@pytest.mark.parametrize("name, target", [("hrank", "torch.linalg.matrix_rank"),
                                          ("chip", "prunekit.criteria.nuclear.channel_independence")])
def test_a_failed_decomposition_is_a_score_error_naming_the_layer(name, target, monkeypatch):
    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(target, fails)
    model = new_model().eval()
    graph, batches = graph_and_batches(model, targets=False)
    with pytest.raises(ScoreError) as caught:
        get_criterion(name, progress=False).score(graph, model, batches)
    assert f"{name}: the decomposition of feature map 'relu' (group(s) conv1) on calibration " \
           "batch 0 (counting from 0) failed (linalg.svd: The algorithm failed to converge)" \
        in str(caught.value)
    assert isinstance(caught.value.__cause__, torch.linalg.LinAlgError)


def test_channel_independence_refuses_non_finite_features():
    features = torch.randn(2, 4, 9)
    features[1, 2, 3] = float("inf")
    with pytest.raises(ScoreError, match="features hold 1 NaN/inf value"):
        channel_independence(features)


def test_a_criterion_registered_later_is_checked_too():
    @register_criterion
    class Broken(Criterion):
        name = "test-broken"

        def score(self, graph, model, calibration=None):
            return {g.name: np.where(np.arange(g.size) < 3, np.nan, 1.0)
                    for g in graph.prunable_groups()}

    try:
        model = new_model().eval()
        graph, _ = graph_and_batches(model)
        with pytest.raises(ScoreError, match="criterion 'test-broken': 3 of 8 scores of group "
                                             r"'conv1' \(layer conv1\) are not finite .*the "
                                             "criterion itself failed"):
            get_criterion("test-broken").score(graph, model)
    finally:
        CRITERIA.pop("test-broken")


def test_prune_refuses_a_nan_model_and_leaves_it_alone():
    model = poison(new_model().eval())
    with pytest.raises(ScoreError, match="'conv2.weight'"):
        prunekit.prune(model, torch.randn(1, 3, 8, 8), criterion="l1", ratio=0.5)
    assert model.conv1.out_channels == 8 and model.conv2.out_channels == 8


# --------------------------------------------------------------------------- evaluation
def loader(n=16, batch=8):
    images, labels = tiny_data(n).tensors
    return [(images[i:i + batch], labels[i:i + batch]) for i in range(0, n, batch)]


def test_evaluating_a_nan_weight_warns_naming_it_and_counts_the_outputs():
    model = poison(new_model().eval(), "conv1.weight")
    with pytest.warns(NonFiniteWarning) as caught:
        result = evaluate(model, loader(), progress=False)
    messages = [str(w.message) for w in caught]
    assert any("the model's tensor 'conv1.weight' holds 1 NaN/inf value(s)" in m
               for m in messages)
    assert any("NaN/inf values for 16 of 16 examples" in m for m in messages)
    assert result["nonfinite_outputs"] == 16 and 0 <= result["top1"] <= 100


class NanForFirstExample(nn.Module):
    """Finite weights; the output row of each batch's first example is NaN."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        out = self.fc(x.mean((2, 3)))
        return torch.cat([torch.full_like(out[:1], float("nan")), out[1:]])


def test_non_finite_outputs_of_a_finite_model_are_counted_and_warned_about():
    with pytest.warns(NonFiniteWarning, match="NaN/inf values for 2 of 16 examples") as caught:
        result = evaluate(NanForFirstExample(), loader(), progress=False)
    assert len(caught) == 1  # the weights are finite: no warning about them
    assert result["nonfinite_outputs"] == 2 and result["n"] == 16


def test_a_finite_model_evaluates_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        result = evaluate(new_model().eval(), loader(), progress=False)
    assert result["nonfinite_outputs"] == 0
