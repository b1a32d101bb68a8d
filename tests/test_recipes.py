"""Every shipped recipe loads and validates; broken recipes fail with the file and the key."""
import pytest
import torch
import yaml

import prunekit
from prunekit.recipes import DATASETS, RECIPE_DIR, RecipeError, load_recipe, validate_recipe

SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
# The ImageNet ResNet-50 recipes (torchvision's resnet50 on an image folder): they cannot run on
# CIFAR-10; tests/test_imagenet_recipes.py runs them end to end on a tiny image folder.
RESNET50 = [name for name in SHIPPED if "_resnet50" in name]
# CHIP's ResNet-50 strings -> (stem, stage-1..3 streams, mid width of stage 1..4), the
# architectures pinned in tests/test_paper_ratios.py
CHIP_R50_WIDTHS = {"chip_resnet50_45": (64, 230, 460, 921, 41, 83, 166, 332),
                   "chip_resnet50_49": (64, 225, 450, 901, 39, 79, 158, 317),
                   "chip_resnet50_63": (64, 192, 384, 768, 32, 64, 128, 256),
                   "chip_resnet50_77": (64, 128, 256, 512, 25, 51, 102, 204)}


def test_recipes_are_shipped():
    assert {"chip_resnet56_47", "fpgm_resnet56_40_soft", "sfp_resnet56_40",
            "lfpc_resnet56"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads(name):
    recipe = load_recipe(name)
    assert recipe["name"] == name and recipe.get("paper")  # says which paper setting it fixes
    if name in RESNET50:
        assert recipe["model"]["source"] == "torchvision" and recipe["dataset"] == "imagefolder"
        assert recipe["model"]["name"] == "resnet50" and "data" not in recipe
    else:
        assert recipe["model"]["name"].startswith("cifar_")
    # YAML 1.1 reads 65.94e6 as a string: expected numbers must be numbers.
    assert all(isinstance(v, (int, float)) for v in recipe.get("expected", {}).values()), name


def test_resnet50_recipes_are_shipped():
    assert set(CHIP_R50_WIDTHS) | {"fpgm_resnet50_30_soft", "fpgm_resnet50_40_soft",
                                   "sfp_resnet50_30", "hrank_resnet50", "lfpc_resnet50",
                                   "swp_resnet50"} <= set(RESNET50)
    for name in RESNET50:  # reconstructed choices are said so; numbers cite their table
        recipe = load_recipe(name)
        assert "reconstructed" in (recipe["paper"] + recipe["notes"]).lower() \
            or "table" in recipe["paper"].lower() or "readme" in recipe["paper"].lower()
        assert all(isinstance(v, float) for v in recipe.get("expected", {}).values()), name


@pytest.mark.parametrize("name", sorted(CHIP_R50_WIDTHS))
def test_chip_resnet50_recipe_resolves_to_the_pinned_architecture(name):
    recipe = load_recipe(name)
    assert recipe["finetune"] == {"epochs": 180, "lr": 0.01, "momentum": 0.99,
                                  "weight_decay": 0.0001, "schedule": "cosine",
                                  "warmup_epochs": 5, "batch_size": 256, "label_smoothing": 0.1}
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, recipe["model"]["name"])(weights=None).eval()
    graph = prunekit.build_graph(model, torch.randn(1, 3, 64, 64))
    target = prunekit.PlanTarget.from_dict(recipe["plan"])
    counts = prunekit.plan.resolve_counts(graph, model, target)
    mids = [counts[f"layer{s}.0.{c}"] for s in (1, 2, 3, 4) for c in ("conv1", "conv2")]
    got = (counts.get("conv1", 64), *(counts[f"layer{s}.0.conv3"] for s in (1, 2, 3)),
           *mids[::2])
    assert got == CHIP_R50_WIDTHS[name] and mids[::2] == mids[1::2]
    assert "layer4.0.conv3" not in counts  # stage 4's stream is never pruned
    assert len(counts) == 3 + 32  # three streams and every bottleneck's conv1 and conv2


def test_recipe_datasets_match_the_run_config():
    from prunekit.pipeline.config import DATASET_KINDS
    assert DATASETS == DATASET_KINDS


def test_lfpc_recipe_targets_the_papers_macs():
    recipe = load_recipe("lfpc_resnet56")
    assert recipe["method"]["name"] == "lfpc" and recipe["plan"]["macs_reduction"] == 0.529
    assert recipe["method"]["criteria"] == ["l1", "l2", "fpgm"]


@pytest.mark.parametrize("change, message", [
    ({"method": {"name": "magic"}}, "unknown method 'magic'"),
    ({"method": {"name": "lfpc", "sampler": {"temperature": 1}}}, "unknown sampler keys"),
    ({"method": {"name": "lfpc", "search": {"epoch": 1}}}, "method.search: unknown keys"),
    ({"finetune": {"epoch": 3}}, "finetune: unknown keys"),
    ({"plan": {"ratio": 0.3, "macs_reduction": 0.5}}, "several targets"),
    ({"plan": {"rate": 0.3}}, "unknown plan keys"),
    ({"colour": "red"}, "unknown sections"),
    ({"dataset": "imagenet"}, "dataset 'imagenet' is unknown; valid: auto, cifar10, imagefolder"),
    ({"model": {"name": "resnet50", "source": "hub"}}, "model.source 'hub' is unknown"),
])
def test_bad_recipes_say_what_is_wrong(change, message):
    recipe = {"model": {"name": "cifar_resnet56"}, **change}
    with pytest.raises(RecipeError, match=message):
        validate_recipe(recipe, "r.yaml")


def test_model_source_and_dataset_keys_are_accepted():
    validate_recipe({"model": {"source": "torchvision", "name": "resnet50",
                               "weights": "IMAGENET1K_V1", "kwargs": {}},
                     "dataset": "imagefolder"}, "r.yaml")


def test_unknown_recipe_lists_known_ones(tmp_path):
    with pytest.raises(RecipeError, match="known recipes: .*lfpc_resnet56"):
        load_recipe("no_such_recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(bad))
    bad.write_text(yaml.safe_dump({"model": "cifar_resnet56"}))
    with pytest.raises(RecipeError, match="'model' must be a mapping"):
        load_recipe(str(bad))


@pytest.mark.parametrize("name", SHIPPED)
def test_expected_numbers_cite_their_source(name):
    """An ``expected`` block is the paper's numbers: the comment right above it says where each
    comes from (paper table, README, abstract, a later paper quoting it)."""
    lines = (RECIPE_DIR / f"{name}.yaml").read_text().splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("expected:")]
    if not at:
        return
    comment = []
    for line in reversed(lines[:at[0]]):
        if not line.startswith("#"):
            break
        comment.append(line)
    text = " ".join(comment).lower()
    assert comment, f"{name}: no source comment above expected"
    assert any(word in text for word in ("table", "readme", "abstract", "quoted")), \
        f"{name}: the comment above expected names no source: {text!r}"
