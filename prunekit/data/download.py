"""Downloading the official CIFAR-10 python archive: MD5 check, safe unpacking (no absolute
paths, ``..`` or links), and an error that explains offline use when there is no network."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import DataError
from .cifar_files import _OFFICIAL_DIR, _OFFICIAL_FILES, clear_cache
from .errors import ChecksumError, DownloadError
from .locate import DATA_ENV_VAR

__all__ = ["CIFAR10_MD5", "CIFAR10_URL", "download_cifar10"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


def _check_members(archive: tarfile.TarFile) -> None:
    for member in archive.getmembers():
        parts = Path(member.name).parts
        if Path(member.name).is_absolute() or member.name.startswith(("/", "\\")) or ".." in parts:
            raise DataError(f"refusing to extract {member.name!r}: path escapes the target; "
                            f"the archive is not the official CIFAR-10 one")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"refusing to extract {member.name!r}: links/devices not allowed; "
                            f"the archive is not the official CIFAR-10 one")


def _open_url(url: str):
    try:
        return urllib.request.urlopen(url)
    except urllib.error.URLError as error:
        # Typical on offline machines: say how to use a copy that is already on disk.
        raise DownloadError(
            f"could not download {url}: {error.reason}. Without internet access, point "
            f"prunekit at an existing copy with '--data DIR' or {DATA_ENV_VAR}=DIR."
        ) from error


def download_cifar10(
    root: str | os.PathLike, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, force: bool = False
) -> Path:
    """Download and unpack the official CIFAR-10 python archive to ``root/cifar-10-batches-py``.

    Skipped when that folder already holds all six batches (unless ``force``). The archive is
    streamed to a temporary file, its MD5 checked (a mismatch deletes it and raises
    :class:`ChecksumError`), unpacked into a temporary folder after refusing absolute paths,
    ``..`` and links, then moved into place; the archive is removed afterwards.
    """
    root = Path(root).expanduser()
    target = root / _OFFICIAL_DIR
    if not force and all((target / name).is_file() for name in _OFFICIAL_FILES):
        return target
    root.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm  # lazy: only downloads need a progress bar

    handle, archive_name = tempfile.mkstemp(dir=root, prefix=".cifar10-", suffix=".tar.gz")
    archive_path = Path(archive_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(handle, "wb") as out, _open_url(url) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc="CIFAR-10") as progress:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.update(len(chunk))
        if digest.hexdigest() != md5.lower():
            raise ChecksumError(
                f"MD5 mismatch for {url}: expected {md5}, got {digest.hexdigest()}; "
                "the downloaded file was deleted (interrupted or altered download?)"
            )
        with tempfile.TemporaryDirectory(dir=root, prefix=".cifar10-extract-") as staging:
            with tarfile.open(archive_path, "r:gz") as archive:
                _check_members(archive)
                if hasattr(tarfile, "data_filter"):  # second line of defence where available
                    archive.extractall(staging, filter="data")
                else:
                    archive.extractall(staging)
            unpacked = Path(staging) / _OFFICIAL_DIR
            missing = [n for n in _OFFICIAL_FILES if not (unpacked / n).is_file()]
            if missing:
                raise DataError(f"{url} does not contain {_OFFICIAL_DIR}/{', '.join(missing)}; "
                                f"give the official CIFAR-10 python archive")
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(unpacked), str(target))
    finally:
        archive_path.unlink(missing_ok=True)
    clear_cache()  # a forced re-download may replace files that are cached
    return target
