"""Data files are validated when a dataset opens them, not taken at face value (issue 14).

Tiny fake CIFAR-10 folders in ``tmp_path`` (packaged ``cifar10/*.npz`` and official
``cifar-10-batches-py/`` layouts) with one file spoiled at a time: each spoiled file must be a
DataError naming it (and the offending value, index or lengths), each bad option a
ConfigError, and float pixels already in [0, 1] must not be divided by 255 a second time.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit import data
from prunekit.cli import main
from prunekit.data import CIFAR10, SPLITS, load_cifar10_arrays, load_cifar10_labels
from prunekit.errors import ConfigError, DataError, PrunekitError

TRAIN_PARTS = (20, 20)  # train_0.npz, train_1.npz
TEST_COUNT = 20


@pytest.fixture(autouse=True)
def fresh_cache():
    # The per-process cache is keyed on the folder; tests rewrite files in theirs.
    data.clear_cache()
    yield
    data.clear_cache()


def images(count: int, salt: int = 0) -> np.ndarray:
    n, h, w, c = np.meshgrid(np.arange(count), np.arange(32), np.arange(32), np.arange(3),
                             indexing="ij")
    return ((n * 7 + h * 3 + w * 5 + c * 80 + salt) % 256).astype(np.uint8)


def labels(count: int) -> np.ndarray:
    return (np.arange(count) % 10).astype(np.uint8)


def make_packaged(root: Path, **overrides) -> Path:
    """A packaged folder; ``overrides`` maps a file stem (``test``, ``train_1``, ...) to the
    arrays saved in it instead of good ones."""
    folder = root / "cifar10"
    folder.mkdir(parents=True)
    start = 0
    for i, count in enumerate(TRAIN_PARTS):
        arrays = {"x": images(count, salt=start), "y": labels(count), "first_index": start}
        np.savez(folder / f"train_{i}.npz", **overrides.get(f"train_{i}", arrays))
        start += count
    good_test = {"x": images(TEST_COUNT, salt=101), "y": labels(TEST_COUNT)}
    np.savez(folder / "test.npz", **overrides.get("test", good_test))
    np.savez(folder / "test_lossless_first1000.npz",
             **overrides.get("test_lossless_first1000", good_test))
    return folder


def write_batch(path: Path, x: np.ndarray, y) -> None:
    rows = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
    with open(path, "wb") as handle:
        pickle.dump({b"labels": [int(v) for v in y], b"data": rows}, handle, protocol=2)


def make_official(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(5):
        write_batch(folder / f"data_batch_{i + 1}", images(4, salt=i), labels(4))
    write_batch(folder / "test_batch", images(TEST_COUNT, salt=101), labels(TEST_COUNT))
    return folder


def open_test(root: Path, **kwargs):
    return CIFAR10(root, split="test", normalize=None, **kwargs)


def refused(root: Path, *needles: str, split: str = "test", error=DataError) -> str:
    """Open ``split`` expecting ``error``; every needle must be in its message."""
    with pytest.raises(error) as caught:
        CIFAR10(root, split=split, normalize=None, val_size=4)
    message = str(caught.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ------------------------------------------------------------------------ float pixels


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_float_images_in_unit_range_are_not_divided_again(tmp_path, dtype):
    make_packaged(tmp_path / "u8")
    x = images(TEST_COUNT, salt=101)
    make_packaged(tmp_path / "fl", test={"x": (x / 255.0).astype(dtype), "y": labels(TEST_COUNT)})
    as_uint8, as_float = open_test(tmp_path / "u8"), open_test(tmp_path / "fl")
    assert len(as_float) == TEST_COUNT
    for i in (0, 7, TEST_COUNT - 1):
        expected, got = as_uint8[i][0], as_float[i][0]
        assert got.dtype == torch.float32
        assert float(got.max()) > 0.5  # divided twice it would be at most 1/255
        torch.testing.assert_close(got, expected, atol=1 / 255, rtol=0)
    # Normalisation sees the same pixels too.
    normalised = CIFAR10(tmp_path / "fl", split="test")[3][0]
    torch.testing.assert_close(normalised, CIFAR10(tmp_path / "u8", split="test")[3][0],
                               atol=0.02, rtol=0)


def test_float_images_on_the_0_255_scale_are_refused_not_guessed(tmp_path):
    x = images(TEST_COUNT).astype(np.float32)
    make_packaged(tmp_path, test={"x": x, "y": labels(TEST_COUNT)})
    message = refused(tmp_path, "test.npz", "outside [0, 1]", "uint8", "divide them by 255")
    assert "image 0" in message or "image 1" in message  # the first image with a value > 1


@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_float_images_are_refused(tmp_path, value, shown):
    x = images(TEST_COUNT) / np.float32(255)
    x[5, 3, 4, 1] = value
    make_packaged(tmp_path, test={"x": x, "y": labels(TEST_COUNT)})
    refused(tmp_path, "test.npz", shown, "image 5", "finite")


def test_negative_float_images_are_refused(tmp_path):
    x = images(TEST_COUNT) / np.float32(255)
    x[2, 0, 0, 0] = -0.25
    make_packaged(tmp_path, test={"x": x, "y": labels(TEST_COUNT)})
    refused(tmp_path, "test.npz", "-0.25", "image 2", "[0, 1]")


# ------------------------------------------------------------------------ other pixel dtypes


@pytest.mark.parametrize("x, needle", [
    (images(TEST_COUNT) > 128, "bool"),
    (images(TEST_COUNT).astype(np.complex64), "complex"),
    (images(TEST_COUNT).astype(np.int16) + 200, "outside 0..255"),
    (images(TEST_COUNT).astype(np.int16) - 1, "-1"),
    (images(TEST_COUNT).astype("U3"), "<U3"),
], ids=["bool", "complex", "int-above-255", "int-negative", "strings"])
def test_images_that_are_not_pixels_are_refused(tmp_path, x, needle):
    make_packaged(tmp_path, test={"x": x, "y": labels(TEST_COUNT)})
    refused(tmp_path, "test.npz", needle)


def test_integer_images_in_range_are_converted_exactly(tmp_path):
    make_packaged(tmp_path / "u8")
    wide = images(TEST_COUNT, salt=101).astype(np.int64)
    make_packaged(tmp_path / "i64", test={"x": wide, "y": labels(TEST_COUNT)})
    x, _ = load_cifar10_arrays(tmp_path / "i64", "test")
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x, wide)
    assert torch.equal(open_test(tmp_path / "i64")[4][0], open_test(tmp_path / "u8")[4][0])


@pytest.mark.parametrize("x, needles", [
    (images(TEST_COUNT).transpose(0, 3, 1, 2), ("channels first", "transpose(0, 2, 3, 1)")),
    (images(TEST_COUNT)[:, :16], ("(20, 16, 32, 3)", "(N, 32, 32, 3)")),
    (images(TEST_COUNT)[0], ("(32, 32, 3)", "(N, 32, 32, 3)")),
], ids=["chw", "16-rows", "one-image"])
def test_images_of_the_wrong_shape_are_refused(tmp_path, x, needles):
    make_packaged(tmp_path, test={"x": x, "y": labels(TEST_COUNT)})
    refused(tmp_path, "test.npz", *needles)


# ------------------------------------------------------------------------ labels


def test_whole_number_float_labels_are_refused_with_the_conversion(tmp_path):
    make_packaged(tmp_path, test={"x": images(TEST_COUNT), "y": labels(TEST_COUNT) * 1.0})
    refused(tmp_path, "test.npz", "float labels", "y.astype(np.int64)")


def test_fractional_float_labels_are_refused_not_truncated(tmp_path):
    y = labels(TEST_COUNT) + 0.7  # truncation would have made them all valid classes
    make_packaged(tmp_path, test={"x": images(TEST_COUNT), "y": y})
    message = refused(tmp_path, "test.npz", "float labels", "not whole numbers")
    assert "astype" not in message


@pytest.mark.parametrize("bad", [10, -1, 255])
def test_labels_outside_the_classes_name_file_index_and_value(tmp_path, bad):
    y = labels(TEST_COUNT).astype(np.int16)
    y[13] = bad
    make_packaged(tmp_path, test={"x": images(TEST_COUNT), "y": y})
    refused(tmp_path, "test.npz", f"y[13] = {bad}", "0..9")


def test_label_out_of_range_in_a_train_part_names_that_part(tmp_path):
    y = labels(TRAIN_PARTS[1]).astype(np.int64)
    y[[3, 8]] = 10
    make_packaged(tmp_path, train_1={"x": images(TRAIN_PARTS[1]), "y": y,
                                     "first_index": TRAIN_PARTS[0]})
    message = refused(tmp_path, "train_1.npz", "y[3] = 10", "2 such labels", split="train")
    assert "train_0" not in message
    # The cheap label-only reader refuses it too.
    with pytest.raises(DataError, match="train_1.npz"):
        load_cifar10_labels(tmp_path, "trainval")


def test_bool_and_two_dimensional_labels_are_refused(tmp_path):
    make_packaged(tmp_path / "a", test={"x": images(TEST_COUNT), "y": labels(TEST_COUNT) > 4})
    refused(tmp_path / "a", "test.npz", "bool")
    one_hot = np.eye(10, dtype=np.int64)[labels(TEST_COUNT)]
    make_packaged(tmp_path / "b", test={"x": images(TEST_COUNT), "y": one_hot})
    refused(tmp_path / "b", "test.npz", "(20, 10)", "argmax(1)")


def test_length_mismatch_names_both_lengths_and_the_file(tmp_path):
    make_packaged(tmp_path, test={"x": images(TEST_COUNT), "y": labels(TEST_COUNT - 3)})
    refused(tmp_path, "test.npz", "x holds 20 images", "y holds 17 labels")
    # Also when only the labels are read (the images are not decoded for that).
    with pytest.raises(DataError, match="y holds 17 labels"):
        load_cifar10_labels(tmp_path, "test")


def test_label_only_reader_checks_the_image_header(tmp_path):
    x = images(TEST_COUNT).astype(np.float32)
    make_packaged(tmp_path, test={"x": x.transpose(0, 3, 1, 2), "y": labels(TEST_COUNT)})
    with pytest.raises(DataError, match="channels first"):
        load_cifar10_labels(tmp_path, "test")


# ------------------------------------------------------------------------ damaged npz files


def spoil(tmp_path: Path, name: str, content: bytes) -> Path:
    folder = make_packaged(tmp_path)
    (folder / name).write_bytes(content)
    return folder / name


@pytest.mark.parametrize("content, needle", [
    (b"this is not a zip archive at all", "not an npz"),
    (b"", "empty"),
], ids=["garbage", "empty"])
def test_garbage_npz_is_named(tmp_path, content, needle):
    path = spoil(tmp_path, "test.npz", content)
    message = refused(tmp_path, str(path), needle)
    assert "unsafe" not in message  # garbage is not a pickle


def test_truncated_npz_is_named(tmp_path):
    buffer = io.BytesIO()
    np.savez(buffer, x=images(TEST_COUNT), y=labels(TEST_COUNT))
    whole = buffer.getvalue()
    for cut in (len(whole) // 2, len(whole) - 30):
        data.clear_cache()
        root = tmp_path / str(cut)
        path = spoil(root, "test.npz", whole[:cut])
        refused(root, str(path), "damaged npz", "--data")


def test_corrupted_npz_member_is_named(tmp_path):
    buffer = io.BytesIO()
    np.savez(buffer, x=images(TEST_COUNT), y=labels(TEST_COUNT))
    spoiled = bytearray(buffer.getvalue())
    spoiled[spoiled.find(b"\x93NUMPY") + 500] ^= 0xFF  # a pixel byte: the CRC no longer fits
    path = spoil(tmp_path, "test.npz", bytes(spoiled))
    refused(tmp_path, str(path), "damaged npz", "CRC")


def test_npz_lacking_y_or_x_names_the_missing_array(tmp_path):
    make_packaged(tmp_path / "a", test={"x": images(TEST_COUNT), "labels": labels(TEST_COUNT)})
    refused(tmp_path / "a", "test.npz", "lacks the array(s) 'y'", "labels")
    make_packaged(tmp_path / "b", test_lossless_first1000={"y": labels(TEST_COUNT)})
    refused(tmp_path / "b", "test_lossless_first1000.npz", "'x'", split="test-lossless")


@pytest.mark.parametrize("member", ["x", "y"])
def test_object_arrays_are_refused_as_unsafe(tmp_path, member):
    arrays = {"x": images(TEST_COUNT), "y": labels(TEST_COUNT)}
    arrays[member] = np.array([object()] * TEST_COUNT, dtype=object)
    make_packaged(tmp_path, test=arrays)
    refused(tmp_path, "test.npz", "refused as unsafe", "unpickling")
    with pytest.raises(DataError, match="unsafe"):
        load_cifar10_labels(tmp_path, "test")


class RunsCommand:
    """Unpickling this would run a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_saved_as_npz_is_refused_as_unsafe(tmp_path):
    marker = tmp_path / "ran"
    path = spoil(tmp_path / "root", "test.npz", pickle.dumps(RunsCommand(marker)))
    refused(tmp_path / "root", str(path), "pickle", "refused as unsafe")
    assert not marker.exists()


def test_npy_file_saved_as_npz_is_named(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, images(TEST_COUNT))
    path = spoil(tmp_path, "test.npz", buffer.getvalue())
    refused(tmp_path, str(path), "single .npy array", "'x' and 'y'")


def test_npz_member_that_is_not_an_array_is_named(tmp_path):
    folder = make_packaged(tmp_path)
    with zipfile.ZipFile(folder / "test.npz", "w") as archive:
        buffer = io.BytesIO()
        np.save(buffer, images(TEST_COUNT))
        archive.writestr("x.npy", buffer.getvalue())
        archive.writestr("y.npy", b"not an array")
    refused(tmp_path, "test.npz", "y is a bytes")


def test_train_parts_with_different_pixel_dtypes_are_refused(tmp_path):
    floats = images(TRAIN_PARTS[1]) / np.float32(255)
    make_packaged(tmp_path, train_1={"x": floats, "y": labels(TRAIN_PARTS[1]),
                                     "first_index": TRAIN_PARTS[0]})
    refused(tmp_path, "train_0.npz: uint8", "train_1.npz: float32", split="trainval")


def test_train_part_with_a_bad_first_index_is_named(tmp_path):
    make_packaged(tmp_path, train_1={"x": images(TRAIN_PARTS[1]), "y": labels(TRAIN_PARTS[1]),
                                     "first_index": np.array([20, 21])})
    refused(tmp_path, "train_1.npz", "first_index must be one integer", split="trainval")


# ------------------------------------------------------------------------ official pickles


def test_batch_asking_for_os_system_is_refused_and_nothing_runs(tmp_path):
    folder = make_official(tmp_path / "root")
    marker = tmp_path / "ran"
    with open(folder / "data_batch_2", "wb") as handle:
        pickle.dump({b"labels": [0], b"data": RunsCommand(marker)}, handle, protocol=2)
    message = refused(tmp_path / "root", "data_batch_2", "refused as unsafe", ".system",
                      split="train")
    assert "download_cifar10" in message
    assert not marker.exists()


def test_batch_asking_for_another_numpy_module_is_refused(tmp_path):
    folder = make_official(tmp_path)
    # Only numpy's array modules may be imported; numpy.ma is not one of them.
    (folder / "test_batch").write_bytes(b"\x80\x02cnumpy.ma\ndtype\n.")
    refused(tmp_path, "test_batch", "refused as unsafe", "numpy.ma.dtype")


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q\x00(U\x04data", b"garbage bytes"],
                         ids=["empty", "truncated", "garbage"])
def test_damaged_batch_is_named(tmp_path, content):
    folder = make_official(tmp_path)
    (folder / "test_batch").write_bytes(content)
    message = refused(tmp_path, "test_batch", "not a readable CIFAR-10 batch")
    assert "unsafe" not in message


def test_batch_without_labels_or_with_bad_rows_is_named(tmp_path):
    folder = make_official(tmp_path / "a")
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, handle, protocol=2)
    refused(tmp_path / "a", "test_batch", "b'labels'")
    folder = make_official(tmp_path / "b")
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 1000), np.uint8), b"labels": [0, 1]}, handle)
    refused(tmp_path / "b", "test_batch", "(2, 1000)", "(N, 3072)")


def test_batch_label_out_of_range_names_the_batch(tmp_path):
    folder = make_official(tmp_path)
    y = labels(4).astype(int)
    y[2] = 10
    write_batch(folder / "data_batch_3", images(4), y)
    refused(tmp_path, "data_batch_3", "y[2] = 10", split="trainval")


def test_batch_pixels_above_255_are_not_wrapped(tmp_path):
    folder = make_official(tmp_path)
    rows = images(4).transpose(0, 3, 1, 2).reshape(4, 3072).astype(np.int32)
    rows[1, 0] = 300  # np.uint8 would have made it 44
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": rows, b"labels": [0, 1, 2, 3]}, handle, protocol=2)
    refused(tmp_path, "test_batch", "300", "image 1")


# ------------------------------------------------------------------------ empty splits, options


def test_zero_length_part_is_refused_before_training(tmp_path):
    empty = {"x": np.zeros((0, 32, 32, 3), np.uint8), "y": np.zeros(0, np.uint8)}
    make_packaged(tmp_path, test=empty)
    refused(tmp_path, "test.npz", "no images")


def test_val_size_taking_all_training_images_is_refused_with_the_sizes(tmp_path):
    make_packaged(tmp_path)
    total = sum(TRAIN_PARTS)
    for val_size in (total, total + 5):
        with pytest.raises(ConfigError) as caught:
            CIFAR10(tmp_path, split="train", val_size=val_size)
        message = str(caught.value)
        assert f"val_size={val_size}" in message and f"{total} trainval images" in message
        assert f"[0, {total})" in message


@pytest.mark.parametrize("val_size", [-1, True, 2.5])
def test_val_size_must_be_a_whole_number(tmp_path, val_size):
    make_packaged(tmp_path)
    with pytest.raises(ConfigError, match="val_size"):
        CIFAR10(tmp_path, split="val", val_size=val_size)


def test_val_split_with_val_size_zero_is_a_config_error(tmp_path):
    make_packaged(tmp_path)
    with pytest.raises(ConfigError, match="empty"):
        CIFAR10(tmp_path, split="val", val_size=0)


@pytest.mark.parametrize("limit", [0, -3, True, False, 0.5, 10.0, "10"])
def test_bad_limit_is_a_config_error_before_any_file_is_read(tmp_path, limit):
    # No data at all: the option is reported first, not "CIFAR-10 not found".
    with pytest.raises(ConfigError, match="limit must be a whole number"):
        CIFAR10(tmp_path / "nowhere", split="test", limit=limit)


def test_numpy_integer_limit_is_accepted(tmp_path):
    make_packaged(tmp_path)
    assert len(open_test(tmp_path, limit=np.int64(10))) == 10
    assert data.check_limit(None) is None and data.check_limit(np.int32(3)) == 3


@pytest.mark.parametrize("split", ["validation", "TEST", None, 3])
def test_unknown_split_is_a_config_error_listing_the_splits(tmp_path, split):
    with pytest.raises(ConfigError) as caught:
        CIFAR10(tmp_path / "nowhere", split=split)
    assert all(name in str(caught.value) for name in SPLITS)
    with pytest.raises(ConfigError):
        load_cifar10_arrays(tmp_path / "nowhere", split)


@pytest.mark.parametrize("normalize", ["imagenet1k", ((0.5,) * 3, (0.0,) * 3), 5, ("a", "b")])
def test_bad_normalize_is_a_config_error(tmp_path, normalize):
    with pytest.raises(ConfigError, match="normalize"):
        CIFAR10(tmp_path / "nowhere", split="test", normalize=normalize)


# ------------------------------------------------------------------------ image folders


def test_image_folder_without_classes_or_images_names_the_folder(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "loose.png").write_bytes(b"")
    with pytest.raises(DataError) as caught:
        data.image_folder(tmp_path, "val")
    assert str(tmp_path / "val") in str(caught.value) and "class folders" in str(caught.value)

    (tmp_path / "val" / "cat").mkdir()
    (tmp_path / "val" / "dog").mkdir()
    (tmp_path / "val" / "dog" / "notes.txt").write_text("no image")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "cat" / "a.png")
    with pytest.raises(DataError) as caught:
        data.image_folder(tmp_path, "val")
    message = str(caught.value)
    assert str(tmp_path / "val") in message and "dog" in message and "cat" not in message
    assert ".png" in message

    (tmp_path / "val" / "dog" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "dog" / "sub" / "b.jpg")
    assert len(data.image_folder(tmp_path, "val", image_size=8)) == 2  # nested images count
    with pytest.raises(ConfigError, match="train, val"):
        data.image_folder(tmp_path, "test")


# ------------------------------------------------------------------------ downloads


def test_download_of_a_foreign_archive_is_a_data_error(tmp_path):
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("README")
        member.size = 2
        tar.addfile(member, io.BytesIO(b"hi"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="official CIFAR-10 python archive"):
        data.download_cifar10(tmp_path / "root", url=archive.as_uri(), md5=md5)
    with pytest.raises(data.DownloadError, match="PRUNEKIT_DATA"):
        data.download_cifar10(tmp_path / "root", url=(tmp_path / "absent.tgz").as_uri())


# ------------------------------------------------------------------------ one line at the CLI


def test_cli_eval_on_a_damaged_file_is_one_line(tmp_path, capsys):
    path = spoil(tmp_path, "test.npz", b"garbage")
    code = main(["eval", "--model", "cifar_resnet20", "--data", str(tmp_path),
                 "--latency-batches", "", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "not an npz" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_data_errors_belong_to_the_family():
    assert issubclass(DataError, PrunekitError) and issubclass(DataError, ValueError)
    assert issubclass(data.DownloadError, PrunekitError)
    assert issubclass(data.DownloadError, ConnectionError)
