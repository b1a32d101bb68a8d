"""Atomic file writing: a file prunekit writes is either the old complete file or the new one.

Every write goes to a temporary file in the destination's directory (same file system, so the
rename is atomic), is flushed and fsynced, then renamed over the destination with
``os.replace``; the directory is fsynced too, so the rename survives a power cut. A planted
symlink at the destination is replaced, never written through. Temporary files are named
``.<name>.<random>.tmp``; :func:`remove_stale_temp_files` clears those a killed run left.
Imports nothing from prunekit (bottom of the import graph).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

__all__ = ["cache_root", "atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "fsync_directory", "remove_stale_temp_files", "temp_path_for"]

TEMP_SUFFIX = ".tmp"
# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _new_file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would give: the existing file's when it is a regular
    file, otherwise 0o666 less the umask (mkstemp's own 0o600 would hide results from the
    user's group and other tools)."""
    try:
        if path.is_file() and not path.is_symlink():
            return path.stat().st_mode & 0o7777
    except OSError:
        pass
    return 0o666 & ~_UMASK


def _temp_file(path: Path) -> tuple[int, str]:
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.chmod(name, _new_file_mode(path))
    except OSError:  # e.g. file systems without permissions; the content matters more
        pass
    return handle, name


def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh, empty temporary file next to ``path`` (for writers that need a file name,
    e.g. exporters); the caller renames it with ``os.replace`` or deletes it."""
    handle, name = _temp_file(Path(path))
    os.close(handle)
    return Path(name)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(stream)`` on a temporary binary file, fsync it and rename it to ``path``.

    On any exception (KeyboardInterrupt too) the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    handle, temp_name = _temp_file(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda stream: stream.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any, **dumps_kwargs: Any) -> Path:
    """``value`` as JSON (serialised completely before anything is written)."""
    return atomic_write_text(path, json.dumps(value, **dumps_kwargs))


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files an interrupted writer left in ``directory``;
    returns what was removed. Call it only while holding the directory (e.g. a run lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for candidate in directory.glob(f".*{TEMP_SUFFIX}"):
        if candidate.is_file() and not candidate.is_symlink():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def cache_root() -> Path:
    """prunekit's cache folder: ``$PRUNEKIT_CACHE``, default ``~/.cache/prunekit`` (compiled
    kernels, layout decisions, latency tables)."""
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))
