"""Image folders as the job's data: splits (train minus a fixed class-balanced val, test =
val/), class checks, preprocessing from the model, the PNG exactness check against the CIFAR
arrays, and the CLI end to end on a tiny folder (issue 15)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import prunekit
from conftest import SHARED, needs_shared
from prunekit import data
from prunekit.cli import main
from prunekit.errors import ConfigError, DataError

CLASSES = ["cat", "dog", "emu"]


def _folder(root, per_class=(8, 4), size=40, classes=CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        images = rng.integers(0, 256, (len(classes) * n, size, size, 3), dtype=np.uint8)
        data.export_image_folder(images, np.repeat(np.arange(len(classes)), n), root, split,
                                 classes)
    data.clear_folder_cache()
    return root


def test_splits_hold_out_a_fixed_class_balanced_val_part(tmp_path):
    root = _folder(tmp_path / "f", per_class=(10, 4))
    pre = data.Preprocessing.imagenet(32)
    train = data.folder_split(root, "train", pre)
    val = data.folder_split(root, "val", pre)
    trainval = data.folder_split(root, "trainval", pre)
    test = data.folder_split(root, "test", pre)
    assert len(trainval) == 30 and len(val) == 3 and len(train) == 27 and len(test) == 12
    assert sorted(np.bincount(val.labels).tolist()) == [1, 1, 1]
    assert not {p for p, _ in val.samples} & {p for p, _ in train.samples}
    assert all("/val/" in p for p, _ in test.samples)
    again = data.folder_split(root, "val", pre)
    assert again.samples == val.samples  # fixed, not drawn anew
    image, label = test[0]
    assert image.shape == (3, 32, 32) and label == 0
    assert "image folder test" in test.description and "12 images" in test.description
    limited = data.folder_split(root, "test", pre, limit=6)
    assert np.bincount(limited.labels).tolist() == [2, 2, 2]


def test_train_and_val_folders_must_hold_the_same_classes(tmp_path):
    root = _folder(tmp_path / "f")
    (root / "val" / "emu").rename(root / "val" / "yak")
    data.clear_folder_cache()
    with pytest.raises(DataError, match=r"only in train/: \['emu'\]; only in val/: \['yak'\]"):
        data.folder_split(root, "train", data.Preprocessing.imagenet(32))


def test_empty_or_classless_folders_are_named(tmp_path):
    (tmp_path / "a" / "train").mkdir(parents=True)
    with pytest.raises(prunekit.data.DatasetNotFoundError, match="not an image folder"):
        prunekit.pipeline.resolve_dataset("imagefolder", tmp_path / "a")
    root = _folder(tmp_path / "b")
    (root / "train" / "fox").mkdir()
    data.clear_folder_cache()
    with pytest.raises(DataError, match="fox hold no images"):
        data.folder_classes(root)


@pytest.mark.parametrize("val_size", [-1, 24, 2.5, True])
def test_a_val_size_that_leaves_no_training_images_is_refused(val_size, tmp_path):
    root = _folder(tmp_path / "f")
    with pytest.raises(ConfigError, match="val_size must be a whole number in 0..23"):
        data.folder_split(root, "train", data.Preprocessing.imagenet(32), val_size=val_size)


def test_an_unreadable_image_is_named(tmp_path):
    root = _folder(tmp_path / "f")
    bad = next((root / "val" / "cat").iterdir())
    bad.write_bytes(b"not a png")
    test = data.folder_split(root, "test", data.Preprocessing.imagenet(32))
    index = [p for p, _ in test.samples].index(str(bad))
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        test[index]


def test_preprocessing_sets_the_transforms_and_the_input_size():
    pre = data.Preprocessing.imagenet(224)
    assert pre.resize_size == 256 and pre.input_shape() == (1, 3, 224, 224)
    cifar = data.Preprocessing.cifar()
    assert cifar.input_size == 32 and cifar.crop_pct == 1.0
    assert cifar.with_overrides(input_size=40).input_size == 40
    with pytest.raises(ConfigError, match="std needs 3 finite positive numbers"):
        pre.with_overrides(std=(1, 0, 1))
    with pytest.raises(ConfigError, match="input size must be a whole number"):
        data.Preprocessing(input_size=0)
    with pytest.raises(ConfigError, match="crop_pct must be in"):
        data.Preprocessing(crop_pct=1.5)


@pytest.mark.shared_data
@needs_shared
def test_png_copies_of_the_lossless_test_images_evaluate_exactly_like_the_arrays(tmp_path,
                                                                                 capsys):
    images, labels = data.load_cifar10_arrays(SHARED, "test-lossless")
    tree = tmp_path / "cifar_png"
    data.export_image_folder(images, labels, tree, "val", data.CIFAR10_CLASSES)
    few = np.sort(data.stratified_order(labels, 0)[:20])  # train/ only needs every class
    data.export_image_folder(images[few], labels[few], tree, "train", data.CIFAR10_CLASSES)
    data.clear_folder_cache()
    common = ["eval", "--model", "cifar_resnet20", "--weights", "pretrained", "--json",
              "--latency-batches", ""]
    assert main([*common, "--data", str(tree)]) == 0
    folder = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*common, "--data", str(SHARED), "--split", "test-lossless"]) == 0
    arrays = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert folder["images"] == arrays["images"] == 1000
    assert folder["top1"] == arrays["top1"] == pytest.approx(91.50)
    assert folder["loss"] == pytest.approx(arrays["loss"], abs=1e-6)
    assert folder["input_size"] == 32 and "image folder test" in folder["split_description"]


def _prune_cli(tmp_path, root, model, criterion, *extra):
    out = tmp_path / f"run-{criterion}"
    code = main(["prune", "--model", model, "--data", str(root), "--input-size", "32",
                 "--criterion", criterion, "--macs-reduction", "0.3",
                 "--calibration-batches", "1", "--calibration-batch-size", "4",
                 "--finetune-epochs", "1", "--finetune-batch-size", "8",
                 "--finetune-max-steps", "1", "--latency-batches", "", *extra,
                 "--out", str(out)])
    assert code == 0
    return out


_USER_MODULE = """
from torch import nn


def small(num_classes=10, width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
                         nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(2 * width, num_classes))
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "prunekit_test_nets.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return "prunekit_test_nets:small"


@pytest.mark.parametrize("model, criterion", [
    ("torchvision:resnet18", "l1"), ("torchvision:resnet18", "chip"),
    ("timm:resnet10t", "l1"), ("timm:resnet10t", "chip"), ("user", "chip"),
])
def test_the_cli_prunes_finetunes_evaluates_and_exports_any_model_on_an_image_folder(
        model, criterion, tmp_path, capsys, request):
    if model.startswith("timm:"):
        pytest.importorskip("timm")
    trust = []
    if model == "user":
        model = request.getfixturevalue("user_module")
        trust = ["--trust-module", "prunekit_test_nets"]
    root = _folder(tmp_path / "f")
    out = _prune_cli(tmp_path, root, model, criterion, "--model-kwargs", '{"num_classes": 3}')
    report = json.loads((out / "report.json").read_text())
    source, _, name = model.partition(":") if not model.startswith("prunekit_test") else (
        "module", "", model)
    assert report["model"] == {"source": source, "name": name, "weights": None,
                               "kwargs": {"num_classes": 3}}
    assert report["data"]["dataset"] == "imagefolder" and report["data"]["classes"] == 3
    assert report["data"]["preprocessing"]["input_size"] == 32
    assert list(report["finetuned"]["accuracy"]) == ["test"]
    assert "12 images" in report["finetuned"]["accuracy"]["test"]["description"]
    reduction = 1 - report["pruned"]["macs"] / report["before"]["macs"]
    if trust:  # 8/16-channel layers: coarse; a reduction above 31% must say so
        assert 0.3 <= reduction <= 0.4
        assert (reduction <= 0.31) != ("cannot be reached within 0.010" in
                                       capsys.readouterr().err)
    else:
        assert 0.3 <= reduction <= 0.31
    saved = out / "model.safetensors"
    # The saved model carries its preprocessing: no --input-size needed from here on.
    assert main(["finetune", str(out), "--data", str(root), "--epochs", "1", "--max-steps", "1",
                 "--batch-size", "8", "--latency-batches", "", *trust]) == 0
    assert main(["eval", "--model", str(saved), "--data", str(root), "--json",
                 "--latency-batches", "", *trust]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["images"] == 12 and evaluated["macs"] == report["finetuned"]["macs"]
    assert evaluated["input_size"] == 32 and evaluated["source"] == "saved"
    if criterion == "l1" or trust:
        pytest.importorskip("onnxruntime")
        assert main(["export", str(out), "--onnx", *trust]) == 0
        assert saved.with_suffix(".onnx").stat().st_size > 0


def test_a_saved_model_of_user_code_loads_only_when_trusted(tmp_path, capsys, user_module):
    model = prunekit.models.sources.build_model({"source": "module", "name": user_module,
                                                 "kwargs": {"num_classes": 3}})
    path = tmp_path / "m.safetensors"
    prunekit.io.save(model, path)
    root = _folder(tmp_path / "f")
    code = main(["eval", "--model", str(path), "--data", str(root), "--latency-batches", ""])
    err = capsys.readouterr().err
    assert code == 2 and "not trusted" in err and "--trust-module prunekit_test_nets" in err


def test_a_split_the_data_lacks_is_refused_before_any_work(tmp_path, capsys):
    root = _folder(tmp_path / "f")
    code = main(["prune", "--model", "torchvision:resnet18", "--data", str(root),
                 "--ratio", "0.3", "--eval-splits", "test-lossless", "--out",
                 str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown evaluation split(s) ['test-lossless']" in err
    assert not (tmp_path / "r").exists()


def test_a_model_that_rejects_the_input_size_is_refused(tmp_path, capsys):
    root = _folder(tmp_path / "f")
    # VGG's fixed 2x2 average pool needs 32 px after its five 2x poolings.
    code = main(["eval", "--model", "cifar_vgg16_bn", "--model-kwargs", '{"num_classes": 3}',
                 "--data", str(root), "--input-size", "16", "--latency-batches", ""])
    err = capsys.readouterr().err
    assert code == 2 and "the model rejects an input of shape (1, 3, 16, 16)" in err
    assert "give the --input-size it needs" in err


def test_cifar_data_refuses_another_input_size(capsys):
    with pytest.raises(ConfigError, match="CIFAR-10 images are 32 px"):
        prunekit.pipeline.CifarRunData(SHARED, preprocessing=data.Preprocessing.imagenet(224))
