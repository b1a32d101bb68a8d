"""Knowledge distillation in fit (prunekit.train.distill): the loss against a direct
computation, resume with the same teacher only, the teacher kept out of every file, DDP."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import ConfigError
from prunekit.train import CheckpointError, Distillation, TrainConfig, distillation_loss, fit

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
from ddp_worker import RandomImages, TinyNet  # noqa: E402
from test_train import free_port  # noqa: E402


class NoNorm(nn.Module):
    """No BatchNorm: train and eval mode compute the same, so a teacher copy agrees exactly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def config(**kw):
    return TrainConfig(**{"epochs": 1, "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0,
                          "batch_size": 16, "device": "cpu", "progress": False,
                          "schedule": "constant", **kw})


def direct_kd(student_logits, teacher_logits, t):
    p_t = torch.softmax(teacher_logits.double() / t, 1)
    log_p_s = torch.log_softmax(student_logits.double() / t, 1)
    return (p_t * (p_t.log() - log_p_s)).sum(1).mean() * t * t


@pytest.mark.parametrize("t", [1.0, 4.0, 0.5])
def test_distillation_loss_is_t2_kl_of_softened_logits(t):
    g = torch.Generator().manual_seed(0)
    s, te = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g) * 3
    assert torch.allclose(distillation_loss(s, te, t).double(), direct_kd(s, te, t), atol=1e-5)
    assert float(distillation_loss(te, te, t)) == pytest.approx(0.0, abs=1e-6)


def test_logged_loss_is_the_weighted_sum_on_one_full_batch(tmp_path):
    torch.manual_seed(0)
    student, teacher = NoNorm(), NoNorm()
    data = RandomImages(16, augment=False)
    x, y = data.images, data.labels
    with torch.no_grad():
        s, te = student(x), teacher(x)
    w, t = 0.3, 2.0
    expected = (1 - w) * F.cross_entropy(s, y) + w * direct_kd(s, te, t)
    summary = fit(student, data, None, config(), tmp_path,
                  distill=Distillation(teacher, temperature=t, weight=w))
    assert summary["history"][0]["train_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_an_identical_teacher_with_weight_one_gives_no_gradient(tmp_path):
    torch.manual_seed(0)
    student = NoNorm()
    before = copy.deepcopy(student.state_dict())
    fit(student, RandomImages(32, augment=False), None, config(), tmp_path,
        distill=Distillation(copy.deepcopy(student), weight=1.0))
    for name, value in student.state_dict().items():
        assert torch.allclose(value, before[name], atol=1e-6), name


def test_weight_zero_trains_exactly_as_without_a_teacher(tmp_path):
    torch.manual_seed(0)
    a = TinyNet()
    b = copy.deepcopy(a)
    fit(a, RandomImages(32), None, config(), tmp_path / "a")
    fit(b, RandomImages(32), None, config(), tmp_path / "b",
        distill=Distillation(TinyNet(), weight=0.0))
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


def test_distillation_changes_the_training(tmp_path):
    torch.manual_seed(0)
    a = TinyNet()
    b = copy.deepcopy(a)
    fit(a, RandomImages(32), None, config(), tmp_path / "a")
    fit(b, RandomImages(32), None, config(), tmp_path / "b",
        distill=Distillation(TinyNet(), weight=0.8))
    assert any(not torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def _teacher(seed=3):
    torch.manual_seed(seed)
    return TinyNet()


def test_resume_with_the_same_teacher_equals_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    start = TinyNet()
    whole, split = copy.deepcopy(start), copy.deepcopy(start)
    cfg = dict(epochs=2, deterministic=True)
    fit(whole, RandomImages(32), None, config(**cfg), tmp_path / "whole",
        distill=Distillation(_teacher(), temperature=3.0, weight=0.6))
    fit(split, RandomImages(32), None, config(epochs=1, deterministic=True), tmp_path / "split",
        distill=Distillation(_teacher(), temperature=3.0, weight=0.6))
    with pytest.warns(UserWarning, match="different config"):  # epochs 1 -> 2
        fit(split, RandomImages(32), None, config(**cfg), tmp_path / "split",
            distill=Distillation(_teacher(), temperature=3.0, weight=0.6))
    # the cosine-free constant schedule makes epochs 1 -> 2 change nothing of the trajectory
    for name, value in whole.state_dict().items():
        assert torch.equal(value, split.state_dict()[name]), name


@pytest.mark.parametrize("second, message", [
    (None, "pass the same teacher"),
    (lambda: Distillation(_teacher(seed=4), temperature=3.0, weight=0.6), "different teacher"),
    (lambda: Distillation(_teacher(), temperature=2.0, weight=0.6), "different teacher"),
])
def test_resume_refuses_a_missing_or_different_teacher(tmp_path, second, message):
    model = TinyNet()
    fit(model, RandomImages(32), None, config(), tmp_path,
        distill=Distillation(_teacher(), temperature=3.0, weight=0.6))
    with pytest.raises(CheckpointError, match=message):
        fit(TinyNet(), RandomImages(32), None, config(epochs=2), tmp_path,
            distill=second() if second else None)


def test_resume_refuses_a_teacher_the_run_did_not_have(tmp_path):
    fit(TinyNet(), RandomImages(32), None, config(), tmp_path)
    with pytest.raises(CheckpointError, match="without distillation"):
        fit(TinyNet(), RandomImages(32), None, config(epochs=2), tmp_path,
            distill=Distillation(_teacher()))


def test_the_teacher_is_never_saved_with_the_student(tmp_path):
    model = TinyNet()
    teacher = Distillation(_teacher())
    fit(model, RandomImages(32), RandomImages(16, seed=1), config(), tmp_path, distill=teacher)
    for name in ("last.pt", "best.pt"):
        saved = torch.load(tmp_path / name, weights_only=True)
        assert set(saved["model"]) == set(model.state_dict())
        text = json.dumps({k: v for k, v in saved.items() if k not in ("model", "optimizer")},
                          default=str)
        assert "teacher" not in text or saved.get("distill", {}).get("teacher") in text
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["distill"] == teacher.state() and len(last["distill"]["teacher"]) == 16
    assert all(not p.requires_grad for p in teacher.teacher.parameters())


def test_bad_distillation_settings_are_refused(tmp_path):
    model = TinyNet()
    for kwargs, message in (({"temperature": 0}, "temperature"),
                            ({"temperature": float("nan")}, "temperature"),
                            ({"weight": 1.5}, "weight"), ({"weight": True}, "weight")):
        with pytest.raises(ConfigError, match=message):
            Distillation(TinyNet(), **kwargs)
    with pytest.raises(ConfigError, match="nn.Module"):
        Distillation("teacher")
    with pytest.raises(ConfigError, match="shares parameters"):
        fit(model, RandomImages(32), None, config(), tmp_path / "a",
            distill=Distillation(model))
    with pytest.raises(ConfigError, match="same classes"):
        fit(TinyNet(), RandomImages(32), None, config(), tmp_path / "b",
            distill=Distillation(TinyNet(num_classes=5)))


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_ddp_distillation_keeps_ranks_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for mode in ("plain", "distill"):
        out = tmp_path / mode
        out.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={free_port()}", str(TESTS_DIR / "ddp_worker.py"), str(out)]
        finished = subprocess.run(command + (["distill"] if mode == "distill" else []),
                                  env=env, capture_output=True, text=True, timeout=180)
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
        runs[mode] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    rank0, rank1 = runs["distill"]
    for name, tensor in rank0["params"].items():
        assert torch.equal(tensor, rank1["params"][name]), name
    assert any(not torch.equal(t, runs["plain"][0]["params"][n])
               for n, t in rank0["params"].items())
    last = torch.load(tmp_path / "distill" / "run_rank0" / "last.pt", weights_only=True)
    assert last["distill"]["weight"] == 0.7 and set(last["model"]) == set(rank0["params"]) | {
        n for n in last["model"] if "running" in n or "num_batches" in n}


# ---------------------------------------------------------------- the prune job (--distill)
from conftest import SHARED, needs_shared  # noqa: E402


def _job_args(out, *extra):
    return ["prune", "--model", "cifar_resnet20", "--weights", "pretrained", "--data",
            str(SHARED), "--criterion", "l1", "--ratio", "0.3", "--allocation", "uniform",
            "--finetune-epochs", "1", "--finetune-max-steps", "2", "--finetune-batch-size", "16",
            "--eval-splits", "test-lossless", "--limit", "40", "--latency-batches", "",
            "--out", str(out), *extra]


@pytest.mark.shared_data
@needs_shared
def test_prune_job_distils_from_the_unpruned_model_and_resumes(tmp_path):
    from prunekit.cli import main
    import prunekit.io as pio

    run = tmp_path / "run"
    assert main(_job_args(run, "--distill", "--distill-temperature", "3",
                          "--distill-weight", "0.25")) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["options"]["distill"] == {"temperature": 3.0, "weight": 0.25}
    assert report["distill"]["temperature"] == 3.0 and len(report["distill"]["teacher"]) == 16
    last = torch.load(run / "finetune" / "last.pt", weights_only=True)
    assert last["distill"]["weight"] == 0.25
    model = pio.load(run / "model.safetensors")
    assert set(model.state_dict()) == set(last["model"])  # the student only
    # a rerun resumes the same run (the same teacher, loaded again)
    assert main(_job_args(run, "--distill", "--distill-temperature", "3",
                          "--distill-weight", "0.25")) == 0


@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize("extra, message", [
    (("--distill-weight", "0.3"), "add --distill"),
    (("--distill", "--distill-weight", "2"), "weight"),
    (("--distill", "--distill-temperature", "0"), "temperature"),
    (("--distill", "from-scratch"), "no trained weights"),
])
def test_prune_job_refuses_bad_distill_flags_before_work(tmp_path, capsys, extra, message):
    from prunekit.cli import main

    run = tmp_path / "run"
    args = _job_args(run, *[e for e in extra if e != "from-scratch"])
    if "from-scratch" in extra:  # no --weights: a random initialisation teaches nothing
        at = args.index("--weights")
        del args[at:at + 2]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (run / "model.safetensors").exists() and not (run / "report.json").exists()


@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize("method", ["sfp", "fsdp"])
def test_training_methods_distil_in_their_own_fit(tmp_path, method):
    from prunekit.cli import main

    run = tmp_path / "run"
    args = _job_args(run, "--distill", "--distill-weight", "0.4")
    at = args.index("--criterion")
    del args[at:at + 2]
    at = args.index("--allocation")
    args[at:at + 2] = ["--method", method]
    assert main(args) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["distill"]["weight"] == 0.4
    last = torch.load(run / "finetune" / "last.pt", weights_only=True)
    assert last["distill"] == {k: report["distill"][k] for k in ("temperature", "weight",
                                                                 "teacher")}
