"""The run directory: checked writable before any work, locked by one run at a time (a stale
lock is reported and taken over), temporary files of a killed run removed (issue 14)."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import SHARED, needs_shared
from prunekit.cli import main
from prunekit.errors import ConfigError
from prunekit.files import atomic_write_text
from prunekit.pipeline import (RunLock, RunLockedError, StaleLockWarning, check_out_dir,
                               run_dir)

QUICK = ["--data", str(SHARED), "--eval-splits", "test-lossless", "--limit", "20",
         "--latency-batches", ""]
PRUNE = ["prune", "--model", "cifar_resnet20", "--ratio", "0.5", *QUICK]


def _files(run):
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


# ------------------------------------------------------------------------- check_out_dir
def test_an_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "results"
    target.write_text("mine")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_out_dir(target)
    assert target.read_text() == "mine"


def test_an_out_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"lies under .*f, which is a file"):
        check_out_dir(tmp_path / "f" / "a" / "b")


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only file system"),
                                          (errno.EACCES, "permission denied"),
                                          (errno.ENOSPC, "no space left on device")])
def test_an_unwritable_out_is_refused_with_the_reason(code, reason, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[0]))
    # The probe write fails as the file system would (root ignores chmod, so simulate).
    monkeypatch.setattr(run_dir, "open", refuse, raising=False)
    with pytest.raises(ConfigError, match=f"cannot be written: {reason}"):
        check_out_dir(tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # no probe left behind


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores chmod")
def test_a_read_only_directory_is_refused(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="cannot be written"):
            check_out_dir(out)
    finally:
        out.chmod(0o755)


@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize("layout", ["file", "under-file"])
def test_the_cli_refuses_a_bad_out_before_any_work(layout, tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("keep")
    out = tmp_path / "f" if layout == "file" else tmp_path / "f" / "run"
    from prunekit import models
    monkeypatch.setattr(models, "create", lambda *a, **k: pytest.fail("model was built"))
    assert main([*PRUNE, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "keep"


# --------------------------------------------------------------------------------- locking
def test_a_held_lock_refuses_a_second_holder_and_is_removed_on_release(tmp_path):
    with RunLock(tmp_path) as lock:
        record = json.loads((tmp_path / run_dir.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and lock.stale is None
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / run_dir.LOCK_FILE).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_a_lock_left_by_a_dead_process_is_reported_and_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / run_dir.LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": "h", "started": "2026-01-01T00:00:00"}))
    with pytest.warns(StaleLockWarning, match=f"stale lock of run pid {dead.pid}"):
        with RunLock(tmp_path) as lock:
            assert lock.stale["pid"] == dead.pid
            assert json.loads((tmp_path / run_dir.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_is_only_taken_by_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with RunLock(tmp_path):
        assert not (tmp_path / run_dir.LOCK_FILE).exists()


_HOLDER = """
import sys, time
from prunekit.pipeline import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.shared_data
@needs_shared
def test_two_runs_into_one_out_cannot_both_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*PRUNE, "--out", str(run)]) == 0
    finished = _files(run)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main([*PRUNE, "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"in use by another prunekit run (pid {holder.pid}" in err
        assert {k: v for k, v in _files(run).items() if k != run_dir.LOCK_FILE} == finished
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays behind
        holder.wait()
    assert (run / run_dir.LOCK_FILE).exists()
    assert main([*PRUNE, "--out", str(run)]) == 0  # the resume takes the stale lock over
    err = capsys.readouterr().err
    assert f"warning: {run}: found a stale lock of run pid {holder.pid}" in err
    assert not (run / run_dir.LOCK_FILE).exists()


@pytest.mark.shared_data
@needs_shared
def test_a_rerun_removes_the_temporary_files_a_killed_run_left(tmp_path):
    run = tmp_path / "run"
    assert main([*PRUNE, "--out", str(run)]) == 0
    (run / "finetune").mkdir()
    orphans = [run / ".report.json.k1ll3d.tmp", run / "finetune" / ".last.pt.k1ll3d.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"half a file")
    assert main([*PRUNE, "--out", str(run)]) == 0
    assert not any(o.exists() for o in orphans)


def test_files_are_written_with_the_usual_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "a.json", "{}")
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    path.chmod(0o640)
    atomic_write_text(path, "{}")  # a rewrite keeps the file's mode
    assert path.stat().st_mode & 0o777 == 0o640
