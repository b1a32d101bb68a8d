"""Recipes: YAML files that fix a paper setting (model, criterion, plan, fine-tuning schedule).

A recipe is a mapping with these sections (all but ``model`` optional)::

    name: chip_resnet56_47
    paper: CHIP (Sui et al., NeurIPS 2021), CIFAR-10 ResNet-56, 47% FLOPs
    model: {name: cifar_resnet56, weights: pretrained, kwargs: {shortcut: A}}
    criterion: {name: chip, options: {}}
    calibration: {split: train, batches: 5, batch_size: 128, augment: true}
    plan: {chip_sparsity: "[0.]+[0.15]*2+[0.4]*27"}   # or ratio | ratios | macs_reduction
                                                       #    | conv_rates | global_ratio
    finetune: {epochs: 300, lr: 0.01, weight_decay: 0.005, schedule: cosine, ...}
    expected: {top1: 94.16, macs_thop: 65.94e6}         # the paper's numbers, for reports

Command-line flags override recipe values (``--finetune-epochs 2`` for a smoke run).
"""
from __future__ import annotations

from pathlib import Path

import yaml

SECTIONS = ("name", "paper", "model", "criterion", "calibration", "plan", "finetune",
            "expected", "notes", "method")
PLAN_KEYS = ("ratio", "ratios", "macs_reduction", "chip_sparsity", "conv_rates",
             "global_ratio", "round_to", "ignore", "normalize", "max_ratio")
RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"


class RecipeError(ValueError):
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
    if not isinstance(recipe, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping, got {type(recipe).__name__}")
    unknown = set(recipe) - set(SECTIONS) - {"source"}
    if unknown:
        raise RecipeError(f"{where}: unknown sections {sorted(unknown)}; valid: {SECTIONS}")
    model = recipe.get("model")
    if not isinstance(model, dict) or "name" not in model:
        raise RecipeError(f"{where}: 'model' must be a mapping with a 'name'")
    plan = recipe.get("plan") or {}
    bad = set(plan) - set(PLAN_KEYS)
    if bad:
        raise RecipeError(f"{where}: unknown plan keys {sorted(bad)}; valid: {PLAN_KEYS}")
    targets = [k for k in ("ratio", "ratios", "macs_reduction", "chip_sparsity", "conv_rates",
                           "global_ratio") if k in plan]
    if len(targets) > 1 and set(targets) != {"ratio", "ratios"}:
        raise RecipeError(f"{where}: the plan has several targets {targets}; keep one")
    _validate_method(recipe.get("method") or {}, where)
    _validate_train(recipe.get("finetune") or {}, f"{where}: finetune")


METHODS = ("sfp", "asfp", "fpgm-soft", "lfpc", "swp")
METHOD_KEYS = {"name", "schedule", "mask_grads", "zero_norm_weight", "reset_momentum",
               "criteria", "train_weights", "search", "sampler", "sr", "threshold", "executor",
               "skeleton_lr_scale", "skeleton_weight_decay", "penalty_epochs",
               "bn_recalibration_batches"}
SAMPLER_KEYS = {"tau_max", "tau_min", "hard", "alpha_lr", "alpha_betas", "alpha_weight_decay",
                "init_std", "batch_size", "mask_every"}


def _validate_method(method, where: str) -> None:
    if not isinstance(method, dict):
        raise RecipeError(f"{where}: 'method' must be a mapping such as {{name: sfp}}")
    if not method:
        return
    if method.get("name") not in METHODS:
        raise RecipeError(f"{where}: unknown method {method.get('name')!r}; valid: {METHODS} "
                          "(omit 'method' for one-shot pruning)")
    bad = set(method) - METHOD_KEYS
    if bad:
        raise RecipeError(f"{where}: unknown method keys {sorted(bad)}; valid: {sorted(METHOD_KEYS)}")
    bad = set(method.get("sampler") or {}) - SAMPLER_KEYS
    if bad:
        raise RecipeError(f"{where}: unknown sampler keys {sorted(bad)}; valid: {sorted(SAMPLER_KEYS)}")
    _validate_train(method.get("search") or {}, f"{where}: method.search")


def _validate_train(section, where: str) -> None:
    from dataclasses import fields

    from .train import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    bad = set(section) - known
    if bad:
        raise RecipeError(f"{where}: unknown keys {sorted(bad)}; valid: {sorted(known)}")
