"""Tests for prunekit.train: files, schedules, exact resume, hooks, config checks and DDP."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit.train import (
    LOG_KEYS,
    CheckpointError,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    fit,
)

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
from ddp_worker import RandomImages, TinyNet  # noqa: E402  (helper module next to this file)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(epochs=1, lr=0.05, batch_size=16, device="cpu", progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def new_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def lrs_over(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    """Learning rate used at every iteration of a whole run."""
    optimizer = build_optimizer(TinyNet(), config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    lrs = []
    for _ in range(config.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# --------------------------------------------------------------------------- one epoch
def test_one_epoch_writes_checkpoints_and_log(tmp_path):
    summary = fit(new_model(), RandomImages(64), RandomImages(32, seed=1, augment=False),
                  tiny_config(), tmp_path)

    assert summary["status"] == "completed" and summary["epochs_run"] == 1
    (record,) = read_log(tmp_path)
    assert set(LOG_KEYS) <= set(record)
    assert record["epoch"] == 0 and 0 <= record["val_top1"] <= 100
    assert record["images/s"] > 0 and record["seconds"] > 0
    assert summary["history"] == [record]

    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best_val_top1", "config",
            "global_step", "hooks"} <= set(last)
    assert last["epoch"] == 0 and last["global_step"] == 4  # 64 images / batch 16
    assert TrainConfig.from_dict(last["config"]) == tiny_config()
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 0 and best["val_top1"] == record["val_top1"]
    TinyNet().load_state_dict(best["model"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- schedules
def test_cosine_with_warmup_rises_from_zero_then_decays_to_zero():
    lrs = lrs_over(TrainConfig(epochs=5, lr=0.1, warmup_epochs=1, schedule="cosine"), 10)
    assert lrs[0] == 0.0
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear warm-up...
    assert lrs[10] == pytest.approx(0.1)                      # ...reaching lr at its end
    assert lrs[5] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))    # then only decreasing
    assert lrs[30] == pytest.approx(0.05)                     # half-way through the decay
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert lrs[-1] < 1e-3


def test_multistep_drops_by_gamma_at_each_milestone():
    lrs = lrs_over(TrainConfig(epochs=6, lr=0.1, schedule="multistep", milestones=[2, 4],
                               gamma=0.1), 5)
    assert lrs[:10] == pytest.approx([0.1] * 10)
    assert lrs[10:20] == pytest.approx([0.01] * 10)
    assert lrs[20:] == pytest.approx([0.001] * 10)


def test_constant_schedule_keeps_lr():
    assert lrs_over(TrainConfig(epochs=2, lr=0.1, schedule="constant"), 3) == [0.1] * 6


# --------------------------------------------------------------------------- resume
class StepCounter:
    """A stateful hook: resuming must restore its count."""

    def __init__(self):
        self.steps = 0

    def after_step(self, step):
        assert step == self.steps  # the global step continues across a resume
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


class InterruptAt:
    """Simulates Ctrl-C at the start of an epoch (stateless, so it may be left out on resume)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_resumed_run_matches_uninterrupted_run_bit_for_bit(tmp_path):
    config = tiny_config(epochs=3, seed=7, deterministic=True, num_workers=0,
                         warmup_epochs=1, lr=0.1)
    train, val = RandomImages(64), RandomImages(32, seed=1, augment=False)

    straight_model, straight_counter = new_model(), StepCounter()
    straight = fit(straight_model, train, val, config, tmp_path / "straight",
                   hooks=[straight_counter])

    resumed_dir, counter = tmp_path / "resumed", StepCounter()
    with pytest.raises(KeyboardInterrupt):
        fit(new_model(), train, val, config, resumed_dir, hooks=[counter, InterruptAt(1)])
    assert [r["epoch"] for r in read_log(resumed_dir)] == [0]
    assert torch.load(resumed_dir / "last.pt", weights_only=True)["epoch"] == 0

    resumed_model, resumed_counter = new_model(seed=123), StepCounter()  # weights come from last.pt
    summary = fit(resumed_model, train, val, config, resumed_dir, hooks=[resumed_counter])

    assert summary["resumed_from_epoch"] == 1 and summary["epochs_run"] == 2
    straight_state, resumed_state = straight_model.state_dict(), resumed_model.state_dict()
    for name, tensor in straight_state.items():
        assert torch.equal(tensor, resumed_state[name]), name
    assert resumed_counter.steps == straight_counter.steps == 12
    log = read_log(resumed_dir)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for ours, theirs in zip(log, read_log(tmp_path / "straight")):
        for key in ("lr", "train_loss", "train_top1", "val_top1", "val_loss"):
            assert ours[key] == theirs[key], key
    assert summary["history"] == log
    assert summary["best_val_top1"] == straight["best_val_top1"]

    # Resuming a finished run trains nothing and leaves the files alone.
    before = (resumed_dir / "last.pt").read_bytes()
    again = fit(new_model(), train, val, config, resumed_dir, hooks=[StepCounter()])
    assert again["epochs_run"] == 0 and len(again["history"]) == 3
    assert (resumed_dir / "last.pt").read_bytes() == before


def test_corrupt_last_checkpoint_is_an_error_and_is_not_overwritten(tmp_path):
    garbage = b"this is not a checkpoint" * 10
    (tmp_path / "last.pt").write_bytes(garbage)
    with pytest.raises(CheckpointError) as caught:
        fit(new_model(), RandomImages(64), RandomImages(32, seed=1), tiny_config(), tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "last.pt") in message and "resume=False" in message
    assert (tmp_path / "last.pt").read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]

    fit(new_model(), RandomImages(64), RandomImages(32, seed=1), tiny_config(), tmp_path,
        resume=False)  # the documented way out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0


def test_checkpoint_of_another_architecture_is_an_error(tmp_path):
    fit(new_model(), RandomImages(64), None, tiny_config(), tmp_path)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        fit(TinyNet(width=4), RandomImages(64), None, tiny_config(epochs=2), tmp_path)


# --------------------------------------------------------------------------- hooks
class Recorder:
    def __init__(self):
        self.calls = []

    def on_train_start(self, model, optimizer):
        assert isinstance(model, TinyNet) and isinstance(optimizer, torch.optim.SGD)
        self.model = model
        self.calls.append("on_train_start")

    def on_epoch_start(self, epoch):
        self.calls.append(f"on_epoch_start({epoch})")

    def extra_loss(self, model):
        self.calls.append("extra_loss")
        return 1e-4 * model.classifier.weight.abs().sum()

    def after_backward(self, step):
        assert all(p.grad is not None for p in self.model.parameters())
        self.calls.append(f"after_backward({step})")

    def after_step(self, step):
        self.calls.append(f"after_step({step})")

    def on_epoch_end(self, epoch):
        self.calls.append(f"on_epoch_end({epoch})")

    def state_dict(self):
        self.calls.append("state_dict")
        return {"calls": len(self.calls)}


def test_hooks_are_called_in_the_documented_order(tmp_path):
    recorder = Recorder()
    summary = fit(new_model(), RandomImages(64), RandomImages(32, seed=1),
                  tiny_config(epochs=2, max_steps_per_epoch=2), tmp_path, hooks=[recorder])

    def epoch(e, first_step):
        steps = []
        for step in (first_step, first_step + 1):
            steps += ["extra_loss", f"after_backward({step})", f"after_step({step})"]
        return [f"on_epoch_start({e})", *steps, f"on_epoch_end({e})", "state_dict"]

    assert recorder.calls == ["on_train_start", *epoch(0, 0), *epoch(1, 2)]
    assert all(record["train_extra_loss"] > 0 for record in summary["history"])
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["hooks"] == [{"calls": len(recorder.calls)}]  # the last state_dict() call


# --------------------------------------------------------------------------- loss, config
def test_label_smoothing_changes_the_loss_on_the_same_batch(tmp_path):
    losses = []
    for smoothing in (0.0, 0.3):
        # one step: its loss is computed before the (tiny) update, so lr does not matter
        config = tiny_config(lr=1e-9, label_smoothing=smoothing, max_steps_per_epoch=1)
        summary = fit(new_model(), RandomImages(64), None, config, tmp_path / str(smoothing))
        losses.append(summary["history"][0]["train_loss"])
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


def test_no_decay_bn_bias_exempts_one_dimensional_parameters():
    model = TinyNet()
    optimizer = build_optimizer(model, TrainConfig(epochs=1, lr=0.1, no_decay_bn_bias=True))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {
        id(p) for p in model.parameters() if p.ndim == 1}


def test_config_round_trips_through_json_and_rejects_bad_values():
    config = TrainConfig(epochs=3, lr=0.1, schedule="multistep", milestones=[1, 2])
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config

    with pytest.raises(ValueError, match="lr .*must be a finite number > 0"):
        TrainConfig(epochs=1, lr=-0.1)
    with pytest.raises(ValueError, match="cosine, multistep, constant"):
        TrainConfig(epochs=1, lr=0.1, schedule="step")
    with pytest.raises(ValueError, match="unknown key.*learning_rate"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 0.1})
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(epochs=5, lr=0.1, milestones=[3, 2])
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=2, lr=0.1, warmup_epochs=3)


def test_amp_on_cpu_is_ignored_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="amp=True is ignored on CPU"):
        fit(new_model(), RandomImages(32), None, tiny_config(amp=True, max_steps_per_epoch=1),
            tmp_path)


# --------------------------------------------------------------------------- DDP
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_ddp_two_cpu_processes_keep_identical_weights_and_only_rank0_writes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(TESTS_DIR / "ddp_worker.py"), str(tmp_path)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any(not torch.equal(rank0["initial"][n], rank1["initial"][n]) for n in rank0["initial"])
    for name, tensor in rank0["params"].items():
        assert torch.equal(tensor, rank1["params"][name]), name
        assert not torch.equal(tensor, rank0["initial"][name]), f"{name} did not train"
    assert rank0["history"] == rank1["history"] and len(rank0["history"]) == 1
    assert rank0["group_destroyed"] and rank1["group_destroyed"]

    assert sorted(p.name for p in (tmp_path / "run_rank0").iterdir()) == [
        "best.pt", "last.pt", "log.jsonl"]
    assert not (tmp_path / "run_rank1").exists()
    last = torch.load(tmp_path / "run_rank0" / "last.pt", weights_only=True)
    assert last["world_size"] == 2 and last["global_step"] == 4  # 64 images / (2 ranks x 8)


def test_resuming_with_a_different_config_warns(tmp_path):
    fit(new_model(), RandomImages(32), None, tiny_config(), tmp_path)
    with pytest.warns(UserWarning, match=r"different config \(epochs, lr\)"):
        fit(new_model(), RandomImages(32), None, tiny_config(epochs=2, lr=0.01), tmp_path)
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1]
