"""Recipes: YAML files that fix a paper setting (model, criterion, plan, fine-tuning schedule).

A recipe is a mapping with these sections (all but ``model`` optional)::

    name: chip_resnet56_47
    paper: CHIP (Sui et al., NeurIPS 2021), CIFAR-10 ResNet-56, 47% FLOPs
    model: {name: cifar_resnet56, weights: pretrained, kwargs: {shortcut: A}}
    # or {source: torchvision, name: resnet50, weights: IMAGENET1K_V1, kwargs: {}}
    dataset: auto                                       # or cifar10, imagefolder
    criterion: {name: chip, options: {}}
    calibration: {split: train, batches: 5, batch_size: 128, augment: true}
    plan: {chip_sparsity: "[0.]+[0.15]*2+[0.4]*27"}   # any prunekit.plan.PlanTarget key
    method: {name: sfp, schedule: constant}             # a registered method and its Config
    finetune: {epochs: 300, lr: 0.01, weight_decay: 0.005, schedule: cosine, ...}
    expected: {top1: 94.16, macs_thop: 65.94e6}         # the paper's numbers, for reports

Command-line flags override recipe values (``--finetune-epochs 2`` for a smoke run).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import PrunekitError
from .methods import get_method
from .models.sources import MODEL_SOURCES
from .plan import PlanTarget
from .train import TrainConfig

SECTIONS = ("name", "paper", "model", "dataset", "criterion", "calibration", "plan", "finetune",
            "expected", "notes", "method")
# The kinds of data a recipe may name; prunekit.pipeline.config.DATASET_KINDS (a layer above,
# so not importable here) must list the same (tests/test_recipes.py checks it).
DATASETS = ("auto", "cifar10", "imagefolder")
RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"


class RecipeError(PrunekitError, ValueError):
    """A recipe file that cannot be used; the message names the file and the problem."""


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    for candidate in (RECIPE_DIR / name_or_path, RECIPE_DIR / f"{name_or_path}.yaml"):
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.exists() else []
    raise RecipeError(f"recipe '{name_or_path}' not found (not a file, not in {RECIPE_DIR}); "
                      f"known recipes: {', '.join(known) or 'none'}")


def load_recipe(name_or_path: str) -> dict:
    path = find_recipe(name_or_path)
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from exc
    validate_recipe(recipe, str(path))
    recipe.setdefault("name", path.stem)
    recipe["source"] = str(path)
    return recipe


def validate_recipe(recipe, where: str = "recipe") -> None:
    """Check a recipe through the classes that will use it: the method's Config, PlanTarget
    and TrainConfig; the message names the file and the key."""
    if not isinstance(recipe, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping, got {type(recipe).__name__}")
    unknown = set(recipe) - set(SECTIONS) - {"source"}
    if unknown:
        raise RecipeError(f"{where}: unknown sections {sorted(unknown)}; valid: {SECTIONS}")
    model = recipe.get("model")
    if not isinstance(model, dict) or "name" not in model:
        raise RecipeError(f"{where}: 'model' must be a mapping with a 'name'")
    if model.get("source", "prunekit") not in MODEL_SOURCES:
        raise RecipeError(f"{where}: model.source {model['source']!r} is unknown; valid: "
                          f"{', '.join(MODEL_SOURCES)} (default prunekit)")
    if recipe.get("dataset", "auto") not in DATASETS:
        raise RecipeError(f"{where}: dataset {recipe['dataset']!r} is unknown; valid: "
                          f"{', '.join(DATASETS)} (auto tells CIFAR-10 from an image folder)")
    plan = recipe.get("plan") or {}
    try:
        PlanTarget.from_dict(plan)
    except ValueError as exc:
        raise RecipeError(f"{where}: plan: {exc}") from None
    _validate_method(recipe.get("method") or {}, where)
    _validate_train(recipe.get("finetune") or {}, f"{where}: finetune")


def _validate_method(method, where: str) -> None:
    if not isinstance(method, dict):
        raise RecipeError(f"{where}: 'method' must be a mapping such as {{name: sfp}}")
    if not method:
        return
    try:
        cls = get_method(method.get("name"))
        cls.Config.from_dict({k: v for k, v in method.items() if k != "name"},
                             f"method {cls.name}")
    except ValueError as exc:
        raise RecipeError(f"{where}: {exc} (omit 'method' for one-shot pruning)") from None


def _validate_train(section, where: str) -> None:
    from dataclasses import fields

    known = {f.name for f in fields(TrainConfig)}
    bad = set(section) - known
    if bad:
        raise RecipeError(f"{where}: unknown keys {sorted(bad)}; valid: {sorted(known)}")
