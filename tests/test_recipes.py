"""Every shipped recipe loads and validates; broken recipes fail with the file and the key."""
import pytest
import yaml

from prunekit.recipes import RECIPE_DIR, RecipeError, load_recipe, validate_recipe

SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def test_recipes_are_shipped():
    assert {"chip_resnet56_47", "fpgm_resnet56_40_soft", "sfp_resnet56_40",
            "lfpc_resnet56"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads(name):
    recipe = load_recipe(name)
    assert recipe["name"] == name and recipe["model"]["name"].startswith("cifar_")
    assert recipe.get("paper")  # every recipe says which paper setting it fixes


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
])
def test_bad_recipes_say_what_is_wrong(change, message):
    recipe = {"model": {"name": "cifar_resnet56"}, **change}
    with pytest.raises(RecipeError, match=message):
        validate_recipe(recipe, "r.yaml")


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
