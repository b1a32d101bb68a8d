"""The seeds' ImageNet ResNet-50 recipes run end to end through the CLI on a tiny generated
image folder (a random-init resnet50 with a 3-class head at 64 px; every other setting is the
recipe's, with the epochs cut to one step). Their paper numbers are pinned elsewhere
(tests/test_paper_ratios.py, tests/test_recipes.py); this shows the recipes are runnable."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prunekit import data
from prunekit.cli import main
from prunekit.recipes import load_recipe

RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")
                 if "resnet50" in p.stem)
SMOKE = ["--model", "torchvision:resnet50", "--model-kwargs", '{"num_classes": 3}',
         "--input-size", "64", "--finetune-epochs", "1", "--finetune-max-steps", "1",
         "--finetune-batch-size", "4", "--finetune-warmup-epochs", "0",
         "--calibration-batches", "1", "--calibration-batch-size", "4", "--latency-batches", ""]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        images = rng.integers(0, 256, (3 * n, 72, 72, 3), dtype=np.uint8)
        data.export_image_folder(images, np.repeat(np.arange(3), n), root, split,
                                 ["a", "b", "c"])
    data.clear_folder_cache()
    return root


def test_every_seed_has_a_resnet50_recipe():
    for method in ("chip", "fpgm", "sfp", "hrank", "lfpc", "swp"):
        assert any(name.startswith(method + "_") for name in RECIPES), method
    assert sum(name.startswith("chip_") for name in RECIPES) == 4


@pytest.mark.parametrize("recipe", RECIPES)
def test_resnet50_recipe_runs_end_to_end_on_a_tiny_folder(recipe, tiny_folder, tmp_path):
    options = load_recipe(recipe)
    assert options["model"]["source"] == "torchvision" and options["model"]["name"] == "resnet50"
    assert options.get("dataset") == "imagefolder"
    out = tmp_path / recipe
    extra = []
    if options.get("finetune", {}).get("milestones"):
        extra = ["--finetune-milestones", "1"]
    if options.get("method", {}).get("name") == "swp":
        # At the paper's alpha one step zeroes no stripe; a threshold near 1 removes some, so
        # the stripe removal itself runs.
        extra += ["--threshold", "0.9999"]
    assert main(["prune", "--recipe", recipe, "--data", str(tiny_folder), *SMOKE, *extra,
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == recipe and report["data"]["dataset"] == "imagefolder"
    assert report["model"]["source"] == "torchvision"
    final = report.get("finetuned", report["pruned"])
    assert final["macs"] < report["before"]["macs"]
    assert (out / "model.safetensors").exists()
