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
])
def test_bad_flags_are_refused_before_any_work(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--model", "cifar_resnet20", "--ratio", "0.3", *flags,
                 "--data", str(tmp_path / "no-data-here"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert "CIFAR-10 not found" not in err  # refused before the data was looked for
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
