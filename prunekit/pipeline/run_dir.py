"""The run directory: checked usable before any work starts, and held by one run at a time.

:func:`check_out_dir` refuses an ``--out`` that is a file, lies under a file, or cannot be
written (read-only, no permission, no space) before data is read or a model is built.

:class:`RunLock` is ``OUT/.prunekit.lock``: it holds the holder's pid, host and start time,
and the holder keeps an exclusive ``flock`` on it for as long as the run lasts. A second run
into the same OUT is refused, naming the holder. A lock file whose holder is gone (killed,
machine rebooted) is a stale lock: it is reported as a warning and taken over, since the run
record and the atomic writes keep the directory consistent whatever the dead run was doing.
Where ``fcntl`` is missing (Windows), liveness falls back to checking the recorded pid.

Holding the lock, the run removes the temporary files a killed run's atomic writers left.
Under ``torchrun`` only rank 0 takes the lock; the other ranks belong to the same run.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from pathlib import Path

from ..errors import ConfigError, PrunekitError
from ..files import remove_stale_temp_files

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "StaleLockWarning", "check_out_dir"]

LOCK_FILE = ".prunekit.lock"


class RunLockedError(PrunekitError, RuntimeError):
    """Another live run holds the run directory."""


class StaleLockWarning(UserWarning):
    """A lock left by a run that is gone was found and taken over."""


def check_out_dir(out: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``out`` if needed and prove it is a writable directory; returns it as a Path.

    Raises ConfigError naming the problem (a file, under a file, read-only, not permitted, no
    space left on device) and what to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a directory; give a directory path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {out} lies under {parent}, which is a file; give a "
                                  "path under a directory")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".prunekit-write-test-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{flag} {out} cannot be written: {_reason(exc)}; "
                          "give a writable directory") from exc
    return out


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def is_secondary_rank() -> bool:
    """Whether this process is a ``torchrun`` rank other than 0 (which owns the run dir)."""
    return int(os.environ.get("RANK", "0") or 0) > 0


class RunLock:
    """Exclusive hold of a run directory for the duration of a ``with`` block."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None
        self.stale: dict | None = None  # the record of a stale lock taken over, if any
        self.removed_temp_files: list[Path] = []  # what a killed run's writers left

    def __enter__(self) -> "RunLock":
        if not is_secondary_rank():
            self.acquire()
            # Only now is it safe: no live writer can own a temporary file in here.
            self.removed_temp_files = [
                path for folder in [self.path.parent, *self.path.parent.rglob("*")]
                if folder.is_dir() and not folder.is_symlink()
                for path in remove_stale_temp_files(folder)]
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._read(fd)
                os.close(fd)
                raise self._locked(holder) from None
            # The holder removes the file when it finishes; a file opened just before that is
            # no longer the lock: try again on the current one.
            if self._same_file(fd):
                break
            os.close(fd)
        try:
            previous = self._read(fd)
            if fcntl is None and previous and previous.get("host") == socket.gethostname() \
                    and previous.get("pid") != os.getpid() and _process_alive(previous["pid"]):
                raise self._locked(previous)
            if previous:
                self.stale = previous
                warnings.warn(f"{self.path.parent}: found a stale lock of run pid "
                              f"{previous.get('pid')} on {previous.get('host')} (started "
                              f"{previous.get('started')}), which is gone; taking it over",
                              StaleLockWarning, stacklevel=3)
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Emptied and removed while still locked: a run that starts meanwhile sees no record.
        try:
            os.ftruncate(self._fd, 0)
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def _same_file(self, fd: int) -> bool:
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(fd)
        return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)

    @staticmethod
    def _read(fd: int) -> dict | None:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if not text:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return {"pid": None, "host": "?", "started": "?"}
        return record if isinstance(record, dict) else {"pid": None, "host": "?", "started": "?"}

    def _locked(self, holder: dict | None) -> RunLockedError:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
               if holder else "a run that is starting")
        return RunLockedError(f"{self.path.parent} is in use by another prunekit run ({who}). "
                              "Wait for it to finish, or give this run another --out.")
