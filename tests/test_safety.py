"""Run safety: bad input is refused with a clear message before work starts, and files are
written atomically (issue 14; more cases land here as they are fixed)."""
from __future__ import annotations

import json

import pytest

from prunekit.cli import main
from prunekit.files import atomic_write, atomic_write_json, remove_stale_temp_files


@pytest.mark.parametrize("flags, message", [
    (["--finetune-epochs", "-1"], "--finetune-epochs must be a whole number >= 0"),
    (["--latency-batches", "abc"], "--latency-batches takes comma-separated whole numbers"),
    (["--method", "sfp"], "method sfp trains while it prunes"),
    (["--method", "swp", "--finetune-epochs", "1"], "method swp decides what it removes; drop "
                                                    "the ratio target"),
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
