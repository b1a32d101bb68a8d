"""Datasets for prunekit: CIFAR-10 (two on-disk layouts) and ImageNet-style folders.

CIFAR-10 is found in either layout below a *data root* (see :func:`resolve_data_root`):

* ``official``: the python batches ``cifar-10-batches-py/`` (``data_batch_1..5``,
  ``test_batch``), as unpacked from the archive :func:`download_cifar10` fetches;
* ``packaged``: ``cifar10/train_*.npz``, ``cifar10/test.npz`` and
  ``cifar10/test_lossless_first1000.npz``, the project's shared copy. Its full arrays were
  decoded from a JPEG copy of CIFAR-10 and cost pretrained nets about 10 accuracy points;
  only ``test-lossless`` has the exact original pixels.

Every accuracy should be reported together with its split name (see :data:`SPLITS` and
:func:`describe_split`) so a reader can tell a JPEG-test number from a lossless one and a
validation number from a test number.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"

#: Split names used throughout prunekit and in every report.
SPLITS = ("train", "val", "trainval", "test", "test-lossless")
DEFAULT_VAL_SIZE = 5000
#: Seeds of the held-out validation choice and of ``limit=`` subsets. Changing them changes
#: which images are "val", so they are constants, never taken from a global RNG.
VAL_SPLIT_SEED = 0
LIMIT_SEED = 1
DATA_ENV_VAR = "PRUNEKIT_DATA"

_OFFICIAL_DIR = "cifar-10-batches-py"
_OFFICIAL_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_OFFICIAL_FILES = _OFFICIAL_TRAIN_FILES + ("test_batch",)
_PACKAGED_DIR = "cifar10"
_LOSSLESS_FILE = "test_lossless_first1000.npz"
_LOSSLESS_COUNT = 1000  # the packaged lossless file holds the first 1,000 test images


class DatasetNotFoundError(FileNotFoundError):
    """No dataset in a supported layout at any of the places prunekit looked."""


class ChecksumError(ValueError):
    """A downloaded file does not have the expected MD5 checksum."""


# --------------------------------------------------------------------------- locating data


def _default_roots() -> list[Path]:
    package_repo = Path(__file__).resolve().parents[1]
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


# --------------------------------------------------------------------------- reading files


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and builtins, so a tampered batch file
    cannot run code (the official format is a pickle; downloads are untrusted input)."""

    _NUMPY_NAMES = {"_reconstruct", "_frombuffer", "ndarray", "dtype", "scalar"}

    def find_class(self, module: str, name: str):
        is_numpy = module.split(".")[0] == "numpy" and name in self._NUMPY_NAMES
        # Python 3 protocol-2 pickles spell byte strings as _codecs.encode(text, "latin1").
        if not (is_numpy or (module, name) == ("_codecs", "encode")):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # avoid numpy 2's warning shim
        return getattr(importlib.import_module(module), name)


def _read_official_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as handle:
        # encoding="bytes": the official batches were pickled by Python 2.
        batch = _BatchUnpickler(handle, encoding="bytes").load()
    flat = np.asarray(batch[b"data"], dtype=np.uint8)
    # Rows are channel-major (1024 R, 1024 G, 1024 B); prunekit keeps HWC like the npz files.
    images = flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch[b"labels"], dtype=np.int64)


def _read_npz(path: Path, with_images: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    with np.load(path) as archive:
        labels = archive["y"].astype(np.int64)
        images = archive["x"] if with_images else None
    if images is not None and (images.shape[1:] != (32, 32, 3) or len(images) != len(labels)):
        raise ValueError(f"{path}: expected x (N,32,32,3) and y (N,), got {images.shape}")
    return images, labels


def _packaged_train_files(folder: Path) -> list[Path]:
    # Sort numerically: the parts must be concatenated in file order (train_0, train_1, ...).
    parts = [p for p in folder.glob("train_*.npz") if p.stem.split("_", 1)[1].isdigit()]
    return sorted(parts, key=lambda p: int(p.stem.split("_", 1)[1]))


def _check_train_parts_contiguous(files: list[Path]) -> None:
    """A missing or renamed part would silently shift every later image; ``first_index``
    (stored in each part) makes that detectable."""
    expected_start = 0
    for path in files:
        with np.load(path) as archive:
            if "first_index" in archive.files and int(archive["first_index"]) != expected_start:
                raise ValueError(
                    f"{path} starts at image {int(archive['first_index'])}, expected "
                    f"{expected_start}: is a train_*.npz part missing?"
                )
            expected_start += len(archive["y"])


def _read_part(folder: Path, layout: str, part: str, with_images: bool):
    """Read one of "trainval", "test", "test-lossless" (the splits stored on disk)."""
    if layout == "official":
        names = {"trainval": _OFFICIAL_TRAIN_FILES}.get(part, ("test_batch",))
        batches = [_read_official_batch(folder / name) for name in names]
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        if part == "test-lossless":  # test_batch is lossless; take the same 1,000 images
            images, labels = images[:_LOSSLESS_COUNT].copy(), labels[:_LOSSLESS_COUNT].copy()
        return (images if with_images else None), labels
    if part == "trainval":
        files = _packaged_train_files(folder)
        _check_train_parts_contiguous(files)
        parts = [_read_npz(p, with_images) for p in files]
        labels = np.concatenate([p[1] for p in parts])
        return (np.concatenate([p[0] for p in parts]) if with_images else None), labels
    name = "test.npz" if part == "test" else _LOSSLESS_FILE
    if not (folder / name).is_file():
        raise DatasetNotFoundError(f"split {part!r} needs {folder / name}, which is missing")
    return _read_npz(folder / name, with_images)


@functools.lru_cache(maxsize=4)
def _cached_part(folder: str, layout: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _read_part(Path(folder), layout, part, with_images=True)
    # Shared by every caller in the process: make accidental in-place edits fail loudly.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=8)
def _cached_labels(folder: str, layout: str, part: str) -> np.ndarray:
    if layout == "official":  # pickles cannot be read partially: load (and cache) it all
        return _cached_part(folder, layout, part)[1]
    labels = _read_part(Path(folder), layout, part, with_images=False)[1]
    labels.flags.writeable = False
    return labels


def clear_cache() -> None:
    """Forget the arrays cached by :func:`load_cifar10_arrays` (e.g. after files changed)."""
    _cached_part.cache_clear()
    _cached_labels.cache_clear()


# --------------------------------------------------------------------------- splits


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def _stored_part(split: str) -> str:
    """The on-disk part a split is cut from: train and val are both cut from trainval."""
    return "trainval" if split in ("train", "val") else split


def stratified_order(labels: Sequence[int] | np.ndarray, seed: int) -> np.ndarray:
    """All indices of ``labels`` in an order that visits the classes round-robin.

    Each class is shuffled by its own generator, ``np.random.default_rng([seed, class])``,
    so the result depends only on the labels and ``seed`` (never on a global RNG), and the
    first ``k`` entries are a class-balanced sample of size ``k``: every class contributes
    ``k // classes`` or one more, unless it runs out of images and the others make up for it.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        shuffled = members[np.random.default_rng([seed, int(cls)]).permutation(len(members))]
        rank_in_class[shuffled] = np.arange(len(members))
    # lexsort's last key is the primary one: first everyone's rank 0, then rank 1, ...
    return np.lexsort((labels, rank_in_class))


def train_val_indices(
    labels: Sequence[int] | np.ndarray, val_size: int = DEFAULT_VAL_SIZE, seed: int = VAL_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Split the trainval indices into sorted (train, val) index arrays; val is class-balanced."""
    count = len(labels)
    if not 0 <= val_size < count:
        raise ValueError(
            f"val_size must be in [0, {count}) for {count} training images, got {val_size}"
        )
    val = np.sort(stratified_order(labels, seed)[:val_size])
    train = np.setdiff1d(np.arange(count), val, assume_unique=True)
    return train, val


@functools.lru_cache(maxsize=8)
def _cached_train_val(folder: str, layout: str, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    return train_val_indices(_cached_labels(folder, layout, "trainval"), val_size)


def _split_indices(layout: str, folder: Path, split: str, val_size: int) -> np.ndarray | None:
    """Indices into the stored part for ``split``, or None when the split is the whole part."""
    if split not in ("train", "val"):
        return None
    if split == "val" and val_size == 0:
        raise ValueError("val_size=0 leaves the 'val' split empty")
    train, val = _cached_train_val(str(folder), layout, val_size)
    return train if split == "train" else val


def load_cifar10_arrays(
    root: str | os.PathLike | None, split: str, val_size: int = DEFAULT_VAL_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 32, 32, 3)`` (HWC, RGB) and labels ``int64 (N,)`` of a split.

    ``root`` goes through :func:`resolve_data_root` (None = search). Stored parts are cached
    per process; for "trainval", "test" and "test-lossless" the cached read-only arrays
    themselves are returned (copy them before editing), "train" and "val" are fresh copies.
    """
    _check_split(split)
    layout, folder = _locate(root)
    images, labels = _cached_part(str(folder), layout, _stored_part(split))
    indices = _split_indices(layout, folder, split, val_size)
    if indices is None:
        return images, labels
    return images[indices], labels[indices]


def load_cifar10_labels(
    root: str | os.PathLike | None, split: str, val_size: int = DEFAULT_VAL_SIZE
) -> np.ndarray:
    """Labels of a split without decoding the packaged images (cheap; for counting and sampling)."""
    _check_split(split)
    layout, folder = _locate(root)
    labels = _cached_labels(str(folder), layout, _stored_part(split))
    indices = _split_indices(layout, folder, split, val_size)
    return labels if indices is None else labels[indices]


def describe_split(
    root: str | os.PathLike | None, split: str, val_size: int = DEFAULT_VAL_SIZE
) -> str:
    """Human label for a split, e.g. for a report line "top-1 91.5% on <description>"."""
    _check_split(split)
    layout, folder = _locate(root)
    count = len(load_cifar10_labels(folder, split, val_size))
    lossy = layout == "packaged"
    if split == "train":
        total = len(_cached_labels(str(folder), layout, "trainval"))
        text = f"{count:,} of the {total:,} training images; {val_size:,} held out as 'val'"
    elif split == "val":
        text = f"{count:,} training images held out class-balanced, seed {VAL_SPLIT_SEED}"
    elif split == "trainval":
        text = f"all {count:,} training images"
    elif split == "test":
        text = f"{count:,} images" if lossy else f"{count:,} official test images"
    else:  # test-lossless: exact pixels in both layouts
        return f"{split} (first {count:,} official test images, original pixels)"
    if not lossy:
        return f"{split} ({text}, original pixels)"
    quality = "JPEG-decoded copy: ~10 points below lossless"
    return f"{split} ({text}, {quality}{'; class-major order' if split == 'test' else ''})"


# --------------------------------------------------------------------------- torch dataset


def normalization_stats(
    normalize: str | tuple[Sequence[float], Sequence[float]] | None,
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Turn ``"imagenet"``, ``"cifar"``, an explicit ``(mean, std)`` pair or None into stats."""
    if normalize is None:
        return None
    if isinstance(normalize, str):
        named = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar": (CIFAR_MEAN, CIFAR_STD)}
        if normalize not in named:
            raise ValueError(
                f"normalize={normalize!r}: use 'imagenet', 'cifar', (mean, std) or None"
            )
        return named[normalize]
    mean, std = (tuple(float(v) for v in stats) for stats in normalize)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"normalize needs 3 means and 3 positive stds, got {normalize!r}")
    return mean, std


def random_crop_flip(image: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a ``(C, H, W)`` tensor: zero-pad, random crop, random
    horizontal flip. Uses torch's RNG, so ``torch.manual_seed`` (and the per-worker seeds a
    DataLoader derives from it) make it reproducible."""
    _, height, width = image.shape
    padded = F.pad(image, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    crop = padded[:, top:top + height, left:left + width]
    return crop.flip(-1) if torch.rand(()) < 0.5 else crop


class CIFAR10(Dataset):
    """CIFAR-10 split as ``(float tensor (3, 32, 32), int label)`` pairs.

    Args:
        root: data root or CIFAR folder; None searches (see :func:`resolve_data_root`).
        split: one of :data:`SPLITS`.
        train_augment: pad-4 random crop + horizontal flip; default on for "train" and
            "trainval" only. Padding happens before normalisation, i.e. the border is black.
        normalize: "imagenet" (default; what the shared pretrained weights expect), "cifar",
            an explicit ``(mean, std)`` pair, or None for plain ``[0, 1]`` pixels.
        limit: keep only this many images, chosen class-balanced by a fixed seed
            (:data:`LIMIT_SEED`, see :func:`stratified_order`) and kept in stored order. Not a
            prefix on purpose: the packaged ``test.npz`` is class-major, so its first 100
            images would all be airplanes.
        val_size: images held out of "train" as "val".

    Attributes: ``split``, ``description`` (for reports), ``labels`` (int64 array),
    ``classes``.
    """

    classes = CIFAR10_CLASSES

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "test",
        train_augment: bool | None = None,
        normalize: str | tuple[Sequence[float], Sequence[float]] | None = "imagenet",
        limit: int | None = None,
        val_size: int = DEFAULT_VAL_SIZE,
    ) -> None:
        _check_split(split)
        layout, folder = _locate(root)
        # Keep the cached stored part plus an index array instead of copying 45,000 images.
        self._images, stored_labels = _cached_part(str(folder), layout, _stored_part(split))
        indices = _split_indices(layout, folder, split, val_size)
        labels = stored_labels if indices is None else stored_labels[indices]
        self.description = describe_split(folder, split, val_size)
        if limit is not None:
            if limit <= 0:
                raise ValueError(f"limit must be positive, got {limit}")
            if limit < len(labels):
                chosen = np.sort(stratified_order(labels, LIMIT_SEED)[:limit])
                indices = chosen if indices is None else indices[chosen]
                labels = labels[chosen]
                self.description += f" [class-balanced subset of {limit:,}, seed {LIMIT_SEED}]"
        self._indices = indices
        self.labels = np.asarray(labels, dtype=np.int64)
        self.split = split
        if train_augment is None:
            train_augment = split in ("train", "trainval")
        self.train_augment = train_augment
        stats = normalization_stats(normalize)
        self._mean = None if stats is None else torch.tensor(stats[0]).view(3, 1, 1)
        self._std = None if stats is None else torch.tensor(stats[1]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        stored = item if self._indices is None else self._indices[item]
        # torch.tensor copies, so the shared read-only cache is never aliased.
        image = torch.tensor(self._images[stored]).permute(2, 0, 1).float().div_(255.0)
        if self.train_augment:
            image = random_crop_flip(image)
        if self._mean is not None:
            image = (image - self._mean) / self._std
        return image, int(self.labels[item])

    def __repr__(self) -> str:
        return f"CIFAR10({self.description}, augment={self.train_augment})"


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
    """DataLoader, sharded with a ``DistributedSampler(seed=seed)`` when ``distributed`` is True
    or a ``torch.distributed`` process group is initialised.

    With a DistributedSampler the caller MUST call ``loader.sampler.set_epoch(epoch)`` before
    every epoch, otherwise each epoch repeats the same order. ``num_replicas``/``rank`` default
    to the process group's; pass them to shard without one. Without sharding the shuffle order
    and augmentation follow torch's global RNG (``torch.manual_seed``).
    """
    group_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler = None
    if distributed or group_ready:
        sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
            drop_last=drop_last,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


# --------------------------------------------------------------------------- download


def _check_members(archive: tarfile.TarFile) -> None:
    for member in archive.getmembers():
        parts = Path(member.name).parts
        if Path(member.name).is_absolute() or member.name.startswith(("/", "\\")) or ".." in parts:
            raise ValueError(f"refusing to extract {member.name!r}: path escapes the target")
        if not (member.isfile() or member.isdir()):
            raise ValueError(f"refusing to extract {member.name!r}: links/devices not allowed")


def _open_url(url: str):
    try:
        return urllib.request.urlopen(url)
    except urllib.error.URLError as error:
        # Typical on offline machines: say how to use a copy that is already on disk.
        raise ConnectionError(
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
                raise ValueError(f"{url} does not contain {_OFFICIAL_DIR}/{', '.join(missing)}")
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(unpacked), str(target))
    finally:
        archive_path.unlink(missing_ok=True)
    clear_cache()  # a forced re-download may replace files that are cached
    return target


# --------------------------------------------------------------------------- image folders


def image_folder(
    root: str | os.PathLike,
    split: str = "train",
    image_size: int = 224,
    train_augment: bool | None = None,
):
    """``torchvision.datasets.ImageFolder`` over ``root/<split>`` with ImageNet transforms.

    Train: RandomResizedCrop(image_size) + horizontal flip; eval: Resize(image_size * 8/7,
    i.e. 256 for 224) + CenterCrop(image_size). Both normalise with ImageNet statistics.
    ``train_augment`` defaults to ``split == "train"``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown image-folder split {split!r}; valid splits: train, val")
    try:
        from torchvision import datasets, transforms
    except ImportError as error:
        raise ImportError(
            "image_folder needs torchvision: pip install prunekit[vision]"
        ) from error
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"image folder not found: {folder} (expected <root>/{split}/<class>/<images>)"
        )
    augment = split == "train" if train_augment is None else train_augment
    if augment:
        geometry = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        resize = round(image_size * 256 / 224)
        geometry = [transforms.Resize(resize), transforms.CenterCrop(image_size)]
    pipeline = transforms.Compose(
        geometry + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    return datasets.ImageFolder(str(folder), transform=pipeline)
