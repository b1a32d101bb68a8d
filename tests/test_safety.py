"""Run safety: bad input is refused with a clear message before work starts, and files are
written atomically (issue 14; more cases land here as they are fixed)."""
from __future__ import annotations

import json

import pytest
import torch

from prunekit.cli import main
from prunekit.files import atomic_write, atomic_write_json, remove_stale_temp_files


@pytest.mark.parametrize("flags, message", [
    (["--finetune-epochs", "-1"], "--finetune-epochs must be a whole number >= 0"),
    (["--latency-batches", "abc"], "--latency-batches takes comma-separated whole numbers"),
    (["--method", "sfp"], "method sfp trains while it prunes"),
    (["--method", "swp", "--finetune-epochs", "1"], "method swp decides what it removes; drop "
                                                    "the ratio target"),
    (["--criterion", "l3"], "unknown criterion 'l3'; available: apoz"),
    (["--finetune-lr", "inf"], "--finetune-lr on the command line) must be a finite number > 0"),
    (["--finetune-lr", "0"], "must be a finite number > 0, got 0"),
    (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
])
def test_bad_flags_are_refused_before_any_work(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--model", "cifar_resnet20", "--ratio", "0.3", *flags,
                 "--data", str(tmp_path / "no-data-here"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert "CIFAR-10 not found" not in err  # refused before the data was looked for
    assert not out.exists()


def test_a_target_the_method_cannot_use_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--model", "cifar_resnet20", "--method", "sfp", "--chip-sparsity",
                 "[0.]+[0.2]*2+[0.3]*9", "--finetune-epochs", "1",
                 "--data", str(tmp_path / "no-data-here"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "needs a ratio, ratios, macs_reduction target, not chip_sparsity" in err
    assert not out.exists()


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"old": 1})

    def failing(stream):
        stream.write(b'{"new": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, failing)
    assert json.loads(path.read_text()) == {"old": 1}
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_write_replaces_a_planted_symlink_instead_of_its_target(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "report.json"
    link.symlink_to(target)
    atomic_write_json(link, {"a": 1})
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and json.loads(link.read_text()) == {"a": 1}


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".report.json.abc123.tmp").write_text("half")
    (tmp_path / "model.safetensors").write_text("real")
    removed = remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [".report.json.abc123.tmp"]
    assert (tmp_path / "model.safetensors").exists()


def test_round_to_zero_is_refused_not_read_as_one(tmp_path, capsys):
    code = main(["prune", "--model", "cifar_resnet20", "--ratio", "0.3", "--round-to", "0",
                 "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert code == 2 and "round_to must be a positive int" in capsys.readouterr().err


def test_numpy_ratio_is_accepted_and_bool_refused():
    import numpy as np
    import torch

    import prunekit
    from prunekit.plan import PlanError, check_ratio
    assert check_ratio(np.float32(0.5)) == 0.5
    with pytest.raises(PlanError):
        check_ratio(True)
    model = prunekit.models.create("cifar_resnet20").eval()
    result = prunekit.prune(model, torch.randn(1, 3, 32, 32), ratio=np.float32(0.5))
    assert result.macs_after < result.macs_before


@pytest.mark.parametrize("kept", [[0.5, 2.7], [True, False], [float("nan")]])
def test_plan_indices_must_be_whole_numbers(kept):
    import torch

    import prunekit
    from prunekit.plan import PlanError
    model = prunekit.models.create("cifar_resnet20").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="whole channel indices"):
        prunekit.prune(model, torch.randn(1, 3, 32, 32), plan={"conv1": kept})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_eval_of_a_saved_model_refuses_flags_it_would_ignore(tmp_path, capsys):
    import prunekit
    path = tmp_path / "m.safetensors"
    prunekit.io.save(prunekit.models.create("cifar_resnet20"), path)
    code = main(["eval", "--model", str(path), "--weights", "pretrained", "--shortcut", "B"])
    err = capsys.readouterr().err
    assert code == 2 and "--weights and --shortcut cannot apply to a saved model" in err


# ------------------------------------------------ a rerun into an existing --out (items 1, 2)
from conftest import SHARED, needs_shared  # noqa: E402

QUICK = ["--data", str(SHARED), "--eval-splits", "test-lossless", "--limit", "20",
         "--latency-batches", ""]


def _files(run):
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize("second, named", [
    (["--model", "cifar_resnet32", "--ratio", "0.2"], ["model:", "plan:"]),
    (["--model", "cifar_resnet20", "--ratio", "0.2"], ["plan:"]),
    (["--model", "cifar_resnet20", "--ratio", "0.5", "--criterion", "fpgm"], ["method:"]),
    (["--model", "cifar_resnet20", "--ratio", "0.5", "--seed", "3"], ["seed:"]),
], ids=["other-model", "other-ratio", "other-criterion", "other-seed"])
def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(second, named, tmp_path,
                                                                    capsys):
    run = tmp_path / "run"
    assert main(["prune", "--model", "cifar_resnet20", "--ratio", "0.5", *QUICK,
                 "--out", str(run)]) == 0
    before = _files(run)
    capsys.readouterr()
    assert main(["prune", *second, *QUICK, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "new --out" in err
    assert all(word in err for word in named)
    assert _files(run) == before


@pytest.mark.shared_data
@needs_shared
def test_a_rerun_may_add_epochs_but_never_replace_a_finetuned_model(tmp_path, capsys):
    run = tmp_path / "run"
    train = ["--finetune-max-steps", "1", "--finetune-batch-size", "8"]
    base = ["prune", "--model", "cifar_resnet20", "--ratio", "0.5", *QUICK, *train,
            "--out", str(run)]
    assert main([*base, "--finetune-epochs", "1"]) == 0
    fine_tuned = _files(run)
    capsys.readouterr()
    assert main(base) == 2  # no --finetune-epochs: would save the un-fine-tuned model
    assert "fine-tuned for 1 epochs" in capsys.readouterr().err
    assert _files(run) == fine_tuned
    assert main([*base, "--finetune-epochs", "2"]) == 0  # more epochs: a resume
    report = json.loads((run / "report.json").read_text())
    assert report["finetune"]["epochs_run"] == 1
    assert json.loads((run / "run.json").read_text())["finetune_epochs"] == 2


@pytest.mark.shared_data
@needs_shared
def test_results_without_a_run_record_are_not_overwritten(tmp_path, capsys):
    run = tmp_path / "old"
    run.mkdir()
    (run / "report.json").write_text("{}")
    code = main(["prune", "--model", "cifar_resnet20", "--ratio", "0.5", *QUICK,
                 "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "no run.json" in err and (run / "report.json").read_text() == "{}"


# ------------------------------------------------------------ flags that did nothing (item 10)
def test_a_target_that_removes_no_channel_is_refused():
    import prunekit
    from prunekit.plan import PlanError
    model, x = prunekit.models.create("cifar_resnet20"), torch.randn(1, 3, 32, 32)
    with pytest.raises(PlanError, match="round_to=1000 is at least the largest prunable group"):
        prunekit.prune(model, x, ratio=0.3, round_to=1000)
    with pytest.raises(PlanError, match="rounds up to all its channels"):
        prunekit.prune(model, x, ratio=0.01)
    assert prunekit.prune(model, x, ratio=0.0).macs_after == prunekit.measure.count_macs(model, x)


@pytest.mark.shared_data
@needs_shared
def test_round_to_above_every_layer_is_refused_by_the_cli(tmp_path, capsys):
    code = main(["prune", "--model", "cifar_resnet20", "--ratio", "0.3", "--round-to", "1000",
                 *QUICK, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "removes no channel" in err
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_round_to_is_refused_by_methods_that_ignore_it(tmp_path, capsys):
    code = main(["prune", "--model", "cifar_resnet20", "--method", "sfp", "--ratio", "0.3",
                 "--round-to", "8", "--finetune-epochs", "1",
                 "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "method sfp does not round its channel counts" in err


@pytest.mark.parametrize("value", [0, -3, True, 2.0, "10"])
def test_num_classes_must_be_a_positive_whole_number(value):
    import prunekit
    from prunekit.errors import ConfigError
    with pytest.raises(ConfigError, match="num_classes must be a whole number >= 1"):
        prunekit.models.create("cifar_resnet20", num_classes=value)
    with pytest.raises(ConfigError, match="num_classes"):
        prunekit.models.CifarVGG(num_classes=value)


@pytest.mark.shared_data
@needs_shared
def test_a_model_whose_outputs_do_not_fit_the_data_is_refused(tmp_path, capsys):
    import prunekit
    path = tmp_path / "c100.safetensors"
    prunekit.io.save(prunekit.models.create("cifar_resnet20", num_classes=100), path)
    code = main(["eval", "--model", str(path), "--data", str(SHARED)])
    err = capsys.readouterr().err
    assert code == 2 and "the model has 100 outputs but CIFAR-10 has 10 classes" in err


@pytest.mark.parametrize("flags, named", [
    (["--latency-runs", "0"], "--latency-runs"), (["--batch-size", "0"], "--batch-size"),
    (["--workers", "-1"], "--workers"), (["--threads", "0"], "--threads"),
    (["--limit", "0"], "--limit"), (["--latency-runs", "x"], "--latency-runs"),
])
def test_eval_refuses_counts_below_their_minimum_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as stopped:  # argparse: usage line + message, code 2
        main(["eval", "--model", "cifar_resnet20", *flags])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and named in err and "Traceback" not in err


def test_negative_latency_batch_sizes_are_refused(capsys):
    assert main(["eval", "--model", "cifar_resnet20", "--latency-batches", "1,-2"]) == 2
    assert "--latency-batches values must be >= 1, got -2" in capsys.readouterr().err


def test_ctrl_c_during_eval_does_not_promise_a_resume(monkeypatch, capsys, tmp_path):
    from prunekit.cli import commands

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(commands, "load_model", interrupted)
    assert main(["eval", "--model", "cifar_resnet20"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "resume" not in err


def test_ctrl_c_during_prune_says_how_to_resume(monkeypatch, capsys, tmp_path):
    from prunekit.cli import prune as prune_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(prune_cli, "run_prune", interrupted)
    assert main(["prune", "--model", "cifar_resnet20", "--ratio", "0.3",
                 "--out", str(tmp_path / "r")]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


# ---------------------------------------------------------------- report (item 10, last case)
def _fake_run(root, name, description, top1=90.0):
    run = root / name
    run.mkdir()
    accuracy = {"test": {"top1": top1, "description": description}}
    stage = {"accuracy": accuracy, "macs": 1e6, "params": 1e4}
    (run / "report.json").write_text(json.dumps({
        "before": {**stage, "macs": 2e6}, "pruned": stage, "recipe": name, "speedup": {}}))
    return run


def test_report_refuses_runs_measured_on_different_images(tmp_path, capsys):
    full = _fake_run(tmp_path, "full", "CIFAR-10 test, 10,000 images")
    subset = _fake_run(tmp_path, "subset", "CIFAR-10 test [class-balanced subset of 100, seed 0]")
    code = main(["report", str(full), str(subset), "--out", str(tmp_path / "cmp")])
    err = capsys.readouterr().err
    assert code == 2 and "evaluated on different 'test' images" in err
    assert "subset: CIFAR-10 test [class-balanced subset of 100" in err
    assert not (tmp_path / "cmp.md").exists()
    other = _fake_run(tmp_path, "other", "CIFAR-10 test, 10,000 images", top1=80.0)
    assert main(["report", str(full), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert "CIFAR-10 test, 10,000 images" in (tmp_path / "cmp.md").read_text()


def test_report_names_a_run_without_the_split(tmp_path, capsys):
    run = _fake_run(tmp_path, "a", "CIFAR-10 test")
    code = main(["report", str(run), "--split", "val", "--out", str(tmp_path / "cmp")])
    assert code == 2 and "run a has no accuracy on split 'val'" in capsys.readouterr().err


# ------------------------------------------------------------------ clear errors at the CLI
@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize("planted", ["other-model", "garbage"])
def test_a_foreign_pruned_model_in_the_run_dir_is_refused_with_cli_advice(planted, tmp_path,
                                                                          capsys):
    import prunekit
    run = tmp_path / "run"
    command = ["prune", "--model", "cifar_resnet20", "--ratio", "0.5", *QUICK, "--out", str(run)]
    assert main(command) == 0
    pruned = run / "pruned.safetensors"
    if planted == "garbage":
        pruned.write_bytes(b"\x00" * 64)
    else:
        prunekit.io.save(prunekit.models.create("cifar_resnet32"), pruned)
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "cannot be used to resume this run" in err and f"Delete {pruned}" in err
    assert "prunekit.io" not in err and "Traceback" not in err


@pytest.mark.shared_data
@needs_shared
def test_disk_full_is_named_first(tmp_path, capsys, monkeypatch):
    import errno
    from prunekit.pipeline import job

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(job, "atomic_write_json", full)
    code = main(["prune", "--model", "cifar_resnet20", "--ratio", "0.5", *QUICK,
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "error: no space left on device" in err
