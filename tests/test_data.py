"""Tests for prunekit.data: layouts, splits, augmentation, data-root search, download.

Everything runs on tiny fake datasets written to tmp_path, except the tests marked
``shared_data``, which read the project's shared CIFAR-10 copy when it is present.
The network is never touched: downloads use ``file://`` URLs.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit import data
from prunekit.data import (
    CIFAR10,
    SPLITS,
    ChecksumError,
    DatasetNotFoundError,
    build_loader,
    describe_split,
    download_cifar10,
    load_cifar10_arrays,
    load_cifar10_labels,
    random_crop_flip,
    resolve_data_root,
    train_val_indices,
)
from prunekit.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IMAGES_PER_BATCH = 20
TRAIN_COUNT = 5 * IMAGES_PER_BATCH
TEST_COUNT = 30
VAL_SIZE = 20  # 2 per class of the 100 fake training images


# --------------------------------------------------------------------------- fake datasets


def fake_images(count: int, salt: int) -> np.ndarray:
    """HWC uint8 images whose every pixel is a known function of (image, row, column, channel)."""
    n, h, w, c = np.meshgrid(
        np.arange(count), np.arange(32), np.arange(32), np.arange(3), indexing="ij"
    )
    return ((n * 7 + h * 3 + w * 5 + c * 80 + salt) % 256).astype(np.uint8)


def fake_cifar():
    train_x = fake_images(TRAIN_COUNT, salt=0)
    train_y = np.arange(TRAIN_COUNT) % 10
    test_x = fake_images(TEST_COUNT, salt=101)
    test_y = np.repeat(np.arange(10), TEST_COUNT // 10)  # class-major, like the shared test.npz
    return train_x, train_y, test_x, test_y


def write_official_batch(path: Path, images: np.ndarray, labels: np.ndarray, protocol: int) -> None:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # HWC -> CHW-flattened
    batch = {b"batch_label": b"fake", b"labels": [int(v) for v in labels], b"data": rows}
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=protocol)


def make_official(parent: Path) -> Path:
    """Write a fake ``cifar-10-batches-py`` under ``parent`` and return that folder."""
    train_x, train_y, test_x, test_y = fake_cifar()
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(5):
        part = slice(i * IMAGES_PER_BATCH, (i + 1) * IMAGES_PER_BATCH)
        # Protocol 2 stands in for the Python 2 pickles of the real files.
        write_official_batch(folder / f"data_batch_{i + 1}", train_x[part], train_y[part], 2)
    write_official_batch(folder / "test_batch", test_x, test_y, pickle.HIGHEST_PROTOCOL)
    return folder


def make_packaged(parent: Path) -> Path:
    """Write the same fake content in the packaged ``cifar10/*.npz`` layout."""
    train_x, train_y, test_x, test_y = fake_cifar()
    folder = parent / "cifar10"
    folder.mkdir(parents=True)
    # Uneven parts, named so that a lexical sort (train_10 < train_2) would be wrong.
    bounds = [0, 30, 45, 60, 70, 80, 85, 90, 94, 97, 99, TRAIN_COUNT]
    for part, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.savez(
            folder / f"train_{part}.npz",
            x=train_x[start:stop], y=train_y[start:stop].astype(np.uint8), first_index=start,
        )
    np.savez(folder / "test.npz", x=test_x, y=test_y.astype(np.uint8))
    np.savez(
        folder / "test_lossless_first1000.npz", x=test_x, y=test_y.astype(np.uint8),
        index_in_test_npz=np.arange(TEST_COUNT, dtype=np.int32),
    )
    return folder


@pytest.fixture
def official_root(tmp_path: Path) -> Path:
    make_official(tmp_path)
    return tmp_path


@pytest.fixture
def packaged_root(tmp_path: Path) -> Path:
    make_packaged(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- layouts


def test_official_layout_shapes_dtypes_labels(official_root):
    train_x, train_y, test_x, test_y = fake_cifar()
    x, y = load_cifar10_arrays(official_root, "trainval")
    assert x.shape == (TRAIN_COUNT, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (TRAIN_COUNT,) and y.dtype == np.int64
    np.testing.assert_array_equal(x, train_x)
    np.testing.assert_array_equal(y, train_y)
    x, y = load_cifar10_arrays(official_root, "test")
    np.testing.assert_array_equal(x, test_x)
    np.testing.assert_array_equal(y, test_y)


def test_official_rows_are_converted_from_chw_to_hwc(tmp_path):
    folder = make_official(tmp_path)
    # One image with constant planes R=10, G=20, B=30 except the top-left red pixel.
    planes = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 20, 30)])
    planes[0, 0, 1] = 200  # red channel, row 0, column 1
    batch = {b"labels": [3], b"data": planes.reshape(1, 3072)}
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump(batch, handle, protocol=2)
    x, y = load_cifar10_arrays(tmp_path, "test")
    assert x.shape == (1, 32, 32, 3) and y.tolist() == [3]
    assert x[0, 5, 5].tolist() == [10, 20, 30]
    assert x[0, 0, 1].tolist() == [200, 20, 30]
    assert x[0, 1, 0].tolist() == [10, 20, 30]


def test_both_layouts_give_identical_arrays(tmp_path):
    official, packaged = tmp_path / "a", tmp_path / "b"
    make_official(official)
    make_packaged(packaged)
    for split in SPLITS:
        xa, ya = load_cifar10_arrays(official, split, val_size=VAL_SIZE)
        xb, yb = load_cifar10_arrays(packaged, split, val_size=VAL_SIZE)
        np.testing.assert_array_equal(xa, xb, err_msg=split)
        np.testing.assert_array_equal(ya, yb, err_msg=split)
    assert "original pixels" in describe_split(official, "test")
    assert "JPEG" in describe_split(packaged, "test")
    assert "original pixels" in describe_split(packaged, "test-lossless")


def test_root_may_be_parent_or_the_cifar_folder_itself(tmp_path):
    official = make_official(tmp_path / "a")
    packaged = make_packaged(tmp_path / "b")
    for root in (official.parent, official, packaged.parent, packaged):
        assert len(load_cifar10_labels(root, "test")) == TEST_COUNT


def test_stored_splits_are_cached_and_read_only(packaged_root):
    first = load_cifar10_arrays(packaged_root, "test")
    second = load_cifar10_arrays(packaged_root, "test")
    assert first[0] is second[0]
    with pytest.raises(ValueError):
        first[0][0, 0, 0, 0] = 1


def test_malicious_pickle_is_refused(tmp_path):
    folder = make_official(tmp_path)

    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"labels": [0], b"data": RunsCode()}, handle)
    # A DataError (one CLI line) naming the file and the refused global, not a raw
    # UnpicklingError.
    with pytest.raises(DataError, match="refused as unsafe") as error:
        load_cifar10_arrays(tmp_path, "test")
    assert "test_batch" in str(error.value) and "getcwd" in str(error.value)


def python2_style_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """Hand-assembled protocol-2 pickle shaped like the real batches, which Python 2's cPickle
    wrote: byte strings as BINSTRING and numpy globals under ``numpy.core``."""

    def short_string(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value

    def int32(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    dtype = (
        b"cnumpy\ndtype\n" + short_string(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + short_string(b"|") + b"NNN" + int32(-1) + int32(-1) + b"K\x00tb"
    )
    raw = rows.tobytes()
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
        + b"K\x00\x85" + short_string(b"b") + b"\x87R"
        + b"(K\x01" + int32(rows.shape[0]) + int32(rows.shape[1]) + b"\x86"
        + dtype + b"\x89" + b"T" + struct.pack("<I", len(raw)) + raw + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (
        b"\x80\x02}(" + short_string(b"data") + array
        + short_string(b"labels") + label_list + b"u."
    )


def test_python2_pickled_batches_load(tmp_path):
    folder = make_official(tmp_path)
    test_x, test_y = fake_cifar()[2:]
    rows = test_x.transpose(0, 3, 1, 2).reshape(len(test_x), 3072)
    (folder / "test_batch").write_bytes(python2_style_pickle(rows, test_y.tolist()))
    x, y = load_cifar10_arrays(tmp_path, "test")
    np.testing.assert_array_equal(x, test_x)
    np.testing.assert_array_equal(y, test_y)


def test_missing_packaged_part_is_detected(packaged_root):
    (packaged_root / "cifar10" / "train_1.npz").unlink()
    with pytest.raises(ValueError, match="missing"):
        load_cifar10_labels(packaged_root, "trainval")


# --------------------------------------------------------------------------- splits


def test_unknown_split_lists_valid_splits(packaged_root):
    with pytest.raises(ValueError) as error:
        load_cifar10_arrays(packaged_root, "validation")
    for name in SPLITS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="test-lossless"):
        CIFAR10(packaged_root, split="testing")


def test_train_val_split_disjoint_complete_balanced(packaged_root):
    train_y = load_cifar10_labels(packaged_root, "train", val_size=VAL_SIZE)
    val_y = load_cifar10_labels(packaged_root, "val", val_size=VAL_SIZE)
    assert len(train_y) == TRAIN_COUNT - VAL_SIZE and len(val_y) == VAL_SIZE
    assert np.bincount(val_y, minlength=10).tolist() == [2] * 10

    train_idx, val_idx = train_val_indices(fake_cifar()[1], VAL_SIZE)
    assert not set(train_idx) & set(val_idx)
    union = np.sort(np.concatenate([train_idx, val_idx]))
    np.testing.assert_array_equal(union, np.arange(TRAIN_COUNT))
    # The arrays really are the trainval images at those indices.
    x_all, _ = load_cifar10_arrays(packaged_root, "trainval")
    x_val, _ = load_cifar10_arrays(packaged_root, "val", val_size=VAL_SIZE)
    np.testing.assert_array_equal(x_val, x_all[val_idx])


def test_val_split_ignores_global_seeds():
    labels = np.arange(1000) % 10
    torch.manual_seed(1)
    np.random.seed(1)
    first = train_val_indices(labels, 100)[1]
    torch.manual_seed(2)
    np.random.seed(2)
    np.random.permutation(10)
    second = train_val_indices(labels, 100)[1]
    np.testing.assert_array_equal(first, second)
    # Pinned: a numpy change to the seeded permutation would silently move "val" images.
    assert train_val_indices(np.arange(100) % 10, 10)[1].tolist() == PINNED_VAL_INDICES


PINNED_VAL_INDICES = [23, 37, 40, 49, 75, 76, 82, 88, 91, 94]


def test_val_size_validation(packaged_root):
    with pytest.raises(ValueError, match="val_size"):
        load_cifar10_arrays(packaged_root, "train", val_size=TRAIN_COUNT)
    with pytest.raises(ValueError, match="empty"):
        load_cifar10_arrays(packaged_root, "val", val_size=0)
    assert len(load_cifar10_labels(packaged_root, "train", val_size=0)) == TRAIN_COUNT


# --------------------------------------------------------------------------- torch dataset


def test_dataset_items_and_normalisation(packaged_root):
    raw = load_cifar10_arrays(packaged_root, "test")[0]
    pixel = raw[0, 3, 4].astype(np.float64) / 255.0
    plain = CIFAR10(packaged_root, "test", normalize=None)
    image, label = plain[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    np.testing.assert_allclose(image[:, 3, 4].numpy(), pixel, rtol=1e-6)

    stats = {
        "imagenet": (data.IMAGENET_MEAN, data.IMAGENET_STD),
        "cifar": (data.CIFAR_MEAN, data.CIFAR_STD),
        ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)): ((0.5,) * 3, (0.25,) * 3),
    }
    for normalize, (mean, std) in stats.items():
        image = CIFAR10(packaged_root, "test", normalize=normalize)[0][0]
        expected = (pixel - np.array(mean)) / np.array(std)
        np.testing.assert_allclose(image[:, 3, 4].numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError):
        CIFAR10(packaged_root, "test", normalize="imagenet1k")


def test_augmentation_defaults_by_split(packaged_root):
    assert CIFAR10(packaged_root, "train", val_size=VAL_SIZE).train_augment
    assert CIFAR10(packaged_root, "trainval").train_augment
    for split in ("val", "test", "test-lossless"):
        assert not CIFAR10(packaged_root, split, val_size=VAL_SIZE).train_augment
    assert not CIFAR10(packaged_root, "train", train_augment=False, val_size=VAL_SIZE).train_augment


def test_augmentation_reproducible_and_effective(packaged_root):
    dataset = CIFAR10(packaged_root, "trainval", normalize=None)
    stored = load_cifar10_arrays(packaged_root, "trainval")[0][5]
    original = torch.tensor(stored).permute(2, 0, 1) / 255
    torch.manual_seed(0)
    first = [dataset[5][0] for _ in range(16)]
    torch.manual_seed(0)
    second = [dataset[5][0] for _ in range(16)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(a.shape == (3, 32, 32) for a in first)
    assert any(not torch.equal(a, original) for a in first)

    # Zero padding: a crop shifted to the corner shows black borders; flips mirror columns.
    image = torch.rand(3, 32, 32) + 0.1
    outcomes = [random_crop_flip(image) for _ in range(64)]
    assert any((out == 0).any() for out in outcomes)
    flips_only = [random_crop_flip(image, padding=0) for _ in range(32)]
    assert any(torch.equal(out, image.flip(-1)) for out in flips_only)
    assert any(torch.equal(out, image) for out in flips_only)


def test_limit_is_class_balanced_and_deterministic(packaged_root):
    limited = CIFAR10(packaged_root, "test", limit=10)  # test is class-major: a prefix is 1 class
    assert len(limited) == 10 and sorted(limited.labels.tolist()) == list(range(10))
    again = CIFAR10(packaged_root, "test", limit=10)
    assert all(torch.equal(limited[i][0], again[i][0]) for i in range(10))
    assert "subset of 10" in limited.description and limited.split == "test"
    assert len(CIFAR10(packaged_root, "test", limit=10_000)) == TEST_COUNT


def test_dataloader_workers_are_reproducible(packaged_root):
    dataset = CIFAR10(packaged_root, "trainval", normalize=None)

    def one_epoch():
        torch.manual_seed(3)
        loader = build_loader(dataset, batch_size=25, shuffle=True, num_workers=2)
        return torch.cat([images for images, _ in loader])

    assert torch.equal(one_epoch(), one_epoch())


def test_build_loader_plain_and_distributed(packaged_root):
    dataset = CIFAR10(packaged_root, "trainval", normalize=None, train_augment=False)
    plain = build_loader(dataset, batch_size=32, shuffle=False)
    batches = list(plain)
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]
    assert batches[0][0].shape == (32, 3, 32, 32)

    seen = []
    for rank in (0, 1):
        loader = build_loader(
            dataset, 16, shuffle=True, distributed=True, seed=5, num_replicas=2, rank=rank
        )
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        labels = torch.cat([y for _, y in loader])
        assert len(labels) == TRAIN_COUNT // 2
        seen.append(list(loader.sampler))
    assert sorted(seen[0] + seen[1]) == list(range(TRAIN_COUNT))
    loader.sampler.set_epoch(1)
    assert list(loader.sampler) != seen[1]


# --------------------------------------------------------------------------- data root


def test_env_var_is_honoured_and_explicit_argument_wins(tmp_path, monkeypatch):
    from_env, explicit = tmp_path / "env", tmp_path / "explicit"
    make_packaged(from_env)
    make_official(explicit)
    monkeypatch.setenv("PRUNEKIT_DATA", str(from_env))
    assert resolve_data_root() == from_env
    assert resolve_data_root(explicit) == explicit
    assert len(CIFAR10(split="test")) == TEST_COUNT  # root=None follows the env var


def test_missing_data_error_names_places_and_remedies(tmp_path, monkeypatch):
    empty = tmp_path / "nothing-here"
    monkeypatch.setenv("PRUNEKIT_DATA", str(empty))
    with pytest.raises(DatasetNotFoundError) as error:
        resolve_data_root()
    assert str(empty) in str(error.value) and "PRUNEKIT_DATA" in str(error.value)
    assert isinstance(error.value, FileNotFoundError)

    monkeypatch.delenv("PRUNEKIT_DATA")
    defaults = [tmp_path / "d1", tmp_path / "d2"]
    monkeypatch.setattr(data.locate, "_default_roots", lambda: defaults)  # looked up there
    with pytest.raises(DatasetNotFoundError) as error:
        CIFAR10(split="test")
    message = str(error.value)
    assert all(str(place) in message for place in defaults)
    assert "--data" in message and "PRUNEKIT_DATA" in message and "download_cifar10" in message


# --------------------------------------------------------------------------- download


def make_archive(tmp_path: Path, evil: bool = False) -> tuple[Path, str]:
    source = tmp_path / "source"
    make_official(source)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if evil:
            payload = b"gotcha"
            member = tarfile.TarInfo("../evil")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_from_file_url(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "downloaded"
    folder = download_cifar10(root, url=archive.as_uri(), md5=md5)
    assert folder == root / "cifar-10-batches-py"
    np.testing.assert_array_equal(load_cifar10_arrays(root, "trainval")[0], fake_cifar()[0])
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no archive left
    # Already present: no download is attempted (this URL does not exist).
    assert download_cifar10(root, url=(tmp_path / "missing.tar.gz").as_uri(), md5=md5) == folder


def test_download_with_wrong_checksum_fails_and_cleans_up(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "downloaded"
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as error:
        download_cifar10(root, url=archive.as_uri(), md5=wrong)
    assert wrong in str(error.value) and md5 in str(error.value)
    assert list(root.iterdir()) == []


def test_download_failure_explains_offline_use(tmp_path):
    with pytest.raises(ConnectionError, match="PRUNEKIT_DATA"):
        download_cifar10(tmp_path / "root", url=(tmp_path / "absent.tar.gz").as_uri())
    assert list((tmp_path / "root").iterdir()) == []


def test_download_refuses_path_traversal(tmp_path):
    archive, md5 = make_archive(tmp_path, evil=True)
    root = tmp_path / "downloaded"
    with pytest.raises(ValueError, match="evil"):
        download_cifar10(root, url=archive.as_uri(), md5=md5)
    assert not (tmp_path / "evil").exists()
    assert list(root.iterdir()) == []


# --------------------------------------------------------------------------- image folders


def test_image_folder_transforms_and_errors(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (48, 40), (255, 0, 0)).save(tmp_path / "val" / cls / "a.png")
    evaluation = data.image_folder(tmp_path, "val", image_size=32)
    image, label = evaluation[1]
    assert image.shape == (3, 32, 32) and label == 1 and evaluation.classes == ["cat", "dog"]
    assert image[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)

    with pytest.raises(DatasetNotFoundError, match="train"):
        data.image_folder(tmp_path, "train")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"prunekit\[vision\]"):
        data.image_folder(tmp_path, "val")


# --------------------------------------------------------------------------- shared copy

needs_shared = pytest.mark.skipif(
    not (SHARED_DATA / "cifar10" / "test.npz").is_file(),
    reason=f"shared CIFAR-10 copy not found at {SHARED_DATA}",
)


@pytest.mark.shared_data
@needs_shared
def test_shared_copy_labels():
    lossless_x, lossless_y = load_cifar10_arrays(SHARED_DATA, "test-lossless")
    assert lossless_x.shape == (1000, 32, 32, 3)
    assert lossless_y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    first_train = load_cifar10_labels(SHARED_DATA, "trainval")[:10].tolist()
    assert first_train == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # canonical order (data_batch_1)
    assert np.bincount(load_cifar10_labels(SHARED_DATA, "test")).tolist() == [1000] * 10
    assert np.bincount(load_cifar10_labels(SHARED_DATA, "val")).tolist() == [500] * 10
    assert len(load_cifar10_labels(SHARED_DATA, "train")) == 45_000
    assert "JPEG" in describe_split(SHARED_DATA, "test")
