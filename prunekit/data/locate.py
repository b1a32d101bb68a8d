"""Finding the data root: an explicit directory, else ``$PRUNEKIT_DATA``, else default places.

A root is accepted when it (or its ``cifar-10-batches-py`` / ``cifar10`` child) holds CIFAR-10
in one of the layouts of :mod:`prunekit.data.cifar_files`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .cifar_files import _OFFICIAL_DIR, _OFFICIAL_FILES, _PACKAGED_DIR
from .errors import DatasetNotFoundError

__all__ = ["DATA_ENV_VAR", "resolve_data_root"]

DATA_ENV_VAR = "PRUNEKIT_DATA"


def _default_roots() -> list[Path]:
    # This file is <repository>/prunekit/data/locate.py.
    package_repo = Path(__file__).resolve().parents[2]
    return [
        Path.cwd() / "data",
        Path.home() / ".cache" / "prunekit" / "data",
        Path.cwd().parent / "shared" / "data",
        # The repository's sibling shared copy, found even when cwd is elsewhere.
        package_repo.parent / "shared" / "data",
    ]


def _find_cifar10(root: Path) -> tuple[str, Path] | None:
    """Return (layout, folder holding the files) if ``root`` or a child holds CIFAR-10."""
    for folder in (root / _OFFICIAL_DIR, root):
        if all((folder / name).is_file() for name in _OFFICIAL_FILES):
            return "official", folder
    # Official batches win when both exist: they are lossless throughout.
    for folder in (root / _PACKAGED_DIR, root):
        if (folder / "test.npz").is_file() and any(folder.glob("train_*.npz")):
            return "packaged", folder
    return None


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Find the data root: ``data_dir``, else ``$PRUNEKIT_DATA``, else the default places.

    Defaults, in order: ``./data``, ``~/.cache/prunekit/data``, ``../shared/data`` (relative
    to the current directory) and ``shared/data`` beside the repository holding this package.
    A root is accepted when it (or its ``cifar-10-batches-py`` / ``cifar10`` child) holds
    CIFAR-10. An explicit ``data_dir`` or environment variable is authoritative: if it holds
    no data the error names it rather than silently using some other copy.
    """
    if data_dir is not None:
        candidates, origin = [Path(data_dir)], "the data_dir argument"
    elif os.environ.get(DATA_ENV_VAR):
        candidates, origin = [Path(os.environ[DATA_ENV_VAR])], f"${DATA_ENV_VAR}"
    else:
        candidates, origin = _default_roots(), "the default locations"
    candidates = [c.expanduser().absolute() for c in candidates]
    for candidate in candidates:
        if _find_cifar10(candidate) is not None:
            return candidate
    looked = "\n".join(f"  - {c}" for c in candidates)
    raise DatasetNotFoundError(
        f"CIFAR-10 not found in {origin}. Looked in:\n{looked}\n"
        f"Each place may hold '{_OFFICIAL_DIR}/' (official python batches) or "
        f"'{_PACKAGED_DIR}/train_*.npz' + 'test.npz' (packaged arrays). Point prunekit at "
        f"the data with the '--data DIR' flag or {DATA_ENV_VAR}=DIR, or fetch it with "
        f"prunekit.data.download_cifar10(DIR)."
    )


def _locate(root: str | os.PathLike | None) -> tuple[str, Path]:
    resolved = resolve_data_root(root)
    found = _find_cifar10(resolved)
    assert found is not None  # resolve_data_root only returns roots that pass this check
    layout, folder = found
    return layout, folder.resolve()
